"""Writing the fine-tuned UNet, and the whole pipeline around it, in the PyTorch diffusers layout.

What a run leaves must load in PyTorch diffusers (`UNet2DConditionModel.from_pretrained`,
`StableDiffusionPipeline.from_pretrained`) and in our own loader (`models.load_stable_diffusion`).
The naming is our UNet's own (`gal_jax.nn.weights.diffusers_key`: every param sits at the path
of the PyTorch module it reproduces); files are written with safetensors' numpy API (no torch),
every folder built beside its target and renamed into place, so a killed export never leaves a
half-written folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors import numpy as safetensors_numpy

from gal_jax import faults, io_utils, models, personalize
from gal_jax.nn import safetensors_file as nn_safetensors
from gal_jax.nn import unet as nn_unet
from gal_jax.nn import weights as nn_weights
from gal_jax.workdir import LORA_WEIGHTS, TOKEN_EMBEDDINGS

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_COMPONENTS = ("unet", "text_encoder")
# numpy dtypes (bfloat16 is ml_dtypes', which safetensors' numpy API reads and writes as BF16).
DTYPES = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype(jax.numpy.bfloat16),
}
_SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class ExportError(ValueError):
    """An export input or target is missing, of the wrong kind or in the wrong layout."""


# ---------------------------------------------------------------------------------------------
# Naming and layout (pure)
# ---------------------------------------------------------------------------------------------


def torch_name(path: Sequence[str]) -> str:
    """Returns the PyTorch diffusers state-dict name of our UNet's param at `path`."""
    if path[-1] not in ("kernel", "scale", "embedding", "bias"):
        raise ExportError(f"{'/'.join(path)}: no PyTorch name for a param called {path[-1]!r}.")
    return nn_weights.diffusers_key(tuple(path))


