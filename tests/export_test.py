"""Tests of export: the fine-tuned UNet and its pipeline load in PyTorch diffusers and in our loader."""

import dataclasses
import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gal_jax import export, models, tiny
from gal_jax.nn import unet as nn_unet

LAYOUTS = {"tiny": tiny.TINY_UNET, "tiny_sd2": tiny.TINY_UNET_SD2, "sd15": models.SD15_UNET}
# Relative to the output's scale: float32 ours vs float32 PyTorch, and PyTorch computing in float16.
F32_TOLERANCE = 1e-5
F16_COMPUTE_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def finetuned(loaded_sd):
    """The tiny UNet's params with seeded noise added to every leaf: a stand-in for fine-tuned weights."""
    base = loaded_sd[1].unet
    leaves, treedef = jax.tree_util.tree_flatten(base)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def saved_unet(loaded_sd, finetuned, tmp_path_factory) -> Path:
    return export.save_unet(loaded_sd[0], finetuned, tmp_path_factory.mktemp("saved") / "unet")


@pytest.fixture(scope="module")
def unet_inputs(loaded_sd):
    """(latents NCHW, timesteps, text context) for comparing UNet outputs."""
    sd = loaded_sd[0]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, sd.latent_channels, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, sd.max_length, sd.unet.config.cross_attention_dim)).astype(np.float32)
    return latents, np.array([10, 500], np.int32), context


def flax_output(sd, params, inputs) -> np.ndarray:
    latents, timesteps, context = inputs
    return np.asarray(sd.apply_unet(params, *map(jnp.asarray, (latents, timesteps, context))))


def torch_output(unet, inputs) -> np.ndarray:
    import torch

    latents, timesteps, context = inputs
    with torch.no_grad():
        sample = unet(
            torch.from_numpy(latents).to(unet.dtype),
            torch.from_numpy(timesteps).long(),
            torch.from_numpy(context).to(unet.dtype),
        ).sample
    return sample.float().numpy()


def rounded(params, dtype: str):
    """Returns float32 `params` as they come back from a file holding them in `dtype`."""
    return models.cast_params(models.cast_params(params, dtype), "float32")


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def stored_dtypes(file: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as weights:
        return {weights.get_slice(name).get_dtype() for name in weights.keys()}


# ---------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_names_and_shapes_equal_pytorch_state_dict(layout):
    import torch
    from diffusers import UNet2DConditionModel

    config = LAYOUTS[layout]
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(config))
    state = export.torch_state_dict(jax.tree_util.tree_map(
        lambda spec: np.zeros(spec.shape, spec.dtype), nn_unet.abstract_params(unet)))
    ours = {name: value.shape for name, value in state.items()}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**config).state_dict().items()}
    assert len(ours) == len(traverse_util.flatten_dict(nn_unet.abstract_params(unet)))
    assert sorted(ours.keys() ^ theirs.keys()) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def test_torch_layout_transposes_kernels_and_renames_lists():
    path = ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "kernel")
    assert export.torch_name(path) == "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    assert export.torch_name(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert export.torch_name(("conv_norm_out", "scale")) == "conv_norm_out.weight"
    conv = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # HWIO
    state = export.torch_state_dict({"conv_in": {"kernel": conv, "bias": np.arange(5.0)},
                                     "proj_in": {"kernel": conv[0, 0]}})
    np.testing.assert_array_equal(state["conv_in.weight"], conv.transpose(3, 2, 0, 1))  # OIHW
    np.testing.assert_array_equal(state["proj_in.weight"], conv[0, 0].T)  # (out, in)
    np.testing.assert_array_equal(state["conv_in.bias"], np.arange(5.0))
    with pytest.raises(export.ExportError, match="no PyTorch name"):
        export.torch_name(("conv_in", "mystery"))


# ---------------------------------------------------------------------------------------------
# The UNet folder
# ---------------------------------------------------------------------------------------------


def test_float32_round_trip_is_bit_identical(loaded_sd, finetuned, saved_unet):
    sd, base = loaded_sd
    assert stored_dtypes(saved_unet / export.WEIGHTS) == {"F32"}
    chex.assert_trees_all_equal(export.load_unet(sd, saved_unet), finetuned)
    with pytest.raises(AssertionError):  # the round trip is not just handing back the base
        chex.assert_trees_all_equal(export.load_unet(sd, saved_unet), base.unet)


