"""The `gal-jax` command line: usage errors, make-tiny, sample."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]


def gal_jax(*args, cwd=REPO):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "gal_jax.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_unknown_command_prints_usage():
    result = gal_jax("train")
    assert result.returncode != 0
    assert "usage: gal-jax {run|export|sample|make-tiny|evaluate|review|bench}" in result.stderr


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


# ---------------------------------------------------------------------------------------------
# Every error a user can cause: one line, the right exit code, no traceback.


def assert_one_line_error(result, command: str, code: int, *fragments: str):
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("gal-jax ")]
    assert lines and lines[0].startswith(f"gal-jax {command}: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


@pytest.mark.parametrize("args, fragments", [
    (["--workdr=x"], ["unknown flag --workdr; did you mean --workdir?"]),
    (["--config.train.stepz=3"], ["unknown config field --config.train.stepz; did you mean --config.train.steps?"]),
    (["--config.trian.steps=3"], ["unknown config field --config.trian.steps; did you mean --config.train?"]),
    (["--config.train.steps=abc"], ["--config.train.steps=abc: invalid literal for int()"]),
    (["--config.gal.feedback=oracle"], ["config.gal.feedback='oracle'; expected one of"]),
    (["--config.train.save_dtype=int8"], ["config.train.save_dtype='int8'; expected one of"]),
    # Values only the trainer, sampler or scorer used to reject, after the workdir was written.
    (["--config.train.steps=-5"], ["train.steps must be a positive integer, got -5"]),
    (["--config.train.max_grad_norm=-1.0"], ["train.max_grad_norm=-1.0 must be >= 0"]),
    (["--config.train.warmup_steps=100000"], ["train.warmup_steps=100000 must lie in [0, train.steps="]),
    (["--config.sample.steps=0"], ["config.sample.steps=0 must be a positive integer"]),
    (["--config.sample.guidance_scale=0.5"], ["config.sample.guidance_scale=0.5 must be >= 1"]),
    (["--config.gal.score_batch=0"], ["config.gal.score_batch=0 must be >= 1"]),
    (["--config.mesh.tensor=2"],
     ["mesh: mesh.data=-1 x mesh.fsdp=1 x mesh.tensor=2 does not cover the 1 available devices"]),
    (["--config.mesh.tensor=0"], ["mesh.tensor=0: a mesh axis size is a positive integer or -1"]),
    (["--config.mesh.cpu_devices=-3"], ["config.mesh.cpu_devices=-3: expected 0 (one CPU device), -1"]),
    (["--config.mesh.train_devices=2"], ["mesh.train_devices=2: the mesh has only 1 device"]),
])
def test_bad_flags_and_config_fields_are_usage_errors(tmp_path, args, fragments):
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}", *args)
    assert_one_line_error(result, "run", 2, *fragments)
    assert not (tmp_path / "config.json").exists(), "a usage error wrote to the workdir"


def test_bad_counts_of_sample_and_bench_are_usage_errors(tmp_path):
    """--num_per_prompt=0 used to fall back to the config's count and write images; bench.iters=0
    failed after the benchmark ran, as 'no median for empty data'."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a teapot in park\n")
    sampled = gal_jax("sample", "--config=configs/tiny_cpu.py", f"--prompts={prompts}", "--num_per_prompt=0",
                      f"--out={tmp_path / 'out'}")
    assert_one_line_error(sampled, "sample", 2, "--num_per_prompt=0 must be >= 1")
    assert not (tmp_path / "out").exists()
    sampled = gal_jax("sample", "--config=configs/tiny_cpu.py", f"--prompts={prompts}", "--num_per_prompt=1",
                      "--config.sample.guidance_scale=0.5", f"--out={tmp_path / 'out'}")
    assert_one_line_error(sampled, "sample", 2, "config.sample.guidance_scale=0.5 must be >= 1")
    assert not (tmp_path / "out").exists()
    benched = gal_jax("bench", "train", "--config=configs/tiny_cpu.py", "--config.bench.iters=0")
    assert_one_line_error(benched, "bench", 2, "config.bench.iters=0 must be >= 1")
    # evaluate --config splits the CPU as the config says (as run and sample do), checking the value first.
    evaluated = gal_jax("evaluate", "--config=configs/tiny_cpu.py", "--config.mesh.cpu_devices=-3",
                        f"--workdir={tmp_path / 'eval'}", f"--images={tmp_path}", f"--references={tmp_path}")
    assert_one_line_error(evaluated, "evaluate", 2, "config.mesh.cpu_devices=-3: expected 0 (one CPU device), -1")
    assert not (tmp_path / "eval").exists()


