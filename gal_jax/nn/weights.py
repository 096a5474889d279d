"""PyTorch-named safetensors <-> our Flax param trees, for every model family.

Our param trees are named after the PyTorch modules they reproduce, so one rule maps a param path to
its state-dict key: list elements `layers_0` become `layers.0`, `kernel` / `scale` / `embedding`
become `weight`. Layouts differ only for kernels: a Linear's (out, in) is our (in, out), a Conv's
OIHW our HWIO.

Reading is lazy: each array is assembled from the byte ranges of the file that this process's
shards need (`safetensors_file`, no memory map), copied explicitly to their devices, so no host
holds the whole model and no device more than its shard. fp16/bf16/fp32 stored weights are cast to
the abstract tree's dtypes. Writing streams one tensor at a time into a file renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from gal_jax.nn import safetensors_file

Params = Any
ParamPath = tuple[str, ...]


def torch_key(param_path: ParamPath) -> str:
    """Returns the PyTorch state-dict name of the param at `param_path` in our tree."""
    *modules, leaf = param_path
    modules = [re.sub(r"^(\w+?)_(\d+)$", r"\1.\2", name) for name in modules]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*modules, leaf])


def _torch_axes(param_path: ParamPath, ndim: int) -> tuple[int, ...]:
    """Returns, for each axis of our param, the PyTorch axis it is: Linear (out, in) -> (in, out),
    Conv OIHW -> HWIO, everything else unchanged."""
    if param_path[-1] == "kernel" and ndim == 2:
        return (1, 0)
    if param_path[-1] == "kernel" and ndim == 4:
        return (2, 3, 1, 0)
    return tuple(range(ndim))


def to_torch_layout(param_path: ParamPath, value: np.ndarray) -> np.ndarray:
    """Returns our param `value` rearranged as the PyTorch tensor of the same name."""
    return np.transpose(value, np.argsort(_torch_axes(param_path, value.ndim)))


def from_torch_layout(param_path: ParamPath, value: np.ndarray) -> np.ndarray:
    """Returns the PyTorch tensor `value` of our param at `param_path` rearranged in our layout."""
    return np.transpose(value, _torch_axes(param_path, value.ndim))


def torch_shape(param_path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Returns the shape the PyTorch tensor of our param (of `shape`) has."""
    shape_in_torch = [0] * len(shape)
    for axis, torch_axis in enumerate(_torch_axes(param_path, len(shape))):
        shape_in_torch[torch_axis] = shape[axis]
    return tuple(shape_in_torch)


def weight_files(path: str | Path, *, stem: str, variant: str | None = None) -> dict[str, Path]:
    """Returns {PyTorch key: the safetensors file holding it} for a file, index or folder.

    `path` is a `.safetensors` file, a `.safetensors.index.json` (sharded), or a folder holding
    `<stem>[.<variant>].safetensors` or `<stem>[.<variant>].safetensors.index.json`.
    """
    path = Path(path)
    if path.is_dir():
        full_stem = f"{stem}.{variant}" if variant else stem
        candidates = [path / f"{full_stem}.safetensors", path / f"{full_stem}.safetensors.index.json"]
        found = [file for file in candidates if file.is_file()]
        if not found:
            raise ValueError(f"{path}: no weights (looked for {', '.join(f.name for f in candidates)})")
        path = found[0]
    if path.name.endswith(".index.json"):
        return _sharded_files(path)
    return {key: path for key in safetensors_file.keys(path)}


