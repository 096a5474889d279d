"""Device mesh, parameter partition rules and global batches.

The mesh has two axes: 'data' (batch parallelism, params replicated) and 'fsdp' (batch parallelism
with parameters and optimizer state sharded, ZeRO-3 style). Batches are sharded over both axes.
Parameters are sharded by regex rules on their path names (big_vision style); a rule's spec shards
the *largest* dimension divisible by the fsdp size, so one rule serves convolutions and dense layers.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
BATCH = P(DATA_AXES)
REPLICATED = P()

# (regex on 'a/b/c' param paths, how to shard). 'fsdp' shards the largest divisible dimension;
# None replicates. First match wins. Small tensors (norms, biases) are never worth sharding.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    (r".*/(scale|bias)$", None),
    (r".*", "fsdp"),
)
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a ('data', 'fsdp') mesh; a size of -1 takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = count // max(fsdp, 1)
    if fsdp == -1:
        fsdp = count // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp != count:
        raise ValueError(
            f"mesh: data={data} x fsdp={fsdp} does not cover the {count} available devices"
        )
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, DATA_AXES)


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


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(name: str, shape: tuple[int, ...], fsdp_size: int,
             rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
    """Returns the PartitionSpec the first matching rule gives a param of this name and shape."""
    for pattern, how in rules:
        if re.fullmatch(pattern, name):
            break
    else:
        return REPLICATED
    if how is None or fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return REPLICATED
    candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
    if not candidates:
        return REPLICATED
    spec = [None] * len(shape)
    spec[int(candidates[0])] = "fsdp"
    return P(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
    """Returns a tree of NamedShardings for a (possibly abstract) param tree."""
    fsdp_size = mesh.shape["fsdp"]

    def sharding(path, leaf):
        return NamedSharding(mesh, spec_for(_path_name(path), tuple(leaf.shape), fsdp_size, rules))

    return jax.tree_util.tree_map_with_path(sharding, abstract_params)


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
