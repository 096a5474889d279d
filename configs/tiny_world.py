r"""The trained tiny world: the tiny world's own SD and CLIP (gal_jax/assets/tiny_world), on CPU.

    gal-jax run --config=configs/tiny_world.py --workdir=workdirs/tiny_world

Unlike the random-init models of configs/tiny_cpu.py, these models draw the world's contexts from
their prompts, so DreamBooth on the references (all "a sks teapot on a table"; the placeholder is
read from them) overfits, carrying the table into about half of the anchor contexts, and GAL's
rounds act on it. README "The tiny world" has what it measures.

Settings, each measured (README): 400 DreamBooth steps at 1e-3 with prior preservation (200 steps
at 2e-4 left round 1's overfit rates at 0 on 16 of 18 directions: nothing to query); generation with
the paper's DDPM sampler, 25 steps at guidance 5 (the model's pictures fall apart at the 4-10 steps
tiny_cpu uses; DDIM's pictures of a prompt barely change with the seed, and GAL's entropy needs
them to); evaluation with DDIM, 25 steps, 4 pictures per test prompt; 4 rounds of uncertainty with
the paper's balance (lambda 0.005: the new references weigh under 0.001;
`--config.gal.balance=false` gives them weight 1).
"""

from configs import tiny_cpu


def get_config():
    """Returns the trained tiny world's config."""
    config = tiny_cpu.get_config()
    config.model.tiny_world = True
    config.train.steps = 400
    config.train.learning_rate = 1e-3
    config.train.checkpoint_every = 100
    config.train.log_every = 20
    config.sample.sampler = "ddpm"
    config.sample.steps = 25
    config.sample.guidance_scale = 5.0
    config.gal.rounds = 4
    config.eval.sampler = "ddim"
    config.eval.steps = 25
    config.eval.guidance_scale = 5.0
    config.eval.num_per_prompt = 4
    return config
