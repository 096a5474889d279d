r"""GAL with DreamBooth-LoRA on Stable Diffusion XL base 1.0 (diffusers' train_dreambooth_lora_sdxl.py
example): rank-4 deltas (alpha 4) on to_q, to_k, to_v and to_out.0 of every UNet attention layer, lr
1e-4 constant without warmup, 500 steps at batch 1 x 4 gradient accumulation, 1024 px.

The frozen base weights are read in bfloat16 (diffusers' example trains under fp16 mixed precision
with the frozen UNet and text encoders in half precision); the LoRA deltas and their AdamW state
stay float32. Our compute is bfloat16, whose range does not overflow SDXL's VAE the way fp16 does,
so the fp16-fix VAE their example passes is not needed. GAL's loop keeps the paper's protocol
(prior preservation, 10 images per anchor, 50 DDPM steps, guidance 7.5, k = 3, balance); add
--config.train.with_prior=false for the diffusers example exactly (it trains without a prior set).
The text encoders are not trained (SDXL text-encoder LoRA and textual inversion are refused).

  gal-jax run --config=configs/sdxl_lora.py --workdir=/tmp/gal/sdxl-dog \
      --config.model.sd_path=/models/stable-diffusion-xl-base-1.0 \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/reference_images/object/dog \
      --config.data.class_dir=/data/reg_data/dog --config.data.class_prompt="a dog" \
      --config.data.placeholder="sks" --config.data.class_word=dog

DIR/model/ is the base pipeline with the LoRA file beside it:

  pipe = StableDiffusionXLPipeline.from_pretrained(DIR/model); pipe.load_lora_weights(DIR/model)

Memory (`gal-jax bench memory --config=configs/sdxl_lora.py --config.bench.model=sdxl`, XLA's buffer
assignment on abstract SDXL-sized weights) is recorded in BENCHMARKS.md.
"""

from configs import sd15_lora


def get_config(variant: str = ""):
    """Returns the SDXL DreamBooth-LoRA config ('official': the authors' GAL settings around it)."""
    config = sd15_lora.get_config(variant)
    use_sdxl(config)
    config.train.grad_accum_steps = 4
    return config


def use_sdxl(config):
    """Sets what SDXL base needs on `config`: 1024 px, frozen weights in bfloat16."""
    config.data.resolution = 1024
    config.model.param_dtype = "bfloat16"
    config.model.compute_dtype = "bfloat16"
    return config