def torch_state_dict(unet_params: models.Params, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Returns the PyTorch diffusers state dict (name -> contiguous numpy array in `dtype`) of Flax
    UNet params."""
    np_dtype = numpy_dtype(dtype)
    state = {}
    for path, value in traverse_util.flatten_dict(unet_params).items():
        name = torch_name(path)
        if name in state:
            raise ExportError(f"{'/'.join(path)}: maps to PyTorch name {name}, which another param has.")
        array = np.asarray(value).astype(np_dtype, copy=False)
        state[name] = np.ascontiguousarray(nn_weights.to_torch_layout(path, array))
    return state


def numpy_dtype(dtype: str) -> np.dtype:
    """Returns the numpy dtype of an export dtype name ("float32", "float16" or "bfloat16")."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: not an export dtype; expected one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# The UNet folder
# ---------------------------------------------------------------------------------------------


def save_unet(
    sd: models.StableDiffusion, unet_params: models.Params, folder: Path, dtype: str = "float32"
) -> Path:
    """Returns `folder`, now a diffusers UNet2DConditionModel folder (config.json + safetensors)
    holding `unet_params` cast to `dtype`; replaces what was there, atomically.

    Call it in one process with host-resident (fully addressable) params.
    """
    folder = Path(folder).expanduser()
    numpy_dtype(dtype)
    _check_target(folder)
    _check_matches_model(sd, unet_params, folder)
    state = torch_state_dict(unet_params, dtype)

    def build(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(unet_config(sd), indent=2) + "\n")
        _write_safetensors(state, tmp / WEIGHTS)

    return _build_beside(folder, build)


def load_unet(sd: models.StableDiffusion, folder: Path, param_dtype: str = "float32") -> models.Params:
    """Returns the Flax UNet params of `sd`'s architecture stored in a diffusers UNet folder (any
    float dtype on disk), cast to `param_dtype`."""
    params = models.load_unet_params(folder, compute_dtype=sd.unet.dtype, param_dtype=param_dtype)
    _check_matches_model(sd, params, Path(folder))
    return params


def unet_config(sd: models.StableDiffusion) -> dict:
    """Returns the diffusers config of `sd`'s UNet: its base folder's unet/config.json when there is
    one, else the Flax module's config."""
    base_config = sd.path / "unet" / CONFIG
    if base_config.is_file():
        config = io_utils.read_json(base_config)
    else:
        config = sd.unet.config.to_dict()
        try:
            config["_diffusers_version"] = importlib.metadata.version("diffusers")
        except importlib.metadata.PackageNotFoundError:  # diffusers is not needed to write its layout
            pass
    # A Flax base names its class FlaxUNet2DConditionModel; what we write is the PyTorch layout.
    config["_class_name"] = nn_unet.CLASS_NAME
    return config


def _check_matches_model(sd: models.StableDiffusion, unet_params: models.Params, where: Path) -> None:
    expected = traverse_util.flatten_dict(nn_unet.abstract_params(sd.unet))
    actual = traverse_util.flatten_dict(unet_params)
    if expected.keys() != actual.keys():
        names = sorted("/".join(k) for k in expected.keys() ^ actual.keys())
        raise ExportError(f"{where}: UNet params do not match the model's architecture (e.g. {names[0]}).")
    for key, spec in expected.items():
        if tuple(actual[key].shape) != tuple(spec.shape):
            raise ExportError(
                f"{where}: UNet param {'/'.join(key)} has shape {tuple(actual[key].shape)}, "
                f"the model's is {tuple(spec.shape)}."
            )


# ---------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------


def write_pipeline(base_path: Path, unet_folder: Path, out: Path, dtype: str = "float16",
                   extra_files: Sequence[Path] = ()) -> Path:
    """Returns `out`, now a diffusers Stable Diffusion folder: the base's components and
    model_index.json copied unchanged, unet/ the UNet folder's weights in `dtype`, and
    `extra_files` (LoRA weights, learned embeddings) beside them; atomic."""
    base, unet_folder, out = (Path(p).expanduser() for p in (base_path, unet_folder, out))
    for file in extra_files:
        if not Path(file).is_file():
            raise ExportError(f"{file}: missing; it belongs in the exported model folder.")
    numpy_dtype(dtype)
    components = _base_components(base)
    _check_unet_folder(unet_folder)
    _check_target(out)
    if out.resolve() == base.resolve():
        raise ExportError(f"{out}: is the base model folder; the export must go to another folder.")

    def build(tmp: Path) -> None:
        for name in components:
            shutil.copytree(base / name, tmp / name)  # follows symlinks (HF cache snapshots)
        shutil.copyfile(base / "model_index.json", tmp / "model_index.json")
        _copy_unet(unet_folder, tmp / "unet", dtype)
        for file in extra_files:
            shutil.copyfile(file, tmp / Path(file).name)

    return _build_beside(out, build)


def _base_components(base: Path) -> list[str]:
    """Returns the component folders (except unet/) of the SD folder `base` that its model_index.json
    lists and that exist, checking it is an SD folder."""
    if not base.is_dir():
        raise ExportError(f"{base}: base model folder does not exist or is not a directory.")
    index_file = base / "model_index.json"
    if not index_file.is_file():
        raise ExportError(f"{base}: not a diffusers Stable Diffusion folder (no model_index.json).")
    index = io_utils.read_json(index_file)
    if not isinstance(index, dict):
        raise ExportError(f"{index_file}: not a diffusers model index (expected a JSON object).")
    listed = [
        name for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None
    ]
    missing = [name for name in models.SD_COMPONENTS if name not in listed or not (base / name).is_dir()]
    if missing:
        raise ExportError(
            f"{base}: not a Stable Diffusion folder: missing {', '.join(m + '/' for m in missing)} "
            "(model_index.json must list them and the folders must exist)."
        )
    return [name for name in listed if name != "unet" and (base / name).is_dir()]


def _check_unet_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ExportError(f"{folder}: UNet folder does not exist or is not a directory.")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder}: UNet folder is missing {' and '.join(missing)}.")


def _copy_unet(source: Path, target: Path, dtype: str) -> None:
    """Writes `target` as the UNet folder `source` with its weights in `dtype` (copied when already)."""
    target.mkdir()
    shutil.copyfile(source / CONFIG, target / CONFIG)
    if _stored_dtypes(source / WEIGHTS) == {_SAFETENSORS_CODES[dtype]}:
        shutil.copyfile(source / WEIGHTS, target / WEIGHTS)
        return
    np_dtype = numpy_dtype(dtype)
    state = safetensors_numpy.load_file(str(source / WEIGHTS))
    _write_safetensors({name: tensor.astype(np_dtype) for name, tensor in state.items()}, target / WEIGHTS)


def _stored_dtypes(file: Path) -> set[str]:
    """Returns the safetensors dtype codes ("F32", "F16", "BF16", ...) of the tensors in `file`."""
    try:
        with safe_open(str(file), framework="np") as weights:
            return {weights.get_slice(name).get_dtype() for name in weights.keys()}
    except Exception as err:  # the reader raises several unrelated types for bad files
        raise ExportError(f"{file}: unreadable safetensors file ({type(err).__name__}: {err}).") from err


