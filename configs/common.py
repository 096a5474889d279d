r"""Every field a GAL experiment reads, with the paper's values (GAL_SPEC.md) as defaults.

This file follows the paper's protocol; `sd15_object.py:official` / `sd15_style.py:official` follow
the authors' launch scripts (README "Protocol" lists every difference and how to get the other).
Other configs start from `get_config()` and override a few fields. Launch:

    gal-jax run --config=configs/sd15_object.py --workdir=/tmp/gal \
          --config.model.sd_path=/models/stable-diffusion-v1-5
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default experiment config (SD 1.5 object concept, uncertainty + balance)."""
    config = ml_collections.ConfigDict()

    # Models: '' means the embedded tiny default (built by `gal-jax make-tiny` into tiny_dir).
    config.model = ml_collections.ConfigDict()
    config.model.sd_path = ""
    config.model.clip_path = ""
    config.model.tiny_dir = ""  # '' -> $GAL_JAX_CACHE/tiny-v3, or tiny-world-v4 with tiny_world
    # The tiny default's kind: random-init models (false) or the models trained on the tiny world
    # (true; gal_jax/assets/tiny_world, `gal-jax make-tiny --train`).
    config.model.tiny_world = False
    config.model.param_dtype = "float32"
    # The authors train in float32 (no --mixed_precision) and the paper names no precision. The sd15
    # configs compute in 'bfloat16' on GPU/TPU for speed (weights and AdamW stay float32).
    config.model.compute_dtype = "float32"
    # Attention kernel of every model: 'auto' picks per layer and logs why: cuDNN's fused kernel on
    # CUDA GPUs where dtype and head size allow, Pallas flash attention on TPUs for sequences in
    # 128 blocks (not yet run on a TPU here), our XLA attention elsewhere; or 'xla', 'cudnn', 'flash'.
    config.model.attention = "auto"
    # PyTorch .bin weights are pickles: read (with torch) only when a folder has no safetensors
    # and this is True.
    config.model.allow_bin = False

    # The concept: the authors' layout (reference_images/<kind>/<concept>/init.json, reg_data/<concept>).
    config.data = ml_collections.ConfigDict()
    # '' -> the tiny object concept. A folder with MuDI's metadata.jsonl (and masks) is a
    # multi-subject concept (kind 'object'): its subjects are trained and queried together.
    config.data.concept_dir = ""
    config.data.kind = "object"  # 'object' | 'style'
    config.data.class_dir = ""  # class images for prior preservation ('' -> none)
    config.data.class_prompt = ""  # '' -> "a photo of a {class}" (the authors' launch scripts)
    config.data.num_class_images = 200  # at most this many class images (the authors' default)
    config.data.placeholder = ""  # e.g. '<cute-cat>'; objects only
    config.data.class_word = ""  # e.g. 'cat', 'wooden_pot'; '' -> the concepts list's class_prompt, or init.json
    config.data.resolution = 512
    # The authors' scripts random-crop (no --center_crop). We center-crop so every reference's VAE
    # latents are computed once per round (train.cache_latents); true reproduces the authors' crops.
    config.data.random_crop = False
    config.data.flip = False
    # MuDI's Seg-Mix (multi-subject concepts): with probability `prob`, from optimizer step
    # `start_step`, an instance is pasted beside another subject on white; `relative_scale` fixes
    # their scales (0: random); the loss weighs latent pixels by mask * (1 - soft_alpha) + soft_alpha.
    config.data.segmix = ml_collections.ConfigDict(dict(prob=0.0, start_step=0, relative_scale=0.0, soft_alpha=1.0))

    # Device mesh data x fsdp x tensor = all devices; one of them may be -1 (the remaining devices).
    # 'data' and 'fsdp' split the batch ('fsdp' also shards params and optimizer state); 'tensor'
    # splits attention heads and MLP hidden units over its devices (Megatron-style model
    # parallelism: they all see the same examples), for a model whose activations crowd one device.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    # Parameter sharding: (logical axis, mesh axis or None) pairs in priority order; None or () takes
    # gal_jax.sharding.DEFAULT_LOGICAL_RULES ("heads" and "mlp" over 'tensor' first, then every
    # axis over 'fsdp'; a mesh axis of size 1 shards nothing). Logical axes: gal_jax/nn/layers.py.
    config.mesh.rules = None
    # CPU only: split the host's CPU into this many JAX devices (gal_jax/cpu_devices.py): XLA:CPU
    # runs each convolution on one core, and devices run in parallel, so generation and scoring
    # (batch split over the mesh) then use every core. 0 keeps XLA's one CPU device, -1 makes one
    # per usable core. Ignored on accelerators and where XLA_FLAGS already sets
    # --xla_force_host_platform_device_count. Each device holds a copy of replicated weights.
    config.mesh.cpu_devices = 0
    # Train on the first N devices only, as (data, fsdp, tensor) with mesh.fsdp and mesh.tensor as
    # above (0: the whole mesh); generation and scoring keep the whole mesh. For a train batch too
    # small to gain from splitting (the tiny world's 4 rows on CPU devices). One process only.
    config.mesh.train_devices = 0

    # Training, from the base weights every round.
    config.train = ml_collections.ConfigDict()
    # The personalization method (README "Methods"): 'dreambooth' (the whole UNet: the paper's),
    # 'lora' (config.lora), 'textual_inversion' (the concept's placeholder as one new token) or
    # 'attndreambooth' (three stages, configs/sd21_attndreambooth.py).
    config.train.method = "dreambooth"
    # What a stage trains: a regex over model-tree paths (unet/.../attn2/to_k/kernel, text_encoder/...,
    # lora/..., new_tokens); '' -> the method's own (gal_jax/personalize.py DEFAULT_TRAINABLE).
    config.train.trainable = ""
    # Multi-stage methods: {stage name: {train.* field: value}}, run in the order of the names,
    # each config.train with those fields replaced; empty -> one stage, config.train itself.
    config.train.stages = ml_collections.ConfigDict()
    # The new-token methods: the token added ('' -> the concept's placeholder, e.g. '<cute-cat>')
    # and the one-token word whose embedding starts it ('' -> the first word of the class word).
    config.train.new_token = ""
    config.train.new_token_init = ""
    # Extra loss terms of the step, by name (gal_jax/loss_terms.py; each off at these defaults).
    # attention_map: AttnDreamBooth's regularizer, the new token's cross-attention map mean and
    # variance pulled towards the next token's (the class word), with these weights.
    config.train.loss_terms = ml_collections.ConfigDict()
    config.train.loss_terms.attention_map = ml_collections.ConfigDict(dict(mean=0.0, var=0.0))
    # dco: DCO in place of the instance loss, -log sigmoid(-beta (L - L_base)), L_base the base
    # UNet's loss (the LoRA method's model without its deltas); MuDI uses beta 1000 without prior.
    config.train.loss_terms.dco = ml_collections.ConfigDict(dict(beta=0.0))
    config.train.steps = 800
    config.train.batch_size = 1  # global, in instance examples
    config.train.learning_rate = 5e-6
    config.train.lr_schedule = "constant"  # 'constant' | 'cosine'
    config.train.warmup_steps = 0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 1e-2
    config.train.max_grad_norm = 1.0  # 0: no clipping
    config.train.with_prior = True
    config.train.prior_loss_weight = 1.0
    config.train.grad_accum_steps = 1
    # How the batch shards' gradients are summed: "xla" (the SPMD partitioner's all-reduce per
    # gradient leaf), "flat" (one all-reduce of the flattened gradients, in a shard_map; needs
    # replicated weights and no loss_terms) or "auto" ("flat" on CPU where it can, else "xla").
    config.train.grad_all_reduce = "auto"
    # Recompute blocks in the backward pass to save memory: "none", "block" (every resnet and
    # transformer block: diffusers' gradient checkpointing) or "dots_saveable" (keep the matmuls).
    config.train.remat = "none"
    # Min-SNR-gamma loss weighting (diffusers' --snr_gamma; 5 is their suggestion); 0: plain MSE
    # (the paper, the authors' code). Applies to instance and class examples alike.
    config.train.snr_gamma = 0.0
    config.train.cache_latents = True  # only used without random augmentation
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    # Once a round's UNet is written (rounds/<r>/unet/, in save_dtype), its training states (AdamW
    # moments, checkpoints: ~10 GB each for SD 1.5) are deleted unless this is true.
    config.train.keep_training_state = False
    config.train.save_dtype = "float32"  # 'float32' | 'bfloat16' | 'float16'
    config.train.log_every = 50
    config.train.seed = 0

    # DreamBooth-LoRA (train.method='lora'): rank-r deltas W + (alpha / r) B A on the kernels whose
    # UNet path matches `targets` ('' -> to_q, to_k, to_v, to_out.0 of every attention layer;
    # add ff/net_0/proj|ff/net_2 for the MLPs), B zero at the start; alpha 0 -> the rank.
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 4
    config.lora.alpha = 0.0
    config.lora.targets = ""
    # Deltas on the text encoder too (diffusers' --train_text_encoder): the kernels whose path
    # matches text_encoder_targets ('' -> q_proj, k_proj, v_proj, out_proj of every layer).
    config.lora.train_text_encoder = False
    config.lora.text_encoder_targets = ""

    # Generation over anchor prompts x seeds.
    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "ddpm"  # 'ddpm' (paper) | 'dpmsolver++' (authors' code) | 'ddim' | 'pndm'
    config.sample.steps = 50
    config.sample.guidance_scale = 7.5
    config.sample.num_per_prompt = 10
    # Images per device in one compiled generation chunk. 0 (auto): as many as fit in 85% of the
    # devices' free memory (the chunk's bytes per image read from XLA's buffer assignment at two
    # sizes), at most 64, spread evenly over the first grid's chunks and kept for the run (a
    # shrinking pool reuses one compilation); devices that report no memory (CPU) get 8. A
    # positive number is a fixed bound: min(bound, the grid per device).
    config.sample.max_images_per_device = 0
    config.sample.seed = 0
    # MuDI's initialisation (multi-subject concepts): start from noise shifted by init_gamma times
    # the VAE latents of a collage of the segmented subjects (0: plain noise).
    config.sample.init_gamma = 0.0

    # The GAL loop.
    config.gal = ml_collections.ConfigDict()
    config.gal.rounds = 4
    config.gal.k = 3
    config.gal.openness_lambda = 0.005
    config.gal.balance = True
    config.gal.feedback = "uncertainty"  # 'uncertainty' | 'random' | 'human' | 'none'
    config.gal.anchors = "paper"  # 'paper' | 'official' | path to a file of templates with {}
    config.gal.seed = 0  # random feedback: the directions and images drawn
    # Random feedback's image in each drawn direction: 'random' (the paper's baseline: one random
    # image, fixed by gal.seed, round and direction) | 'best' (highest sim_anchor, as uncertainty).
    config.gal.random_image = "random"
    config.gal.score_batch = 64
    # Multi-subject concepts: 'clip' also counts an image as failed when its subjects' identities
    # are mixed (one vertical strip per subject, each most similar by CLIP to one subject's
    # references, and not every subject found); 'none' scores as for one subject.
    config.gal.identity_check = "none"
    # What decides that a picture is overfit (GAL_SPEC step 3): 'clip' (the paper's) | on the tiny
    # world only, 'tiny_world_judge': its rule-based judge's context probabilities in place of
    # CLIP's cosines, an oracle with the world's ground truth (gal_jax/tiny_world_oracle.py).
    config.gal.oracle = "clip"

    # Evaluation after each round (TXT-ALN / IMG-ALN / OVF) on a test prompt set.
    config.eval = ml_collections.ConfigDict()
    config.eval.enabled = False
    config.eval.concepts_json = ""
    # The authors' evaluation notebooks: the SD pipeline's default sampler (PNDM, skip_prk_steps),
    # 50 steps, guidance 7.5, seed 8888; 8 images per test prompt give the paper's 6,400 object
    # images (10 concepts x 20 prompts x 4 rounds). Its own sampler, not config.sample's.
    config.eval.sampler = "pndm"
    config.eval.steps = 50
    config.eval.guidance_scale = 7.5
    config.eval.seed = 8888
    config.eval.num_per_prompt = 8
    config.eval.txt_scale = 1.0  # the notebooks' CLIPScore-style 2.5; Table 1 is raw cosines

    # The final model, DIR/model/: a diffusers Stable Diffusion folder with the fine-tuned UNet.
    config.export = ml_collections.ConfigDict()
    config.export.dtype = "float16"  # UNet weights: 'float16' (half the size) | 'float32' | 'bfloat16'

    # `gal-jax bench`: 'config' benchmarks the models this config loads; 'sd15' random SD 1.5 + CLIP B/32;
    # 'sdxl' random SDXL base (UNet, VAE, both text encoders) + CLIP B/32.
    config.bench = ml_collections.ConfigDict()
    config.bench.model = "config"
    config.bench.iters = 5
    config.bench.warmup = 1
    config.bench.out = ""  # optional JSON file for the results
    # Optional markdown file (e.g. BENCHMARKS.md) the run appends its table to, with the device,
    # versions, date and command.
    config.bench.record = ""
    config.bench.latent_size = 0  # `bench unet`: latent grid side (0: the model's own)
    # Add where the time goes: op time per kind, layer and pass, and the heaviest ops, from a
    # profiler trace of the timed function (gal_jax/op_profile.py).
    config.bench.profile = False
    # `bench memory`: the GiB one device may hold; the figures then say whether the train step and
    # a generation chunk fit (0: no budget).
    config.bench.memory_budget_gib = 0.0
    # `bench train|sample`: time PyTorch diffusers' DreamBooth step / StableDiffusionPipeline on the
    # same weights, batch, resolution and precision, interleaved with ours (the test extra's torch),
    # also through torch.compile with torch_compile; `authors` adds the GAL authors' workflow
    # (float32, generation one image a call, DreamBooth at batch 1 encoding pixels every step).
    config.bench.compare_torch = False
    config.bench.torch_compile = True
    config.bench.authors = False

    return config


