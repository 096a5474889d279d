"""Layers the convolutional families (VAE, UNet) share, in NHWC: GroupNorm, Conv, ResnetBlock2D,
Downsample2D / Upsample2D, multi-head attention and the VAE's spatial self-attention.

Activations are NHWC end to end; only the models' public entry points transpose. Param names
follow diffusers' PyTorch modules (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`,
`downsamplers_0/conv`, `to_q`, `to_out_0`, ...) so `weights.diffusers_key` maps every path to its
state-dict name. Logical axis names, in addition to layers.py's "embed", "heads" and "mlp":

  "conv_in"     the input-channel axis of a conv kernel (HWIO's I)
  "conv_out"    the output-channel axis of a conv kernel and of its bias
  "norm"        the channel axis of GroupNorm scale and bias
  "time_embed"  the width of the timestep embedding (UNet), read by each resnet's time_emb_proj

Normalisations and the attention softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from gal_jax.nn import layers

conv_kernel_init = nn.initializers.lecun_normal()

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated`, except that on CPU a plain NHWC convolution (no dilation, no
    groups, non-negative explicit padding) gets its kernel gradient as one matmul per kernel tap.

    XLA:CPU computes a kernel gradient as a convolution whose window is the whole image, 1.2-1.7x
    slower than the taps' matmuls (3x3 kernels, tiny and SD 1.5 widths); the kernel gradients were
    the largest group of ops in the tiny UNet's gradient. Values and the input gradient are XLA's.
    """
    plain = (
        layers._on_cpu() and lhs.ndim == 4 and feature_group_count == 1 and precision is None and not kwargs
        and not isinstance(padding, str) and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if plain:
        return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
        **kwargs)


def _xla_conv_nhwc(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, kernel, strides, padding):
    return _xla_conv_nhwc(x, kernel, strides, padding)


def _conv_nhwc_forward(x, kernel, strides, padding):
    return _xla_conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_backward(strides, padding, residuals, grad_out):
    x, kernel = residuals
    # The convolution is linear in x: its transpose is XLA's input gradient, without a forward.
    (grad_x,) = jax.linear_transpose(lambda x: _xla_conv_nhwc(x, kernel, strides, padding), x)(grad_out)
    (top, bottom), (left, right) = padding
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    rows, cols = grad_out.shape[1:3]
    (stride_h, stride_w), channels = strides, x.shape[-1]
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
    taps = [
        jax.lax.dot_general(
            padded[:, i:i + stride_h * (rows - 1) + 1:stride_h, j:j + stride_w * (cols - 1) + 1:stride_w]
            .reshape(-1, channels),
            grad_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        for i in range(kernel.shape[0]) for j in range(kernel.shape[1])
    ]
    return grad_x, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_forward, _conv_nhwc_backward)


class GroupNorm(nn.Module):
    """GroupNorm over the channels (last axis) and every spatial position, computed in float32.

    Matches torch.nn.GroupNorm (biased variance, per-channel affine); returns `dtype`. The input
    is (B, ..., C) with C divisible by `num_groups`.
    """

    num_groups: int
    epsilon: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")

        def param(name, init):
            return self.param(
                name, nn.with_logical_partitioning(init, ("norm",)), (channels,), self.param_dtype
            ).astype(jnp.float32)

        scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
        grouped = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        centred = grouped - mean
        variance = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
        normalised = (centred * jax.lax.rsqrt(variance + self.epsilon)).reshape(x.shape)
        return (normalised * scale + bias).astype(self.dtype)


