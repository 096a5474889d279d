r"""AttnDreamBooth (Pang et al. 2024) inside GAL, on Stable Diffusion 2.1-base: the authors'
three stages (bash_script/train_attndreambooth.sh, train_attndreambooth.py) as config defaults.

  s1_inversion  the new token's embedding only: lr 1e-3, 60 steps, batch 8, regularizer (0.1, 0)
  s2_attention  the cross-attention layers (every attn2's to_q/to_k/to_v/to_out.0, weights and
                biases): lr 2e-5, 100 steps, batch 8, regularizer (mean 2, variance 5)
  s3_unet       the whole UNet: lr 2e-6, 500 steps, batch 8, regularizer (2, 5)
                (variant 'fast', their README's: lr 1e-5, 200 steps, batch 4)

Each stage starts from the previous one's result; the text encoder stays frozen throughout (the
new token's row is trained in stage 1 only, as in their code). AdamW (0.9, 0.999, eps 1e-8,
weight decay 1e-2), constant lr without warmup, plain epsilon MSE without prior preservation
(their script does not turn it on), no gradient clipping (their clipping line is never reached
in stages 2 and 3 and clips nothing in stage 1). The regularizer pulls the mean and variance,
over heads and pixels, of the new token's cross-attention map in every cross-attention layer
towards those of the next token (the class word), summed over the batch, averaged over layers.

The placeholder of the concept ("<cute-cat>") becomes the new token, initialised from the class
word; prompts read "a photo of a <cute-cat> cat" as theirs read "a photo of a new_concept_v0 cat".
Launch:

  gal-jax run --config=configs/sd21_attndreambooth.py --workdir=/tmp/gal/attn-cat \
      --config.model.sd_path=/models/stable-diffusion-2-1-base \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/reference_images/object/cat \
      --config.data.placeholder="<cute-cat>" --config.data.class_word=cat

and `configs/sd21_attndreambooth.py:fast` for their fast stage 3.
"""

import ml_collections

from configs import common


def regularizer(mean: float, var: float) -> dict:
    """Returns a stage's loss_terms entry: the cross-attention map regularizer's two weights."""
    return dict(attention_map=dict(mean=mean, var=var))


def attndreambooth_stages(fast: bool = False) -> ml_collections.ConfigDict:
    """Returns the authors' three stages as config.train.stages entries."""
    stages = ml_collections.ConfigDict()
    stages.s1_inversion = dict(trainable="^new_tokens$", learning_rate=1e-3, steps=60, batch_size=8,
                               loss_terms=regularizer(0.1, 0.0))
    stages.s2_attention = dict(trainable="^unet/.*/attn2/", learning_rate=2e-5, steps=100, batch_size=8,
                               loss_terms=regularizer(2.0, 5.0))
    stages.s3_unet = dict(trainable="^unet/", learning_rate=1e-5 if fast else 2e-6, steps=200 if fast else 500,
                          batch_size=4 if fast else 8, loss_terms=regularizer(2.0, 5.0))
    return stages


def use_attndreambooth(config: ml_collections.ConfigDict, fast: bool = False) -> ml_collections.ConfigDict:
    """Returns `config` training AttnDreamBooth's stages with the authors' optimizer settings."""
    config.train.method = "attndreambooth"
    config.train.stages = attndreambooth_stages(fast)
    config.train.with_prior = False
    config.train.lr_schedule = "constant"
    config.train.warmup_steps = 0
    config.train.weight_decay = 1e-2
    config.train.max_grad_norm = 0.0
    config.train.checkpoint_every = 100
    return config


def get_config(variant: str = ""):
    """Returns the SD 2.1-base AttnDreamBooth config; variant 'fast' is the authors' fast stage 3."""
    if variant not in ("", "fast"):
        raise ValueError(f"unknown variant {variant!r} of sd21_attndreambooth (known: 'fast')")
    config = common.get_config()
    config.data.kind = "object"
    config.data.resolution = 512
    config.model.compute_dtype = "bfloat16"
    config.train.save_dtype = "bfloat16"
    return use_attndreambooth(config, fast=variant == "fast")
