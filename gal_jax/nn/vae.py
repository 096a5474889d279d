"""diffusers' AutoencoderKL in Flax: encoder, decoder, quant convs and the diagonal Gaussian
posterior, read from and written to diffusers' `vae/` folders.

Param paths follow diffusers' PyTorch names (`encoder/down_blocks_0/resnets_1/conv1/kernel` is
`encoder.down_blocks.0.resnets.1.conv1.weight`); activations are NHWC inside, and the public
methods take and return NCHW as diffusers does (or NHWC with `layout="NHWC"`). The module applies
no `scaling_factor`: as in diffusers, that is the pipeline's business.

Typical use:

    model, params = vae.load(folder)                              # folder holds config.json
    posterior = model.apply({"params": params}, pixels, method=model.encode)
    latents = posterior.sample(key) * model.config.scaling_factor
    pixels = model.apply({"params": params}, latents / model.config.scaling_factor, method=model.decode)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from gal_jax.nn import conv_layers, layers, weights

Params = Any
CLASS_NAME = "AutoencoderKL"
Layout = Literal["NCHW", "NHWC"]
LAYOUTS = ("NCHW", "NHWC")
RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder fix it, whatever the config


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """The fields of a diffusers AutoencoderKL config.json, with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * levels:
            raise ValueError(f"vae: down_block_types {self.down_block_types}: only DownEncoderBlock2D per level")
        if self.up_block_types != ("UpDecoderBlock2D",) * levels:
            raise ValueError(f"vae: up_block_types {self.up_block_types}: only UpDecoderBlock2D per level")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"vae: act_fn {self.act_fn!r} is not supported (silu only)")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"vae: {channels} channels are not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsampling_factor(self) -> int:
        """Returns how many pixels one latent spans per side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VaeConfig:
        """Returns the config of a diffusers AutoencoderKL dict; lists become tuples.

        Raises ValueError for latents_mean / latents_std, which this port does not carry.
        """
        for name in ("latents_mean", "latents_std"):
            if values.get(name) is not None:
                raise ValueError(f"vae: {name} is not supported")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Returns the config.json dict diffusers' AutoencoderKL reads."""
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}


def read_config(path: str | Path) -> VaeConfig:
    """Returns the config in a diffusers AutoencoderKL `config.json` (or the folder holding it)."""
    return VaeConfig.from_dict(weights.read_diffusers_config(path, CLASS_NAME))


@struct.dataclass
class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) diffusers' DiagonalGaussianDistribution describes; mean
    and logvar (clipped to [-30, 20]) in the model's public layout."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        """Returns the mean, the posterior's mode."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """Returns mean + std * eps with eps ~ N(0, I) drawn from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """Returns KL(self || other) per example (B,), summed over the latent; `other` defaults to
        N(0, I)."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=axes)


class VaeMidBlock(nn.Module):
    """diffusers' UNetMidBlock2D as the VAE uses it: resnet, optional 1-head attention, resnet."""

    config: VaeConfig
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = functools.partial(
            conv_layers.ResnetBlock2D, x.shape[-1], config.norm_num_groups, RESNET_EPS, **dtypes
        )
        x = resnet(name="resnets_0")(x)
        if config.mid_block_add_attention:
            x = conv_layers.SpatialSelfAttention(
                1, config.norm_num_groups, RESNET_EPS, self.attention, name="attentions_0", **dtypes
            )(x)
        return resnet(name="resnets_1")(x)


class VaeLevel(nn.Module):
    """One level of the encoder (DownEncoderBlock2D: resnets, then `downsamplers_0`) or of the
    decoder (UpDecoderBlock2D: resnets, then `upsamplers_0`); returns NHWC."""

    config: VaeConfig
    out_channels: int
    num_resnets: int
    resample: Literal["down", "up", "none"]
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for index in range(self.num_resnets):
            x = conv_layers.ResnetBlock2D(
                self.out_channels, self.config.norm_num_groups, RESNET_EPS, name=f"resnets_{index}", **dtypes
            )(x)
        if self.resample == "down":
            x = conv_layers.Downsample2D(0, name="downsamplers_0", **dtypes)(x)
        elif self.resample == "up":
            x = conv_layers.Upsample2D(name="upsamplers_0", **dtypes)(x)
        return x


def _output_head(config: VaeConfig, x: jax.Array, features: int, dtypes: dict) -> jax.Array:
    """Returns conv_out(silu(conv_norm_out(x))), the last layers of the encoder and the decoder."""
    x = conv_layers.GroupNorm(config.norm_num_groups, RESNET_EPS, name="conv_norm_out", **dtypes)(x)
    return conv_layers.conv2d(features, 3, name="conv_out", **dtypes)(jax.nn.silu(x))


class VaeEncoder(nn.Module):
    """diffusers' Encoder (double_z): NHWC pixels -> NHWC moments (mean, logvar), 2 x latent_channels."""

    config: VaeConfig
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = config.block_out_channels
        x = conv_layers.conv2d(channels[0], 3, name="conv_in", **dtypes)(x)
        for level, out_channels in enumerate(channels):
            resample = "down" if level < len(channels) - 1 else "none"
            x = VaeLevel(
                config, out_channels, config.layers_per_block, resample, name=f"down_blocks_{level}", **dtypes
            )(x)
        x = VaeMidBlock(config, self.attention, name="mid_block", **dtypes)(x)
        return _output_head(config, x, 2 * config.latent_channels, dtypes)