def conv2d(
    features: int,
    kernel_size: int,
    *,
    dtype,
    param_dtype,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
    channel_axes: tuple[str | None, str | None] = ("conv_in", "conv_out"),
    name: str | None = None,
) -> nn.Conv:
    """Returns an NHWC nn.Conv as torch.nn.Conv2d(padding=`padding`), kernel HWIO with logical
    axes (None, None, *channel_axes) and bias (channel_axes[1],).

    `padding` is torch's symmetric int (default: "same" for odd kernels, (k - 1) // 2) or explicit
    ((top, bottom), (left, right)) pairs.
    """
    if padding is None:
        padding = (kernel_size - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(conv_kernel_init, (None, None, *channel_axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), channel_axes[1:]),
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding norm, SiLU): returns (B, H, W, out).

    norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb)) when `temb` is given) -> norm2 -> silu ->
    conv2, plus the input (through a 1x1 `conv_shortcut` when the channel count changes), divided
    by `output_scale_factor`. `time_emb_proj` exists only in blocks called with a `temb`.
    """

    out_channels: int
    groups: int
    epsilon: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(GroupNorm, self.groups, self.epsilon, **dtypes)
        hidden = conv2d(self.out_channels, 3, name="conv1", **dtypes)(jax.nn.silu(norm(name="norm1")(x)))
        if temb is not None:
            projection = layers.partitioned_dense(
                self.out_channels, ("time_embed", "conv_out"), name="time_emb_proj", **dtypes
            )
            hidden = hidden + projection(jax.nn.silu(temb))[:, None, None, :]
        hidden = conv2d(self.out_channels, 3, name="conv2", **dtypes)(jax.nn.silu(norm(name="norm2")(hidden)))
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, name="conv_shortcut", **dtypes)(x)
        residual = x.astype(hidden.dtype) + hidden
        return residual if self.output_scale_factor == 1 else residual / self.output_scale_factor


class Downsample2D(nn.Module):
    """A stride-2 3x3 `conv` (diffusers' Downsample2D with use_conv): returns (B, H/2, W/2, C).

    `padding` 1 pads every side (UNet); 0 pads only bottom and right by one, as diffusers' VAE
    encoder does with F.pad(0, 1, 0, 1).
    """

    padding: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        conv = conv2d(x.shape[-1], 3, stride=2, padding=padding, name="conv", dtype=self.dtype,
                      param_dtype=self.param_dtype)
        return conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 `conv` (diffusers' Upsample2D with use_conv):
    returns (B, 2H, 2W, C)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        doubled = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        doubled = doubled.reshape(batch, 2 * height, 2 * width, channels)
        conv = conv2d(channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)
        return conv(doubled)


def multi_head_attention(
    module: nn.Module,
    x: jax.Array,
    context: jax.Array | None,
    *,
    num_heads: int,
    qkv_bias: bool,
    attention: layers.AttentionImplementation,
    capture: bool = False,
) -> jax.Array:
    """Returns diffusers' Attention (to_q, to_k, to_v, to_out_0) of tokens `x` (B, T, D) over
    `context` (B, S, E), or over `x` itself when `context` is None; (B, T, D).

    Call it from `module`'s compact method: the projections become `module`'s children, named as
    diffusers names them. With `capture`, the attention probabilities (B, N, T, S), float32, are
    also computed explicitly and sown as `module`'s "intermediates"/"attention_probs"; the output
    still comes from `layers.dot_product_attention`, so it is the same with or without capture.
    """
    attended = layers.multi_head_attention(
        module, x, context, num_heads=num_heads, names=("to_q", "to_k", "to_v"), qkv_bias=qkv_bias,
        attention=attention, capture=capture,
    )
    out = layers.partitioned_dense(
        x.shape[-1], ("heads", "embed"), name="to_out_0", dtype=module.dtype, param_dtype=module.param_dtype
    )
    return out(attended)


class SpatialSelfAttention(nn.Module):
    """The VAE mid block's attention: x + attention(group_norm(x)) over all H x W positions, with
    biased projections; returns (B, H, W, C)."""

    num_heads: int
    groups: int
    epsilon: float
    attention: layers.AttentionImplementation = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        normed = GroupNorm(self.groups, self.epsilon, self.dtype, self.param_dtype, name="group_norm")(x)
        tokens = normed.reshape(batch, height * width, channels)
        attended = multi_head_attention(
            self, tokens, None, num_heads=self.num_heads, qkv_bias=True, attention=self.attention
        )
        return x.astype(attended.dtype) + attended.reshape(x.shape)
