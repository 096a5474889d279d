r"""GAL with textual inversion on Stable Diffusion 1.5 (diffusers' textual_inversion.py defaults).

The concept's placeholder ("<cute-cat>") becomes one new token, initialised from the class word's
embedding; only its row is trained. diffusers' README runs batch 1 x 4 accumulated steps at lr
5e-4 scaled by that batch (2e-3), 3000 steps; a GAL round keeps their effective batch and lr (batch
4, lr 2e-3, constant) within the paper's per-round budget of 800 steps, without prior
preservation (textual inversion has none). A round
leaves only the token's embedding (rounds/<r>/personalization/learned_embeds.safetensors);
DIR/model/ is the base pipeline with that file beside it:

  pipe = StableDiffusionPipeline.from_pretrained(DIR/model); pipe.load_textual_inversion(DIR/model)
"""

from configs import sd15_object


def get_config(variant: str = ""):
    """Returns the SD 1.5 textual-inversion config."""
    config = sd15_object.get_config(variant)
    config.train.method = "textual_inversion"
    config.train.with_prior = False
    config.train.learning_rate = 2e-3
    config.train.steps = 800
    config.train.batch_size = 4
    return config
