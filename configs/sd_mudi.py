r"""MuDI (Jang et al. 2024) inside GAL: several subjects personalized at once with Seg-Mix, on
Stable Diffusion 1.5 or 2.1-base (the model folder decides; nothing else differs) or, with the
'sdxl' variant, on SDXL base 1.0 at 1024 px as their launch line runs it, with MuDI's training
settings.

Their launch line (README, train_segmix_lora_sdxl.py): LoRA rank 32 (alpha 32) on to_q, to_k,
to_v and to_out.0, lr 1e-4 constant without warmup, 2010 steps at batch 1 x 2 gradient
accumulation, AdamW weight decay 1e-4, gradient clipping 1.0, Seg-Mix probability 0.3 from step
0 at random scales (relative_scale 0) with soft_alpha 1.0 (every latent pixel weighs alike), and
the DCO loss (beta 1000) instead of prior preservation, as their public code does. Their scripts
train SDXL at 1024 px (`configs/sd_mudi.py:sdxl`, frozen weights in bfloat16, LoRA in float32;
they report about 18 GB of GPU memory, under 15 GB with gradient checkpointing); the default
variant runs the same recipe on SD 1.5 / 2.1-base at 512 px. Their SDXL line also swaps in the
fp16-fix VAE (--pretrained_vae_model_name_or_path): our compute is bfloat16, which SDXL's own VAE
does not overflow, so it is not needed.

Generation starts from MuDI's mean-shifted noise: gamma (sample.init_gamma) times the VAE latents
of a collage of the segmented subjects is added to the first noise. The value of gamma their
notebook uses was not available here; 1.0 is ours (0 turns the initialisation off).

The concept folder is a MuDI data set as they ship it (metadata.jsonl, images, masks). Their prior
set works too, instead of DCO: --config.train.with_prior=true --config.train.loss_terms.dco.beta=0
--config.data.class_dir=/data/MuDI/dataset/reg/actionfigure_2_and_dog0 (its class_metadata.jsonl
and masks: class images paired with their subject and Seg-Mixed with the instances).

  gal-jax run --config=configs/sd_mudi.py --workdir=/tmp/gal/toy-and-corgi \
      --config.model.sd_path=/models/stable-diffusion-v1-5 \
      --config.model.clip_path=/models/clip-vit-base-patch32 \
      --config.data.concept_dir=/data/MuDI/dataset/category/actionfigure_2_and_dog0

  (SD 2.1-base: the same line with --config.model.sd_path=/models/stable-diffusion-2-1-base;
   SDXL: --config=configs/sd_mudi.py:sdxl --config.model.sd_path=/models/stable-diffusion-xl-base-1.0)

GAL's anchors name all subjects ("a olis harry potter toy and hta corgi on the beach"); the
overfit oracle's plain prompts are the captions with each identifier phrase replaced by its class,
and its identity check (gal.identity_check='clip', ours: MuDI measures identity mixing with
Detect-and-Compare, whose OWLv2 and DreamSim are not available here) also fails an image whose
vertical strips, one per subject, do not each look most like a different subject's references, so
GAL queries the directions where the subjects get confused. Named-slot anchors:
--config.gal.anchors=configs/anchors/two_subjects.txt ("{a} and {b} playing together in a forest").
The final model is the base pipeline with the LoRA beside it (`pipe.load_lora_weights(DIR/model)`).
"""

from configs import sd15_object, sdxl_lora


def use_mudi(config):
    """Sets MuDI's method and training settings on `config` (any model)."""
    config.train.method = "mudi"
    config.lora.rank = 32
    config.lora.alpha = 32.0
    config.train.learning_rate = 1e-4
    config.train.lr_schedule = "constant"
    config.train.warmup_steps = 0
    config.train.steps = 2010
    config.train.batch_size = 1
    config.train.grad_accum_steps = 2
    config.train.weight_decay = 1e-4
    config.train.max_grad_norm = 1.0
    config.train.with_prior = False  # their public default: DCO, not their mixed prior set
    config.train.loss_terms.dco.beta = 1000.0
    config.data.segmix.prob = 0.3
    config.data.segmix.start_step = 0
    config.data.segmix.relative_scale = 0.0
    config.data.segmix.soft_alpha = 1.0
    config.sample.init_gamma = 1.0
    config.gal.identity_check = "clip"
    return config


def get_config(variant: str = ""):
    """Returns the MuDI config (SD 1.5 or 2.1-base, by config.model.sd_path; 'sdxl': SDXL base at 1024 px)."""
    if variant not in ("", "sdxl"):
        raise ValueError(f"unknown variant {variant!r} of sd_mudi (known: 'sdxl')")
    config = use_mudi(sd15_object.get_config())
    return sdxl_lora.use_sdxl(config) if variant == "sdxl" else config
