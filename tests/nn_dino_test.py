"""Our Flax DINOv2 (gal_jax.nn.dino) against transformers' PyTorch Dinov2Model on tiny random models;
our numpy/PIL preprocessing against transformers' slow BitImageProcessor; the whole DinoEmbedder
against the authors' PyTorch pipeline; clear errors for folders it cannot read."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gal_jax import dino as gal_dino
from gal_jax.nn import dino

import parity  # tests/parity.py

TOLERANCE = 1e-5  # relative to the reference's largest magnitude, float32
PREPROCESSING_TOLERANCE = 1e-6
# image_size 56 with 14-pixel patches: a 4 x 4 grid of position embeddings.
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56
)
DINOV2_PREPROCESSOR = dict(
    size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3,
    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
)


_assert_parity = functools.partial(parity.assert_parity, tolerance=TOLERANCE)


def _randomised(torch_model: torch.nn.Module) -> torch.nn.Module:
    """Returns the model with every LayerScale, norm, bias and the mask token drawn at random, and
    position embeddings as large as the patch embeddings, so that parity tests see them all
    (transformers initialises the former to constants, the latter to a tiny spread)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in torch_model.named_parameters():
            if "lambda1" in name or "norm" in name or name.endswith("bias") or "mask_token" in name:
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif "position_embeddings" in name:
                value.copy_(torch.randn(value.shape, generator=generator))
    return torch_model.eval()


def _tiny_torch_dino(folder, **overrides):
    """Returns (folder, torch Dinov2Model) of a tiny random DINOv2 saved there as safetensors."""
    torch.manual_seed(0)
    model = _randomised(transformers.Dinov2Model(transformers.Dinov2Config(**{**TINY, **overrides})))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def torch_dino(tmp_path_factory):
    return _tiny_torch_dino(tmp_path_factory.mktemp("dino"))


def _compare_with_transformers(folder, torch_model, pixels: np.ndarray, what: str) -> None:
    model, params = dino.load(folder)
    with torch.no_grad():
        theirs = torch_model(pixel_values=torch.from_numpy(pixels))
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(pixels))
    _assert_parity(ours.last_hidden_state, theirs.last_hidden_state, f"{what} last hidden state")
    _assert_parity(ours.pooled_output, theirs.pooler_output, f"{what} pooled output")


def test_dinov2_on_the_config_grid_matches_transformers(torch_dino):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    assert not dino.needs_interpolation(dino.read_config(torch_dino[0]), 56, 56)
    _compare_with_transformers(*torch_dino, pixels, "4x4 grid")


@pytest.mark.parametrize(
    "height, width", [(98, 70), (42, 126), (30, 29)], ids=["7x5-grid", "3x9-grid", "2x2-grid-cropped"]
)
def test_dinov2_on_another_grid_interpolates_positions_as_transformers(torch_dino, height, width):
    pixels = np.random.default_rng(1).standard_normal((2, 3, height, width)).astype(np.float32)
    assert dino.needs_interpolation(dino.read_config(torch_dino[0]), height, width)
    _compare_with_transformers(*torch_dino, pixels, f"{height}x{width} pixels")


def test_dinov2_with_swiglu_ffn_matches_transformers(tmp_path):
    folder, torch_model = _tiny_torch_dino(tmp_path, use_swiglu_ffn=True, hidden_act="gelu", qkv_bias=False)
    model, params = dino.load(folder)
    assert set(params["encoder"]["layer_0"]["mlp"]) == {"weights_in", "weights_out"}
    pixels = np.random.default_rng(2).standard_normal((2, 3, 70, 84)).astype(np.float32)
    _compare_with_transformers(folder, torch_model, pixels, "swiglu")


# torch rounds its float32 bicubic weights as its kernel was compiled (FMA contraction); ours are
# rounded once from float64: a few float32 ulps apart, ~1e-6 of the output after accumulation.
BICUBIC_TOLERANCE = 2e-6


@pytest.mark.parametrize(
    "in_size, out_size", [(4, 7), (16, 37), (37, 16), (37, 23), (4, 2), (5, 5), (3, 1)]
)
def test_bicubic_matrix_is_torchs_bicubic_interpolate(in_size, out_size):
    grid = np.random.default_rng(3).standard_normal((1, 2, in_size, in_size)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid), size=(out_size, out_size), mode="bicubic", align_corners=False
    ).numpy()
    matrix = dino.torch_bicubic_matrix(in_size, out_size)
    ours = np.einsum("hi,ncij,wj->nchw", matrix, grid, matrix)
    _assert_parity(ours, expected, f"bicubic {in_size}->{out_size}", tolerance=BICUBIC_TOLERANCE)


