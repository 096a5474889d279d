"""Device mesh, parameter partition rules and global batches.

The mesh has three axes: 'data' (batch parallelism, params replicated), 'fsdp' (batch parallelism
with parameters and optimizer state sharded, ZeRO-3 style) and 'tensor' (Megatron-style model
parallelism: attention heads and MLP hidden units split over its devices, which all see the same
examples). Batches are sharded over ('data', 'fsdp') only and replicated over 'tensor'. With
mesh.tensor=1 (the default) the 'tensor' axis has size 1 and every sharding is what a two-axis
('data', 'fsdp') mesh gives.

Parameters are sharded by their logical axis names (MaxText style): every param of our models
(`gal_jax.nn`) names its axes ("embed", "mlp", "heads", "conv_out", ...; `nn.layers` lists them), and
a rule table maps logical names onto mesh axes in priority order. A dimension whose size the mesh
axis does not divide stays unsharded (the next rule may then take the mesh axis), and small arrays
(norms, biases) stay replicated. Optimizer states mirror the params, so a state leaf takes the axes
of the param whose path ends its own. The default table first gives "heads" and "mlp" to 'tensor'
(inert while it has size 1), then every axis to 'fsdp': with both larger than 1, an attention or MLP
kernel (embed, heads) splits its heads over 'tensor' and its embed rows over 'fsdp'.

Activations carry logical axes too (`ACTIVATION_NHWC`, `ACTIVATION_TOKENS`): the models mark block
outputs with `constrain`, which pins them (by `DEFAULT_ACTIVATION_RULES`: the batch over both mesh
axes) only inside an `activation_sharding(mesh)` context, as the train step's compilation opens.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
MESH_AXES = (*DATA_AXES, "tensor")
BATCH = P(DATA_AXES)
REPLICATED = P()

# (logical axis, mesh axis or None), in priority order: the first rule that names one of an array's
# logical axes, whose mesh axis is still free and divides that dimension, shards it.
LogicalRules = Sequence[tuple[str, "str | None"]]
# Megatron's split first: the query/key/value and fc1 kernels' output units and the output and fc2
# kernels' input units go to 'tensor', so each device computes its heads and its slice of the MLP,
# and the partial sums of the output projection and fc2 are all-reduced. While 'tensor' has size 1
# these two rules do nothing.
TENSOR_LOGICAL_RULES: tuple[tuple[str, str], ...] = (("heads", "tensor"), ("mlp", "tensor"))
DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | None], ...] = TENSOR_LOGICAL_RULES + (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("vocab", "fsdp"),
    ("time_embed", "fsdp"),
    ("text_time", "fsdp"),
    ("projection", "fsdp"),
    ("norm", None),
)
# Arrays smaller than this stay replicated: gathering them would cost more than they save.
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a ('data', 'fsdp', 'tensor') mesh; one size of -1 takes all remaining devices.

    Raises ValueError naming the config fields (mesh.data, mesh.fsdp, mesh.tensor) when the sizes
    are not positive (or -1) or do not multiply to the number of devices. 'tensor' varies fastest,
    so a tensor group is made of neighbouring devices (the fastest links on a GPU host or TPU slice).
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(
                f"mesh.{name}={size!r}: a mesh axis size is a positive integer or -1 (the remaining devices)"
            )
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        named = ", ".join(f"mesh.{name}" for name in free)
        raise ValueError(f"mesh: at most one of mesh.data, mesh.fsdp and mesh.tensor may be -1 (got {named})")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        sizes[free[0]] = count // fixed if count % fixed == 0 else -1
    if any(size < 1 for size in sizes.values()) or int(np.prod(list(sizes.values()))) != count:
        given = " x ".join(f"mesh.{name}={size}" for name, size in zip(sizes, (data, fsdp, tensor)))
        raise ValueError(f"mesh: {given} does not cover the {count} available devices")
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config: Any) -> Mesh:
    """Returns the mesh config.mesh describes over all devices (its data, fsdp and tensor sizes; a
    config written before mesh.tensor existed means tensor=1)."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.get("tensor", 1))