def follow_authors_scripts(config: ml_collections.ConfigDict, *, steps: int, batch_size: int,
                           with_prior: bool) -> ml_collections.ConfigDict:
    """Returns `config` set to everything the authors' launch scripts pass (scripts/run_obj_gal.sh,
    run_style_gal.sh) and the sampler their training scripts generate with.

    Both scripts pass lr 5e-6 constant without warmup, 4 rounds, balance, --openness_lambda=0.005
    (their argparse defaults, 0.0035 for objects and 1.0 for styles, are not what they run) and
    seed 0; the loop generates 10 images per anchor with DPM-Solver++ (diffusers
    DPMSolverMultistepScheduler from SD's scheduler config), 50 steps, guidance 7.5, from their
    own anchor set. They do not pass --center_crop or --mixed_precision (random crops, float32):
    add --config.model.compute_dtype=float32 --config.data.random_crop=true for those.
    """
    config.train.steps = steps
    config.train.batch_size = batch_size
    config.train.with_prior = with_prior
    config.train.prior_loss_weight = 1.0
    config.train.learning_rate = 5e-6
    config.train.lr_schedule = "constant"
    config.train.warmup_steps = 0
    config.train.grad_accum_steps = 1
    config.train.seed = 0
    config.data.resolution = 512
    config.sample.sampler = "dpmsolver++"
    config.sample.steps = 50
    config.sample.guidance_scale = 7.5
    config.sample.num_per_prompt = 10
    config.sample.seed = 0
    config.gal.rounds = 4
    config.gal.k = 3
    config.gal.openness_lambda = 0.005
    config.gal.balance = True
    config.gal.feedback = "uncertainty"
    config.gal.anchors = "official"
    config.gal.seed = 0
    return config
