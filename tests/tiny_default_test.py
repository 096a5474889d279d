"""The tiny world default (`--config.model.tiny_world=true`): the shipped trained models and the
tiny world's concepts, as users get them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from gal_jax import models, tiny, tiny_world

REPO = Path(__file__).resolve().parent.parent


def test_make_tiny_puts_the_shipped_models_and_the_world_in_place(tiny_world_assets):
    paths = tiny_world_assets
    assert (paths["root"] / ".tiny_kind").read_text().strip() == "trained"
    assert (paths["sd"] / "model_index.json").is_file() and (paths["clip"] / "config.json").is_file()
    assert sorted(p.name for p in paths["object_concept"].glob("*.png")) == [f"{i}.png" for i in range(tiny_world.NUM_REFERENCES)]
    assert len(list(paths["reg_dir"].glob("*.png"))) == tiny_world.NUM_CLASS_IMAGES
    sd, _ = models.load_stable_diffusion(paths["sd"])
    clip, _ = models.load_clip(paths["clip"])
    assert sd.max_length == clip.tokenizer.model_max_length
    # Again: nothing rebuilt; the other kind in the same folder: refused, naming the folder.
    assert tiny.make_tiny(paths["root"]) == paths == tiny.make_tiny_paths(paths["root"])
    with pytest.raises(FileExistsError, match=str(paths["root"])):
        tiny.make_tiny(paths["root"], trained=False)


def test_the_config_picks_the_kind_and_its_own_default_folder(tiny_world_assets, tmp_path):
    from configs import tiny_cpu
    from gal_jax import inputs

    config = tiny_cpu.get_config()
    assert tiny.default_dir(False) != tiny.default_dir(True)
    config.model.tiny_world = True
    config.model.tiny_dir = str(tiny_world_assets["root"])
    paths = inputs.resolve(config)
    assert paths.sd == tiny_world_assets["sd"] and paths.concept == tiny_world_assets["object_concept"]
    config.model.tiny_world = False
    with pytest.raises(FileExistsError, match="holds the trained tiny default"):
        inputs.resolve(config)


def test_the_shipped_clip_text_tower_is_the_sd_text_encoder(tiny_world_assets):
    import jax

    _, clip_params = models.load_clip(tiny_world_assets["clip"])
    _, sd_params = models.load_stable_diffusion(tiny_world_assets["sd"])
    for a, b in zip(jax.tree_util.tree_leaves(clip_params["text_model"]),
                    jax.tree_util.tree_leaves(sd_params.text_encoder), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_concepts_two_tones_survive_the_shipped_vae(tiny_world_assets):
    """DreamBooth can only learn what the VAE keeps: each tone of the references' teapot comes back
    from a round trip nearer its own colour than the other's (the earlier magenta-and-cyan checks
    came back one pale lavender, equally far from both)."""
    from PIL import Image

    from gal_jax import sample

    sd, params = models.load_stable_diffusion(tiny_world_assets["sd"])
    references = np.stack([np.asarray(Image.open(p).convert("RGB"))
                           for p in sorted(tiny_world_assets["object_concept"].glob("*.png"))])
    mean = sd.encode_posterior(params.vae, references.astype(np.float32) / 127.5 - 1.0)[0]
    decoded = np.asarray(sample.to_uint8(sd.decode_latents(params.vae, mean)), np.float32)
    tones = np.asarray([tiny_world.CONCEPT_BODY, tiny_world.CONCEPT_LOWER], np.float32)
    for original, back in zip(references.astype(np.float32), decoded, strict=True):
        for own, other in ((0, 1), (1, 0)):
            where = np.linalg.norm(original - tones[own], axis=-1) < 60
            assert where.sum() > 50
            came_back = back[where].mean(axis=0)
            assert np.linalg.norm(came_back - tones[own]) < 0.5 * np.linalg.norm(came_back - tones[other]), came_back


def test_the_judge_names_the_context_of_the_shipped_vaes_round_trips(tiny_world_assets):
    """Figure 2 judges generated pictures, which are at best the VAE's: on its round trips of
    held-out pictures the judge must still name each context (before session 25 it named the
    castle for 62% of the parks: the VAE's duller grass matched the castle's)."""
    from gal_jax import tiny_figures

    sd, params = models.load_stable_diffusion(tiny_world_assets["sd"])
    result = tiny_figures.judge_on_round_trips(sd, params, tiny_figures.held_out_scenes(1000))
    assert set(result["per_context"]) == set(tiny_world.CONTEXTS) and result["images"] == 1000
    assert result["accuracy"] >= 0.97, result
    assert result["min"] >= 0.8, {c: a for c, a in result["per_context"].items() if a < 0.8}


def test_the_shipped_models_are_small_fp16_safetensors():
    files = [p for p in tiny.SHIPPED_MODELS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"clip", "unet", "vae", "text_encoder"}
    for path in weights:
        with safe_open(path, "np") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} <= {np.dtype("float16"), np.dtype("int64")}, path
    assert not list(tiny.SHIPPED_MODELS.rglob("*.bin"))


def test_the_shipped_build_recorded_its_figures():
    """The figures README quotes are the ones measured on the shipped files (tiny_world_slow_test
    measures them again and checks the issue's thresholds)."""
    report = json.loads((tiny.SHIPPED_MODELS / "tiny_train.json").read_text())
    zero_shot = report["figures"]["clip_zero_shot"]
    assert zero_shot["images"] >= 1000
    for name in ("context", "object", "colour"):
        assert 0.0 <= zero_shot[name]["clip_accuracy"] <= 1.0, name
    # What GAL's overfit oracle relies on: the CLIP tells the contexts apart, as the judge does.
    assert zero_shot["context"]["clip_accuracy"] >= 0.9
    assert zero_shot["context"]["judge_agrees_with_clip"] >= 0.9
    following = report["figures"]["base_context_following"]["per_context"]
    assert set(following) == set(tiny_world.ANCHOR_CONTEXTS)
    # The shipped UNet predicts v (tiny_train.Recipe.prediction_type) and draws most contexts
    # (measured 92.4%; claim 2's stricter per-context bar is the slow test's).
    scheduler = json.loads((tiny.SHIPPED_MODELS / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert report["figures"]["base_context_following"]["mean"] >= 0.85


def test_the_default_run_on_the_shipped_models_queries_and_reports(tiny_world_assets, tmp_path):
    from configs import tiny_cpu
    from gal_jax import driver
    from gal_jax.workdir import Workdir

    config = tiny_cpu.get_config()
    config.model.tiny_dir = str(tiny_world_assets["root"])
    config.model.tiny_world = True
    config.gal.rounds = 2  # the last round only trains: round 1 scores and queries
    config.train.steps = 2
    config.train.batch_size = 8  # over the 8 fake devices
    config.sample.num_per_prompt = 2
    config.sample.steps = 2
    report = driver.run(config, tmp_path / "run")
    record = Workdir(tmp_path / "run").read_record(1)
    assert report.is_file() and len(record.directions) == len(tiny_world.ANCHOR_CONTEXTS)
    assert record.plain_prompts == ("a teapot on a table",)


@pytest.mark.parametrize("flags, message", [
    ([], "`gal-jax make-tiny --train` needs --out"),
    (["--out={tmp}/m", "--num_train=0"], "--num_train=0 must be >= 1"),
    (["--out={tmp}/m", "--recipe=big"], "flag --recipe=big: value should be one of <twin_swap_wide|first|smoke|object_negatives|swap_negatives|swap_lit|twin_lit>"),
    (["--out={tmp}/m", "--num_train=8", "--vae_from={tmp}/elsewhere"],
     "{tmp}/elsewhere/vae/config.json: not found; --vae_from must be a Stable Diffusion folder with vae/"),
    (["--out={tmp}/m", "--clip_from={tmp}/elsewhere"],
     "{tmp}/elsewhere/config.json: not found; --clip_from must be a CLIP folder (a build's clip/)"),
])
def test_make_tiny_train_refuses_bad_flags_before_training(tmp_path, flags, message):
    args = [f.format(tmp=tmp_path) for f in flags]
    result = subprocess.run([sys.executable, "-m", "gal_jax.main", "make-tiny", "--train", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"gal-jax make-tiny: error: {message.format(tmp=tmp_path)}" in result.stderr
    assert not (tmp_path / "m").exists()