def train_mesh_from_config(mesh_config: Any, mesh: Mesh) -> Mesh:
    """Returns the mesh training runs on: `mesh` itself, or with mesh.train_devices = N > 0 the
    first N of its devices as (data, fsdp, tensor) with config.mesh's fsdp and tensor sizes.

    Raises ValueError naming mesh.train_devices when N is not a count of `mesh`'s devices that
    fsdp x tensor divides, or when the run spans several processes (each would train alone).
    """
    count, size = mesh_config.get("train_devices", 0), mesh.devices.size
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"mesh.train_devices={count!r}: expected 0 (the whole mesh) or a number of devices")
    if count in (0, size):
        return mesh
    if count > size:
        raise ValueError(f"mesh.train_devices={count}: the mesh has only {size} device{'s' if size > 1 else ''}")
    if jax.process_count() > 1:
        raise ValueError(f"mesh.train_devices={count}: training on part of the mesh needs a single process "
                         f"(this run has {jax.process_count()}); use 0")
    fsdp, tensor = mesh_config.fsdp, mesh_config.get("tensor", 1)
    data = 1 if -1 in (fsdp, tensor) else -1  # one axis takes the devices left
    fixed = abs(fsdp * tensor)
    if count % fixed:
        raise ValueError(f"mesh.train_devices={count} is not a multiple of mesh.fsdp x mesh.tensor = {fixed}")
    return make_mesh(data, fsdp, tensor, devices=list(mesh.devices.flat)[:count])


def num_batch_shards(mesh: Mesh) -> int:
    """Returns the number of shards a global batch is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    """Raises ValueError when `global_batch` cannot be split evenly over the mesh's batch axes."""
    shards = num_batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {shards} batch shards of the mesh "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {shards}."
        )


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(logical_axes: Sequence[str | None], shape: tuple[int, ...], mesh_shape: Mapping[str, int],
             rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> P:
    """Returns the PartitionSpec the rules give an array of this shape and these logical axes.

    Rules are tried in order; a rule applies when its logical name is one of the array's axes,
    that dimension is not yet sharded, its mesh axis is unused and larger than 1, and the mesh
    axis's size divides the dimension (an uneven dimension stays whole).
    """
    logical_axes = tuple(logical_axes)
    if len(logical_axes) != len(shape):
        raise ValueError(f"sharding: logical axes {logical_axes} do not match the shape {shape}")
    spec: list[str | None] = [None] * len(shape)
    if int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return REPLICATED
    used: set[str] = set()
    for logical, mesh_axis in rules:
        if mesh_axis is None or logical not in logical_axes or mesh_axis in used:
            continue
        if mesh_axis not in mesh_shape:
            raise ValueError(f"sharding rule ({logical!r}, {mesh_axis!r}): the mesh has no axis {mesh_axis!r}")
        dim = logical_axes.index(logical)
        size = mesh_shape[mesh_axis]
        if spec[dim] is None and size > 1 and shape[dim] % size == 0:
            spec[dim] = mesh_axis
            used.add(mesh_axis)
    return P(*spec)


# ---------------------------------------------------------------------------------------------
# Activations: logical constraints inside the models, active only where a mesh is given
# ---------------------------------------------------------------------------------------------

# (logical activation axis, mesh axes): the batch over both data axes; the other dimensions are
# not split. A constraint pins an array replicated over the mesh axes it does not name, so under
# 'tensor' each marked block output is whole on every device of a tensor group (Megatron's layout
# between blocks), while inside a block XLA follows the heads/mlp split of the weights.
ActivationRules = Sequence[tuple[str, "str | tuple[str, ...]"]]
DEFAULT_ACTIVATION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (("activation_batch", DATA_AXES),)
ACTIVATION_NHWC = ("activation_batch", "activation_height", "activation_width", "activation_embed")
ACTIVATION_TOKENS = ("activation_batch", "activation_length", "activation_embed")
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("gal_jax_activation_sharding", default=None)


def activation_spec(logical_axes: Sequence[str | None], shape: tuple[int, ...], mesh_shape: Mapping[str, int],
                    rules: ActivationRules = DEFAULT_ACTIVATION_RULES) -> P | None:
    """Returns the PartitionSpec pinning an activation of `shape` and these logical axes, or None
    when no rule shards any of its dimensions (then it is left to XLA, never forced replicated).

    A rule's mesh axes of size 1 are dropped; a dimension they do not divide stays unconstrained.
    """
    spec: list[Any] = [None] * len(shape)
    for logical, mesh_axes in rules:
        if logical not in logical_axes:
            continue
        axes = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes) if mesh_shape.get(a, 1) > 1)
        dim = tuple(logical_axes).index(logical)
        size = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
        if axes and spec[dim] is None and shape[dim] % size == 0:
            spec[dim] = axes if len(axes) > 1 else axes[0]
    return P(*spec) if any(name is not None for name in spec) else None


