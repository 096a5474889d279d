"""CLIP in Flax: text and vision transformers, the dual encoder, and their PyTorch-named weights.

The modules reproduce transformers' CLIPTextModel, CLIPTextModelWithProjection and CLIPModel
(pre-LN encoder layers, causal text attention, class-token pooling, projections without bias). Their
param trees are named after the PyTorch modules (`text_model/encoder/layers_0/self_attn/q_proj/
kernel` is `text_model.encoder.layers.0.self_attn.q_proj.weight`), so `weights.torch_key` maps
every parameter to its safetensors name, and `load_params` / `save_params` read and write the files
transformers and diffusers read and write.

Typical use:

    config = clip.read_config(folder)              # ClipConfig or ClipTextConfig
    model, params = clip.load(folder, dtype=jnp.bfloat16)
    features = model.apply({"params": params}, input_ids, method=model.text_features)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from gal_jax.nn import layers, weights

Params = Any
CONFIG_FILE = "config.json"
WEIGHTS_STEM = "model"
SDXL_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline's folder names


# ---------------------------------------------------------------------------------------------
# Configs (transformers' config.json field names and defaults)
# ---------------------------------------------------------------------------------------------


def _known_fields(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the entries of `values` that name a field of dataclass `cls`."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def _check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """The text tower of a transformers CLIP config (CLIPTextConfig's fields and defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        layers.activation(self.hidden_act)
        _check_heads(self.hidden_size, self.num_attention_heads)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClipTextConfig:
        """Returns the config of a CLIPTextConfig dict; fields it lacks take transformers' defaults."""
        return cls(**_known_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        """Returns the CLIPTextConfig dict transformers reads."""
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """The vision tower of a transformers CLIP config (CLIPVisionConfig's fields and defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        layers.activation(self.hidden_act)
        _check_heads(self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        """Returns the number of tokens: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClipVisionConfig:
        """Returns the config of a CLIPVisionConfig dict; fields it lacks take transformers' defaults."""
        return cls(**_known_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        """Returns the CLIPVisionConfig dict transformers reads."""
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A transformers CLIPModel config: both towers, the shared projection width, logit scale."""

    text: ClipTextConfig = ClipTextConfig()
    vision: ClipVisionConfig = ClipVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClipConfig:
        """Returns the config of a CLIPConfig dict.

        The legacy `text_config_dict` / `vision_config_dict` entries win over `text_config` /
        `vision_config`, as in transformers.
        """
        text = values.get("text_config_dict") or values.get("text_config") or {}
        vision = values.get("vision_config_dict") or values.get("vision_config") or {}
        return cls(
            text=ClipTextConfig.from_dict(text),
            vision=ClipVisionConfig.from_dict(vision),
            **_known_fields(cls, {k: v for k, v in values.items() if k not in ("text", "vision")}),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the CLIPConfig dict transformers reads."""
        return {
            "model_type": "clip",
            "text_config": self.text.to_dict(),
            "vision_config": self.vision.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


def read_config(path: str | Path) -> ClipConfig | ClipTextConfig:
    """Returns the config in a transformers `config.json` (or the folder holding it).

    model_type "clip" (CLIPModel) gives a ClipConfig; "clip_text_model" (CLIPTextModel and
    CLIPTextModelWithProjection, as in Stable Diffusion's `text_encoder/`) a ClipTextConfig.
    """
    file = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable config.json ({err})") from err
    model_type = values.get("model_type")
    if model_type == "clip":
        return ClipConfig.from_dict(values)
    if model_type == "clip_text_model":
        return ClipTextConfig.from_dict(values)
    raise ValueError(f"{file}: model_type is {model_type!r}, expected 'clip' or 'clip_text_model'")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class ClipTransformerOutput:
    """What a CLIP tower returns.

    last_hidden_state: (B, L, D), after the final layer norm for text, before any for vision.
    pooled_output: (B, D), the end-of-text token's (text) or layer-normed class token's (vision).
    hidden_states: None, or the embeddings and every layer's output (num_layers + 1 arrays of
      (B, L, D), without the final norm): `hidden_states[-2]` is SDXL's penultimate layer.
    """

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class ClipTextOutput:
    """What ClipTextModel returns: the tower's output and, with a projection, `text_embeds` (B, P)."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


@struct.dataclass
class ClipOutput:
    """What ClipModel returns: logits (exp(logit_scale) x cosine) and L2-normalised embeddings."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


class ClipAttention(nn.Module):
    """Multi-head self-attention; returns (B, L, D) like its input."""

    num_heads: int
    is_causal: bool
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attended = layers.multi_head_attention(
            self, x, num_heads=self.num_heads, names=("q_proj", "k_proj", "v_proj"),
            is_causal=self.is_causal, attention=self.attention,
        )
        out_proj = layers.partitioned_dense(
            x.shape[-1], ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj"
        )
        return out_proj(attended)


class ClipEncoderLayer(nn.Module):
    """A pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)); returns (B, L, D)."""

    config: ClipTextConfig | ClipVisionConfig
    is_causal: bool
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(layers.LayerNorm, config.layer_norm_eps, **dtypes)
        attention = ClipAttention(
            config.num_attention_heads, self.is_causal, self.attention, name="self_attn", **dtypes
        )
        x = x + attention(norm(name="layer_norm1")(x))
        mlp = layers.Mlp(config.intermediate_size, config.hidden_act, name="mlp", **dtypes)
        return x + mlp(norm(name="layer_norm2")(x))


class ClipEncoder(nn.Module):
    """The stack of encoder layers; returns (last output, embeddings + every layer's output or None)."""

    config: ClipTextConfig | ClipVisionConfig
    is_causal: bool
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        self.layers = [
            ClipEncoderLayer(self.config, self.is_causal, self.attention, self.dtype, self.param_dtype)
            for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x: jax.Array, output_hidden_states: bool = False):
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        return x, tuple(hidden_states) if output_hidden_states else None


def _embed(num: int, features: int, axes, dtype, param_dtype, name: str) -> nn.Embed:
    init = nn.with_logical_partitioning(layers.default_kernel_init, axes)
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, embedding_init=init, name=name)


class ClipTextEmbeddings(nn.Module):
    """Token plus absolute position embeddings; returns (B, L, D)."""

    config: ClipTextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        config, dtypes = self.config, (self.dtype, self.param_dtype)
        tokens = _embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), *dtypes, "token_embedding")
        positions = _embed(
            config.max_position_embeddings, config.hidden_size, (None, "embed"), *dtypes, "position_embedding"
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None])


