r"""GAL on an object concept with Stable Diffusion 1.5: the paper's hyperparameters (GAL_SPEC.md).

800 DreamBooth steps at batch 1 with prior preservation (200 class images, prior weight 1.0),
lr 5e-6; 10 images per anchor prompt, 50 DDPM steps, guidance 7.5; k=3, lambda=0.005, balance,
4 rounds, seed 0. Launch (one GPU or a TPU host; paths are local copies, nothing is downloaded):

  gal-jax run --config=configs/sd15_object.py --workdir=/tmp/gal/cat \
      --config.model.sd_path=/models/stable-diffusion-v1-5 \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/reference_images/object/cat \
      --config.data.class_dir=/data/reg_data/cat \
      --config.data.class_prompt="a cat" \
      --config.data.placeholder="<cute-cat>" --config.data.class_word=cat

Use `configs/sd15_object.py:official` for the authors' code's choices (DPM-Solver++ sampler,
their anchor set, lambda 0.0035).
"""

from configs import common


def get_config(variant: str = ""):
    """Returns the SD 1.5 object config; variant 'official' follows the authors' scripts."""
    config = common.get_config()  # the paper's values; only what differs is set here
    config.data.kind = "object"
    config.model.compute_dtype = "bfloat16"
    # The compute casts the UNet to bf16 anyway: a bf16 round UNet halves the disk (1.7 GB a round).
    config.train.save_dtype = "bfloat16"
    if variant == "official":
        config.sample.sampler = "dpmsolver++"
        config.gal.anchors = "official"
        config.gal.openness_lambda = 0.0035
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of sd15_object (known: 'official')")
    return config
