"""Every personalization method through GAL rounds on the tiny default: what the workdir and the
exported model hold, and AttnDreamBooth killed inside its second stage, then resumed."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from safetensors import safe_open

from configs import tiny_cpu
from gal_jax import acquisition, driver, export
from crash_test import gal_run, leftovers, outcome
from driver_test import small_config

LORA_FILE, EMBEDDINGS_FILE = export.LORA_WEIGHTS, export.TOKEN_EMBEDDINGS


@pytest.mark.parametrize("method, files, loader", [
    ("lora", [LORA_FILE], "load_lora_weights"),
    ("textual_inversion", [EMBEDDINGS_FILE], "load_textual_inversion"),
])
def test_method_runs_two_gal_rounds_leaving_only_what_it_trains(method, files, loader, tiny_assets, tmp_path):
    config = tiny_cpu.with_method(small_config(tiny_assets, gal__rounds=2), method)
    if method == "lora":
        config.lora.train_text_encoder = True  # its deltas travel in the same file
    report = driver.run(config, tmp_path / "run")
    page = report.read_text()
    assert f"method <b>{method}</b>" in page and f"pipe.{loader}(" in page
    records = driver.read_records(tmp_path / "run")
    assert [r.round for r in records] == [1, 2] and records[0].selected
    for index in (1, 2):
        round_dir = tmp_path / "run" / "rounds" / str(index)
        assert sorted(p.name for p in (round_dir / "personalization").iterdir()) == files
        assert not (round_dir / "unet").exists() and not (round_dir / "checkpoints").exists()
        assert sum(p.stat().st_size for p in (round_dir / "personalization").iterdir()) < 200_000
    model = tmp_path / "run" / "model"
    assert all((model / name).is_file() for name in files) and (model / "unet").is_dir()
    if method == "lora":
        with safe_open(model / LORA_FILE, "numpy") as exported:
            assert {key.split(".")[0] for key in exported.keys()} == {"unet", "text_encoder"}
    # A rerun of the finished run retrains nothing; the round's result reads back.
    assert driver.run(config, tmp_path / "run") == report


def test_a_workdir_is_not_resumed_with_another_method(tiny_assets, tmp_path):
    config = small_config(tiny_assets, gal__feedback="none", train__steps=1)
    driver.run(config, tmp_path / "run")
    other = tiny_cpu.with_method(small_config(tiny_assets, gal__feedback="none", train__steps=1), "lora")
    with pytest.raises(driver.ConfigChangedError, match=r"train.method \('dreambooth' -> 'lora'\)"):
        driver.run(other, tmp_path / "run")


ATTN = ("--config.train.checkpoint_every=2", "--config.sample.steps=2", "--config.sample.num_per_prompt=4",
        "--config.gal.rounds=2", "--config.gal.k=2", "--config.train.stages.s1_inversion.steps=4",
        "--config.train.stages.s2_attention.steps=6", "--config.train.stages.s3_unet.steps=4")


RESULTS = ("rounds/*/personalization/**/*.safetensors",)


def test_attndreambooth_killed_in_stage_two_resumes_to_the_uninterrupted_run(tiny_assets, tmp_path):
    config = "--config=configs/tiny_cpu.py:attndreambooth"
    code, output = gal_run(tmp_path / "plain", tiny_assets["root"], tmp_path / "cache", extra=(config, *ATTN))
    assert code == 0, output[-3000:]
    expected = outcome(tmp_path / "plain", RESULTS)
    assert len(expected["records"]) == 2 and len(expected["weights"]) == 4  # unet + embeddings, 2 rounds

    workdir = tmp_path / "killed"
    # After stage 2's 5th step in round 1 (stage 1 has 4; checkpoint 4 written): stage 1's result is in its
    # last checkpoint, stage 2 resumes at step 4.
    code, output = gal_run(workdir, tiny_assets["root"], tmp_path / "cache", "train:5", extra=(config, *ATTN))
    assert code == -signal.SIGKILL, output[-3000:]
    stages = sorted(p.name for p in (workdir / "rounds" / "1" / "checkpoints").iterdir())
    assert stages == ["s1_inversion", "s2_attention"]
    code, output = gal_run(workdir, tiny_assets["root"], tmp_path / "cache", extra=(config, *ATTN))
    assert code == 0, output[-3000:]
    assert "round 1 train s1_inversion" not in output  # finished: read from its checkpoint
    assert outcome(workdir, RESULTS) == expected
    assert not leftovers(workdir)


MUDI = ("--config=configs/tiny_cpu.py:mudi", "--config.train.steps=4", "--config.train.batch_size=2",
        "--config.train.checkpoint_every=2", "--config.sample.steps=2", "--config.sample.num_per_prompt=2",
        "--config.gal.rounds=2", "--config.gal.k=2", "--config.gal.feedback=random", "--config.data.segmix.prob=0.5",
        "--config.train.learning_rate=0.05")  # large: the test needs deltas that show


def test_two_subjects_run_gal_rounds_resume_after_a_kill_and_export_a_lora_diffusers_loads(tiny_assets, tmp_path):
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from gal_jax import models

    code, output = gal_run(tmp_path / "plain", tiny_assets["root"], tmp_path / "cache", extra=MUDI)
    assert code == 0, output[-3000:]
    expected = outcome(tmp_path / "plain", RESULTS)
    assert len(expected["records"]) == 2 and expected["records"][0]["selected"]
    assert expected["records"][0]["concept_phrase"] == "<tiny-teapot> teapot and <tiny-cat> cat"
    # The identity check (tiny_cpu:mudi sets gal.identity_check='clip'): every number is in the
    # record, and the rates recompute from it.
    first = expected["records"][0]
    assert first["schema_version"] == 3 and first["identity_check"] == "clip" and first["subjects"] == ["a", "b"]
    for direction in first["directions"]:
        sims = np.array([image["sim_subjects"] for image in direction["images"]])
        assert sims.shape == (2, 2, 2)
        mixed = acquisition.identity_mixed(sims)
        assert [image["identity_mixed"] for image in direction["images"]] == mixed.tolist()
        failed = [image["overfit"] or m for image, m in zip(direction["images"], mixed)]
        assert direction["overfit_rate"] == pytest.approx(np.mean(failed))
    workdir = tmp_path / "killed"
    code, output = gal_run(workdir, tiny_assets["root"], tmp_path / "cache", "train:3", extra=MUDI)
    assert code == -signal.SIGKILL, output[-3000:]
    code, output = gal_run(workdir, tiny_assets["root"], tmp_path / "cache", extra=MUDI)
    assert code == 0, output[-3000:]
    assert outcome(workdir, RESULTS) == expected  # Seg-Mix draws resume where they stopped
    assert not leftovers(workdir)
    page = (workdir / "report.html").read_text()
    assert "method <b>mudi</b>" in page and "pipe.load_lora_weights(" in page

    model = workdir / "model"
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(model)
    sd, params = models.load_stable_diffusion(model)  # the exported (float16) base weights, as the pipe's
    _, result = export.load_personalization(sd, workdir / "rounds" / "2" / "personalization")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, sd.unet.config.in_channels, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, sd.unet.config.cross_attention_dim)).astype(np.float32)
    t = np.array([10, 500])
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ours = np.asarray(sd.apply_unet(result.apply(params).unet, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)))
    base = np.asarray(sd.apply_unet(params.unet, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)))
    assert np.abs(ours - base).max() > 1e-2  # trained deltas
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-3)

    # `gal-jax sample` from the run: {id} slots name the subjects; the run's init_gamma applies.
    from gal_jax import outputs

    (tmp_path / "prompts.txt").write_text("{a} and {b} on the beach\n")
    out = outputs.sample_from_run(workdir, None, tmp_path / "prompts.txt", 2, tmp_path / "samples")
    index = json.loads((out / "index.json").read_text())
    assert [e["prompt"] for e in index] == ["<tiny-teapot> teapot and <tiny-cat> cat on the beach"] * 2
    assert all((out / e["path"]).is_file() for e in index)


def test_textual_inversion_on_a_style_concept_needs_and_trains_the_token_its_captions_read(tiny_assets, tmp_path):
    style = tmp_path / "style"
    shutil.copytree(tiny_assets["style_concept"], style)
    config = tiny_cpu.with_method(small_config(tiny_assets, data__kind="style", gal__rounds=2), "textual_inversion")
    config.data.concept_dir = str(style)
    config.model.sd_path, config.model.clip_path = str(tiny_assets["sd"]), str(tiny_assets["clip"])
    config.train.new_token, config.train.new_token_init = "<wc>", "painting"
    # Captions that never read the token: refused before anything trains (it would learn nothing).
    with pytest.raises(ValueError, match=r"init.json: the new token '<wc>' .* is not in the caption 'A "):
        driver.run(config, tmp_path / "refused")
    assert not (tmp_path / "refused" / "rounds").exists()
    entries = json.loads((style / "init.json").read_text())
    for entry in entries:
        entry["instance_prompt"] = entry["instance_prompt"].replace("watercolor painting style", "<wc> style")
    (style / "init.json").write_text(json.dumps(entries))
    driver.run(config, tmp_path / "run")
    records = driver.read_records(tmp_path / "run")
    assert records[0].concept_phrase == "in <wc> style"
    assert records[0].directions and all(d.prompt.endswith("in <wc> style") for d in records[0].directions)
    # The random-init tiny models may stop after round 1; every round run and the export hold the token.
    rounds = [tmp_path / "run" / "rounds" / str(r.round) / "personalization" for r in records]
    for embeds in [folder / EMBEDDINGS_FILE for folder in rounds] + [tmp_path / "run" / "model" / EMBEDDINGS_FILE]:
        with safe_open(embeds, "numpy") as saved:
            assert list(saved.keys()) == ["<wc>"]