class ClipTextTransformer(nn.Module):
    """CLIP's causal text transformer (transformers' CLIPTextTransformer); returns ClipTransformerOutput.

    The pooled output is the final-normed state of the end-of-text token: with the legacy
    `eos_token_id == 2` the position of the largest id (argmax), else the first position holding
    `eos_token_id`, exactly as transformers 4.57 pools.
    """

    config: ClipTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> ClipTransformerOutput:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[-1] > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        x = ClipTextEmbeddings(config, name="embeddings", **dtypes)(input_ids)
        x, hidden_states = ClipEncoder(config, True, self.attention, name="encoder", **dtypes)(
            x, output_hidden_states
        )
        last = layers.LayerNorm(config.layer_norm_eps, name="final_layer_norm", **dtypes)(x)
        if config.eos_token_id == 2:
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
        return ClipTransformerOutput(last, pooled, hidden_states)


class ClipVisionEmbeddings(nn.Module):
    """Patch embeddings (a strided conv) after a learned class token, plus positions; (B, 1 + P, D)."""

    config: ClipVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        config, width = self.config, self.config.hidden_size
        class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(layers.default_kernel_init, ("embed",)),
            (width,),
            self.param_dtype,
        )
        patch = config.patch_size
        patches = nn.Conv(
            width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(layers.default_kernel_init, (None, None, None, "embed")),
            name="patch_embedding",
        )(pixels_nhwc.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, width)
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, width))
        positions = _embed(
            config.num_positions, width, (None, "embed"), self.dtype, self.param_dtype, "position_embedding"
        )
        tokens = jnp.concatenate([class_tokens, patches], axis=1)
        return tokens + positions(jnp.arange(config.num_positions)[None])


class ClipVisionTransformer(nn.Module):
    """CLIP's ViT (transformers' CLIPVisionTransformer) on NCHW pixels; returns ClipTransformerOutput."""

    config: ClipVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> ClipTransformerOutput:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size = config.image_size
        if pixel_values.shape[1:] != (config.num_channels, size, size):
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape}: expected NCHW (B, {config.num_channels}, "
                f"{size}, {size})"
            )
        pixels_nhwc = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = ClipVisionEmbeddings(config, name="embeddings", **dtypes)(pixels_nhwc)
        x = layers.LayerNorm(config.layer_norm_eps, name="pre_layrnorm", **dtypes)(x)
        x, hidden_states = ClipEncoder(config, False, self.attention, name="encoder", **dtypes)(
            x, output_hidden_states
        )
        pooled = layers.LayerNorm(config.layer_norm_eps, name="post_layernorm", **dtypes)(x[:, 0])
        return ClipTransformerOutput(x, pooled, hidden_states)


