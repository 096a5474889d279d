"""Layers the model families share: the attention dispatch, fp32 LayerNorm, MLP and Dense.

Parameters carry logical axis names (MaxText style, through `nn.with_logical_partitioning`); a
rule table maps them onto the mesh. The names used:

  "vocab"       rows of a token embedding table
  "embed"       the model (residual stream) width
  "heads"       the flattened heads x head_dim axis of attention projections (row-major, so
                sharding it splits whole heads when the mesh size divides the head count)
  "mlp"         the hidden width of an MLP
  "projection"  the width of a CLIP-style output projection
  None          never sharded (positions, patch kernel spatial and channel axes)

Compute dtype (`dtype`) and parameter dtype (`param_dtype`) are separate; normalisations and the
attention softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from jax.extend import backend as jax_backend

AttentionImplementation = Literal["xla", "cudnn", "flash", "auto"]
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "flash", "auto")
# Pallas' TPU flash attention tiles both sequences in blocks of this many positions.
_FLASH_BLOCK = 128
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

default_kernel_init = nn.initializers.normal(stddev=0.02)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def choose_attention_implementation(
    requested: AttentionImplementation,
    *,
    platform: str,
    dtype,
    head_dim: int,
    seq_lengths: tuple[int, int],
    has_bias: bool = False,
    max_cudnn_head_dim: int = 128,
) -> tuple[str, str]:
    """Returns (implementation, reason): "auto" resolved to "cudnn", "flash" or "xla", others kept.

    "auto" picks cuDNN's fused kernel on a CUDA GPU when its constraints hold (fp16/bf16, head dim
    a multiple of 8 and at most `max_cudnn_head_dim`, even sequence lengths when there is a bias);
    Pallas' flash attention on a TPU when both sequence lengths are multiples of its 128-position
    blocks and there is no bias or mask (SD's self-attention; its 77-token cross-attention stays
    on XLA); XLA otherwise. `platform` is "cuda" for an NVIDIA GPU, else the backend's name.
    """
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {requested!r}: expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if requested != "auto":
        return requested, "requested"
    if platform == "tpu":
        if has_bias:
            return "xla", "flash attention here takes no bias or mask"
        if any(length % _FLASH_BLOCK for length in seq_lengths):
            return "xla", f"flash attention needs sequence lengths in blocks of {_FLASH_BLOCK}, not {seq_lengths}"
        return "flash", f"TPU, sequence lengths {seq_lengths}"
    if platform != "cuda":
        return "xla", f"platform {platform} has no cuDNN"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return "xla", f"cuDNN attention needs float16/bfloat16, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > max_cudnn_head_dim:
        return "xla", f"cuDNN attention needs head_dim % 8 == 0 and <= {max_cudnn_head_dim}, not {head_dim}"
    if has_bias and any(length % 2 for length in seq_lengths):
        return "xla", f"cuDNN attention with a bias needs even sequence lengths, not {seq_lengths}"
    return "cudnn", f"CUDA GPU, {jnp.dtype(dtype).name}, head_dim {head_dim}"


def current_platform() -> tuple[str, int]:
    """Returns ("cuda" or the backend name, the largest head dim cuDNN's fused kernel takes here)."""
    backend = jax_backend.get_backend()
    if backend.platform != "gpu" or "cuda" not in backend.platform_version.lower():
        return backend.platform, 128
    capability = getattr(jax.local_devices()[0], "compute_capability", "0.0")
    hopper_or_later = tuple(int(part) for part in capability.split(".")[:2]) >= (9, 0)
    return "cuda", 256 if hopper_or_later else 128


@functools.cache
def _log_attention_choice(implementation: str, reason: str) -> None:
    """Logs the attention implementation "auto" resolved to, once per distinct choice."""
    logging.info("attention: auto -> %s (%s)", implementation, reason)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    implementation: AttentionImplementation = "xla",
) -> jax.Array:
    """Returns softmax(q k^T / sqrt(head_dim) + bias, masked) v, shaped (B, T, N, H) like `query`.

    query (B, T, N, H), key and value (B, S, N, H); `mask` is boolean and broadcastable to
    (B, N, T, S), True where attention is allowed; `is_causal` adds a lower-triangular mask.
    Both implementations compute the softmax in float32. "auto" is resolved by
    `choose_attention_implementation` at trace time and the choice is logged once.
    """
    if implementation == "auto":
        platform, max_head_dim = current_platform()
        implementation, reason = choose_attention_implementation(
            "auto",
            platform=platform,
            dtype=query.dtype,
            head_dim=query.shape[-1],
            seq_lengths=(query.shape[1], key.shape[1]),
            has_bias=bias is not None or mask is not None,
            max_cudnn_head_dim=max_head_dim,
        )
        _log_attention_choice(implementation, reason)
    elif implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation == "xla":
        return xla_attention(query, key, value, mask=mask, bias=bias, is_causal=is_causal)
    if implementation == "flash":
        return tpu_flash_attention(query, key, value, mask=mask, bias=bias, is_causal=is_causal)
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, is_causal=is_causal, implementation=implementation
    )


