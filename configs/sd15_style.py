r"""GAL on a style concept with Stable Diffusion 1.5: the paper's hyperparameters (GAL_SPEC.md).

500 DreamBooth steps at batch 2, no prior preservation, lr 5e-6; 10 images per anchor prompt,
50 DDPM steps, guidance 7.5; k=3, lambda=0.005, balance, 4 rounds, seed 0. Launch:

  gal-jax run --config=configs/sd15_style.py --workdir=/tmp/gal/watercolor \
      --config.model.sd_path=/models/stable-diffusion-v1-5 \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/reference_images/style/watercolor

Use `configs/sd15_style.py:official` for what the authors' scripts/run_style_gal.sh passes and
their DPM-Solver++ loop sampler and anchor set (`common.follow_authors_scripts`); add
`--config.model.compute_dtype=float32 --config.data.random_crop=true` for their float32 training on
random crops.
"""

from configs import common


def get_config(variant: str = ""):
    """Returns the SD 1.5 style config; variant 'official' follows the authors' scripts."""
    config = common.get_config()  # the paper's values; only what differs is set here
    config.data.kind = "style"
    config.train.steps = 500
    config.train.batch_size = 2
    config.train.with_prior = False
    # The authors train in float32 on random crops; bf16 compute is faster on GPU/TPU, and
    # center crops let a round encode its latents once (configs/common.py, model/data fields).
    config.model.compute_dtype = "bfloat16"
    # The compute casts the UNet to bf16 anyway: a bf16 round UNet halves the disk (1.7 GB a round).
    config.train.save_dtype = "bfloat16"
    if variant == "official":
        common.follow_authors_scripts(config, steps=500, batch_size=2, with_prior=False)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of sd15_style (known: 'official')")
    return config