class VaeDecoder(nn.Module):
    """diffusers' Decoder: NHWC latents -> NHWC pixels, out_channels."""

    config: VaeConfig
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = config.block_out_channels[::-1]
        x = conv_layers.conv2d(channels[0], 3, name="conv_in", **dtypes)(z)
        x = VaeMidBlock(config, self.attention, name="mid_block", **dtypes)(x)
        for index, out_channels in enumerate(channels):
            resample = "up" if index < len(channels) - 1 else "none"
            x = VaeLevel(
                config, out_channels, config.layers_per_block + 1, resample, name=f"up_blocks_{index}", **dtypes
            )(x)
        return _output_head(config, x, config.out_channels, dtypes)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: `encode` pixels to a DiagonalGaussian, `decode` latents to pixels.

    Both take and return the public `layout` (NCHW as diffusers, or NHWC); inside, everything is
    NHWC. `dtype` is the compute dtype, `param_dtype` the params'; GroupNorm and the softmax run in
    float32. Calling the module decodes the posterior's mode (reconstruction), which `init` uses.
    """

    config: VaeConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: layers.AttentionImplementation = "xla"
    layout: Layout = "NCHW"

    def setup(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: expected one of {LAYOUTS}")
        config, dtypes = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VaeEncoder(config, self.attention, **dtypes)
        self.decoder = VaeDecoder(config, self.attention, **dtypes)
        moments, latents = 2 * config.latent_channels, config.latent_channels
        self.quant_conv = conv_layers.conv2d(moments, 1, **dtypes) if config.use_quant_conv else None
        self.post_quant_conv = conv_layers.conv2d(latents, 1, **dtypes) if config.use_post_quant_conv else None

    def _to_nhwc(self, x: jax.Array, channels: int, what: str) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"{what} of shape {x.shape}: expected {self.layout} (4 axes)")
        if self.layout == "NCHW":
            x = jnp.transpose(x, (0, 2, 3, 1))
        if x.shape[-1] != channels:
            raise ValueError(f"{what} of shape {x.shape}: expected {channels} channels ({self.layout})")
        return x.astype(self.dtype)

    def _from_nhwc(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, (0, 3, 1, 2)) if self.layout == "NCHW" else x

    def encode(self, pixels: jax.Array) -> DiagonalGaussian:
        """Returns the posterior of `pixels` (B, C, H, W) in [-1, 1], H and W multiples of
        `config.downsampling_factor`; mean and logvar in `dtype`, (B, latent_channels, h, w)."""
        moments = self.encoder(self._to_nhwc(pixels, self.config.in_channels, "pixels"))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(self._from_nhwc(mean), self._from_nhwc(jnp.clip(logvar, -30.0, 20.0)))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Returns the pixels (B, out_channels, H, W), unclipped, of unscaled `latents`."""
        z = self._to_nhwc(latents, self.config.latent_channels, "latents")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self._from_nhwc(self.decoder(z))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.decode(self.encode(pixels).mode())


# ---------------------------------------------------------------------------------------------
# Params and diffusers folders
# ---------------------------------------------------------------------------------------------


def _boxed_init(model: AutoencoderKL, key: jax.Array) -> Params:
    size = model.config.downsampling_factor
    shape = (1, model.config.in_channels, size, size)
    if model.layout == "NHWC":
        shape = (1, size, size, model.config.in_channels)
    return model.init(key, jnp.zeros(shape, jnp.float32))["params"]


def init_params(model: AutoencoderKL, key: jax.Array) -> Params:
    """Returns freshly initialised params of `model` (plain arrays, on the default device)."""
    return layers.init_params(functools.partial(_boxed_init, model), key)


def abstract_params(model: AutoencoderKL) -> Params:
    """Returns the param tree of `model` as jax.ShapeDtypeStructs (nothing is computed)."""
    return layers.abstract_params(functools.partial(_boxed_init, model))


def logical_partition_specs(model: AutoencoderKL) -> Params:
    """Returns the tree of logical PartitionSpecs ("conv_in", "conv_out", ...) of `model`'s params."""
    return layers.logical_partition_specs(functools.partial(_boxed_init, model))


def load_params(
    model: AutoencoderKL, path: str | Path, *, variant: str | None = None, shardings: Params | None = None
) -> Params:
    """Returns `model`'s params from a diffusers `vae/` folder, weights file or index, cast to
    `model.param_dtype`, each array straight onto its entry of `shardings` (default: the first
    local device). A missing key or a shape the config does not expect raises ValueError naming
    the file and the key."""
    return weights.read_diffusers_params(abstract_params(model), path, variant=variant, shardings=shardings)


def save_params(
    model: AutoencoderKL, params: Params, folder: str | Path, *, dtype=None, variant: str | None = None
) -> Path:
    """Writes `params` and `config.json` as a diffusers AutoencoderKL folder; returns the weights
    file (`diffusion_pytorch_model[.variant].safetensors`). Floats are cast to `dtype` when given."""
    return weights.write_diffusers_folder(
        params, abstract_params(model), model.config.to_dict(), folder, dtype=dtype, variant=variant
    )


def load(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: layers.AttentionImplementation = "xla",
    layout: Layout = "NCHW",
    variant: str | None = None,
    shardings: Params | None = None,
) -> tuple[AutoencoderKL, Params]:
    """Returns (model, params) of a diffusers AutoencoderKL folder."""
    model = AutoencoderKL(read_config(path), dtype, param_dtype, attention, layout)
    return model, load_params(model, path, variant=variant, shardings=shardings)
