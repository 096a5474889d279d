"""Our XLA attention (hand-written gradient, late softmax normalisation, row groups on CPU) against
jax.nn.dot_product_attention: values and gradients, with masks, biases and causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gal_jax.nn import layers


def _inputs(batch, queries, keys, heads=2, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((batch, queries, heads, head_dim), (batch, keys, heads, head_dim), (batch, keys, heads, head_dim))
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def _grads(attention, q, k, v, bias, **kwargs):
    def loss(q, k, v, bias):
        extra = {} if bias is None else {"bias": bias}
        return jnp.sum(jnp.sin(attention(q, k, v, **extra, **kwargs)))

    return jax.grad(loss, argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3))(q, k, v, bias)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("save_log_sum_exp", [False, True], ids=["cpu", "accelerator"])
def test_values_and_gradients_match_jax(with_mask, with_bias, is_causal, save_log_sum_exp, monkeypatch):
    # On CPU the backward recomputes the softmax statistics; elsewhere the forward saves them.
    monkeypatch.setattr(layers, "_on_cpu", lambda: not save_log_sum_exp)
    q, k, v = _inputs(3, 9, 9)
    rng = np.random.default_rng(1)
    kwargs = {"is_causal": is_causal}
    if with_mask:
        kwargs["mask"] = jnp.asarray(rng.random((3, 1, 9, 9)) > 0.3) | jnp.eye(9, dtype=bool)
    bias = jnp.asarray(rng.standard_normal((1, 2, 9, 9)), jnp.float32) if with_bias else None
    extra = {} if bias is None else {"bias": bias}
    ours = layers.xla_attention(q, k, v, **extra, **kwargs)
    theirs = jax.nn.dot_product_attention(q, k, v, implementation="xla", **extra, **kwargs)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for mine, reference in zip(_grads(layers.xla_attention, q, k, v, bias, **kwargs),
                               _grads(jax.nn.dot_product_attention, q, k, v, bias, **kwargs)):
        np.testing.assert_allclose(mine, reference, atol=1e-5)


def test_the_cpu_backward_in_row_groups_equals_the_whole_batch():
    # (2 heads, 256 x 256) float32 weights are 512 KiB a row: the backward takes 2 rows at a time.
    q, k, v = _inputs(4, 256, 256, seed=2)
    assert layers._cpu_row_group(4, 2 * 256 * 256 * 4) == 2
    _, residuals = layers._attention_forward(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), None)
    assert residuals[-1] is None  # the log-sum-exp is recomputed per row group, not saved
    for mine, reference in zip(_grads(layers.xla_attention, q, k, v, None),
                               _grads(jax.nn.dot_product_attention, q, k, v, None)):
        np.testing.assert_allclose(mine, reference, atol=2e-5)


def test_cross_attention_of_other_lengths_and_half_precision():
    q, k, v = _inputs(2, 16, 77)
    np.testing.assert_allclose(layers.xla_attention(q, k, v), jax.nn.dot_product_attention(q, k, v), atol=1e-6)
    half = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    out = layers.xla_attention(*half)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), jax.nn.dot_product_attention(q, k, v), atol=3e-2)


def test_a_fully_masked_row_stays_finite():
    q, k, v = _inputs(1, 3, 4)
    mask = jnp.ones((1, 1, 3, 4), bool).at[:, :, 1].set(False)
    out = layers.xla_attention(q, k, v, mask=mask)
    assert np.isfinite(np.asarray(out)).all()
    grads = _grads(layers.xla_attention, q, k, v, None, mask=mask)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.skipif(layers.current_platform()[0] != "cuda", reason="cuDNN attention needs a CUDA GPU (launch/gpu_check.sh)")
def test_cudnn_attention_on_a_gpu_matches_xla_and_auto_picks_it():
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(4, 1024, 1024, heads=8, head_dim=64, seed=3))
    platform, max_head_dim = layers.current_platform()
    choice, reason = layers.choose_attention_implementation(
        "auto", platform=platform, dtype=q.dtype, head_dim=64, seq_lengths=(1024, 1024), max_cudnn_head_dim=max_head_dim)
    assert choice == "cudnn", reason
    fused = layers.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(fused, layers.xla_attention(q, k, v).astype(jnp.float32), atol=2e-2)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (3, 2, ((0, 1), (0, 1))), (1, 1, 0)])
def test_conv_kernel_gradient_by_taps_equals_xla(kernel, stride, padding):
    from gal_jax.nn import conv_layers

    conv = conv_layers.conv2d(7, kernel, dtype=jnp.float32, param_dtype=jnp.float32, stride=stride, padding=padding)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, 9, 5)), jnp.float32)
    params = conv.init(jax.random.key(0), x)
    xla_conv = conv.clone(conv_general_dilated=jax.lax.conv_general_dilated)

    def grads(module):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

    # On CPU the plain NHWC conv takes the custom gradient; the reference is XLA's own.
    assert "custom_vjp" in str(jax.make_jaxpr(lambda p: conv.apply(p, x))(params))
    np.testing.assert_allclose(conv.apply(params, x), xla_conv.apply(params, x), atol=1e-6)
    for mine, reference in zip(jax.tree.leaves(grads(conv)), jax.tree.leaves(grads(xla_conv))):
        np.testing.assert_allclose(mine, reference, atol=1e-4, rtol=1e-5)


def test_conv_with_dilation_or_groups_is_left_to_xla():
    from gal_jax.nn import conv_layers

    x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 4))
    numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    grouped = jax.make_jaxpr(lambda k: conv_layers.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers, feature_group_count=2))(kernel)
    assert "custom_vjp" not in str(grouped)
    np.testing.assert_array_equal(
        conv_layers.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers,
                                         feature_group_count=2),
        jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers,
                                     feature_group_count=2))
