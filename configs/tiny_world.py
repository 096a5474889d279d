r"""The trained tiny world: the tiny world's own SD and CLIP (gal_jax/assets/tiny_world), on CPU.

    gal-jax run --config=configs/tiny_world.py --workdir=workdirs/tiny_world

Unlike the random-init models of configs/tiny_cpu.py, these models draw the world's contexts from
their prompts, so DreamBooth on the references (all "a sks teapot on a table"; the placeholder is
read from them) overfits, carrying the table into some of the anchor contexts, and GAL's rounds act
on it. README "The tiny world" has what it measures.

Settings, each measured (README): 200 DreamBooth steps at 1e-3 with prior preservation (400 steps
left round 1's overfit rates all or nothing per direction, 0 or 1: nothing to query; 7e-4 carried
too little of the table into the test prompts' pictures); no checkpoint inside a round (each orbax save holds
the 2-core host for about 1.7 s; a kill redoes at most one round's 200 steps, about 20 s);
generation with the paper's DDPM sampler, 25 steps at guidance 5 (the model's pictures fall apart
at the 4-10 steps tiny_cpu uses; DDIM's pictures of a prompt barely change with the seed, and GAL's
entropy needs them to); evaluation with DDIM, 25 steps, 4 pictures per test prompt; 4 rounds of
uncertainty with the paper's balance (lambda 0.005: the new references weigh under 0.001;
`--config.gal.balance=false` gives them weight 1). On a CPU it runs on one JAX device per core
(`mesh.cpu_devices=-1`: generation and scoring split over them) and trains on one of them
(`mesh.train_devices=1`); README's paragraph on `mesh.cpu_devices` has the figures.

Variants train another personalization method on the same world, with the settings measured on
the session-5 models (400 steps; README "Methods" has their figures on the shipped models,
session 31, where LoRA at this rate learns little of the teapot): `configs/tiny_world.py:lora` (rank-16 deltas on every attention projection, lr
5e-3: rank 4 at 1e-3 learned nothing of the teapot in 400 steps, rank 16 at 1e-2 broke the
pictures, deltas on the MLPs too at 1e-2 gave noise), `:textual_inversion` (the new token "sks",
initialised from "teapot", lr 2e-2 at batch 4, no prior), `:attndreambooth` (the authors' three stages and regularizer, 100 +
100 + 200 steps at batch 4, stage 1 at the textual-inversion lr, stages 2-3 at theirs x 200, as this
world's DreamBooth lr is SD 1.5's).
"""

from configs import tiny_cpu


def get_config(variant: str = ""):
    """Returns the trained tiny world's config; a variant names another personalization method."""
    config = tiny_cpu.get_config()
    config.model.tiny_world = True
    config.train.steps = 200
    config.train.learning_rate = 1e-3
    # No checkpoint inside a round (the last step's is skipped: the round's result is written
    # instead): each orbax save holds the 2-core host for about 1.7 s, and a kill redoes at most
    # 200 steps (about 20 s).
    config.train.checkpoint_every = 200
    config.train.log_every = 20
    config.sample.sampler = "ddpm"
    config.sample.steps = 25
    config.sample.guidance_scale = 5.0
    config.gal.rounds = 4
    config.eval.sampler = "ddim"
    config.eval.steps = 25
    config.eval.guidance_scale = 5.0
    config.eval.num_per_prompt = 4
    # One JAX device per CPU core: generation and scoring split their batch over them (1.5x on 2
    # cores: 5.7 images/s against 3.8 on one device, `gal-jax bench sample`), in chunks of 24
    # images a device (as fast as 48 a device, and the rounds' grids of 144 and 96 images fill
    # whole chunks on one or two devices). Training keeps one device: its 4-row batch runs slower
    # split (0.137 s a step on two devices, 0.10 on one).
    config.mesh.cpu_devices = -1
    config.mesh.train_devices = 1
    config.sample.max_images_per_device = 24
    return with_method(config, variant)


METHODS = ("lora", "textual_inversion", "attndreambooth")


def with_method(config, method: str):
    """Returns `config` training `method` ('' keeps DreamBooth) with settings tried on this world:
    tiny_cpu.with_method switches the method on, this world's values replace its tiny lengths."""
    if method in ("", "dreambooth"):
        return config
    if method not in METHODS:
        raise ValueError(f"unknown variant {method!r} of tiny_world (known: {', '.join(METHODS)})")
    config = tiny_cpu.with_method(config, method)
    config.train.steps = 400  # as measured (on the session-5 models); DreamBooth's 200 is this world's
    if method == "lora":
        config.lora.rank = 16
        config.lora.alpha = 16.0
        config.train.learning_rate = 5e-3
    elif method == "textual_inversion":
        config.train.with_prior = False
        config.train.batch_size = 4
        config.train.learning_rate = 2e-2
    else:  # attndreambooth
        config.train.checkpoint_every = 100
        # The authors' stages and regularizer weights; stage 1 at this world's textual-inversion lr,
        # stages 2-3 at theirs scaled as this world's DreamBooth lr is (1e-3 here, 5e-6 on SD 1.5:
        # x 200); their steps cut to this world's budget, at batch 4.
        stages = config.train.stages
        stages.s1_inversion.update(learning_rate=2e-2, steps=100, batch_size=4)
        stages.s2_attention.update(learning_rate=4e-3, steps=100, batch_size=4)
        stages.s3_unet.update(learning_rate=4e-4, steps=200, batch_size=4)
    return config
