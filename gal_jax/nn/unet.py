"""diffusers' UNet2DConditionModel in Flax for SD 1.x, SD 2.x and SDXL, read from and written to
diffusers' `unet/` folders.

Covered: CrossAttnDownBlock2D / DownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D /
UpBlock2D; conv (SD 1.x) or linear (SD 2.x, SDXL) transformer projections; `attention_head_dim`
as diffusers' legacy head count, an int or one per level; `transformer_layers_per_block` an int
or one per level; `layers_per_block` an int or one per level; SDXL's "text_time" added embedding.
Options that change the network beyond these raise ValueError when the config is read.

Activations are NHWC inside; `__call__` takes and returns NCHW as diffusers does (or NHWC with
`layout="NHWC"`). `dtype` is the compute dtype and `param_dtype` the params'; GroupNorm,
LayerNorm and the attention softmax run in float32, so `upcast_attention` needs nothing more.

Param paths (hook for parameter transforms such as low-rank deltas): every param sits at the
path of the PyTorch module it reproduces, list entries spelled `<name>_<index>`, leaves `kernel`
(Linear (in, out), Conv HWIO), `bias`, `scale` (norms). `weights.diffusers_key` maps a path to
its state-dict name, e.g.

  down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel
      -> down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight
  up_blocks_1/resnets_2/conv1/kernel              -> up_blocks.1.resnets.2.conv1.weight
  time_embedding/linear_1/kernel                  -> time_embedding.linear_1.weight
  mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel
      -> mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight

Every Dense kernel is 2-D and every Conv kernel 4-D under such a path, whatever the remat
policy, so a transform can select kernels by path and add a delta of the same shape.

Hook for attention maps: `apply(..., capture_attention=True)` (or a collection of the names
`cross_attention_layers` lists) sows each chosen cross-attention's probabilities (B, heads,
H*W, text tokens) under "intermediates"; `captured_attention` reads them back by name. The
output does not change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Collection, Literal, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gal_jax import sharding
from gal_jax.nn import conv_layers, layers, weights
from gal_jax.nn.unet_transformer import Compute, Transformer2DModel

Params = Any
CLASS_NAME = "UNet2DConditionModel"
Layout = Literal["NCHW", "NHWC"]
LAYOUTS = ("NCHW", "NHWC")
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
ATTENTION_PROBS = "attention_probs"
# Config entries this port does not implement, with the values under which they change nothing.
_INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "num_attention_heads": (None,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
}


# ---------------------------------------------------------------------------------------------
# Config (diffusers' config.json field names and defaults)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers UNet2DConditionModel config.json this port reads.

    `attention_head_dim` is diffusers' legacy name for the number of heads per level.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        levels = len(self.block_out_channels)
        checks = [
            (len(self.down_block_types) == levels == len(self.up_block_types),
             "down_block_types, up_block_types and block_out_channels differ in length"),
            (set(self.down_block_types) <= set(DOWN_BLOCK_TYPES), f"down_block_types: only {DOWN_BLOCK_TYPES}"),
            (set(self.up_block_types) <= set(UP_BLOCK_TYPES), f"up_block_types: only {UP_BLOCK_TYPES}"),
            (self.mid_block_type == "UNetMidBlock2DCrossAttn", "mid_block_type: only UNetMidBlock2DCrossAttn"),
            (self.act_fn in ("silu", "swish"), f"act_fn {self.act_fn!r}: only silu"),
            (isinstance(self.cross_attention_dim, int), "cross_attention_dim: one int for every level"),
            (isinstance(self.norm_num_groups, int), "norm_num_groups: an int (None is not supported)"),
            (self.addition_embed_type in (None, "text_time"), "addition_embed_type: only None or 'text_time'"),
            (self.addition_embed_type is None
             or None not in (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim),
             "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"),
            (self.conv_in_kernel % 2 == 1 and self.conv_out_kernel % 2 == 1, "conv kernels must be odd"),
        ]
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            checks.append((isinstance(value, int) or (len(value) == levels and all(isinstance(v, int) for v in value)),
                           f"{name}: an int or one int per level"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"unet config: {message}")
        for channels, heads in zip(self.block_out_channels, self.heads_per_level):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"unet config: {channels} channels are not divisible by {heads} heads and "
                    f"{self.norm_num_groups} groups"
                )

    def _per_level(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Returns the number of attention heads of each level (legacy `attention_head_dim`)."""
        return self._per_level(self.attention_head_dim)

    @property
    def layers_per_level(self) -> tuple[int, ...]:
        """Returns the number of resnets of each down level (up levels have one more)."""
        return self._per_level(self.layers_per_block)

    @property
    def transformer_depth_per_level(self) -> tuple[int, ...]:
        """Returns the number of transformer blocks of each level's Transformer2DModels."""
        return self._per_level(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        """Returns the width of the timestep embedding the resnets read."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def spatial_multiple(self) -> int:
        """Returns what the latents' height and width must be multiples of (the down factor)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UNetConfig:
        """Returns the config of a diffusers UNet2DConditionModel dict; lists become tuples.

        Raises ValueError naming an entry this port does not implement when it is set to a value
        that would change the network.
        """
        for name, inert in _INERT_VALUES.items():
            if name in values and values[name] not in inert:
                raise ValueError(f"unet config: {name}={values[name]!r} is not supported")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Returns the config.json dict diffusers' UNet2DConditionModel reads."""
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}


