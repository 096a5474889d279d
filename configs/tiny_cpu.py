r"""The embedded tiny default: tiny random-init SD and CLIP, the tiny teapot concept, on CPU.

Runs the whole GAL loop (3 rounds, uncertainty + balance) in a few minutes on 2 CPU cores:

    gal-jax run --config=configs/tiny_cpu.py --workdir=workdirs/tiny

Any field can be overridden, e.g. `--config.gal.feedback=random --config.train.steps=10`;
`configs/tiny_cpu.py:lora` (or `:textual_inversion`, `:attndreambooth`) trains another method;
`:mudi` trains MuDI on the tiny two-subject concept (a teapot and a cat).
"""

from configs import common, sd21_attndreambooth, sd_mudi


def get_config(variant: str = ""):
    """Returns the tiny CPU config; a variant names another personalization method ('lora',
    'textual_inversion', 'attndreambooth': its stages shrunk to tiny lengths)."""
    config = common.get_config()
    config.data.resolution = 64
    config.data.class_prompt = "a teapot"
    config.data.placeholder = ""  # read from the references: "<tiny-teapot>", the trained world's "sks"
    config.data.class_word = "teapot"
    config.train.steps = 30
    config.train.batch_size = 2
    config.train.learning_rate = 1e-4
    config.train.checkpoint_every = 10
    config.train.log_every = 10
    config.sample.sampler = "ddim"
    config.sample.steps = 10
    config.sample.num_per_prompt = 8
    config.sample.max_images_per_device = 48
    config.gal.rounds = 3
    config.gal.openness_lambda = 0.005
    # Evaluation (off unless --config.eval.enabled=true) keeps config.eval's sampler, seed and
    # guidance but takes far fewer steps and images, so it runs in tests.
    config.eval.steps = 4
    config.eval.num_per_prompt = 2
    return with_method(config, variant)


def with_method(config, method: str):
    """Returns `config` training `method` ('' keeps DreamBooth) at tiny lengths."""
    if method in ("", "dreambooth"):
        return config
    if method == "lora":
        config.train.method = "lora"
        config.train.learning_rate = 1e-3
    elif method == "textual_inversion":
        config.train.method = "textual_inversion"
        config.train.learning_rate = 5e-3
    elif method == "attndreambooth":
        sd21_attndreambooth.use_attndreambooth(config)
        config.train.checkpoint_every = 10
        for name, steps in (("s1_inversion", 10), ("s2_attention", 10), ("s3_unet", 10)):
            config.train.stages[name].steps = steps
            config.train.stages[name].batch_size = 2
    elif method == "mudi":  # the tiny two-subject concept (a teapot and a cat, with masks)
        sd_mudi.use_mudi(config)
        config.lora.rank = 4
        config.lora.alpha = 4.0
        config.train.learning_rate = 1e-3
        config.train.steps = 30
        config.train.batch_size = 8  # x 2 accumulation; a micro-batch of 8 splits over 8 fake test devices
        config.data.class_prompt = ""
        config.data.class_word = ""
    else:
        raise ValueError(f"unknown variant {method!r} of tiny_cpu (known: lora, textual_inversion, attndreambooth, "
                         "mudi)")
    return config