def _projection(features: int, dtype, param_dtype, name: str) -> nn.Dense:
    return layers.partitioned_dense(
        features, ("embed", "projection"), dtype=dtype, param_dtype=param_dtype, use_bias=False, name=name
    )


class ClipTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `projection` (SDXL's second
    text encoder); returns ClipTextOutput."""

    config: ClipTextConfig
    projection: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> ClipTextOutput:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tower = ClipTextTransformer(self.config, attention=self.attention, name="text_model", **dtypes)
        out = tower(input_ids, output_hidden_states)
        text_embeds = None
        if self.projection:
            text_embeds = _projection(self.config.projection_dim, name="text_projection", **dtypes)(
                out.pooled_output
            )
        return ClipTextOutput(out.last_hidden_state, out.pooled_output, out.hidden_states, text_embeds)


class SdxlTextEncoders(nn.Module):
    """SDXL's two text encoders read as one: transformers' CLIPTextModel (`text_encoder`) and
    CLIPTextModelWithProjection (`text_encoder_2`), as StableDiffusionXLPipeline.encode_prompt
    combines them.

    Input: (B, 2L) token ids, the first tokenizer's L ids followed by the second's. Output: the
    UNet's conditioning packed in one array (B, L + 1, D1 + D2): rows 0..L-1 are both encoders'
    penultimate hidden states side by side (the cross-attention context), row L holds the second
    encoder's projected pooled embedding (P features, zero-padded to D1 + D2), which SDXL's UNet
    reads through its added text-time embedding. One array keeps the conditioning a plain
    (batch, tokens, features) array for vmap, sharding and caching; `split_sdxl_conditioning`
    unpacks it.
    """

    config: ClipTextConfig
    config_2: ClipTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    def __post_init__(self):
        super().__post_init__()
        if self.config_2.projection_dim > self.config.hidden_size + self.config_2.hidden_size:
            raise ValueError(f"text_encoder_2's projection_dim {self.config_2.projection_dim} is wider than the "
                             f"two encoders' hidden states ({self.config.hidden_size} + {self.config_2.hidden_size})")

    @property
    def towers(self) -> tuple[ClipTextModel, ClipTextModel]:
        """The two encoders as standalone modules (their params are this module's two subtrees)."""
        return self._tower(0, parent=None), self._tower(1, parent=None)

    def _tower(self, index: int, **where) -> ClipTextModel:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
        return ClipTextModel((self.config, self.config_2)[index], bool(index), **dtypes, **where)

    @property
    def context_width(self) -> int:
        return self.config.hidden_size + self.config_2.hidden_size

    @property
    def pooled_width(self) -> int:
        return self.config_2.projection_dim

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1] // 2
        if input_ids.shape[-1] != 2 * length:
            raise ValueError(f"input ids of shape {input_ids.shape}: expected (B, 2L), both tokenizers' ids")
        one = self._tower(0, name=SDXL_TEXT_ENCODERS[0])(input_ids[:, :length], output_hidden_states=True)
        two = self._tower(1, name=SDXL_TEXT_ENCODERS[1])(input_ids[:, length:], output_hidden_states=True)
        context = jnp.concatenate([one.hidden_states[-2], two.hidden_states[-2]], axis=-1)
        pooled = jnp.pad(two.text_embeds, ((0, 0), (0, context.shape[-1] - two.text_embeds.shape[-1])))
        return jnp.concatenate([context, pooled[:, None].astype(context.dtype)], axis=1)


def split_sdxl_conditioning(conditioning: jax.Array, pooled_width: int) -> tuple[jax.Array, jax.Array]:
    """Returns (context (B, L, D), pooled text embedding (B, pooled_width)) of SdxlTextEncoders'
    packed output."""
    return conditioning[:, :-1], conditioning[:, -1, :pooled_width]


