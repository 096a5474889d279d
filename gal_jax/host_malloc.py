"""glibc's allocator, set up for XLA:CPU before its threads start.

XLA:CPU allocates each step's temporaries (activations, workspaces: tens of MB for the tiny UNet's
train step) on its worker threads and frees them when the step ends. By default glibc gives worker
threads arenas of their own, hands emptied heap back to the kernel, and maps larger blocks afresh
each time, so every step touched its temporaries' pages anew: 16,700 page faults a step on the tiny
world's train step (2 CPU cores), a quarter of its time, most of it in the kernel. `set_up`'s one arena
keeps freed memory in the process for the next step to reuse: one arena for every thread, blocks up
to 32 MB served from it (a fixed threshold: glibc's sliding one is what made the single arena
fragment and slow down over a run), emptied memory kept up to 1 GB, the heap grown 64 MB at a time.
Measured on the tiny world's train step (`gal-jax bench train --config=configs/tiny_world.py
--config.bench.iters=400`, 2 CPU cores, farm-bench, 3 interleaved pairs): 0.097 s a step instead of
0.138 (median), kernel time 3.4 s instead of 24 s, peak memory 1163 MiB instead of 1220. On the
README's main command the gain is smaller and noisy on this host (three rounds 293 s and, with the
same settings from MALLOC_* variables, 265 s, against 299 s without; training 51-53 s and 42-43 s a
round against 54 s). One arena alone sped the first round's training up and then slowed later
rounds down (fragmentation), hence the fixed threshold. Generation, whose scan keeps its buffers,
is unchanged. The price: the process keeps up to about 1 GB of freed memory for reuse.

Blocks over 32 MB (glibc's largest mmap threshold) were still mapped afresh and unmapped on every
request: the tiny world's train step asks for one of 65 MiB each step. While the heap's free top
holds it (after the compile) it is served from there, but the first checkpoint's host copies leave
the heap fragmented, and from then on every step mapped it anew: 300,000 page faults in 5 s of
round 2's training, where round 1 before its checkpoint had none. `set_up` therefore also
turns glibc's mmap off (M_MMAP_MAX 0: every block comes from the heap, which grows with brk and
keeps what is freed, within the trim threshold). Measured on the README's main command cut to two
rounds (farm-bench, 3 interleaved pairs, 2 CPU cores): wall 0.91x (median; 0.80-0.91), round 2's
training 37.7-41.3 s against 45.1-49.0 s, no page faults in either round's steady state. The
price: memory freed in the middle of the heap stays with the process (peak 1254 MiB against 1107).

That one arena is right for a process that loads its executables from the persistent compile
cache, and wrong for one that compiles them: LLVM's compile leaves many freed blocks of distinct
sizes over 768 KB in the arena, glibc walks that size-sorted bin on every large allocation and
every sorting of a freed block, under the arena's one lock (perf, 2 cores: `_int_malloc` 23.6% of
the steps' samples, futex waits on the arena lock about 10% more; malloc_trim after the compile
hands pages back but leaves the blocks in the bin, and mmap turned on during the compile leaves the
small blocks' debris). So a process that will compile (`compiles`, by default: the persistent cache
holds no executable yet, as on a fresh machine, and always in the tests, which keep none) keeps
glibc's arena per thread, where the compile's debris stays in the compiling thread's arena, with
the rest of the settings (mmap off, emptied memory kept). Measured on 2 CPU cores (session 31):

| process | train step (`bench train`, tiny world, median of 200) | README's main command |
|---|---|---|
| compiles, one arena | 0.134-0.140 s | 250 s |
| compiles, an arena per thread | 0.082-0.098 s (compile 22-31 s, one arena's 35-39) | 165 s |
| loads from the cache, one arena | 0.057-0.064 s | 124 s |
| loads from the cache, an arena per thread | 0.083-0.088 s (worker threads' heaps mapped and unmapped each step) | 144 s |

`set_up()` must run before jax (or anything else) starts threads; the CLI and the tests' conftest
call it first thing. It acts only where it helps: glibc on Linux, JAX on its CPU backend
(JAX_PLATFORMS names cpu first, or no accelerator plugin is installed; an accelerator's host side
runs data-loading threads that one arena would serialise), MALLOC_ARENA_MAX not already set by
the user, and GAL_JAX_MALLOC_ONE_ARENA not 0 (1 asks for one arena whether or not the process will
compile).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

from gal_jax import COMPILATION_CACHE  # the package's __init__: nothing there starts a thread

# mallopt's parameters (glibc's malloc.h) and the values set, in this order.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
KEEP_MEMORY = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 64 * 2**20))
ONE_ARENA, ARENA_PER_THREAD = "one arena", "an arena per thread"
LAYOUTS = {ONE_ARENA: ((M_ARENA_MAX, 1),) + KEEP_MEMORY, ARENA_PER_THREAD: KEEP_MEMORY}
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

_applied: str | None = None  # the layout set up; "" where none was


def runs_on_cpu(environ=os.environ) -> bool:
    """Returns whether JAX will compute on its CPU backend: JAX_PLATFORMS names cpu first, or is
    unset and no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def wanted(environ=os.environ, platform: str = sys.platform) -> bool:
    """Returns whether setting glibc up helps this process (see the module docstring)."""
    return (platform.startswith("linux") and environ.get("GAL_JAX_MALLOC_ONE_ARENA", "1") != "0"
            and "MALLOC_ARENA_MAX" not in environ and runs_on_cpu(environ))


def compilation_cache_has_executables(directory) -> bool:
    """Returns whether JAX's persistent compilation cache at `directory` holds any executable."""
    try:
        return any(name.endswith("-cache") for name in os.listdir(directory))
    except OSError:  # not made yet
        return False


def layout(compiles: bool, environ=os.environ) -> str | None:
    """Returns the layout `set_up` applies (ONE_ARENA, ARENA_PER_THREAD), or None where glibc's
    defaults stay (see `wanted`)."""
    if not wanted(environ):
        return None
    if environ.get("GAL_JAX_MALLOC_ONE_ARENA") == "1" or not compiles:
        return ONE_ARENA
    return ARENA_PER_THREAD


def set_up(compiles: bool | None = None) -> str | None:
    """Sets glibc's allocator up as the module docstring says, for a process that will compile its
    XLA executables (`compiles`; None: the persistent compilation cache holds none yet) or load
    them; returns the layout applied, or None. Later calls return the first call's answer."""
    global _applied
    if _applied is not None:
        return _applied or None
    _applied = ""
    if compiles is None:
        compiles = not compilation_cache_has_executables(COMPILATION_CACHE)
    chosen = layout(compiles)
    if chosen is None:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if all([mallopt(parameter, value) == 1 for parameter, value in LAYOUTS[chosen]]):
        _applied = chosen
    return _applied or None
