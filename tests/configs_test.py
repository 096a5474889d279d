"""Experiment configs: the paper's hyperparameters and variants (overrides: main_test.py)."""

import pytest
from configs import common, sd15_object, sd15_style


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
    assert (config.sample.sampler, config.gal.anchors, config.gal.openness_lambda) == ("dpmsolver++", "official", 0.0035)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'oficial'"):
        sd15_object.get_config("oficial")
