"""The transformer half of diffusers' UNet2DConditionModel, in Flax: Transformer2DModel (GroupNorm,
proj_in, BasicTransformerBlocks, proj_out) on NHWC feature maps, with its attention, GEGLU MLP and
the cross-attention capture hook.

Param names follow diffusers' PyTorch modules (`attn1`, `attn2`, `to_q`, `to_out_0`, `norm1`,
`ff/net_0/proj`, `ff/net_2`, `proj_in`, `proj_out`); `weights.diffusers_key` maps paths to
state-dict names. Logical axes as in conv_layers.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from gal_jax import sharding
from gal_jax.nn import conv_layers, layers, weights

TRANSFORMER_GROUP_NORM_EPS = 1e-6  # diffusers' Transformer2DModel fixes these
TRANSFORMER_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the blocks compute: dtypes, attention implementation, remat policy, and the names of
    the cross-attention layers whose probabilities are captured."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: layers.AttentionImplementation = "xla"
    remat: str = "none"
    capture: frozenset[str] = frozenset()

    @property
    def dtypes(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class Attention(nn.Module):
    """diffusers' Attention as BasicTransformerBlock uses it (no q/k/v bias): self-attention, or
    cross-attention over `context`; sows its probabilities when its name is in `capture`."""

    num_heads: int
    capture: frozenset[str]
    attention: layers.AttentionImplementation
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        capture = bool(self.capture) and weights.diffusers_module_name(self.path) in self.capture
        return conv_layers.multi_head_attention(
            self, x, context, num_heads=self.num_heads, qkv_bias=False, attention=self.attention, capture=capture
        )


class Geglu(nn.Module):
    """diffusers' GEGLU: h * gelu(g), (h, g) the halves of `proj`(x); (B, T, `features`)."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        projection = layers.partitioned_dense(
            2 * self.features, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype
        )
        hidden, gate = jnp.split(projection(x), 2, axis=-1)
        return hidden * layers.gelu(gate)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU (inner width 4 D): net_2(net_0(x)); (B, T, D)."""

    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width, dtypes = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = Geglu(4 * width, name="net_0", **dtypes)(x)
        return layers.partitioned_dense(width, ("mlp", "embed"), name="net_2", **dtypes)(hidden)


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer_norm): self-attention, cross-attention, GEGLU MLP,
    each pre-LN and residual; (B, T, D)."""

    num_heads: int
    compute: Compute

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        compute = self.compute
        norm = functools.partial(layers.LayerNorm, TRANSFORMER_LAYER_NORM_EPS, **compute.dtypes)
        attend = functools.partial(Attention, self.num_heads, attention=compute.attention, **compute.dtypes)
        x = x + attend(frozenset(), name="attn1")(norm(name="norm1")(x))
        x = x + attend(compute.capture, name="attn2")(norm(name="norm2")(x), context)
        return x + FeedForward(name="ff", **compute.dtypes)(norm(name="norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel on continuous NHWC inputs: GroupNorm, proj_in (1x1 conv or
    linear), `depth` transformer blocks, proj_out, plus the input; (B, H, W, C)."""

    num_heads: int
    depth: int
    groups: int
    linear_projection: bool
    compute: Compute

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        compute, (batch, height, width, channels) = self.compute, x.shape
        hidden = conv_layers.GroupNorm(self.groups, TRANSFORMER_GROUP_NORM_EPS, name="norm", **compute.dtypes)(x)
        if self.linear_projection:
            project_in = layers.partitioned_dense(channels, ("conv_in", "embed"), name="proj_in", **compute.dtypes)
            project_out = layers.partitioned_dense(channels, ("embed", "conv_out"), name="proj_out", **compute.dtypes)
        else:
            conv = functools.partial(conv_layers.conv2d, channels, 1, **compute.dtypes)
            project_in = conv(channel_axes=("conv_in", "embed"), name="proj_in")
            project_out = conv(channel_axes=("embed", "conv_out"), name="proj_out")
        tokens = project_in(hidden).reshape(batch, height * width, channels)
        for index in range(self.depth):
            tokens = BasicTransformerBlock(self.num_heads, compute, name=f"transformer_blocks_{index}")(
                tokens, context
            )
            tokens = sharding.constrain(tokens, sharding.ACTIVATION_TOKENS)
        return project_out(tokens.reshape(batch, height, width, channels)) + x.astype(compute.dtype)
