r"""The trained tiny world: the tiny world's own SD and CLIP (gal_jax/assets/tiny_world), on CPU.

    gal-jax run --config=configs/tiny_world.py --workdir=workdirs/tiny_world

Unlike the random-init models of configs/tiny_cpu.py, these models draw the world's contexts from
their prompts, so DreamBooth on the references (all "a sks teapot on a table"; the placeholder is
read from them) is meant to be seen overfitting and GAL's rounds acting on it (README "The tiny
world" says how far that holds today). Settings: 200 DreamBooth steps at 2e-4 (enough for plain DreamBooth to carry
the table into most anchor contexts), 25 DDIM steps at guidance 5 for generation and evaluation
(the model's pictures fall apart at the 4-10 steps tiny_cpu uses), 4 rounds, uncertainty with the
paper's balance (lambda 0.005: the new references weigh under 0.001; `--config.gal.balance=false`
gives them weight 1). README "The tiny world" has what it measures.
"""

from configs import tiny_cpu


def get_config():
    """Returns the trained tiny world's config."""
    config = tiny_cpu.get_config()
    config.model.tiny_world = True
    config.train.steps = 200
    config.train.learning_rate = 2e-4
    config.train.checkpoint_every = 100
    config.train.log_every = 20
    config.sample.steps = 25
    config.sample.guidance_scale = 5.0
    config.gal.rounds = 4
    config.eval.sampler = "ddim"
    config.eval.steps = 25
    config.eval.guidance_scale = 5.0
    config.eval.num_per_prompt = 4
    return config