# ---------------------------------------------------------------------------------------------
# A round's personalization: UNet folder, LoRA (PEFT keys) and learned token embeddings
# ---------------------------------------------------------------------------------------------


def lora_module_name(component: str, module: Sequence[str]) -> str:
    """Returns the PyTorch module name of our `component`'s module at `module` ("unet" modules
    as diffusers names them, text-encoder ones as transformers does)."""
    if component == "unet":
        return nn_weights.diffusers_module_name(tuple(module))
    return nn_weights.torch_key((*module, "weight")).removesuffix(".weight")


def lora_state_dict(lora: models.Params, scale: float) -> dict[str, np.ndarray]:
    """Returns the float32 LoRA state dict diffusers' `load_lora_weights` reads (PEFT keys):
    `<component>.<module>.lora_A.weight` (r, in) = down^T and `...lora_B.weight` (out, r) =
    (scale * up)^T. The scale alpha / r is folded into lora_B, so the file's alpha is its rank
    (what diffusers assumes when a file names none) and every loader applies the same delta."""
    state = {}
    for component, tree in lora.items():
        if component not in LORA_COMPONENTS:
            raise ExportError(f"LoRA deltas for {component!r}: expected one of {LORA_COMPONENTS}")
        for module, pair in personalize.lora_pairs(tree).items():
            name = f"{component}.{lora_module_name(component, module)}"
            state[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(pair["down"], np.float32).T)
            state[f"{name}.lora_B.weight"] = np.ascontiguousarray((scale * np.asarray(pair["up"], np.float32)).T)
    return state


def read_lora(file: Path, sd: models.StableDiffusion) -> models.Params:
    """Returns the LoRA tree ({component: {module path: {"down", "up"}}}, scale 1) of a PEFT-keyed
    LoRA file for `sd`'s UNet and text encoder; raises ExportError naming a key that fits neither."""
    from gal_jax.nn import clip as nn_clip

    modules = {}
    for component, abstract in (("unet", nn_unet.abstract_params(sd.unet)),
                                ("text_encoder", nn_clip.abstract_params(sd.text_encoder))):
        for path, leaf in traverse_util.flatten_dict(abstract).items():
            if path[-1] == "kernel" and len(leaf.shape) == 2:
                modules[f"{component}.{lora_module_name(component, path[:-1])}"] = (component, path[:-1], leaf.shape)
    try:
        state = safetensors_numpy.load_file(str(file))
    except Exception as err:  # the reader raises several unrelated types for bad files
        raise ExportError(f"{file}: unreadable safetensors file ({type(err).__name__}: {err}).") from err
    flat = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or name not in modules:
            raise ExportError(f"{file}: {key!r} is not a LoRA weight of this model's attention or MLP layers")
        component, module, (fan_in, fan_out) = modules[name]
        expected = (value.shape[0], fan_in) if part == "A.weight" else (fan_out, value.shape[1])
        if value.ndim != 2 or value.shape != expected:
            raise ExportError(f"{file}: {key} has shape {value.shape}, expected {expected}")
        flat[(component, *module, "down" if part == "A.weight" else "up")] = np.asarray(value, np.float32).T
    return traverse_util.unflatten_dict(flat)


def write_token_embeddings(file: Path, tokens: Sequence[str], rows: np.ndarray) -> Path:
    """Writes the learned embeddings as diffusers' `load_textual_inversion` reads them: one key
    per token, its (1, D) float32 row."""
    rows = np.asarray(rows, np.float32)
    _write_safetensors({token: np.ascontiguousarray(rows[i : i + 1]) for i, token in enumerate(tokens)}, file)
    return file


