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
"""

from __future__ import annotations

import dataclasses

import jax

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
