"""The tiny world's judge as GAL's overfit oracle (config.gal.oracle=tiny_world_judge)."""

import numpy as np
import pytest

from configs import tiny_cpu
from gal_jax import acquisition, driver, tiny_world, tiny_world_oracle


def _scenes(context: str, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [tiny_world.sample_scene(rng, context=context).image for _ in range(count)]


def test_the_judge_calls_table_pictures_of_other_anchors_overfit():
    images = np.stack(_scenes(tiny_world.REFERENCE_CONTEXT, 3, 0) + _scenes("on the beach", 3, 1))
    anchors = ["a sks teapot on the beach", "a sks teapot in the cave"]
    sim_anchor, sim_plain = tiny_world_oracle.JudgeScorer().similarities(
        images, [0, 0, 1, 0, 0, 1], anchors, ["a teapot on a table"])
    assert sim_anchor.shape == (6,) and sim_plain.shape == (6, 1)
    assert ((0 <= sim_anchor) & (sim_anchor <= 1)).all() and ((0 <= sim_plain) & (sim_plain <= 1)).all()
    overfit = sim_anchor <= sim_plain.max(axis=1)
    # Tables are overfit whatever the anchor; beaches asked for are not; a beach asked to be a cave
    # is not overfit either (the table is no likelier than the cave there): GAL's rule, the judge's odds.
    assert overfit.tolist() == [True, True, True, False, False, False]
    assert (sim_anchor[3:5] > 0.5).all() and sim_anchor[5] < 0.5


def test_prompts_must_name_a_world_context_and_indices_match_the_images():
    scorer = tiny_world_oracle.JudgeScorer()
    images = np.stack(_scenes("on the beach", 2, 2))
    with pytest.raises(ValueError, match="the anchor prompt 'a sks teapot at the zoo' names no context of the tiny world"):
        scorer.similarities(images, [0, 0], ["a sks teapot at the zoo"], ["a teapot on a table"])
    with pytest.raises(ValueError, match="the plain prompt 'a teapot' names no context"):
        scorer.similarities(images, [0, 0], ["a sks teapot on the beach"], ["a teapot"])
    with pytest.raises(ValueError, match="anchor_index_per_image has 1 entries for 2 images"):
        scorer.similarities(images, [0], ["a sks teapot on the beach"], ["a teapot on a table"])


def test_the_oracle_is_checked_in_the_config():
    config = tiny_cpu.get_config()
    config.gal.oracle = "dino"
    with pytest.raises(ValueError, match=r"config.gal.oracle='dino'; expected one of \('clip', 'tiny_world_judge'\)"):
        driver.check_config(config)
    config.gal.oracle = "tiny_world_judge"
    with pytest.raises(ValueError, match="judges pictures of the tiny world only: set config.model.tiny_world=true"):
        driver.check_config(config)
    config.model.tiny_world = True
    config.gal.identity_check = "clip"
    with pytest.raises(ValueError, match="cannot check identities: set config.gal.identity_check=none"):
        driver.check_config(config)


def test_a_run_with_the_judge_as_oracle_records_its_scores(tiny_world_assets, tmp_path):
    """The round's record holds the judge's probabilities as sim_anchor / sim_plain, its overfit
    flags and queries follow from them by GAL's rules, and they are not CLIP's."""
    from PIL import Image

    from gal_jax.workdir import Workdir

    config = tiny_cpu.get_config()
    config.model.tiny_dir = str(tiny_world_assets["root"])
    config.model.tiny_world = True
    config.gal.oracle = "tiny_world_judge"
    config.gal.rounds = 2
    config.train.steps, config.train.batch_size = 2, 8
    config.sample.num_per_prompt, config.sample.steps = 2, 2
    driver.run(config, tmp_path / "run")
    workdir = Workdir(tmp_path / "run")
    record = workdir.read_record(1)
    scorer = tiny_world_oracle.JudgeScorer()
    for direction in record.directions:
        images = np.stack([np.asarray(Image.open(workdir.resolve(i.path)).convert("RGB")) for i in direction.images])
        sim_anchor, sim_plain = scorer.similarities(images, [0] * len(images), [direction.prompt], record.plain_prompts)
        np.testing.assert_allclose([i.sim_anchor for i in direction.images], sim_anchor, rtol=1e-6)
        np.testing.assert_allclose([i.sim_plain for i in direction.images], sim_plain, rtol=1e-6)
        assert [i.overfit for i in direction.images] == (sim_anchor <= sim_plain.max(axis=1)).tolist()
        assert direction.entropy == pytest.approx(acquisition.direction_entropy(direction.overfit_rate))