def read_config(path: str | Path) -> UNetConfig:
    """Returns the config in a diffusers UNet2DConditionModel `config.json` (or its folder)."""
    return UNetConfig.from_dict(weights.read_diffusers_config(path, CLASS_NAME))


def cross_attention_layers(config: UNetConfig) -> tuple[str, ...]:
    """Returns the diffusers names of the UNet's cross-attention modules, in execution order
    (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`, ...): the names
    `capture_attention` takes."""
    depth, layers_per_level = config.transformer_depth_per_level, config.layers_per_level
    levels = len(config.block_out_channels)

    def names(block: str, attentions: int, level: int) -> list[str]:
        return [
            f"{block}.attentions.{index}.transformer_blocks.{layer}.attn2"
            for index in range(attentions) for layer in range(depth[level])
        ]

    found = []
    for level, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            found += names(f"down_blocks.{level}", layers_per_level[level], level)
    found += names("mid_block", 1, levels - 1)
    for index, kind in enumerate(config.up_block_types):
        level = levels - 1 - index
        if kind == "CrossAttnUpBlock2D":
            found += names(f"up_blocks.{index}", layers_per_level[level] + 1, level)
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Returns diffusers' sinusoidal embedding (N, dim), float32, of `timesteps` (N,)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


def _resnet(config: UNetConfig, compute: Compute, out_channels: int, name: str, scale: float = 1.0):
    """Returns a UNet ResnetBlock2D (rematerialised as `compute.remat` says) named `name`."""
    block = layers.remat(conv_layers.ResnetBlock2D, compute.remat)
    return block(out_channels, config.norm_num_groups, config.norm_eps, scale, name=name, **compute.dtypes)


def _transformer(config: UNetConfig, compute: Compute, level: int, name: str):
    """Returns level `level`'s Transformer2DModel (rematerialised as `compute.remat` says)."""
    block = layers.remat(Transformer2DModel, compute.remat)
    return block(
        config.heads_per_level[level], config.transformer_depth_per_level[level], config.norm_num_groups,
        config.use_linear_projection, compute, name=name,
    )