def tpu_flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """`dot_product_attention` through Pallas' TPU flash attention kernel (TPU only).

    The head dim is zero-padded to a multiple of 128 lanes, as MaxDiffusion does for SD's head dims
    of 40-160 (zeros add nothing to q.k, and the padded output columns are dropped); the softmax
    scale stays that of the real head dim. No mask or bias; sequence lengths in 128 blocks.
    Not yet run on a TPU by this project (none at hand): `model.attention=xla` is the fallback.
    """
    if mask is not None or bias is not None:
        raise ValueError("flash attention: masks and biases are not supported; use attention='xla'")
    if any(length % _FLASH_BLOCK for length in (query.shape[1], key.shape[1])):
        raise ValueError(
            f"flash attention: sequence lengths {query.shape[1]}, {key.shape[1]} are not multiples of "
            f"{_FLASH_BLOCK}; use attention='xla' (or 'auto', which falls back by itself)"
        )
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    head_dim = query.shape[-1]
    padded = -(-head_dim // 128) * 128
    pad = ((0, 0), (0, 0), (0, 0), (0, padded - head_dim))
    q, k, v = (jnp.pad(jnp.swapaxes(x, 1, 2), pad) for x in (query, key, value))  # (B, N, T, padded)
    out = pallas_flash.flash_attention(q, k, v, causal=is_causal, sm_scale=head_dim**-0.5)
    return jnp.swapaxes(out[..., :head_dim], 1, 2).astype(query.dtype)


# Added to masked-out logits: finite, so a fully masked row stays finite (uniform weights), and far
# below any real logit, so a masked key gets exactly zero weight after the exp.
_MASKED_LOGIT = -1e30


def xla_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """`dot_product_attention` on plain XLA ops (measured on XLA:CPU; GPUs use cuDNN where they can).

    Two things make it faster than jax.nn.dot_product_attention's XLA path (the tiny UNet on CPU,
    `gal-jax bench unet`: forward 0.87 -> 0.42 s, gradient 3.6 -> 2.2-2.4 s): the softmax is
    normalised after the second matmul, dividing the (T, H) output instead of the (T, S) weights,
    and the gradient is written by hand (flash attention's backward without tiling: the weights are
    recomputed, and no (T, S) intermediate of the softmax's own autodiff is kept).
    Logits, softmax and the weighted sum accumulate in float32; the output has `query`'s dtype.
    """
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # (B, N, T|S, H)
    bias = _combined_bias(bias, mask, is_causal, q.shape[2], k.shape[2])
    return jnp.swapaxes(_attention(q, k, v, bias), 1, 2)


def _combined_bias(bias, mask, is_causal: bool, queries: int, keys: int):
    """Returns one float32 additive bias for `bias`, `mask` and causality (None if none of them)."""
    if mask is None and not is_causal:
        return None if bias is None else bias.astype(jnp.float32)
    allowed = jnp.ones((1, 1, queries, keys), bool) if mask is None else mask
    if is_causal:
        allowed = allowed & jnp.tril(jnp.ones((queries, keys), bool))
    masked = jnp.where(allowed, 0.0, _MASKED_LOGIT).astype(jnp.float32)
    return masked if bias is None else masked + bias.astype(jnp.float32)


def _logits(q, k, bias):
    # The 1/sqrt(H) scale goes on the (T, H) query, not the (T, S) logits: XLA:CPU materialised
    # the scalar broadcast to the logits' full shape for its matmul fusion (the largest single op
    # of the tiny UNet's forward).
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias


@jax.custom_vjp
def _attention(q, k, v, bias):
    return _attention_forward(q, k, v, bias)[0]


def _attention_forward(q, k, v, bias):
    logits = _logits(q, k, bias)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    # On CPU the backward recomputes the softmax's log-sum-exp itself (in cache-sized row groups):
    # saving it kept XLA:CPU from fusing the forward's two matmuls, which then wrote every (T, S)
    # logit to memory (tiny UNet gradient, op time 2.7 -> 2.25 s). Elsewhere it is saved, as flash
    # attention does.
    log_sum_exp = None if _on_cpu() else peak + jnp.log(total)
    out = out.astype(q.dtype)
    return out, (q, k, v, bias, out, log_sum_exp)


# On CPU the backward runs over groups of batch rows whose (heads, T, S) float32 weights fit in
# about this many bytes (cache): memory traffic, not FLOPs, bounds it there (2x on the tiny UNet).
_CPU_BACKWARD_BYTES = 1 << 20


def _attention_backward(residuals, grad_out):
    q, k, v, bias, out, log_sum_exp = residuals
    batch, heads, queries, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    rows = _cpu_row_group(batch, heads * queries * keys * 4)
    if rows is None or bias is not None:
        return _attention_backward_rows(residuals, grad_out)
    group = lambda x: None if x is None else x.reshape(batch // rows, rows, *x.shape[1:])
    grads = jax.lax.map(
        lambda args: _attention_backward_rows((*args[:3], None, *args[3:5]), args[5])[:3],
        tuple(group(x) for x in (q, k, v, out, log_sum_exp, grad_out)),
    )
    return (*(g.reshape(batch, *g.shape[2:]) for g in grads), None)


def _on_cpu() -> bool:
    return jax_backend.get_backend().platform == "cpu"


def _cpu_row_group(batch: int, bytes_per_row: int) -> int | None:
    """Returns how many batch rows the CPU backward takes at a time (a divisor of `batch`), or
    None off CPU or where one group would be the whole batch."""
    if not _on_cpu():
        return None
    rows = max((d for d in range(1, batch + 1) if batch % d == 0 and d * bytes_per_row <= _CPU_BACKWARD_BYTES),
               default=1)
    return None if rows == batch else rows


def _attention_backward_rows(residuals, grad_out):
    q, k, v, bias, out, log_sum_exp = residuals
    logits = _logits(q, k, bias)
    if log_sum_exp is None:  # not saved by the forward (CPU)
        log_sum_exp = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - log_sum_exp)  # the softmax, recomputed
    grad_out32 = grad_out.astype(jnp.float32)
    # The (S, H) gradients are computed transposed, (H, T) x (T, S), so that only (T, H)-sized
    # operands are transposed, never the (T, S) weights (XLA:CPU copied them: 24% of the tiny
    # UNet gradient's op time was such copies).
    grad_v = jnp.swapaxes(jnp.matmul(jnp.swapaxes(grad_out32, -1, -2), weights), -1, -2)
    grad_weights = jnp.matmul(grad_out32, jnp.swapaxes(v, -1, -2).astype(jnp.float32))
    row = jnp.sum(grad_out32 * out.astype(jnp.float32), axis=-1, keepdims=True)
    grad_logits = weights * (grad_weights - row)
    scale = q.shape[-1] ** -0.5
    grad_q = jnp.matmul(grad_logits, k.astype(jnp.float32)) * scale
    grad_k = jnp.swapaxes(jnp.matmul(jnp.swapaxes(q, -1, -2).astype(jnp.float32), grad_logits), -1, -2) * scale
    grad_bias = None if bias is None else _sum_to_shape(grad_logits, bias.shape)
    return grad_q.astype(q.dtype), grad_k.astype(k.dtype), grad_v.astype(v.dtype), grad_bias


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Returns `x` summed over the axes a broadcast from `shape` expanded."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and x.shape[i + lead] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


_attention.defvjp(_attention_forward, _attention_backward)


# ---------------------------------------------------------------------------------------------
# Dense, LayerNorm, MLP
# ---------------------------------------------------------------------------------------------


def partitioned_dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Dense:
    """Returns an nn.Dense whose kernel carries logical `axes` (in, out) and bias (out,)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in float32, as torch.nn.LayerNorm (biased variance).

    Returns the normalised input in `dtype`; `scale` and `bias` carry the logical axis "embed".
    """

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (features,), self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (features,), self.param_dtype,
        )
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        normalised = centred * jax.lax.rsqrt(variance + self.epsilon)
        return (normalised * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """Returns x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Returns the exact (erf) GELU, as torch.nn.functional.gelu's default."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"quick_gelu": quick_gelu, "gelu": gelu}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function a transformers/diffusers config calls `name`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Two Dense layers, `fc1` (embed -> mlp) and `fc2` (mlp -> embed), with an activation between.

    Returns the output in `dtype`, the width of the input.
    """

    hidden_features: int
    activation: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(partitioned_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.hidden_features, ("embed", "mlp"), name="fc1")(x)
        hidden = activation(self.activation)(hidden)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2")(hidden)



# ---------------------------------------------------------------------------------------------
# Attention probabilities, rematerialisation, param trees
# ---------------------------------------------------------------------------------------------


def multi_head_attention(
    module: nn.Module,
    x: jax.Array,
    context: jax.Array | None = None,
    *,
    num_heads: int,
    names: tuple[str, str, str],
    qkv_bias: bool = True,
    is_causal: bool = False,
    attention: AttentionImplementation = "xla",
    capture: bool = False,
) -> jax.Array:
    """Returns the heads of tokens `x` (B, T, D) attending over `context` (B, S, E), or over `x`
    itself when `context` is None, concatenated to (B, T, D): no output projection (each family
    names and places its own).

    Call it from `module`'s compact method: the query, key and value projections become its
    children, named `names`. With `capture`, the attention probabilities (B, N, T, S), float32, are
    also computed explicitly and sown as `module`'s "intermediates"/"attention_probs"; the output
    still comes from `dot_product_attention`, so it is the same with or without capture.
    """
    context = x if context is None else context
    batch, length, width = x.shape
    head_dim = width // num_heads

    def project(name, inputs):
        dense = partitioned_dense(width, ("embed", "heads"), use_bias=qkv_bias, name=name,
                                  dtype=module.dtype, param_dtype=module.param_dtype)
        return dense(inputs).reshape(batch, inputs.shape[1], num_heads, head_dim)

    query, key, value = project(names[0], x), project(names[1], context), project(names[2], context)
    if capture:
        module.sow("intermediates", "attention_probs", attention_probabilities(query, key))
    attended = dot_product_attention(query, key, value, is_causal=is_causal, implementation=attention)
    return attended.reshape(batch, length, width)


def attention_probabilities(query: jax.Array, key: jax.Array) -> jax.Array:
    """Returns softmax(q k^T / sqrt(head_dim)) in float32, shaped (B, N, T, S).

    query (B, T, N, H), key (B, S, N, H): the probabilities `dot_product_attention` weighs the
    values with (unmasked, unbiased), computed explicitly so that they can be inspected.
    """
    logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * query.shape[-1] ** -0.5, axis=-1)