def test_a_config_file_that_is_missing_or_does_not_import_is_named(tmp_path):
    missing = gal_jax("run", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}")
    assert_one_line_error(missing, "run", 2, f"--config={tmp_path / 'nope.py'}: no such file")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return (\n")
    result = gal_jax("run", f"--config={broken}", f"--workdir={tmp_path}")
    assert_one_line_error(result, "run", 2, f"{broken}:", "does not import")
    variant = gal_jax("run", "--config=configs/sd15_object.py:bogus", f"--workdir={tmp_path}")
    assert_one_line_error(variant, "run", 2, "unknown variant 'bogus' of sd15_object")


def test_an_unknown_command_and_a_missing_flag_are_usage_errors():
    assert_one_line_error(gal_jax("train"), "<command>", 2, "usage: gal-jax {run|export|sample")
    assert_one_line_error(gal_jax("export", "--out=x"), "export", 2, "`gal-jax export` needs --workdir")


def test_a_workdir_that_is_a_file_is_refused_before_any_model_loads(tmp_path):
    file = tmp_path / "run"
    file.write_text("")
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={file}",
                     f"--config.model.tiny_dir={tmp_path / 'never_built'}")
    assert_one_line_error(result, "run", 1, f"{file}: --workdir is a file, not a folder")
    assert not (tmp_path / "never_built").exists()


def test_a_busy_workdir_names_the_holder(tmp_path):
    from gal_jax.workdir import Workdir

    with Workdir(tmp_path).lock("gal-jax run --workdir=elsewhere"):
        result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}")
    assert_one_line_error(result, "run", 1, f"in use by pid {os.getpid()} (gal-jax run --workdir=elsewhere)")


def test_a_damaged_config_json_in_the_workdir_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model": ')
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}")
    assert_one_line_error(result, "run", 1, f"{tmp_path / 'config.json'}: not valid JSON", "damaged")


def test_a_partial_set_of_real_paths_names_the_missing_one(tiny_assets, tmp_path):
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}",
                     f"--config.model.sd_path={tiny_assets['sd']}",
                     f"--config.data.concept_dir={tiny_assets['object_concept']}")
    assert_one_line_error(result, "run", 1, "config.model.clip_path is empty, but config.model.sd_path, "
                                            "config.data.concept_dir is set")


def test_verbosity_1_keeps_the_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{")
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}", "--verbosity=1")
    assert result.returncode != 0 and "Traceback" in result.stderr


# ---------------------------------------------------------------------------------------------
# A run's result: exported and sampled from; human feedback's exit code.

SMALL = ("--config.train.steps=2", "--config.train.checkpoint_every=1", "--config.sample.steps=1",
         "--config.sample.num_per_prompt=2")


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={workdir}",
                     f"--config.model.tiny_dir={tiny_assets['root']}", "--config.gal.feedback=none",
                     "--config.export.dtype=float32", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Final model (round 1): {workdir / 'model'}" in result.stdout
    return workdir