class DownBlock(nn.Module):
    """Down level `level`: CrossAttnDownBlock2D (resnet then transformer, per layer) or
    DownBlock2D (resnets), then a stride-2 conv except at the last level; returns (x, skips)."""

    config: UNetConfig
    level: int
    compute: Compute

    @nn.compact
    def __call__(self, x, temb, context) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        config, level = self.config, self.level
        cross_attention = config.down_block_types[level] == "CrossAttnDownBlock2D"
        skips = []
        for index in range(config.layers_per_level[level]):
            x = _resnet(config, self.compute, config.block_out_channels[level], f"resnets_{index}")(x, temb)
            if cross_attention:
                x = _transformer(config, self.compute, level, f"attentions_{index}")(x, context)
            skips.append(x)
        if level < len(config.block_out_channels) - 1:
            x = conv_layers.Downsample2D(config.downsample_padding, name="downsamplers_0", **self.compute.dtypes)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet (scaled by mid_block_scale_factor)."""

    config: UNetConfig
    compute: Compute

    @nn.compact
    def __call__(self, x, temb, context) -> jax.Array:
        config, channels = self.config, self.config.block_out_channels[-1]
        scale, level = config.mid_block_scale_factor, len(config.block_out_channels) - 1
        x = _resnet(config, self.compute, channels, "resnets_0", scale)(x, temb)
        x = _transformer(config, self.compute, level, "attentions_0")(x, context)
        return _resnet(config, self.compute, channels, "resnets_1", scale)(x, temb)


class UpBlock(nn.Module):
    """Up block `index` (level `levels - 1 - index`): CrossAttnUpBlock2D or UpBlock2D, each resnet
    reading the input concatenated with the last skip left; then nearest 2x and a conv except at
    the last block."""

    config: UNetConfig
    index: int
    compute: Compute

    @nn.compact
    def __call__(self, x, skips, temb, context) -> jax.Array:
        config, levels = self.config, len(self.config.block_out_channels)
        level = levels - 1 - self.index
        cross_attention = config.up_block_types[self.index] == "CrossAttnUpBlock2D"
        for index, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(config, self.compute, config.block_out_channels[level], f"resnets_{index}")(x, temb)
            if cross_attention:
                x = _transformer(config, self.compute, level, f"attentions_{index}")(x, context)
        if self.index < levels - 1:
            x = conv_layers.Upsample2D(name="upsamplers_0", **self.compute.dtypes)(x)
        return x


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_2(silu(linear_1(x))), width `features`."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.partitioned_dense(self.features, (None, "mlp"), name="linear_1", **dtypes)(x)
        return layers.partitioned_dense(self.features, ("mlp", "time_embed"), name="linear_2", **dtypes)(jax.nn.silu(x))


def _capture_names(config: UNetConfig, capture: bool | Collection[str]) -> frozenset[str]:
    """Returns the cross-attention names `capture` chooses: all for True, none for False."""
    available = cross_attention_layers(config)
    if capture is True:
        return frozenset(available)
    if not capture:
        return frozenset()
    chosen = frozenset([capture] if isinstance(capture, str) else capture)
    unknown = sorted(chosen - set(available))
    if unknown:
        raise ValueError(f"capture_attention: no cross-attention layer named {unknown[0]!r}; the UNet has {available}")
    return chosen


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel (SD 1.x, 2.x, XL); returns the prediction shaped like `sample`.

    `remat` ("none", "block", "dots_saveable") rematerialises every ResnetBlock2D and
    Transformer2DModel, the granularity of diffusers' gradient checkpointing.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"
    remat: str = "none"
    layout: Layout = "NCHW"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        *,
        capture_attention: bool | Collection[str] = False,
    ) -> jax.Array:
        """Returns the UNet output for `sample` (B, C, H, W) at `timesteps` (scalar or (B,)) given
        `encoder_hidden_states` (B, S, cross_attention_dim).

        SDXL ("text_time") also needs `added_cond_kwargs` {"text_embeds": (B, D), "time_ids":
        (B, n)}. `capture_attention` (True, or names from `cross_attention_layers`) sows those
        layers' attention probabilities without changing the output.
        """
        config = self.config
        compute = Compute(
            self.dtype, self.param_dtype, self.attention, self.remat, _capture_names(config, capture_attention)
        )
        x = self._to_nhwc(sample)
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != config.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states of shape {encoder_hidden_states.shape}: expected "
                f"(B, S, {config.cross_attention_dim})"
            )
        temb = self._time_embedding(timesteps, x.shape[0], added_cond_kwargs)
        context = encoder_hidden_states.astype(self.dtype)
        conv = functools.partial(conv_layers.conv2d, **compute.dtypes)
        # Block outputs are pinned batch-sharded where a mesh is active (sharding.activation_sharding).
        pin = functools.partial(sharding.constrain, logical_axes=sharding.ACTIVATION_NHWC)
        x = pin(conv(config.block_out_channels[0], config.conv_in_kernel, name="conv_in")(x))
        skips = [x]
        for level in range(len(config.block_out_channels)):
            x, level_skips = DownBlock(config, level, compute, name=f"down_blocks_{level}")(x, temb, context)
            x = pin(x)
            skips += level_skips
        x = pin(MidBlock(config, compute, name="mid_block")(x, temb, context))
        for index, level in enumerate(reversed(range(len(config.block_out_channels)))):
            count = config.layers_per_level[level] + 1
            skips, block_skips = skips[:-count], tuple(skips[-count:])
            x = pin(UpBlock(config, index, compute, name=f"up_blocks_{index}")(x, block_skips, temb, context))
        x = conv_layers.GroupNorm(config.norm_num_groups, config.norm_eps, name="conv_norm_out", **compute.dtypes)(x)
        x = conv(config.out_channels, config.conv_out_kernel, name="conv_out")(jax.nn.silu(x))
        return jnp.transpose(x, (0, 3, 1, 2)) if self.layout == "NCHW" else x

    def _to_nhwc(self, sample: jax.Array) -> jax.Array:
        """Returns `sample` in NHWC and the compute dtype, after checking its shape."""
        config = self.config
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: expected one of {LAYOUTS}")
        if sample.ndim == 4 and self.layout == "NCHW":
            sample = jnp.transpose(sample, (0, 2, 3, 1))
        multiple = config.spatial_multiple
        if sample.ndim != 4 or sample.shape[-1] != config.in_channels or sample.shape[1] % multiple or (
            sample.shape[2] % multiple
        ):
            raise ValueError(
                f"sample of shape {sample.shape} ({self.layout}): expected {config.in_channels} channels and "
                f"height and width multiples of {multiple}"
            )
        sample = sample.astype(self.dtype)
        return 2 * sample - 1.0 if config.center_input_sample else sample

    def _time_embedding(self, timesteps, batch: int, added_cond_kwargs) -> jax.Array:
        """Returns the embedding (B, time_embed_dim) of the timesteps, plus SDXL's added one."""
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sinusoid = functools.partial(
            timestep_embedding, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift
        )
        timesteps = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (batch,))
        time_embed = sinusoid(timesteps, config.block_out_channels[0]).astype(self.dtype)
        embedding = TimestepEmbedding(config.time_embed_dim, name="time_embedding", **dtypes)(time_embed)
        if config.addition_embed_type != "text_time":
            return embedding
        if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            raise ValueError("addition_embed_type 'text_time' needs added_cond_kwargs text_embeds and time_ids")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = sinusoid(jnp.ravel(time_ids), config.addition_time_embed_dim).reshape(batch, -1)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if added.shape[-1] != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give {added.shape[-1]} features, "
                f"projection_class_embeddings_input_dim is {config.projection_class_embeddings_input_dim}"
            )
        return embedding + TimestepEmbedding(config.time_embed_dim, name="add_embedding", **dtypes)(
            added.astype(self.dtype)
        )