class ClipModel(nn.Module):
    """transformers' CLIPModel: both towers, their projections (no bias) and the logit scale."""

    config: ClipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"

    def setup(self):
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = ClipTextTransformer(config.text, attention=self.attention, **dtypes)
        self.vision_model = ClipVisionTransformer(config.vision, attention=self.attention, **dtypes)
        self.text_projection = _projection(config.projection_dim, **dtypes, name=None)
        self.visual_projection = _projection(config.projection_dim, **dtypes, name=None)
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(config.logit_scale_init_value), ()),
            (),
            self.param_dtype,
        )

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """Returns projected, unnormalised text embeddings (B, P), as get_text_features."""
        return self.text_projection(self.text_model(input_ids).pooled_output)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Returns projected, unnormalised image embeddings (B, P) of NCHW pixels, as get_image_features."""
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> ClipOutput:
        def normalised(x):
            x = x.astype(jnp.float32)
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        text_embeds = normalised(self.text_features(input_ids))
        image_embeds = normalised(self.image_features(pixel_values))
        logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return ClipOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds)


ClipModule = ClipModel | ClipTextModel | SdxlTextEncoders


def _example_inputs(model: ClipModule) -> tuple[jax.Array, ...]:
    """Returns the smallest inputs `model.init` accepts (built inside a trace: no transfers)."""
    text = model.config.text if isinstance(model, ClipModel) else model.config
    input_ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    if isinstance(model, SdxlTextEncoders):
        length = min(text.max_position_embeddings, model.config_2.max_position_embeddings)
        return (jnp.zeros((1, 2 * length), jnp.int32),)
    if isinstance(model, ClipTextModel):
        return (input_ids,)
    vision = model.config.vision
    return input_ids, jnp.zeros((1, vision.num_channels, vision.image_size, vision.image_size), jnp.float32)


def _boxed_init(model: ClipModule, key: jax.Array) -> Params:
    return model.init(key, *_example_inputs(model))["params"]


def init_params(model: ClipModule, key: jax.Array) -> Params:
    """Returns freshly initialised params of `model` (plain arrays, on the default device)."""
    return jax.jit(lambda k: nn.unbox(_boxed_init(model, k)))(key)


def abstract_params(model: ClipModule) -> Params:
    """Returns the param tree of `model` as jax.ShapeDtypeStructs (nothing is computed)."""
    return layers.abstract_params(functools.partial(_boxed_init, model))


def logical_partition_specs(model: ClipModule) -> Params:
    """Returns the tree of logical PartitionSpecs ("vocab", "embed", ...) of `model`'s params."""
    return layers.logical_partition_specs(functools.partial(_boxed_init, model))


# ---------------------------------------------------------------------------------------------
# Weights: transformers' safetensors and config.json
# ---------------------------------------------------------------------------------------------


def weight_files(path: str | Path, *, variant: str | None = None) -> dict[str, Path]:
    """Returns {PyTorch key: file} of the weights at `path`: a `.safetensors` file, an index, or a
    transformers folder (`model[.variant].safetensors[.index.json]`)."""
    return weights.weight_files(path, stem=WEIGHTS_STEM, variant=variant)


def load_params(
    model: ClipModule, path: str | Path, *, variant: str | None = None, shardings: Params | None = None
) -> Params:
    """Returns `model`'s params from transformers-named safetensors, cast to `model.param_dtype`.

    Each array goes straight to its entry of `shardings` (default: the first local device). Keys
    the model does not use (the other tower, old `position_ids` buffers) are skipped; a missing key
    or a shape the config does not expect raises ValueError naming the file and the key.
    """
    files = weight_files(path, variant=variant)
    return weights.read_params(abstract_params(model), files, shardings=shardings)


def save_params(model: ClipModule, params: Params, folder: str | Path, *, dtype=None) -> Path:
    """Writes `model.safetensors` (PyTorch names and layouts, floats cast to `dtype` when given) and
    `config.json` into `folder`; returns the weights file.

    transformers' CLIPModel / CLIPTextModel(WithProjection).from_pretrained read the folder, and
    so does `load`. Params must be addressable from this process.
    """
    folder = Path(folder)
    file = folder / f"{WEIGHTS_STEM}.safetensors"
    weights.write_params(params, abstract_params(model), file, dtype=dtype)
    weights.write_config(folder / CONFIG_FILE, _transformers_config(model))
    return file


def _transformers_config(model: ClipModule) -> dict[str, Any]:
    """Returns the config.json transformers needs to rebuild `model`."""
    if isinstance(model, ClipModel):
        architecture = "CLIPModel"
    else:
        architecture = "CLIPTextModelWithProjection" if model.projection else "CLIPTextModel"
    return {"architectures": [architecture], **model.config.to_dict()}


def load(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: layers.AttentionImplementation = "xla",
    variant: str | None = None,
    shardings: Params | None = None,
) -> tuple[ClipModule, Params]:
    """Returns (model, params) of a transformers CLIP folder: a CLIPModel, or a CLIPTextModel /
    CLIPTextModelWithProjection (the latter when its weights hold `text_projection.weight`)."""
    config = read_config(path)
    if isinstance(config, ClipConfig):
        model = ClipModel(config, dtype=dtype, param_dtype=param_dtype, attention=attention)
    else:
        projection = "text_projection.weight" in weight_files(path, variant=variant)
        model = ClipTextModel(config, projection, dtype=dtype, param_dtype=param_dtype, attention=attention)
    return model, load_params(model, path, variant=variant, shardings=shardings)