REMAT_POLICIES = ("none", "block", "dots_saveable")


def remat_policy(value: bool | str, field: str = "remat") -> str:
    """Returns the policy of REMAT_POLICIES that `value` names; True means "block" (every block
    recomputed: diffusers' gradient checkpointing), False "none"; strings "true"/"false" as the
    bools. Raises ValueError naming `field` otherwise."""
    if isinstance(value, bool):
        return "block" if value else "none"
    policy = {"true": "block", "false": "none"}.get(str(value).strip().lower(), str(value).strip())
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{field}={value!r}: expected one of {', '.join(REMAT_POLICIES)} (or True/False)")
    return policy


@functools.cache
def remat(module_class: type[nn.Module], policy: str) -> type[nn.Module]:
    """Returns `module_class` rematerialised under `policy`: "none" (unchanged), "block" (only
    the block's inputs are saved for the backward pass) or "dots_saveable" (matmul and conv
    outputs are saved, the rest recomputed). Call arguments must be arrays or None.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {REMAT_POLICIES}")
    if policy == "none":
        return module_class
    checkpoint_policy = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None
    return nn.remat(module_class, policy=checkpoint_policy)


BoxedInit = Callable[[jax.Array], dict]


def init_params(boxed_init: BoxedInit, key: jax.Array):
    """Returns fresh params (plain arrays, default device) of a model whose `boxed_init(key)`
    returns its params boxed with logical axes (`model.init(key, ...)["params"]`).

    The params are drawn from an "rbg" key derived from `key`: XLA:CPU compiles one
    RngBitGenerator per param several times faster than a threefry chain, which dominated the
    init of the convolutional models (a tiny VAE: 18 s -> 8 s on a loaded 2-core machine).
    """

    def init(key):
        rbg_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
        return nn.unbox(boxed_init(rbg_key))

    return jax.jit(init)(key)


def abstract_params(boxed_init: BoxedInit):
    """Returns the param tree of `boxed_init`'s model as jax.ShapeDtypeStructs (nothing computed)."""
    return nn.unbox(_boxed_shapes(boxed_init))


