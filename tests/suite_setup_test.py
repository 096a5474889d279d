"""The suite's own set-up (conftest.py): how many worker processes `-n auto` starts, the order files
are dealt out in, and that the tests still run where pytest-xdist is absent or switched off."""

import os
import subprocess
import sys
from pathlib import Path

import conftest

REPO = Path(__file__).parents[1]


def test_auto_workers_one_per_core_within_memory_and_one_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096}.get(name, 13 * 2**30 // 4096))
    assert conftest.pytest_xdist_auto_num_workers(None) == 2  # 13 GiB: two workers' memory
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096}.get(name, 2**40 // 4096))
    assert conftest.pytest_xdist_auto_num_workers(None) == conftest.MAX_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert conftest.pytest_xdist_auto_num_workers(None) == 1
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert conftest.pytest_xdist_auto_num_workers(None) == 1  # the workers would share one GPU


def test_the_minutes_long_files_are_collected_first_and_the_rest_keep_their_order():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    files = list(dict.fromkeys(line.split("::")[0].removeprefix("tests/")
                               for line in result.stdout.splitlines() if "::" in line))
    first = [name for name in conftest.RUN_FIRST if name in files]
    assert files[:len(first)] == first
    rest = files[len(first):]
    assert rest == sorted(rest) and "suite_setup_test.py" in rest


def test_the_suite_runs_without_pytest_xdist():
    """pytest.ini asks for `-n auto`; with xdist off (or not installed, as on the GPU image) and the
    ini's options cleared, conftest's xdist hook must not break collection."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:xdist", "-p",
                             "no:cacheprovider", "-q", "tests/suite_setup_test.py", "-k", "auto_workers"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
