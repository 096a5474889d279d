"""DINOv2 in Flax: transformers' Dinov2Model (a pre-LN ViT with LayerScale), read from its
PyTorch-named safetensors.

The module reproduces transformers' Dinov2Model at inference: patch embeddings (a strided conv)
after a learned class token, absolute position embeddings bicubically resized when the patch grid
differs from the config's (exactly as transformers' `interpolate_pos_encoding`), pre-LN encoder
layers whose two branches are scaled by learned LayerScale vectors, an MLP or SwiGLU FFN, and a
final LayerNorm. Param paths follow the PyTorch names (`encoder/layer_0/attention/attention/query/
kernel` is `encoder.layer.0.attention.attention.query.weight`), so `weights.torch_key` maps every
param to its safetensors name. DINOv2 with registers (`dinov2_with_registers`) is refused.

Typical use:

    model, params = dino.load(folder)                    # folder holds config.json, model.safetensors
    out = model.apply({"params": params}, pixel_values)  # NCHW float pixels, any size >= one patch
    out.last_hidden_state, out.pooled_output             # (B, 1 + patches, D), (B, D)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from gal_jax.nn import layers, weights

Params = Any
CONFIG_FILE = "config.json"
WEIGHTS_STEM = "model"
MODEL_TYPE = "dinov2"
# transformers saves task models (Dinov2ForImageClassification) with the base model under this.
BASE_MODEL_PREFIX = "dinov2."
# torch's bicubic kernel (upsample_bicubic2d): Keys' cubic convolution with a = -0.75.
TORCH_BICUBIC_A = -0.75


# ---------------------------------------------------------------------------------------------
# Config (transformers' Dinov2Config field names and defaults)
# ---------------------------------------------------------------------------------------------


def _known_fields(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the entries of `values` that name a field of dataclass `cls`."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The fields of a transformers Dinov2Config that inference needs, with its defaults.

    Dropout and drop-path rates are training-only and ignored; `layerscale_value` only initialises
    the LayerScale vectors, which checkpoints store; `use_mask_token` says whether the checkpoint
    holds the mask token (used only for masked positions, which pretraining passes).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True

    def __post_init__(self):
        layers.activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"{name} {value!r}: only a positive int (square images and patches) is supported"
                )

    @property
    def grid_size(self) -> int:
        """Returns the side of the patch grid the position embeddings were trained for."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Returns the number of position embeddings: one per patch of the grid plus the class token."""
        return self.grid_size**2 + 1

    @property
    def mlp_features(self) -> int:
        """Returns the hidden width of the plain MLP, as Dinov2MLP computes it."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def swiglu_features(self) -> int:
        """Returns the hidden width of the SwiGLU FFN: 2/3 of the MLP's, rounded up to a multiple of 8
        (Dinov2SwiGLUFFN's rule, which keeps the parameter count near the plain MLP's)."""
        return (int(self.mlp_features * 2 / 3) + 7) // 8 * 8

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Dinov2Config:
        """Returns the config of a Dinov2Config dict; fields it lacks take transformers' defaults."""
        return cls(**_known_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        """Returns the Dinov2Config dict transformers reads."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}


def read_config(path: str | Path) -> Dinov2Config:
    """Returns the config in a transformers DINOv2 `config.json` (or the folder holding it).

    Refuses, naming the file, anything but model_type "dinov2": in particular DINOv2 with registers
    (extra learned tokens between the class token and the patches, another transformers class).
    """
    file = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable config.json ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{file}: not a transformers config (expected a JSON object)")
    model_type = values.get("model_type")
    if model_type == "dinov2_with_registers" or values.get("num_register_tokens"):
        raise ValueError(
            f"{file}: DINOv2 with registers (model_type {model_type!r}, num_register_tokens "
            f"{values.get('num_register_tokens')}) is not supported; use a plain DINOv2 "
            "(model_type 'dinov2')"
        )
    if model_type != MODEL_TYPE:
        raise ValueError(f"{file}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
    try:
        return Dinov2Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: unsupported DINOv2 config ({err})") from err


# ---------------------------------------------------------------------------------------------
# Position embeddings for another patch grid: torch's bicubic resize, reproduced
# ---------------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Returns the four tap weights (4, n), float64, of Keys' cubic convolution (a = -0.75) at
    fractional offsets `t`, for the taps at floor - 1 .. floor + 2.

    The formulas are torch's get_cubic_upsample_coefficients (aten/src/ATen/native/UpSample.h).
    torch evaluates them in float32, rounded as its kernel was compiled (FMA-contracted on x86 and
    ARM builds); evaluating in float64 and rounding once lands within a few float32 ulps of that
    whatever the build.
    """
    a, t = TORCH_BICUBIC_A, t.astype(np.float64)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)])


