"""The host's CPU split into several JAX devices, so that a CPU run uses all its cores.

XLA:CPU runs each convolution on one core (measured on 2 AMD EPYC cores, jax 0.10.2: a 3x3 conv of
96 x 16 x 16 x 64 keeps 1.0 core busy; matmuls use both), so a UNet call keeps about one core
busy however large its batch. JAX devices run in parallel, and `--xla_force_host_platform_device_count=N`
makes N CPU devices (as numpyro's `set_host_device_count` does): work that splits its batch over the
mesh, such as generation (`gal_jax/sample.py`) and CLIP scoring, then runs on N cores at once. The
tiny world's generation: 3.8 images/s on one device, 5.7 on two (`gal-jax bench
sample`, 2 cores). A small train batch does not gain (its per-op overhead does not shrink with the
rows, and the gradients' all-reduce is added): `config.mesh.train_devices` trains on fewer devices.

The price: every device holds its own copy of replicated weights (fine for the tiny models; an
SD 1.5-sized UNet on CPU would need `mesh.fsdp` or fewer devices).

XLA reads the flag when the backend starts, so `split_host_cpu` must run before the first
`jax.devices()` (importing jax is fine); the CLI calls it as soon as it has the config.
"""

from __future__ import annotations

import os

from absl import logging

from gal_jax import host_malloc

FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """Returns the number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_count(value, where: str = "config.mesh.cpu_devices") -> int:
    """Returns `value` as a device count request (0 keeps XLA's one device, -1 one per core, N
    devices), or raises ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"{where}={value!r}: expected 0 (one CPU device), -1 (one per core) or a "
                         "positive number of CPU devices")
    return value


def split_host_cpu(count: int, environ=os.environ) -> int | None:
    """Makes the CPU backend start with `count` devices (-1: one per usable core; 0 or 1: leave it)
    by adding FLAG to XLA_FLAGS; returns the number set, or None where nothing was done: not on the
    CPU backend, XLA_FLAGS already sets FLAG (the user's or the tests' own split wins), or the
    backend has already started (logged)."""
    count = check_count(count)
    if count == -1:
        count = usable_cores()
    if count <= 1 or not host_malloc.runs_on_cpu(environ) or FLAG in environ.get("XLA_FLAGS", ""):
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        logging.warning("config.mesh.cpu_devices=%d ignored: the JAX backend has already started", count)
        return None
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {FLAG}={count}".strip()
    return count


def split_as_configured(config) -> int | None:
    """`split_host_cpu` with config.mesh.cpu_devices (0 in configs written before it existed)."""
    return split_host_cpu(config.mesh.get("cpu_devices", 0))
