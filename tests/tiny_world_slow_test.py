"""The tiny world's five claims, measured on the shipped models (slow: about 30 minutes on 2 cores).

    .venv/bin/python -m pytest -m slow tests/tiny_world_slow_test.py

The thresholds are the issue's, not tuned to the figures: a failure here means the shipped models
no longer show what README says they show.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gal_jax import models, sample, score, sharding, tiny_figures, tiny_world

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]

# Strict: when a retrained model meets a claim, the XPASS fails the run until README and this
# mark are updated.
NOT_YET = "README 'The tiny world': not met by the shipped models ({})"


@pytest.mark.xfail(strict=True, reason=NOT_YET.format("object kinds 83.2%; context 98.1%, colour 92.4%"))
def test_1_the_tiny_clip_names_context_object_and_colour_and_the_judge_agrees(tiny_world_assets):
    clip, params = models.load_clip(tiny_world_assets["clip"])
    result = tiny_figures.clip_zero_shot(score.Scorer(clip, params, sharding.make_mesh()),
                                         tiny_figures.held_out_scenes(1000))
    for name in tiny_figures.ATTRIBUTES:
        assert result[name]["clip_accuracy"] >= 0.9, (name, result[name])
    assert result["context"]["judge_agrees_with_clip"] >= 0.9, result["context"]


@pytest.mark.xfail(strict=True, reason=NOT_YET.format(
    "mean 93.1%; 'in park' 75%, 'in library' 75%, 'in front of the castle' 79.2%"))
def test_2_the_base_sd_draws_every_anchor_context(tiny_world_assets):
    sd, params = models.load_stable_diffusion(tiny_world_assets["sd"])
    generator = sample.Generator(sd, sharding.make_mesh(), sampler="ddim", steps=25, guidance_scale=5.0,
                                 max_images_per_device=64)
    # 24 a context, as the build measures it (tiny_train.Recipe.figure_per_context): the same
    # seeded prompts and noise, so the figure README quotes.
    result = tiny_figures.base_context_following(generator, params, per_context=24)
    assert result["min"] >= 0.8, result["per_context"]


@pytest.fixture(scope="module")
def comparison(tiny_world_assets, tmp_path_factory):
    from configs import tiny_world as tiny_world_config

    config = tiny_world_config.get_config()  # uncertainty + balance, 4 rounds, as the issue asks
    config.model.tiny_dir = str(tiny_world_assets["root"])
    return tiny_figures.run_comparison(tmp_path_factory.mktemp("gal"), config, num_per_prompt=4, progress=False)


def test_3_plain_dreambooth_overfits_with_mixed_round_1_rates(comparison):
    from gal_jax.workdir import Workdir

    base, none = comparison["base"][0], comparison["runs"]["none"][0]
    assert none["ovf"] >= base["ovf"] + 0.2, (base, none)
    assert none["judge_context"] <= base["judge_context"] - 0.2, (base, none)
    # `none` stops after training; round 1 of the uncertainty run trains the same model and scores it.
    rates = [d.overfit_rate for d in Workdir(comparison["workdirs"]["uncertainty"]).read_record(1).directions]
    assert sum(0 < r < 1 for r in rates) >= 3, rates  # enough uncertain directions for k = 3


@pytest.mark.xfail(strict=True, reason=NOT_YET.format(
    "OVF 0.300 -> 0.225 -> 0.425 -> 0.500, TXT-ALN 0.243 -> -0.137: the rounds teach the model's own blur"))
def test_4_gal_lowers_ovf_and_raises_text_alignment_over_its_rounds(comparison):
    rounds = comparison["runs"]["uncertainty"]
    first, last = rounds[0], rounds[-1]
    assert len(rounds) >= 2
    assert last["ovf"] < first["ovf"] and last["txt_aln"] > first["txt_aln"], rounds
    assert abs(last["img_aln"] - first["img_aln"]) <= 0.05, rounds
    # `random` at the same number of training images (uncertainty may stop before the last round).
    random_same = [f for f in comparison["runs"]["random"] if f["num_references"] == last["num_references"]]
    assert random_same, comparison["table"]
    assert last["ovf"] < comparison["runs"]["none"][0]["ovf"] and last["ovf"] < random_same[0]["ovf"], comparison["table"]


# Met on session 31's 2-core host (165 s from an empty compile cache, 116 s on a rerun); a slower
# or loaded host may miss it. The command itself, as launch/quickstart.sh runs it (the CLI sets
# glibc's allocator up for the compile cache it finds), on the session's tiny world.
def test_5_the_readme_command_runs_within_3_minutes(tiny_world_assets, tmp_path):
    command = [sys.executable, "-m", "gal_jax.main", "run", "--config=configs/tiny_world.py",
               f"--workdir={tmp_path / 'run'}", f"--config.model.tiny_dir={tiny_world_assets['root']}"]
    environ = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}  # not the 8 fake devices
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds <= 180, f"{seconds:.0f} s"