@contextlib.contextmanager
def _activation_sharding_set_to(value):
    token = _ACTIVATION_SHARDING.set(value)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def activation_sharding(mesh: Mesh, rules: ActivationRules = DEFAULT_ACTIVATION_RULES):
    """Within it, functions traced pin the activations the models mark with `constrain` to the
    shardings `rules` give them on `mesh` (e.g. the train step keeps every block's output
    batch-sharded, whatever layout the FSDP-sharded weights would suggest to XLA)."""
    return _activation_sharding_set_to((mesh, tuple(rules)))


def without_activation_sharding():
    """Within it, `constrain` leaves arrays as they are: for code traced per shard (the body of a
    shard_map), whose arrays are each device's block rather than global arrays."""
    return _activation_sharding_set_to(None)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Returns `x` with a sharding constraint from its logical axes under the active
    `activation_sharding` context; `x` itself outside one (or where no rule applies)."""
    active = _ACTIVATION_SHARDING.get()
    if active is None:
        return x
    mesh, rules = active
    spec = activation_spec(logical_axes, tuple(x.shape), dict(mesh.shape), rules)
    return x if spec is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def logical_rules(rules: Any) -> tuple[tuple[str, str | None], ...]:
    """Returns `rules` (config.mesh.rules: pairs of logical axis and mesh axis or None) checked,
    or DEFAULT_LOGICAL_RULES for None or empty. Raises ValueError naming a malformed rule."""
    if not rules:
        return DEFAULT_LOGICAL_RULES
    checked = []
    for rule in rules:
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
                or not (rule[1] is None or rule[1] in MESH_AXES)):
            raise ValueError(
                f"mesh.rules: {rule!r} is not a (logical axis, mesh axis) pair; mesh axes are {MESH_AXES} or None"
            )
        checked.append((rule[0], rule[1]))
    return tuple(checked)


def logical_axes_by_path(logical_specs: Any) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Returns {param path: logical axes} of a tree of logical PartitionSpecs (e.g.
    `nn.unet.logical_partition_specs(model)`; PartitionSpecs are leaves)."""
    leaves = jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P))
    return {_path_names(path): tuple(spec) for path, spec in leaves}


def param_shardings(abstract_tree: Any, mesh: Mesh, logical_specs: Any,
                    rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> Any:
    """Returns a tree of NamedShardings for a (possibly abstract) tree holding params.

    Each leaf takes the logical axes of the param in `logical_specs` whose path is the longest
    suffix of its own (so params, AdamW moments and a subtree of a bigger state all match);
    leaves that match none (step counters, schedules) are replicated.
    """
    by_path = logical_axes_by_path(logical_specs)
    longest = max((len(path) for path in by_path), default=0)
    mesh_shape = dict(mesh.shape)

    def sharding(path, leaf):
        names = _path_names(path)
        for start in range(max(len(names) - longest, 0), len(names)):
            axes = by_path.get(names[start:])
            if axes is not None and len(axes) == len(leaf.shape):
                return NamedSharding(mesh, spec_for(axes, tuple(leaf.shape), mesh_shape, rules))
        return NamedSharding(mesh, REPLICATED)

    return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, REPLICATED)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of arrays whose leading axis is the global batch."""
    return NamedSharding(mesh, BATCH)


def global_batch_from_local(local: Any, mesh: Mesh) -> Any:
    """Returns global jax.Arrays assembled from this process's slice of a batch (numpy tree)."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def gather_to_host(tree: Any) -> Any:
    """Returns a tree of (possibly sharded, possibly multi-process) arrays as host numpy arrays.

    Every process must call it: with several processes, shards that live on other hosts are
    gathered with a collective.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
