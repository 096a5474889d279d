"""Device memory of the loop's compiled functions, from XLA's buffer assignment.

`compiled.memory_analysis()` of an SPMD executable describes one device's program: its arguments
(each device's shard of the params, AdamW moments, frozen weights and batch), its outputs, the
temporaries XLA allocates (activations kept for the backward pass, workspaces) and the bytes of
outputs that reuse donated arguments. A device then needs at most
arguments + outputs - aliased + temporaries + code.

Nothing is allocated: models come as ShapeDtypeStructs, so an SD 1.5-sized config is checked on a
CPU host before any accelerator is booked. The figures are the buffer assignment of the backend
that compiles: XLA:GPU and XLA:TPU fuse and schedule differently, so on a CPU host they estimate
an accelerator's need (`gal-jax bench` prints the measured peak where it runs on one).

`linear_need` splits a function's need into fixed + per item from two batch sizes; `free_bytes`
reads what the devices have free, so a batch can be sized to fit (the generation chunk's AUTO).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import numpy as np

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs for one compiled function."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments' buffers
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        """The most the function holds at once: inputs, fresh outputs, temporaries, code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def figures(self, prefix: str) -> dict[str, float]:
        """Returns the sizes in GiB as `{prefix}arguments_gib`, ... `{prefix}peak_gib`."""
        sizes = {name: getattr(self, name) for name in ("arguments", "outputs", "aliased", "temporaries", "peak")}
        return {f"{prefix}{name}_gib": round(size / GIB, 3) for name, size in sizes.items()}


def of_compiled(compiled: jax.stages.Compiled) -> DeviceMemory:
    """Returns one device's memory figures of a compiled function."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # older jax: one entry per executable
        stats = stats[0] if stats else None
    if stats is None:
        raise ValueError("XLA gave no memory analysis for this executable on this backend")
    return DeviceMemory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
    )


def fits(budget_gib: float, **needs: DeviceMemory) -> str:
    """Returns 'yes' when every named need's peak is within `budget_gib`, else 'no: ' and those
    over it."""
    over = [f"{name} {need.peak / GIB:.2f} GiB" for name, need in needs.items() if need.peak > budget_gib * GIB]
    return f"no: {', '.join(over)} > {budget_gib:g} GiB" if over else "yes"


def abstract(tree):
    """Returns a tree of arrays (or ShapeDtypeStructs) as ShapeDtypeStructs without shardings."""
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


@dataclasses.dataclass(frozen=True)
class LinearNeed:
    """Bytes one device allocates for a call of n items beyond its resident arguments (the
    weights): fixed + per_item * n."""

    fixed: int
    per_item: int

    def most_items(self, free: int) -> int:
        """Returns the most items whose need fits in `free` bytes (0 when none does)."""
        return max((free - self.fixed) // self.per_item, 0)


def linear_need(small: DeviceMemory, large: DeviceMemory, *, items: tuple[int, int]) -> LinearNeed:
    """Returns the need per call of the same function compiled for items[0] (`small`) and
    items[1] (`large`) items per device: the per-item bytes are the peaks' slope (per-item
    arguments included); the fixed bytes are what the call allocates (outputs, temporaries,
    code) less its per-item part, leaving out the arguments, since the weights already sit on
    the device."""
    count = items[1] - items[0]
    if count <= 0:
        raise ValueError(f"linear_need: items {items} must grow")
    small_allocated, large_allocated = small.peak - small.arguments, large.peak - large.arguments
    fixed = small_allocated - (large_allocated - small_allocated) * items[0] // count
    return LinearNeed(fixed=max(fixed, 0), per_item=max(-(-(large.peak - small.peak) // count), 1))


def device_memory_stats(device: jax.Device) -> dict | None:
    """Returns `device.memory_stats()`, or None where the backend keeps none (XLA:CPU)."""
    try:
        return device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None


def free_bytes(devices: Iterable[jax.Device]) -> int | None:
    """Returns the fewest bytes free (bytes_limit - bytes_in_use) on any of `devices`, the same
    number in every process (their minimum, to MiB); None where a device keeps no statistics."""
    frees = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        stats = device_memory_stats(device) or {}
        if "bytes_limit" not in stats:
            frees.append(None)
        else:
            frees.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    mine = -1 if None in frees or not frees else min(frees) // 2**20
    if jax.process_count() > 1:  # every process must choose the same shapes
        from jax.experimental import multihost_utils

        everyone = np.asarray(multihost_utils.process_allgather(np.int32(mine)))
        mine = -1 if (everyone < 0).any() else int(everyone.min())
    return None if mine < 0 else mine * 2**20
