"""Experiment configs: the paper's hyperparameters and variants (overrides: main_test.py)."""

import pytest
from configs import common, sd15_object, sd15_style, tiny_cpu


def test_defaults_are_the_papers_hyperparameters():
    config = common.get_config()
    assert (config.train.learning_rate, config.train.steps, config.train.batch_size) == (5e-6, 800, 1)
    assert (config.sample.sampler, config.sample.steps, config.sample.guidance_scale) == ("ddpm", 50, 7.5)
    assert (config.sample.num_per_prompt, config.gal.k, config.gal.rounds) == (10, 3, 4)
    assert (config.gal.openness_lambda, config.gal.balance, config.gal.feedback) == (0.005, True, "uncertainty")


def test_style_config_trains_500_steps_at_batch_two_without_prior():
    config = sd15_style.get_config()
    assert (config.data.kind, config.train.steps, config.train.batch_size) == ("style", 500, 2)
    assert not config.train.with_prior


def test_official_variant_follows_the_authors_scripts():
    config = sd15_object.get_config("official")
    assert (config.sample.sampler, config.gal.anchors, config.gal.openness_lambda) == ("dpmsolver++", "official", 0.005)


# What scripts/run_obj_gal.sh and run_style_gal.sh pass, and how their training scripts generate.
AUTHORS_OBJECT = dict(steps=800, batch_size=1, with_prior=True)
AUTHORS_STYLE = dict(steps=500, batch_size=2, with_prior=False)


@pytest.mark.parametrize("module, expected", [(sd15_object, AUTHORS_OBJECT), (sd15_style, AUTHORS_STYLE)])
def test_official_variants_set_everything_the_authors_launch_scripts_pass(module, expected):
    config = module.get_config("official")
    train = config.train
    assert dict(steps=train.steps, batch_size=train.batch_size, with_prior=train.with_prior) == expected
    assert (train.learning_rate, train.lr_schedule, train.warmup_steps, train.grad_accum_steps) == (
        5e-6, "constant", 0, 1)
    assert (train.prior_loss_weight, train.seed, config.data.resolution) == (1.0, 0, 512)
    assert (config.gal.rounds, config.gal.k, config.gal.openness_lambda, config.gal.balance) == (4, 3, 0.005, True)
    assert (config.gal.feedback, config.gal.anchors, config.gal.seed) == ("uncertainty", "official", 0)
    sample = config.sample
    assert (sample.sampler, sample.steps, sample.guidance_scale, sample.num_per_prompt, sample.seed) == (
        "dpmsolver++", 50, 7.5, 10, 0)


@pytest.mark.parametrize("module", [sd15_object, sd15_style])
def test_sd15_configs_train_in_bf16_on_center_crops_unlike_the_authors(module):
    for variant in ("", "official"):
        config = module.get_config(variant)
        assert (config.model.compute_dtype, config.data.random_crop) == ("bfloat16", False)
        assert config.model.param_dtype == "float32"


def test_evaluation_defaults_are_the_authors_notebook_protocol_with_the_papers_image_count():
    config = common.get_config()
    e = config.eval
    assert (e.sampler, e.steps, e.guidance_scale, e.seed, e.num_per_prompt, e.txt_scale) == (
        "pndm", 50, 7.5, 8888, 8, 1.0)
    # 10 concepts x 20 test prompts x 4 rounds x 8 images: the paper's 6,400 object images.
    assert 10 * 20 * config.gal.rounds * e.num_per_prompt == 6400
    for variant in ("", "official"):
        assert sd15_object.get_config(variant).eval.to_dict() == e.to_dict()


def test_random_feedback_defaults_to_the_papers_random_image():
    assert common.get_config().gal.random_image == "random"


def test_tiny_config_keeps_the_evaluation_sampler_and_seed_but_is_small():
    e = tiny_cpu.get_config().eval
    assert (e.sampler, e.seed, e.guidance_scale) == ("pndm", 8888, 7.5)
    assert e.steps * e.num_per_prompt <= 8


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'oficial'"):
        sd15_object.get_config("oficial")


def test_sdxl_configs_train_lora_at_1024_with_bf16_frozen_weights():
    from configs import sd_mudi, sdxl_lora

    lora = sdxl_lora.get_config()
    # diffusers' train_dreambooth_lora_sdxl.py example: rank 4, lr 1e-4 constant, 500 steps, 1 x 4 accumulation.
    assert (lora.train.method, lora.lora.rank, lora.train.learning_rate, lora.train.lr_schedule) == (
        "lora", 4, 1e-4, "constant")
    assert (lora.train.steps, lora.train.batch_size, lora.train.grad_accum_steps) == (500, 1, 4)
    mudi = sd_mudi.get_config("sdxl")
    # MuDI's SDXL launch line: rank 32, lr 1e-4, 2010 steps at 1 x 2 accumulation.
    assert (mudi.train.method, mudi.lora.rank, mudi.train.steps, mudi.train.grad_accum_steps) == ("mudi", 32, 2010, 2)
    for config in (lora, mudi):
        assert (config.data.resolution, config.model.param_dtype, config.model.compute_dtype) == (
            1024, "bfloat16", "bfloat16")
    assert sd_mudi.get_config().data.resolution == 512
    with pytest.raises(ValueError, match="known: 'sdxl'"):
        sd_mudi.get_config("xl")


@pytest.mark.parametrize("variant, method, trains", [
    ("", "dreambooth", "^unet/"), ("lora", "lora", "^lora/"),
    ("textual_inversion", "textual_inversion", "^new_tokens$"), ("attndreambooth", "attndreambooth", "^new_tokens$"),
])
def test_tiny_world_variants_prepare_their_method_on_the_shipped_models(variant, method, trains, tiny_world_assets):
    from configs import tiny_world
    from gal_jax import models, personalize

    config = tiny_world.get_config(variant)
    assert config.model.tiny_world and config.train.steps == (200 if method == "dreambooth" else 400)
    sd, _ = models.load_stable_diffusion(tiny_world_assets["sd"])
    # The tiny world's placeholder "sks" is not one token of its tokenizer: the new-token methods add it.
    sd, prepared = personalize.prepare(config, sd, placeholder="sks", class_word="teapot")
    assert prepared.name == method and prepared.stages[0].trainable == trains
    assert (prepared.new_tokens is not None) == (method in personalize.NEW_TOKEN_METHODS)
    if method == "attndreambooth":
        assert [s.name for s in prepared.stages] == ["s1_inversion", "s2_attention", "s3_unet"]
    with pytest.raises(ValueError, match="unknown variant 'loRA' of tiny_world"):
        tiny_world.get_config("loRA")