def _sharded_files(index: Path) -> dict[str, Path]:
    """Returns {key: shard file} of a safetensors index, checking every shard is there."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({err!r})") from err
    files = {key: index.parent / name for key, name in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise ValueError(f"{index}: names the shard {file.name}, which is missing")
    return files


def _read_part(reader: safetensors_file.SafetensorsReader, key: str, param_path: ParamPath, index: tuple,
               dtype) -> np.ndarray:
    """Returns the part `index` (in our layout) of the stored tensor `key`, in our layout and dtype."""
    torch_axes = _torch_axes(param_path, len(index))
    torch_index = [slice(None)] * len(index)
    for axis, torch_axis in enumerate(torch_axes):
        torch_index[torch_axis] = index[axis]
    part = np.transpose(reader.read(key, tuple(torch_index)), torch_axes)
    return np.asarray(part.astype(dtype, copy=False), order="C")  # 0-d stays 0-d


def read_params(
    abstract: Params,
    files: Mapping[str, Path],
    *,
    shardings: Params | None = None,
    key_of: Callable[[ParamPath], str] = torch_key,
) -> Params:
    """Returns the param tree shaped like `abstract` (ShapeDtypeStructs) read from `files`.

    `files` is `weight_files`' answer; `shardings` a tree like `abstract` of jax.sharding.Sharding
    (default: uncommitted arrays on the default device, which a jitted function may place as its
    shardings say). Keys `abstract` does not need are skipped; a missing key or
    a stored shape that does not fit raises ValueError naming the file and the key.
    """
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    loaded = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for param_path, spec in flat_abstract.items():
            key = key_of(param_path)
            if key not in files:
                raise ValueError(f"{_describe(files)}: missing weight {key!r} (our {'/'.join(param_path)})")
            file = files[key]
            if file not in handles:
                handles[file] = stack.enter_context(safetensors_file.SafetensorsReader(file))
            handle = handles[file]
            if key not in handle:
                raise ValueError(f"{file}: missing weight {key!r} (our {'/'.join(param_path)})")
            stored_shape = handle.shape(key)
            expected = torch_shape(param_path, spec.shape)
            if stored_shape != expected:
                raise ValueError(
                    f"{file}: weight {key!r} has shape {stored_shape}, the config expects {expected}"
                )
            read = lambda index, h=handle, k=key, p=param_path, d=spec.dtype: _read_part(h, k, p, index, d)
            if param_path in flat_shardings:
                loaded[param_path] = _place(spec.shape, flat_shardings[param_path], read)
            else:  # uncommitted on the default device: jit may still place it anywhere
                loaded[param_path] = jax.device_put(read(tuple(slice(None) for _ in spec.shape)))
    return traverse_util.unflatten_dict(loaded)


def _place(shape: tuple[int, ...], sharding: jax.sharding.Sharding, read_part) -> jax.Array:
    """Returns the global array of `shape` on `sharding` whose shards `read_part(index)` reads.

    Each distinct shard is read once and copied explicitly to the local devices holding it, so
    loading works under jax.transfer_guard("disallow") and reads only this process's shards.
    """
    parts, shards = {}, []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index_key = tuple((part.start, part.stop, part.step) for part in index)
        if index_key not in parts:
            parts[index_key] = read_part(index)
        shards.append(jax.device_put(parts[index_key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _describe(files: Mapping[str, Path]) -> str:
    """Returns the file, or the shards, a key was looked for in (for error messages)."""
    names = sorted({str(file) for file in files.values()})
    if len(names) == 1:
        return names[0]
    return f"{Path(names[0]).parent} (shards {', '.join(Path(name).name for name in names)})"


def write_params(
    params: Params,
    abstract: Params,
    file: str | Path,
    *,
    dtype=None,
    key_of: Callable[[ParamPath], str] = torch_key,
) -> Path:
    """Writes `params` to the safetensors `file` by PyTorch names and layouts; returns `file`.

    `params` must match `abstract` (keys and shapes) and be addressable from this process; floats
    are cast to `dtype` when given.
    """
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat = traverse_util.flatten_dict(params)
    if set(flat) != set(flat_abstract):
        differing = sorted("/".join(path) for path in set(flat) ^ set(flat_abstract))
        raise ValueError(f"params do not match the model: {', '.join(differing[:5])} differ")
    keys = {key_of(param_path): param_path for param_path in flat}

    def out_dtype(value) -> np.dtype:
        floating = jax.numpy.issubdtype(value.dtype, jax.numpy.floating)
        return np.dtype(dtype) if dtype is not None and floating else np.dtype(value.dtype)

    specs = {}
    for key, param_path in keys.items():
        value, expected = flat[param_path], flat_abstract[param_path].shape
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"param {'/'.join(param_path)} has shape {tuple(value.shape)}, expected {expected}")
        specs[key] = (torch_shape(param_path, tuple(expected)), out_dtype(value))

    def produce(key):  # one param fetched and converted at a time
        param_path = keys[key]
        value = np.asarray(jax.device_get(flat[param_path]))
        return np.asarray(to_torch_layout(param_path, value).astype(specs[key][1], copy=False), order="C")

    file = safetensors_file.write(Path(file), specs, produce, metadata={"format": "pt"})
    return file


# ---------------------------------------------------------------------------------------------
# diffusers model folders: `config.json` and `diffusion_pytorch_model[.variant].safetensors`
# ---------------------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"
DIFFUSERS_CONFIG_FILE = "config.json"
# diffusers module names with an underscore before a digit that are names, not list entries.
DIFFUSERS_WHOLE_NAMES = frozenset({"linear_1", "linear_2"})


def diffusers_key(param_path: ParamPath) -> str:
    """Returns the diffusers state-dict name of the param at `param_path`: `torch_key`'s rule,
    except that TimestepEmbedding's `linear_1` / `linear_2` stay whole."""
    # A NUL is no regex word character, so torch_key leaves the protected names unsplit.
    protected = tuple(name.replace("_", "\0") if name in DIFFUSERS_WHOLE_NAMES else name for name in param_path)
    return torch_key(protected).replace("\0", "_")