def captured_attention(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Returns {diffusers layer name: probabilities (B, heads, H*W, S)} of the cross-attention
    layers a `capture_attention` apply sowed; `intermediates` is the mutable state it returned
    (or its "intermediates" entry)."""
    intermediates = intermediates.get("intermediates", intermediates)
    found = {}
    for path, values in traverse_util.flatten_dict(dict(intermediates), is_leaf=lambda _, v: isinstance(v, tuple)).items():
        if path[-1] == ATTENTION_PROBS:
            if len(values) != 1:
                raise ValueError(f"{'/'.join(path)}: sown {len(values)} times, expected once per apply")
            found[weights.diffusers_module_name(path[:-1])] = values[0]
    return found


# ---------------------------------------------------------------------------------------------
# Params and diffusers folders
# ---------------------------------------------------------------------------------------------


def _boxed_init(model: UNet2DConditionModel, key: jax.Array) -> Params:
    """Returns `model`'s boxed params, initialised on the smallest inputs (param shapes do not
    depend on the input sizes)."""
    config, size = model.config, model.config.spatial_multiple
    shape = (1, config.in_channels, size, size) if model.layout == "NCHW" else (1, size, size, config.in_channels)
    added = None
    if config.addition_embed_type == "text_time":
        text_width = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, text_width)), "time_ids": jnp.zeros((1, 1))}
    context = jnp.zeros((1, 1, config.cross_attention_dim))
    return model.init(key, jnp.zeros(shape), jnp.zeros((1,)), context, added)["params"]


def init_params(model: UNet2DConditionModel, key: jax.Array) -> Params:
    """Returns freshly initialised params of `model` (plain arrays, on the default device)."""
    return layers.init_params(functools.partial(_boxed_init, model), key)


def abstract_params(model: UNet2DConditionModel) -> Params:
    """Returns the param tree of `model` as jax.ShapeDtypeStructs (nothing is computed)."""
    return layers.abstract_params(functools.partial(_boxed_init, model))


def logical_partition_specs(model: UNet2DConditionModel) -> Params:
    """Returns the tree of logical PartitionSpecs ("conv_out", "embed", ...) of `model`'s params."""
    return layers.logical_partition_specs(functools.partial(_boxed_init, model))


def load_params(
    model: UNet2DConditionModel,
    path: str | Path,
    *,
    variant: str | None = None,
    shardings: Params | None = None,
) -> Params:
    """Returns `model`'s params from a diffusers `unet/` folder (single or sharded safetensors,
    optionally a `variant` such as "fp16"), a weights file or an index, cast to
    `model.param_dtype`, each array straight onto its entry of `shardings` (default: the first
    local device). A missing key or a shape the config does not expect raises ValueError naming
    the file and the key."""
    return weights.read_diffusers_params(abstract_params(model), path, variant=variant, shardings=shardings)


def save_params(
    model: UNet2DConditionModel, params: Params, folder: str | Path, *, dtype=None, variant: str | None = None
) -> Path:
    """Writes `params` and `config.json` as a diffusers UNet2DConditionModel folder; returns the
    weights file (`diffusion_pytorch_model[.variant].safetensors`). Floats are cast to `dtype`
    when given."""
    return weights.write_diffusers_folder(
        params, abstract_params(model), model.config.to_dict(), folder, dtype=dtype, variant=variant
    )


def load(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: layers.AttentionImplementation = "xla",
    remat: str = "none",
    layout: Layout = "NCHW",
    variant: str | None = None,
    shardings: Params | None = None,
) -> tuple[UNet2DConditionModel, Params]:
    """Returns (model, params) of a diffusers UNet2DConditionModel folder."""
    model = UNet2DConditionModel(read_config(path), dtype, param_dtype, attention, remat, layout)
    return model, load_params(model, path, variant=variant, shardings=shardings)
