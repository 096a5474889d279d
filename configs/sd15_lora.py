r"""GAL with DreamBooth-LoRA on Stable Diffusion 1.5 (diffusers' train_dreambooth_lora.py defaults).

Rank-4 deltas (alpha 4) on to_q, to_k, to_v and to_out.0 of every attention layer, lora_B zero at
the start; lr 1e-4 constant, 500 steps at batch 1, prior preservation as in DreamBooth. A round
leaves only its LoRA weights (rounds/<r>/personalization/pytorch_lora_weights.safetensors, ~3 MB);
DIR/model/ is the base pipeline with that file beside it:

  pipe = StableDiffusionPipeline.from_pretrained(DIR/model); pipe.load_lora_weights(DIR/model)

Launch as configs/sd15_object.py, with this config:

  gal-jax run --config=configs/sd15_lora.py --workdir=/tmp/gal/lora-cat \
      --config.model.sd_path=/models/stable-diffusion-v1-5 ...
"""

from configs import sd15_object


def get_config(variant: str = ""):
    """Returns the SD 1.5 DreamBooth-LoRA config ('official': the authors' GAL settings around it)."""
    config = sd15_object.get_config(variant)
    config.train.method = "lora"
    config.train.learning_rate = 1e-4
    config.train.steps = 500
    config.lora.rank = 4
    config.lora.alpha = 4.0
    return config