@functools.cache
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Returns the (out_size, in_size) float32 matrix M for which M @ x is torch's bicubic resize of
    x along one axis: `F.interpolate(mode="bicubic", size=..., align_corners=False)`, no antialias.

    As torch (upsample_bicubic2d given output sizes, no scale factors) computes for float32: the
    scale is in / out and the source of output i is scale * (i + 0.5) - 0.5, in float32 (not
    clamped at 0, unlike the linear modes); the base tap is its floor capped at in - 1, the
    fraction is clamped to [0, 1], and taps outside the input read the nearest edge (their weights
    add up there).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    fraction = np.clip(source - base.astype(np.float32), 0, 1)
    tap_weights = _cubic_weights(fraction)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for tap in range(4):
        np.add.at(matrix, (rows, np.clip(base - 1 + tap, 0, in_size - 1)), tap_weights[tap])
    return matrix.astype(np.float32)


def needs_interpolation(config: Dinov2Config, height: int, width: int) -> bool:
    """Returns whether transformers resizes the position embeddings for `height` x `width` pixels.

    transformers keeps them as they are only when the patch count equals the config's and the
    pixels are square; otherwise (even for the same count on a non-square grid) it resizes.
    """
    num_patches = (height // config.patch_size) * (width // config.patch_size)
    return not (num_patches == config.num_positions - 1 and height == width)


def interpolate_position_embeddings(
    position_embeddings: jax.Array, config: Dinov2Config, height: int, width: int
) -> jax.Array:
    """Returns the position embeddings (1, 1 + patches, D) for `height` x `width` pixels.

    transformers' Dinov2Embeddings.interpolate_pos_encoding (4.57): the class token's embedding is
    kept, the patches' (grid x grid) are resized to (height // patch, width // patch) with torch's
    bicubic in float32 and cast back to their dtype. The separable resize is two small matmuls at
    full float32 precision.
    """
    if not needs_interpolation(config, height, width):
        return position_embeddings
    grid, dim = config.grid_size, position_embeddings.shape[-1]
    new_height, new_width = height // config.patch_size, width // config.patch_size
    patch_grid = position_embeddings[0, 1:].astype(jnp.float32).reshape(grid, grid, dim)
    resized = jnp.einsum(
        "hi,ijd,wj->hwd",
        torch_bicubic_matrix(grid, new_height),
        patch_grid,
        torch_bicubic_matrix(grid, new_width),
        precision=jax.lax.Precision.HIGHEST,
    )
    resized = resized.astype(position_embeddings.dtype).reshape(1, new_height * new_width, dim)
    return jnp.concatenate([position_embeddings[:, :1], resized], axis=1)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class Dinov2Output:
    """What Dinov2Model returns.

    last_hidden_state: (B, 1 + patches, D) after the final layer norm (class token first).
    pooled_output: (B, D), the final-normed class token (transformers' pooler_output).
    hidden_states: None, or the embeddings and every layer's output (num_layers + 1 arrays, without
      the final norm), as transformers' output_hidden_states.
    """

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _param(module: nn.Module, name: str, shape, axes, init=layers.default_kernel_init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


class Dinov2PatchEmbeddings(nn.Module):
    """The patch conv (`projection`, kernel = stride = patch); returns the patches row-major,
    (B, patches, D)."""

    config: Dinov2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        patch = self.config.patch_size
        projection = nn.Conv(
            self.config.hidden_size, (patch, patch), strides=(patch, patch), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                layers.default_kernel_init, (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="projection",
        )
        patches = projection(pixels_nhwc.astype(self.dtype))
        return patches.reshape(patches.shape[0], -1, patches.shape[-1])


class Dinov2Embeddings(nn.Module):
    """Class token, patch embeddings (strided conv) and position embeddings; (B, 1 + patches, D).

    `bool_masked_pos` (B, patches), when given, replaces the masked patches' embeddings by the
    learned mask token, as in DINOv2's pretraining.
    """

    config: Dinov2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels_nhwc: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        config, hidden = self.config, self.config.hidden_size
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cls_token = _param(self, "cls_token", (1, 1, hidden), (None, None, "embed"))
        mask_token = None
        if config.use_mask_token:  # stored in checkpoints even when no position is ever masked
            zeros = nn.initializers.zeros_init()
            mask_token = _param(self, "mask_token", (1, hidden), (None, "embed"), zeros)
        position_embeddings = _param(
            self, "position_embeddings", (1, config.num_positions, hidden), (None, None, "embed")
        )
        batch, height, width, _ = pixels_nhwc.shape
        patches = Dinov2PatchEmbeddings(config, name="patch_embeddings", **dtypes)(pixels_nhwc)
        if bool_masked_pos is not None and mask_token is not None:
            patches = jnp.where(bool_masked_pos[..., None], mask_token.astype(self.dtype)[None], patches)
        class_tokens = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, hidden))
        tokens = jnp.concatenate([class_tokens, patches], axis=1)
        positions = interpolate_position_embeddings(position_embeddings, config, height, width)
        return tokens + positions.astype(self.dtype)


class Dinov2SelfAttention(nn.Module):
    """Multi-head self-attention without its output projection (`query`, `key`, `value`); (B, L, D)."""

    num_heads: int
    qkv_bias: bool
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.multi_head_attention(
            self, x, num_heads=self.num_heads, names=("query", "key", "value"), qkv_bias=self.qkv_bias,
            attention=self.attention,
        )


class Dinov2SelfOutput(nn.Module):
    """The attention output projection under `output/dense` (transformers' Dinov2SelfOutput)."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = layers.partitioned_dense(
            self.features, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="dense"
        )
        return dense(x)


class Dinov2Attention(nn.Module):
    """Self-attention (`attention`) then its output projection (`output/dense`); returns (B, L, D)."""

    config: Dinov2Config
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        config = self.config
        attended = Dinov2SelfAttention(
            config.num_attention_heads, config.qkv_bias, self.attention, name="attention", **dtypes
        )(x)
        return Dinov2SelfOutput(config.hidden_size, name="output", **dtypes)(attended)


class Dinov2LayerScale(nn.Module):
    """Multiplies a residual branch by a learned per-channel vector `lambda1` (D,)."""

    init_value: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.constant(self.init_value)
        scale = _param(self, "lambda1", (x.shape[-1],), ("embed",), init)
        return x * scale.astype(self.dtype)


class Dinov2SwiGLUFFN(nn.Module):
    """SwiGLU FFN: `weights_in` (D -> 2F), silu(first half) * second half, `weights_out` (F -> D)."""

    hidden_features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(layers.partitioned_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        both = dense(2 * self.hidden_features, ("embed", "mlp"), name="weights_in")(x)
        gate, value = jnp.split(both, 2, axis=-1)
        return dense(x.shape[-1], ("mlp", "embed"), name="weights_out")(jax.nn.silu(gate) * value)


class Dinov2Layer(nn.Module):
    """A pre-LN layer with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    config: Dinov2Config
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(layers.LayerNorm, config.layer_norm_eps, **dtypes)
        scale = functools.partial(Dinov2LayerScale, config.layerscale_value, **dtypes)
        attention = Dinov2Attention(config, self.attention, name="attention", **dtypes)
        attended = attention(norm(name="norm1")(x))
        x = x + scale(name="layer_scale1")(attended)
        if config.use_swiglu_ffn:
            ffn = Dinov2SwiGLUFFN(config.swiglu_features, name="mlp", **dtypes)
        else:
            ffn = layers.Mlp(config.mlp_features, config.hidden_act, name="mlp", **dtypes)
        return x + scale(name="layer_scale2")(ffn(norm(name="norm2")(x)))


class Dinov2Encoder(nn.Module):
    """The stack of layers (`layer_0` ...); returns (last output, embeddings + every output or None)."""

    config: Dinov2Config
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, output_hidden_states: bool = False):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden_states = [x]
        for index in range(self.config.num_hidden_layers):
            layer = Dinov2Layer(self.config, self.attention, name=f"layer_{index}", **dtypes)
            x = layer(x)
            hidden_states.append(x)
        return x, tuple(hidden_states) if output_hidden_states else None