def read_token_embeddings(file: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Returns (tokens, rows (n, D) float32) of a learned-embeddings file (one key per token, each
    a (D,) or (1, D) row), in the file's key order."""
    try:
        with safe_open(str(file), framework="np") as stored:
            tokens = tuple(stored.keys())
            rows = [np.asarray(stored.get_tensor(token), np.float32).reshape(-1) for token in tokens]
    except Exception as err:  # the reader raises several unrelated types for bad files
        raise ExportError(f"{file}: unreadable safetensors file ({type(err).__name__}: {err}).") from err
    if not tokens or len({row.shape for row in rows}) != 1:
        raise ExportError(f"{file}: expected one (1, D) embedding per token, found {[r.shape for r in rows]}")
    return tokens, np.stack(rows)


def save_personalization(sd: models.StableDiffusion, result: personalize.Personalization, tokens: Sequence[str],
                         folder: Path, dtype: str = "float32") -> Path:
    """Returns `folder`, now holding a round's Personalization (host arrays): `unet/` (diffusers
    layout, in `dtype`) when it has a UNet, LORA_WEIGHTS when it has LoRA deltas, TOKEN_EMBEDDINGS
    ({token: row}) when it has new tokens; replaces what was there, atomically."""
    folder = Path(folder).expanduser()
    _check_target(folder)
    if result.unet is not None:
        _check_matches_model(sd, result.unet, folder / "unet")

    def build(tmp: Path) -> None:
        if result.unet is not None:
            (tmp / "unet").mkdir()
            (tmp / "unet" / CONFIG).write_text(json.dumps(unet_config(sd), indent=2) + "\n")
            _write_safetensors(torch_state_dict(result.unet, dtype), tmp / "unet" / WEIGHTS)
        if result.lora is not None:
            _write_safetensors(lora_state_dict(result.lora, result.lora_scale), tmp / LORA_WEIGHTS)
        if result.new_tokens is not None:
            write_token_embeddings(tmp / TOKEN_EMBEDDINGS, tokens, np.asarray(result.new_tokens))

    return _build_beside(folder, build)


def load_personalization(sd: models.StableDiffusion, folder: Path, param_dtype: str = "float32"):
    """Returns (sd, Personalization) of a folder `save_personalization` wrote: `sd` grown by the
    folder's new tokens unless its tokenizer has them already (at the rows they were saved for)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{folder}: personalization folder does not exist or is not a directory.")
    unet = load_unet(sd, folder / "unet", param_dtype) if (folder / "unet").is_dir() else None
    lora = read_lora(folder / LORA_WEIGHTS, sd) if (folder / LORA_WEIGHTS).is_file() else None
    rows = None
    if (folder / TOKEN_EMBEDDINGS).is_file():
        tokens, rows = read_token_embeddings(folder / TOKEN_EMBEDDINGS)
        sd = _with_tokens(sd, tokens, folder / TOKEN_EMBEDDINGS)
        rows = jax.numpy.asarray(rows).astype(param_dtype)
    if unet is None and lora is None and rows is None:
        raise ExportError(f"{folder}: holds no unet/, {LORA_WEIGHTS} or {TOKEN_EMBEDDINGS}.")
    lora = None if lora is None else jax.tree_util.tree_map(jax.numpy.asarray, lora)
    return sd, personalize.Personalization(unet=unet, lora=lora, new_tokens=rows, lora_scale=1.0)


def _with_tokens(sd: models.StableDiffusion, tokens: Sequence[str], file: Path) -> models.StableDiffusion:
    """Returns `sd` knowing `tokens` as the rows after its base vocabulary."""
    vocabulary = sd.tokenizer.get_vocab()
    if all(token in vocabulary for token in tokens):
        ids = [vocabulary[token] for token in tokens]
        size = sd.vocab_size
        if ids != list(range(size - len(tokens), size)):
            raise ExportError(f"{file}: the model knows {list(tokens)} at other rows ({ids})")
        return sd
    try:
        grown, _ = personalize.add_new_tokens(sd, tokens, None)
    except ValueError as err:
        raise ExportError(f"{file}: {err}") from None
    return grown


def personalized_model(sd: models.StableDiffusion, base_params, folder: Path, param_dtype: str = "float32"):
    """Returns (sd, params) of the base model with a saved personalization in (LoRA merged, the
    tokenizer and token table grown)."""
    sd, result = load_personalization(sd, folder, param_dtype)
    return sd, result.apply(base_params)


def personalization_files(folder: Path) -> list[Path]:
    """Returns the LoRA and learned-embeddings files of a personalization folder (what an exported
    pipeline carries beside its components)."""
    return [Path(folder) / name for name in (LORA_WEIGHTS, TOKEN_EMBEDDINGS) if (Path(folder) / name).is_file()]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _write_safetensors(state: dict[str, np.ndarray], file: Path) -> None:
    # Our writer, not safetensors' save_file: that one leaves 0600 files, unreadable to the other
    # users of a shared machine. transformers-style metadata; diffusers ignores it, other
    # PyTorch tools check it.
    nn_safetensors.write_arrays(file, state, metadata={"format": "pt"})


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: exists and is not a folder; the export writes a folder there.")


def _build_beside(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns `target` after `build` filled a temporary folder beside it, which then replaced it."""
    tmp = io_utils.temporary_dir_beside(target)
    try:
        build(tmp)
        _fsync_files(tmp)
        faults.maybe_kill("write", target)
        io_utils.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_files(folder: Path) -> None:
    """Flushes every file under `folder` to disk, so the rename never publishes unwritten data."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