def test_export_writes_a_round_as_a_diffusers_folder_our_loader_reads(finished_run, tmp_path):
    from gal_jax import models

    result = gal_jax("export", f"--workdir={finished_run}", f"--out={tmp_path / 'exported'}", "--dtype=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    for part in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / "exported" / part).is_file(), part
    _, exported = models.load_stable_diffusion(tmp_path / "exported")
    _, final = models.load_stable_diffusion(finished_run / "model")
    for ours, theirs in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(final)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_sample_from_a_run_uses_its_model_and_its_config(finished_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <tiny-teapot> teapot on the moon\n")
    result = gal_jax("sample", f"--workdir={finished_run}", f"--prompts={prompts}", "--num_per_prompt=2")
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((finished_run / "samples" / "round-1" / "index.json").read_text())
    assert [e["prompt"] for e in index] == ["a <tiny-teapot> teapot on the moon"] * 2


@pytest.mark.parametrize("args, fragments", [
    (["--round=5", "--out=x"], ["round 5 has not finished (finished: [1])"]),
])
def test_export_of_a_round_that_did_not_finish_is_named(finished_run, args, fragments):
    assert_one_line_error(gal_jax("export", f"--workdir={finished_run}", *args), "export", 1, *fragments)


def test_export_of_a_finished_round_whose_model_folder_was_deleted_says_the_workdir_is_damaged(finished_run, tmp_path):
    """It used to advise rerunning `gal-jax run`, which answers 'complete, nothing to do'."""
    damaged = tmp_path / "run"
    shutil.copytree(finished_run, damaged)
    shutil.rmtree(damaged / "rounds" / "1" / "unet")
    result = gal_jax("export", f"--workdir={damaged}", f"--out={tmp_path / 'x'}")
    assert_one_line_error(result, "export", 1, f"{damaged / 'rounds' / '1' / 'unet'}: missing, and round 1 finished",
                          "the workdir is damaged")
    assert not (tmp_path / "x").exists()


def test_export_from_a_folder_that_is_no_workdir_is_named(tmp_path):
    result = gal_jax("export", f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}")
    assert_one_line_error(result, "export", 1, f"{tmp_path / 'config.json'}: missing; {tmp_path} is not a gal-jax "
                                               "workdir")


def test_a_run_waiting_for_human_feedback_exits_with_code_3(tiny_assets, tmp_path):
    result = gal_jax("run", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}",
                     f"--config.model.tiny_dir={tiny_assets['root']}", "--config.gal.feedback=human", *SMALL)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Round 1 waits for human feedback: open" in result.stdout
    assert (tmp_path / "rounds" / "1" / "review.html").is_file()


def test_evaluating_a_folder_with_a_config_but_no_clip_path_uses_the_configs_clip(tiny_assets, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(images / f"{i}.png")
    prompts, captions = tmp_path / "prompts.txt", tmp_path / "captions.txt"
    prompts.write_text("a teapot on the moon\na teapot in park\n")
    captions.write_text("a teapot on a table\n")
    result = gal_jax("evaluate", "--config=configs/tiny_cpu.py", f"--config.model.tiny_dir={tiny_assets['root']}",
                     f"--workdir={tmp_path / 'eval'}", f"--images={images}", f"--prompts={prompts}",
                     f"--references={tiny_assets['object_concept']}", f"--captions={captions}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "eval" / "eval" / "results.md").is_file()


def test_commands_other_than_bench_load_the_tokenizer_without_importing_pytorch(monkeypatch):
    from gal_jax import main, models

    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # as in a fresh CLI process
    environ = {}
    assert main.tokenizer_only_environ(["gal-jax", "run"], environ) and environ == {"USE_TORCH": "0"}
    assert not main.tokenizer_only_environ(["gal-jax", "bench", "train"], {})  # --compare-torch runs diffusers
    kept = {"USE_TORCH": "1"}
    assert not main.tokenizer_only_environ(["gal-jax", "sample"], kept) and kept == {"USE_TORCH": "1"}
    monkeypatch.undo()

    # A fresh process as the CLI sets it up: no PyTorch imported, the same token ids.
    folder = REPO / "gal_jax" / "assets" / "tiny_world" / "sd" / "tokenizer"
    prompts = ["a sks teapot on the beach", "A Red CUP  in park!"]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from gal_jax import main, models\n"
        "assert main.tokenizer_only_environ(['gal-jax', 'sample'])\n"
        f"tokenizer = models._load_tokenizer(Path({str(folder)!r}))\n"
        f"ids = tokenizer({prompts!r}, padding='max_length', max_length=16).input_ids\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': ids}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert fresh["torch"] is False
    expected = models._load_tokenizer(folder)(prompts, padding="max_length", max_length=16).input_ids
    assert fresh["ids"] == expected