@pytest.mark.parametrize("dtype,code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_round_trip_equals_params_cast(loaded_sd, finetuned, tmp_path, dtype, code):
    sd = loaded_sd[0]
    folder = export.save_unet(sd, finetuned, tmp_path / "unet", dtype=dtype)
    assert stored_dtypes(folder / export.WEIGHTS) == {code}
    loaded = export.load_unet(sd, folder, param_dtype="float32")
    chex.assert_trees_all_equal_dtypes(loaded, finetuned)
    chex.assert_trees_all_equal(loaded, rounded(finetuned, dtype))


@pytest.fixture(scope="module")
def sd2(loaded_sd, tmp_path_factory):
    """(StableDiffusion, UNet params) of the SD2-style tiny UNet, with no model folder on disk."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("sd2") / "unet"
    UNet2DConditionModel(**tiny.TINY_UNET_SD2).save_pretrained(folder, safe_serialization=True)
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(tiny.TINY_UNET_SD2))
    sd = dataclasses.replace(loaded_sd[0], path=Path("random:tiny-sd2"), unet=unet)
    return sd, models.load_unet_params(folder)


def test_unet_without_base_config_loads_in_pytorch_and_matches(sd2, unet_inputs, tmp_path):
    from diffusers import UNet2DConditionModel

    sd, params = sd2
    folder = export.save_unet(sd, params, tmp_path / "unet")
    assert json.loads((folder / export.CONFIG).read_text())["_class_name"] == "UNet2DConditionModel"
    torch_unet = UNet2DConditionModel.from_pretrained(folder).eval()
    expected = flax_output(sd, params, unet_inputs)
    assert relative_error(torch_output(torch_unet, unet_inputs), expected) < F32_TOLERANCE


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_fp32(tiny_models, saved_unet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "model"
    return export.write_pipeline(tiny_models["sd"], saved_unet, out, dtype="float32")


@pytest.fixture(scope="module")
def pipeline_fp16(tiny_models, saved_unet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "model"
    return export.write_pipeline(tiny_models["sd"], saved_unet, out, dtype="float16")


def test_pytorch_pipeline_runs_the_finetuned_unet(loaded_sd, finetuned, unet_inputs, pipeline_fp32):
    from diffusers import StableDiffusionPipeline

    sd, base = loaded_sd
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_fp32)
    expected = flax_output(sd, finetuned, unet_inputs)
    assert relative_error(torch_output(pipe.unet, unet_inputs), expected) < F32_TOLERANCE
    assert relative_error(flax_output(sd, base.unet, unet_inputs), expected) > 1000 * F32_TOLERANCE


def test_pytorch_pipeline_loads_float16_export(loaded_sd, finetuned, unet_inputs, pipeline_fp16):
    import torch
    from diffusers import StableDiffusionPipeline

    sd = loaded_sd[0]
    assert stored_dtypes(pipeline_fp16 / "unet" / export.WEIGHTS) == {"F16"}
    as_stored = flax_output(sd, rounded(finetuned, "float16"), unet_inputs)
    upcast = StableDiffusionPipeline.from_pretrained(pipeline_fp16, torch_dtype=torch.float32)
    assert relative_error(torch_output(upcast.unet, unet_inputs), as_stored) < F32_TOLERANCE
    default = StableDiffusionPipeline.from_pretrained(pipeline_fp16)  # diffusers upcasts by default
    assert relative_error(torch_output(default.unet, unet_inputs), as_stored) < F32_TOLERANCE
    half = StableDiffusionPipeline.from_pretrained(pipeline_fp16, torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    assert relative_error(torch_output(half.unet, unet_inputs), as_stored) < F16_COMPUTE_TOLERANCE
    assert relative_error(as_stored, flax_output(sd, finetuned, unet_inputs)) < F16_COMPUTE_TOLERANCE


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_our_loader_reads_the_export(loaded_sd, finetuned, pipeline_fp32, pipeline_fp16, dtype):
    base = loaded_sd[1]
    _, params = models.load_stable_diffusion(pipeline_fp32 if dtype == "float32" else pipeline_fp16)
    chex.assert_trees_all_equal(params.unet, rounded(finetuned, dtype))
    chex.assert_trees_all_equal(params.vae, base.vae)
    chex.assert_trees_all_equal(params.text_encoder, base.text_encoder)


def test_pipeline_copies_listed_components_unchanged(tiny_models, saved_unet, tmp_path):
    base = shutil.copytree(tiny_models["sd"], tmp_path / "base")
    index = json.loads((base / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (base / "model_index.json").write_text(json.dumps(index))
    (base / "feature_extractor").mkdir()
    (base / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    (base / "notes").mkdir()  # not a component: stays behind
    out = export.write_pipeline(base, saved_unet, tmp_path / "model", dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == [
        "feature_extractor", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae",
    ]
    for name in ("feature_extractor", "scheduler", "text_encoder", "tokenizer", "vae"):
        assert file_bytes(out / name) == file_bytes(base / name), name
    assert (out / "model_index.json").read_bytes() == (base / "model_index.json").read_bytes()
    assert file_bytes(out / "unet") == file_bytes(saved_unet)  # same dtype: copied as is


# ---------------------------------------------------------------------------------------------
# Atomicity and errors
# ---------------------------------------------------------------------------------------------


def failing_writer(state, file):
    Path(file).write_bytes(b"half a file")
    raise RuntimeError("disk full")


def test_failed_save_keeps_old_unet_and_leaves_no_temp_folder(loaded_sd, finetuned, tmp_path, monkeypatch):
    sd, base = loaded_sd
    folder = export.save_unet(sd, base.unet, tmp_path / "unet")
    before = file_bytes(folder)
    monkeypatch.setattr(export, "_write_safetensors", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        export.save_unet(sd, finetuned, folder)
    assert file_bytes(folder) == before
    with pytest.raises(RuntimeError, match="disk full"):
        export.save_unet(sd, finetuned, tmp_path / "new_unet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_failed_pipeline_keeps_old_folder_and_leaves_no_temp_folder(
    tiny_models, saved_unet, tmp_path, monkeypatch
):
    out = export.write_pipeline(tiny_models["sd"], saved_unet, tmp_path / "model", dtype="float32")
    before = file_bytes(out)
    monkeypatch.setattr(export, "_write_safetensors", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        export.write_pipeline(tiny_models["sd"], saved_unet, out, dtype="float16")  # re-encodes: writes
    assert file_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_inputs_raise_one_line_errors_naming_the_path(tiny_models, saved_unet, tmp_path):
    sd_path, clip_path = tiny_models["sd"], tiny_models["clip"]
    out, nowhere = tmp_path / "out", tmp_path / "nope"
    index_only, config_only, a_file = tmp_path / "index_only", tmp_path / "config_only", tmp_path / "a_file"
    index_only.mkdir()
    (index_only / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    config_only.mkdir()
    shutil.copy(saved_unet / export.CONFIG, config_only)
    a_file.write_text("x")
    cases = [  # (base, unet folder, out, dtype, the path the message names, what it says)
        (nowhere, saved_unet, out, "float16", nowhere, "does not exist"),
        (clip_path, saved_unet, out, "float16", clip_path, "no model_index.json"),
        (index_only, saved_unet, out, "float16", index_only, "missing unet/, vae/"),
        (sd_path, nowhere, out, "float16", nowhere, "does not exist"),
        (sd_path, config_only, out, "float16", config_only, f"missing {export.WEIGHTS}"),
        (sd_path, saved_unet, a_file, "float16", a_file, "not a folder"),
        (sd_path, saved_unet, sd_path, "float16", sd_path, "is the base model folder"),
        (sd_path, saved_unet, out, "float8", "float8", "expected one of float32, float16, bfloat16"),
    ]
    for base, unet, target, dtype, named, says in cases:
        with pytest.raises(ValueError) as err:
            export.write_pipeline(base, unet, target, dtype)
        message = str(err.value)
        assert "\n" not in message and str(named) in message and says in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "config_only", "index_only"]


def test_save_and_load_refuse_wrong_inputs(loaded_sd, finetuned, tmp_path):
    sd = loaded_sd[0]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(export.ExportError, match="float8"):
        export.save_unet(sd, finetuned, tmp_path / "unet", dtype="float8")
    with pytest.raises(export.ExportError, match="a_file: exists and is not a folder"):
        export.save_unet(sd, finetuned, tmp_path / "a_file")
    partial = traverse_util.unflatten_dict(dict(list(traverse_util.flatten_dict(finetuned).items())[1:]))
    with pytest.raises(export.ExportError, match="do not match the model's architecture"):
        export.save_unet(sd, partial, tmp_path / "unet")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        export.load_unet(sd, tmp_path / "missing")
    assert not (tmp_path / "unet").exists()


def test_load_refuses_a_unet_of_another_architecture(loaded_sd, sd2, tmp_path):
    folder = export.save_unet(*sd2, tmp_path / "unet")
    with pytest.raises(export.ExportError, match="do not match the model's architecture"):
        export.load_unet(loaded_sd[0], folder)


def test_exported_files_are_readable_by_the_other_users_of_a_shared_machine(pipeline_fp32, saved_unet):
    """safetensors' own save_file leaves 0600 files: a model exported on a cluster would be
    unreadable to everyone but its writer."""
    files = [p for folder in (pipeline_fp32, saved_unet) for p in Path(folder).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for file in files:
        assert file.stat().st_mode & 0o044 == 0o044, f"{file}: mode {oct(file.stat().st_mode)}"
