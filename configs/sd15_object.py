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

Use `configs/sd15_object.py:official` for what the authors' scripts/run_obj_gal.sh passes (their
base model is CompVis SD v1-4; the paper says SD 1.5) and their DPM-Solver++ loop sampler and anchor
set (`common.follow_authors_scripts`). Add `--config.model.compute_dtype=float32
--config.data.random_crop=true` for their float32 training on random crops.
"""

from configs import common


def get_config(variant: str = ""):
    """Returns the SD 1.5 object config; variant 'official' follows the authors' scripts."""
    config = common.get_config()  # the paper's values; only what differs is set here
    config.data.kind = "object"
    # The authors train in float32 on random crops; bf16 compute is faster on GPU/TPU, and
    # center crops let a round encode its latents once (configs/common.py, model/data fields).
    config.model.compute_dtype = "bfloat16"
    # The compute casts the UNet to bf16 anyway: a bf16 round UNet halves the disk (1.7 GB a round).
    config.train.save_dtype = "bfloat16"
    if variant == "official":
        common.follow_authors_scripts(config, steps=800, batch_size=1, with_prior=True)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of sd15_object (known: 'official')")
    return config