class Dinov2Model(nn.Module):
    """transformers' Dinov2Model on NCHW pixels; returns Dinov2Output.

    Any pixel size works: the patch grid is (height // patch, width // patch) (the remainder is
    dropped, as by the strided conv) and the position embeddings are resized to it.
    """

    config: Dinov2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    @nn.compact
    def __call__(
        self,
        pixel_values: jax.Array,
        bool_masked_pos: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> Dinov2Output:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape}: expected NCHW "
                f"(B, {config.num_channels}, H, W)"
            )
        if min(pixel_values.shape[2:]) < config.patch_size:
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape}: smaller than one "
                f"{config.patch_size}-pixel patch"
            )
        pixels_nhwc = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = Dinov2Embeddings(config, name="embeddings", **dtypes)(pixels_nhwc, bool_masked_pos)
        encoder = Dinov2Encoder(config, self.attention, name="encoder", **dtypes)
        x, hidden_states = encoder(x, output_hidden_states)
        last = layers.LayerNorm(config.layer_norm_eps, name="layernorm", **dtypes)(x)
        return Dinov2Output(last, last[:, 0], hidden_states)


def _example_pixels(model: Dinov2Model) -> jax.Array:
    """Returns the config's image size of zeros, the input `model.init` is traced with."""
    size = model.config.image_size
    return jnp.zeros((1, model.config.num_channels, size, size), jnp.float32)


