"""The launch scripts' dry runs: the exact command each worker runs, arguments intact, nothing run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[1] / "launch"
ARGS = ["configs/sd15_object.py", "/shared/gal/my cat", "--config.data.class_prompt=a cat", "--config.gal.k=2"]


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_NUM_NODES", "TPU", "ZONE")}
    environment = {**inherited, "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=environment,
                          timeout=30)


def commands(output: str) -> dict[str, list[str]]:
    """Returns {label: argv} of the dry run's 'label: command' lines."""
    lines = (line.split(": ", 1) for line in output.splitlines())
    return {label: shlex.split(command) for label, command in lines}


def gal_jax_run(argv: list[str]) -> list[str]:
    """Returns the argv from `gal-jax` on (what follows env assignments and `env`)."""
    return argv[argv.index("gal-jax"):]


def test_single_gpu_runs_one_process_with_every_argument_intact():
    result = dry_run("single_gpu.sh", *ARGS)
    assert result.returncode == 0, result.stderr
    argv = commands(result.stdout)["run"]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in argv
    assert gal_jax_run(argv) == ["gal-jax", "run", f"--config={ARGS[0]}", f"--workdir={ARGS[1]}", *ARGS[2:]]


def test_multi_gpu_starts_one_process_per_gpu_with_its_id_and_device():
    result = dry_run("multi_gpu.sh", *ARGS, NUM_GPUS="4", PORT="4321")
    assert result.returncode == 0, result.stderr
    per_process = commands(result.stdout)
    assert list(per_process) == [f"process {i}" for i in range(4)]
    for i, argv in enumerate(per_process.values()):
        assert f"CUDA_VISIBLE_DEVICES={i}" in argv
        run = gal_jax_run(argv)
        assert run[:3] == ["gal-jax", "run", "--distributed"]
        assert {"--coordinator_address=127.0.0.1:4321", "--num_processes=4", f"--process_id={i}"} <= set(run)
        assert run[-4:] == [f"--config={ARGS[0]}", f"--workdir={ARGS[1]}", *ARGS[2:]]


def test_slurm_prints_the_srun_line_and_each_nodes_command():
    result = dry_run("slurm_gpu.sbatch", *ARGS, SLURM_JOB_NUM_NODES="3")
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    expected = ["gal-jax", "run", "--distributed", f"--config={ARGS[0]}", f"--workdir={ARGS[1]}", *ARGS[2:]]
    assert lines.pop("launch") == ["srun", *expected]
    assert list(lines) == [f"node {i} (SLURM_PROCID={i})" for i in range(3)]
    assert all(argv == expected for argv in lines.values())


def test_tpu_pod_runs_the_same_command_on_every_worker():
    result = dry_run("tpu_pod.sh", *ARGS, TPU="my-v5e-32", ZONE="us-west4-a")
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    gcloud = lines["launch"]
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32"]
    assert "--worker=all" in gcloud and "--zone=us-west4-a" in gcloud
    remote = next(arg for arg in gcloud if arg.startswith("--command=")).removeprefix("--command=")
    worker = result.stdout.split("every worker: ", 1)[1].strip()
    assert remote == worker  # what gcloud sends is what the workers run
    run = shlex.split(worker.rsplit("&& ", 1)[1])
    assert run == ["gal-jax", "run", "--distributed", f"--config={ARGS[0]}", f"--workdir={ARGS[1]}", *ARGS[2:]]


@pytest.mark.parametrize("script, env, message", [
    ("single_gpu.sh", {}, "usage:"),
    ("multi_gpu.sh", {"NUM_GPUS": "2"}, "usage:"),
    ("slurm_gpu.sbatch", {}, "usage:"),
    ("tpu_pod.sh", {"TPU": "t", "ZONE": "z"}, "usage:"),
])
def test_missing_arguments_print_the_usage(script, env, message):
    result = dry_run(script, "only-a-config.py", **env)
    assert result.returncode == 2 and message in result.stderr


def test_tpu_pod_without_a_tpu_name_says_what_to_set():
    result = dry_run("tpu_pod.sh", *ARGS)
    assert result.returncode != 0 and "set TPU" in result.stderr
