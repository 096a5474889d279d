"""The `gal-jax` command line: usage errors, make-tiny, sample."""

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def gal_jax(*args, cwd=REPO):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "gal_jax.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_unknown_command_prints_usage():
    result = gal_jax("train")
    assert result.returncode != 0
    assert "usage: gal-jax {run|make-tiny|sample|evaluate|review|bench}" in result.stderr


def test_run_without_workdir_says_what_is_missing():
    result = gal_jax("run", "--config=configs/tiny_cpu.py")
    assert result.returncode != 0
    assert "`gal-jax run` needs --workdir" in result.stderr


def test_make_tiny_builds_the_real_layouts(tmp_path):
    result = gal_jax("make-tiny", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    for part in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/model_index.json",
                 "clip/model.safetensors", "clip/preprocessor_config.json",
                 "data/reference_images/object/teapot/init.json"):
        assert (tmp_path / part).is_file(), part


def test_sample_writes_pngs_and_an_index(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <tiny-teapot> teapot on the moon\na teapot in park\n")
    result = gal_jax(
        "sample", "--config=configs/tiny_cpu.py", f"--config.model.tiny_dir={tiny_assets['root']}",
        "--config.sample.steps=2", f"--prompts={prompts}", "--num-per-prompt=2", f"--out={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index) == 4
    assert all((tmp_path / "out" / e["path"]).is_file() for e in index)


def test_sample_then_evaluate_the_folder_writes_metrics(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <tiny-teapot> teapot on the moon\n")
    captions = tmp_path / "captions.txt"
    captions.write_text("a teapot on a table\na teapot on the grass\n")
    out = tmp_path / "out"
    sampled = gal_jax(
        "sample", "--config=configs/tiny_cpu.py", f"--config.model.tiny_dir={tiny_assets['root']}",
        "--config.sample.steps=2", f"--prompts={prompts}", "--num_per_prompt=2", f"--out={out}",
    )
    assert sampled.returncode == 0, sampled.stderr
    evaluated = gal_jax(
        "evaluate", f"--workdir={tmp_path / 'eval'}", f"--images={out}", f"--references={tiny_assets['object_concept']}",
        f"--captions={captions}", f"--clip_path={tiny_assets['clip']}", "--placeholder=<tiny-teapot>",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "eval" / "results.json").read_text())
    assert {"txt_aln", "img_aln", "ovf"} <= set(results[0] if isinstance(results, list) else results["results"][0])


def test_bad_config_value_is_one_clear_line_without_traceback(tmp_path):
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}", "--config.gal.feedback=oracle")
    assert result.returncode != 0
    assert "gal-jax run: error: config.gal.feedback='oracle'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_commands_and_their_flags():
    result = gal_jax("--help")
    assert result.returncode == 0
    assert "gal-jax bench train|sample|score" in result.stdout
    assert "--num_per_prompt" in result.stdout and "--workdir" in result.stdout