def test_mask_token_is_loaded_and_replaces_masked_patches(torch_dino):
    folder, torch_model = torch_dino
    model, params = dino.load(folder)
    stored = torch_model.embeddings.mask_token.detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["embeddings"]["mask_token"]), stored)
    pixels = np.random.default_rng(4).standard_normal((2, 3, 56, 56)).astype(np.float32)
    masked = np.zeros((2, 16), bool)
    masked[0, [1, 5]] = masked[1, 15] = True
    with torch.no_grad():
        theirs = torch_model(
            pixel_values=torch.from_numpy(pixels), bool_masked_pos=torch.from_numpy(masked)
        )
    ours = model.apply({"params": params}, jnp.asarray(pixels), jnp.asarray(masked))
    _assert_parity(ours.last_hidden_state, theirs.last_hidden_state, "masked last hidden state")


def test_classification_checkpoint_loads_its_base_model(torch_dino, tmp_path):
    folder, torch_model = torch_dino
    classifier = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**TINY, num_labels=3))
    classifier.dinov2.load_state_dict(torch_model.state_dict())
    classifier.save_pretrained(tmp_path, safe_serialization=True)
    _, ours = dino.load(tmp_path)
    _, reference = dino.load(folder)
    jax.tree.map(np.testing.assert_array_equal, ours, reference)


