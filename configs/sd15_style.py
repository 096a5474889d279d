r"""GAL on a style concept with Stable Diffusion 1.5: the paper's hyperparameters (GAL_SPEC.md).

500 DreamBooth steps at batch 2, no prior preservation, lr 5e-6; 10 images per anchor prompt,
50 DDPM steps, guidance 7.5; k=3, lambda=0.005, balance, 4 rounds, seed 0. Launch:

  gal-jax run --config=configs/sd15_style.py --workdir=/tmp/gal/watercolor \
      --config.model.sd_path=/models/stable-diffusion-v1-5 \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/reference_images/style/watercolor
"""

from configs import common


def get_config(variant: str = ""):
    """Returns the SD 1.5 style config; variant 'official' follows the authors' scripts."""
    config = common.get_config()  # the paper's values; only what differs is set here
    config.data.kind = "style"
    config.train.steps = 500
    config.train.batch_size = 2
    config.train.with_prior = False
    config.model.compute_dtype = "bfloat16"
    # The compute casts the UNet to bf16 anyway: a bf16 round UNet halves the disk (1.7 GB a round).
    config.train.save_dtype = "bfloat16"
    if variant == "official":
        config.sample.sampler = "dpmsolver++"
        config.gal.anchors = "official"
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of sd15_style (known: 'official')")
    return config