def read_diffusers_config(path: str | Path, class_name: str) -> dict[str, Any]:
    """Returns the dict in a diffusers `config.json` (or the folder holding it) of `class_name`."""
    file = Path(path) / DIFFUSERS_CONFIG_FILE if Path(path).is_dir() else Path(path)
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable config.json ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{file}: not a diffusers config (expected a JSON object)")
    # A config without _class_name (hand-written, or an old export) is read as `class_name`.
    if values.get("_class_name", class_name) != class_name:
        raise ValueError(f"{file}: _class_name is {values.get('_class_name')!r}, expected {class_name!r}")
    return values


def read_diffusers_params(
    abstract: Params, path: str | Path, *, variant: str | None = None, shardings: Params | None = None
) -> Params:
    """Returns the params shaped like `abstract` from a diffusers folder, weights file or index
    (`diffusion_pytorch_model[.variant].safetensors[.index.json]`), as `read_params` does."""
    files = weight_files(path, stem=DIFFUSERS_WEIGHTS_STEM, variant=variant)
    return read_params(abstract, files, shardings=shardings, key_of=diffusers_key)


def write_diffusers_folder(
    params: Params,
    abstract: Params,
    config: Mapping[str, Any],
    folder: str | Path,
    *,
    dtype=None,
    variant: str | None = None,
) -> Path:
    """Writes `params` (diffusers names and layouts, floats cast to `dtype` when given) and
    `config` as a diffusers model folder that `from_pretrained(folder, variant=variant)` reads;
    returns the weights file."""
    folder = Path(folder)
    stem = f"{DIFFUSERS_WEIGHTS_STEM}.{variant}" if variant else DIFFUSERS_WEIGHTS_STEM
    file = write_params(params, abstract, folder / f"{stem}.safetensors", dtype=dtype, key_of=diffusers_key)
    write_config(folder / DIFFUSERS_CONFIG_FILE, config)
    return file


def write_config(file: str | Path, config: Mapping[str, Any]) -> None:
    """Writes a model's `config.json` through a temporary file renamed into place, as the weights
    are written: a kill mid-write leaves any earlier config whole."""
    with safetensors_file.replaced_when_complete(Path(file), "w") as out:
        out.write(json.dumps(dict(config), indent=2) + "\n")


def write_random_diffusers_folder(
    abstract: Params, config: Mapping[str, Any], folder: str | Path, rng: np.random.Generator, *, scale: float = 0.02
) -> Path:
    """Writes a diffusers model folder of `config` whose weights (shaped and typed as `abstract`)
    are N(0, scale) draws, generated and written one tensor at a time; returns the weights file.

    For load and throughput benchmarks of full-sized models: nothing model-sized is ever in memory.
    """
    folder = Path(folder)
    flat = traverse_util.flatten_dict(abstract)
    keys = {diffusers_key(param_path): param_path for param_path in flat}
    specs = {key: (torch_shape(path, tuple(flat[path].shape)), np.dtype(flat[path].dtype)) for key, path in keys.items()}

    def produce(key):
        shape, dtype = specs[key]
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    file = safetensors_file.write(folder / f"{DIFFUSERS_WEIGHTS_STEM}.safetensors", specs, produce,
                                  metadata={"format": "pt"})
    write_config(folder / DIFFUSERS_CONFIG_FILE, config)
    return file


def diffusers_module_name(module_path: tuple[str, ...]) -> str:
    """Returns the diffusers name of the module at flax `module_path` (`down_blocks.0.attentions.0`)."""
    return diffusers_key((*module_path, "weight")).removesuffix(".weight")