def test_saved_params_load_in_transformers_and_back(tmp_path):
    model = dino.Dinov2Model(dino.Dinov2Config(**TINY, use_swiglu_ffn=True))
    params = dino.init_params(model, jax.random.key(0))
    dino.save_params(model, params, tmp_path)
    torch_model = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    assert torch_model.config.use_swiglu_ffn
    pixels = np.random.default_rng(7).standard_normal((1, 3, 84, 56)).astype(np.float32)
    _compare_with_transformers(tmp_path, torch_model, pixels, "saved")
    _, loaded = dino.load(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    specs = dino.logical_partition_specs(model)
    assert tuple(specs["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]) == ("embed", "heads")


# ---------------------------------------------------------------------------------------------
# Preprocessing against transformers' slow BitImageProcessor


@pytest.mark.parametrize(
    "processor_kwargs",
    [
        DINOV2_PREPROCESSOR,
        dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),  # facebook/dinov2-*
        dict(size={"height": 50, "width": 90}, crop_size={"height": 60, "width": 40}),  # crop pads rows
        dict(size={"shortest_edge": 20}, crop_size={"height": 33, "width": 31}),  # crop pads both sides
    ],
    ids=["tiny", "dinov2", "fixed-size", "padded-crop"],
)
def test_preprocessing_matches_the_slow_bit_image_processor(tmp_path, processor_kwargs):
    processor = transformers.BitImageProcessor(**processor_kwargs)
    processor.save_pretrained(tmp_path)
    preprocessing = gal_dino.read_preprocessing(tmp_path)
    rng = np.random.default_rng(5)
    for shape in [(37, 61), (300, 200), (64, 64), (45, 17)]:
        images = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
        expected = transformers.BitImageProcessor.from_pretrained(tmp_path, use_fast=False)(
            images=list(images), return_tensors="np"
        )["pixel_values"]
        ours = gal_dino.preprocess(images, preprocessing)
        assert ours.dtype == np.float32
        _assert_parity(ours, expected, f"preprocess {shape}", tolerance=PREPROCESSING_TOLERANCE)


@pytest.mark.parametrize(
    "height, width, expected",
    [(37, 61, (64, 105)), (300, 200, (96, 64)), (64, 64, (64, 64)), (65, 64, (65, 64))],
)
def test_shortest_edge_size_truncates_the_longer_side(height, width, expected):
    assert gal_dino.shortest_edge_size(height, width, 64) == expected


# ---------------------------------------------------------------------------------------------
# The whole embedder against the authors' pipeline (slow processor + PyTorch model, mean-pooled)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny DINOv2 whose config grid (5 x 5, image_size 70) differs from the crop's (4 x 4),
    as facebook/dinov2-base's (37 x 37) differs from its 224-pixel crop's (16 x 16)."""
    folder, _ = _tiny_torch_dino(tmp_path_factory.mktemp("dino_embedder"), image_size=70)
    transformers.BitImageProcessor(**DINOV2_PREPROCESSOR).save_pretrained(folder)
    return folder


def test_dino_embedder_matches_the_torch_pipeline(dino_folder, monkeypatch):
    traced_shapes = []

    def traced(model, params, pixel_values):
        traced_shapes.append(pixel_values.shape)
        return mean_token_embeddings(model, params, pixel_values)

    mean_token_embeddings = gal_dino.mean_token_embeddings
    monkeypatch.setattr(gal_dino, "mean_token_embeddings", traced)
    images = np.random.default_rng(6).integers(0, 256, (5, 61, 83, 3), dtype=np.uint8)
    embedder = gal_dino.DinoEmbedder(dino_folder, batch_size=2)
    embeddings = embedder.image_embeddings(images)
    model = transformers.Dinov2Model.from_pretrained(dino_folder).eval()
    processor = transformers.BitImageProcessor.from_pretrained(dino_folder, use_fast=False)
    with torch.no_grad():
        hidden = model(**processor(images=list(images), return_tensors="pt")).last_hidden_state.numpy()
    pooled = hidden.mean(axis=1).astype(np.float64)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert embeddings.shape == (5, 32) and embeddings.dtype == np.float64
    _assert_parity(embeddings, expected, "DinoEmbedder")
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-12)
    assert traced_shapes == [(2, 3, 56, 56)]  # one compile: the last batch (1 image) was padded to 2
    assert embedder.image_embeddings(images[:0]).shape == (0, 32)


# ---------------------------------------------------------------------------------------------
# Folders it cannot read


def _write_json(file, values) -> None:
    file.write_text(json.dumps(values))


def test_dino_embedder_names_each_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json, preprocessor_config\.json"):
        gal_dino.DinoEmbedder(tmp_path)


def test_dino_embedder_names_a_malformed_preprocessor_config(dino_folder, tmp_path):
    (tmp_path / "config.json").write_text((dino_folder / "config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: not a readable"):
        gal_dino.DinoEmbedder(tmp_path)
    _write_json(tmp_path / "preprocessor_config.json", {"image_processor_type": "CLIPImageProcessor"})
    message = r"preprocessor_config\.json: image_processor_type is 'CLIPImageProcessor'"
    with pytest.raises(ValueError, match=message):
        gal_dino.DinoEmbedder(tmp_path)
    _write_json(tmp_path / "preprocessor_config.json", {"size": {"longest_edge": 5}})
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: unsupported .*size"):
        gal_dino.DinoEmbedder(tmp_path)


def test_dino_embedder_names_a_malformed_or_unsupported_config(dino_folder, tmp_path):
    preprocessor = "preprocessor_config.json"
    (tmp_path / preprocessor).write_text((dino_folder / preprocessor).read_text())
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"config\.json: not a readable config\.json"):
        gal_dino.DinoEmbedder(tmp_path)
    _write_json(tmp_path / "config.json", {"model_type": "clip"})
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'clip', expected 'dinov2'"):
        gal_dino.DinoEmbedder(tmp_path)
    _write_json(tmp_path / "config.json", {"model_type": "dinov2_with_registers", "num_register_tokens": 4})
    with pytest.raises(ValueError, match=r"config\.json: DINOv2 with registers .* not supported"):
        gal_dino.DinoEmbedder(tmp_path)
    _write_json(tmp_path / "config.json", {"model_type": "dinov2", "hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"config\.json: unsupported DINOv2 config .*relu"):
        gal_dino.DinoEmbedder(tmp_path)


def test_dino_embedder_names_missing_or_mismatched_weights(dino_folder, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((dino_folder / name).read_text())
    with pytest.raises(ValueError, match=r"no weights \(looked for model\.safetensors"):
        gal_dino.DinoEmbedder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not read"):
        gal_dino.DinoEmbedder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((dino_folder / "model.safetensors").read_bytes())
    config = json.loads((dino_folder / "config.json").read_text())
    _write_json(tmp_path / "config.json", {**config, "mlp_ratio": 3})
    message = r"model\.safetensors: weight 'encoder\.layer\.0\.mlp\.fc1\.(weight|bias)' has shape"
    with pytest.raises(ValueError, match=message):
        gal_dino.DinoEmbedder(tmp_path)