def _boxed_init(model: Dinov2Model, key: jax.Array) -> Params:
    return model.init(key, _example_pixels(model))["params"]


def init_params(model: Dinov2Model, key: jax.Array) -> Params:
    """Returns freshly initialised params of `model` (plain arrays, on the default device)."""
    return layers.init_params(functools.partial(_boxed_init, model), key)


def abstract_params(model: Dinov2Model) -> Params:
    """Returns the param tree of `model` as jax.ShapeDtypeStructs (nothing is computed)."""
    return layers.abstract_params(functools.partial(_boxed_init, model))


def logical_partition_specs(model: Dinov2Model) -> Params:
    """Returns the tree of logical PartitionSpecs ("embed", "heads", "mlp", ...) of `model`'s params."""
    return layers.logical_partition_specs(functools.partial(_boxed_init, model))


# ---------------------------------------------------------------------------------------------
# Weights: transformers' safetensors and config.json
# ---------------------------------------------------------------------------------------------


def weight_files(path: str | Path, *, variant: str | None = None) -> dict[str, Path]:
    """Returns {PyTorch key: file} of the weights at `path`: a `.safetensors` file, an index, or a
    transformers folder (`model[.variant].safetensors[.index.json]`)."""
    path = Path(path)
    try:
        return weights.weight_files(path, stem=WEIGHTS_STEM, variant=variant)
    except ValueError as err:
        if path.is_dir() and (path / "pytorch_model.bin").is_file():
            raise ValueError(
                f"{err}; {path / 'pytorch_model.bin'} is not read: save the model with transformers' "
                "save_pretrained(..., safe_serialization=True) to get model.safetensors"
            ) from err
        raise


def _key_prefix(files: Mapping[str, Path]) -> str:
    """Returns "" for a Dinov2Model's keys, "dinov2." for a task model's (its base model's keys)."""
    if "embeddings.cls_token" not in files and BASE_MODEL_PREFIX + "embeddings.cls_token" in files:
        return BASE_MODEL_PREFIX
    return ""


def load_params(
    model: Dinov2Model, path: str | Path, *, variant: str | None = None, shardings: Params | None = None
) -> Params:
    """Returns `model`'s params from transformers-named safetensors, cast to `model.param_dtype`.

    Reads a Dinov2Model checkpoint or a task model's (Dinov2ForImageClassification: the keys under
    `dinov2.`, the head skipped). A missing key or a shape the config does not expect raises
    ValueError naming the file and the key.
    """
    files = weight_files(path, variant=variant)
    prefix = _key_prefix(files)
    key_of = lambda param_path: prefix + weights.torch_key(param_path)  # noqa: E731
    return weights.read_params(abstract_params(model), files, shardings=shardings, key_of=key_of)


def save_params(model: Dinov2Model, params: Params, folder: str | Path, *, dtype=None) -> Path:
    """Writes `model.safetensors` (PyTorch names and layouts, floats cast to `dtype` when given) and
    `config.json` into `folder`, which transformers' Dinov2Model.from_pretrained and `load` read;
    returns the weights file."""
    folder = Path(folder)
    file = folder / f"{WEIGHTS_STEM}.safetensors"
    weights.write_params(params, abstract_params(model), file, dtype=dtype)
    config = {"architectures": ["Dinov2Model"], **model.config.to_dict()}
    weights.write_config(folder / CONFIG_FILE, config)
    return file


def load(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: layers.AttentionImplementation = "xla",
    variant: str | None = None,
    shardings: Params | None = None,
) -> tuple[Dinov2Model, Params]:
    """Returns (model, params) of a transformers DINOv2 folder (config.json, model.safetensors)."""
    model = Dinov2Model(read_config(path), dtype=dtype, param_dtype=param_dtype, attention=attention)
    return model, load_params(model, path, variant=variant, shardings=shardings)