def logical_partition_specs(boxed_init: BoxedInit):
    """Returns the tree of logical PartitionSpecs of `boxed_init`'s model's params."""
    return nn.get_partition_spec(_boxed_shapes(boxed_init))


# Boxed param shapes by (init function, model): loading a model asks for its shapes and logical
# axes three or four times (shardings, reading, the trainer's axes), and each asked traced the
# whole init again (about 1 s for the tiny UNet on 2 cores, far more for SD-sized ones).
_BOXED_SHAPES: dict = {}
_BOXED_SHAPES_KEPT = 32


def _boxed_shapes(boxed_init: BoxedInit):
    """Returns jax.eval_shape of `boxed_init`'s boxed params, from a cache when `boxed_init` is
    functools.partial(function, module) of a module that hashes by value (flax modules with
    hashable fields do); anything else is traced each time."""
    key = None
    if isinstance(boxed_init, functools.partial) and not boxed_init.keywords:
        key = (boxed_init.func, boxed_init.args)
        try:
            hash(key)
        except TypeError:  # a module field that is a list or dict
            key = None
    if key is not None and key in _BOXED_SHAPES:
        return _BOXED_SHAPES[key]
    shapes = jax.eval_shape(lambda: boxed_init(jax.random.key(0)))
    if key is not None:
        if len(_BOXED_SHAPES) >= _BOXED_SHAPES_KEPT:
            _BOXED_SHAPES.pop(next(iter(_BOXED_SHAPES)))
        _BOXED_SHAPES[key] = shapes
    return shapes
