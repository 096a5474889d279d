"""glibc's allocator, set up for XLA:CPU before its threads start.

XLA:CPU allocates each step's temporaries (activations, workspaces: tens of MB for the tiny UNet's
train step) on its worker threads and frees them when the step ends. By default glibc gives worker
threads arenas of their own, hands emptied heap back to the kernel, and maps larger blocks afresh
each time, so every step touched its temporaries' pages anew: 16,700 page faults a step on the tiny
world's train step (2 CPU cores), a quarter of its time, most of it in the kernel. `use_one_arena`
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
round 2's training, where round 1 before its checkpoint had none. `use_one_arena` therefore also
turns glibc's mmap off (M_MMAP_MAX 0: every block comes from the heap, which grows with brk and
keeps what is freed, within the trim threshold). Measured on the README's main command cut to two
rounds (farm-bench, 3 interleaved pairs, 2 CPU cores): wall 0.91x (median; 0.80-0.91), round 2's
training 37.7-41.3 s against 45.1-49.0 s, no page faults in either round's steady state. The
price: memory freed in the middle of the heap stays with the process (peak 1254 MiB against 1107).

The gain is for executables loaded from the persistent compile cache. One that XLA compiles in the
same process runs at about glibc's default speed (0.148 s a step against 0.144, fresh cache per
run, 3 interleaved pairs): the compile leaves many freed blocks of distinct sizes over 768 KB in the
one arena, and glibc walks that size-sorted bin on every large allocation under the arena's lock
(perf: `_int_malloc` 11.6% of the samples, most on that walk). malloc_trim after the compile did
not help in the one run tried (it hands back pages; the blocks stay in the bin).

`use_one_arena()` must run before jax (or anything else) starts threads; the CLI and the tests'
conftest call it first thing. It acts only where it helps: glibc on Linux, JAX on its CPU backend
(JAX_PLATFORMS names cpu first, or no accelerator plugin is installed; an accelerator's host side
runs data-loading threads that one arena would serialise), MALLOC_ARENA_MAX not already set by
the user, and GAL_JAX_MALLOC_ONE_ARENA not 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt's parameters (glibc's malloc.h) and the values set, in this order.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 * 2**20), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**30),
            (M_TOP_PAD, 64 * 2**20))
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

_applied: bool | None = None


def runs_on_cpu(environ=os.environ) -> bool:
    """Returns whether JAX will compute on its CPU backend: JAX_PLATFORMS names cpu first, or is
    unset and no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def wanted(environ=os.environ, platform: str = sys.platform) -> bool:
    """Returns whether one arena helps this process (see the module docstring)."""
    return (platform.startswith("linux") and environ.get("GAL_JAX_MALLOC_ONE_ARENA", "1") != "0"
            and "MALLOC_ARENA_MAX" not in environ and runs_on_cpu(environ))


def use_one_arena() -> bool:
    """Sets glibc's allocator up as the module docstring says where `wanted()`; returns whether it
    did. Later calls return the first call's answer."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not wanted():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all([mallopt(parameter, value) == 1 for parameter, value in SETTINGS])
    return _applied
