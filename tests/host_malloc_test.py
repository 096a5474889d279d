"""glibc's allocator set up for XLA:CPU (gal_jax/host_malloc.py): one arena, or one per thread."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gal_jax import host_malloc

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cuda", True), ("cuda", False),
                                                 ("tpu,cpu", False), (" cpu ", True)])
def test_jax_platforms_decides_the_backend(platforms, expected):
    assert host_malloc.runs_on_cpu({"JAX_PLATFORMS": platforms}) is expected


def test_without_jax_platforms_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    assert host_malloc.runs_on_cpu({}) is all(real(name) is None for name in host_malloc.ACCELERATOR_PLUGINS)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "jax_cuda12_plugin" else None)
    assert not host_malloc.runs_on_cpu({})


@pytest.mark.parametrize("environ, platform, expected", [
    ({"JAX_PLATFORMS": "cpu"}, "linux", True),
    ({"JAX_PLATFORMS": "cpu", "GAL_JAX_MALLOC_ONE_ARENA": "0"}, "linux", False),  # the user's opt-out
    ({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"}, "linux", False),  # the user's own setting
    ({"JAX_PLATFORMS": "cuda"}, "linux", False),  # data-loading threads would share one arena
    ({"JAX_PLATFORMS": "cpu"}, "darwin", False),  # not glibc
])
def test_set_up_only_where_it_helps(environ, platform, expected):
    assert host_malloc.wanted(environ, platform) is expected


ARENAS = textwrap.dedent("""
    import ctypes, re, sys, tempfile
    from gal_jax import host_malloc
    print("applied", str(host_malloc.set_up(compiles=COMPILES)).replace(" ", "_"))
    import jax, jax.numpy as jnp
    x, w = jnp.ones((32, 64, 64, 16)), jnp.ones((3, 3, 16, 16))
    conv = jax.jit(lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for _ in range(3):
        conv(x).block_until_ready()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    path = tempfile.mktemp()
    stream = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print("arenas", len(re.findall('<heap nr=', open(path).read())))
""")


ONE, PER_THREAD = (name.replace(" ", "_") for name in (host_malloc.ONE_ARENA, host_malloc.ARENA_PER_THREAD))


def _probe(script: str, figure: str, compiles: bool = False, **env) -> tuple[str, int]:
    """Runs `script` in a fresh CPU process (no MALLOC_ARENA_MAX, `env` added) that sets glibc up
    for a process that `compiles` or not; returns what it printed as "applied <layout>" and
    "<figure> <count>"."""
    environ = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in ("MALLOC_ARENA_MAX", "GAL_JAX_MALLOC_ONE_ARENA"):
        environ.pop(name, None)
    environ.update(env)
    script = f"COMPILES = {compiles}\n" + script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    applied, count = re.search(rf"applied (\w+)\n{figure} (\d+)", result.stdout).groups()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
def test_xla_cpu_threads_share_the_main_arena_unless_the_process_compiles():
    assert _probe(ARENAS, "arenas") == (ONE, 1)
    applied, count = _probe(ARENAS, "arenas", compiles=True)
    assert applied == PER_THREAD and count > 1  # XLA's worker threads took arenas of their own
    assert _probe(ARENAS, "arenas", compiles=True, GAL_JAX_MALLOC_ONE_ARENA="1") == (ONE, 1)  # asked for
    applied, count = _probe(ARENAS, "arenas", GAL_JAX_MALLOC_ONE_ARENA="0")
    assert applied == "None" and count > 1  # the opt-out: glibc's defaults


def test_the_cli_and_the_test_processes_set_it_up_before_jax():
    # conftest called it first, for a process that compiles (the tests keep no compile cache)
    assert host_malloc.set_up() == host_malloc.layout(compiles=True)
    probe = textwrap.dedent("""
        import sys
        from gal_jax import host_malloc, main
        first = host_malloc.set_up
        host_malloc.set_up = lambda: print("jax imported first:", "jax" in sys.modules) or first()
        sys.argv = ["gal-jax", "nonsense"]
        main.run()
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-2000:]  # the usage error, after the set-up
    assert "jax imported first: False" in result.stdout, (result.stdout, result.stderr[-2000:])


# A block over glibc's largest mmap threshold (32 MB), asked for and freed again and again, as
# XLA:CPU asks for the tiny world's train step's 65 MiB of temporaries every step.
LARGE_BLOCKS = textwrap.dedent("""
    import ctypes, resource
    from gal_jax import host_malloc
    print("applied", str(host_malloc.set_up(compiles=COMPILES)).replace(" ", "_"))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 96 * 2**20

    def use_and_free():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    use_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        use_and_free()
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("compiles, layout", [(False, ONE), (True, PER_THREAD)])
def test_blocks_over_the_mmap_threshold_are_reused_not_mapped_afresh(compiles, layout):
    pages = 3 * 96 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    applied, reused = _probe(LARGE_BLOCKS, "faults", compiles=compiles)
    assert applied == layout and reused < pages // 20  # the freed block came back from the heap
    applied, mapped = _probe(LARGE_BLOCKS, "faults", GAL_JAX_MALLOC_ONE_ARENA="0")
    assert applied == "None" and mapped > pages // 2  # glibc's default maps each block anew


def test_a_process_compiles_where_the_persistent_cache_holds_no_executable(tmp_path):
    cache = tmp_path / "xla-lru"
    assert not host_malloc.compilation_cache_has_executables(cache)  # not made yet
    cache.mkdir()
    (cache / ".lockfile").touch()
    assert not host_malloc.compilation_cache_has_executables(cache)
    (cache / "jit_step-0123abcd-cache").touch()
    assert host_malloc.compilation_cache_has_executables(cache)
    environ = {"JAX_PLATFORMS": "cpu"}
    assert host_malloc.layout(compiles=True, environ=environ) == host_malloc.ARENA_PER_THREAD
    assert host_malloc.layout(compiles=False, environ=environ) == host_malloc.ONE_ARENA
    assert host_malloc.layout(compiles=True, environ={**environ, "GAL_JAX_MALLOC_ONE_ARENA": "1"}) == host_malloc.ONE_ARENA
    assert host_malloc.layout(compiles=False, environ={**environ, "GAL_JAX_MALLOC_ONE_ARENA": "0"}) is None
