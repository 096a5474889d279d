"""Matmul/conv FLOPs from the jaxpr: loops counted as often as they run, SD 1.5 against STACK.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gal_jax import bench, flops, models, sharding
from gal_jax.nn import unet as nn_unet
from gal_jax.nn import vae as nn_vae
from gal_jax.sample import Generator


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_a_scan_body_counts_once_per_step_and_gradients_twice_more():
    def loop(x, w):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
        return y.sum()

    one_matmul = 2 * 8 * 16 * 16
    assert flops.count(loop, _spec(8, 16), _spec(16, 16)) == 5 * one_matmul
    # d/dw: the forward, then per step the gradient wrt the carry and wrt w.
    assert flops.count(jax.jit(jax.grad(loop, argnums=1)), _spec(8, 16), _spec(16, 16)) == 3 * 5 * one_matmul
    # XLA's cost analysis reads the 5-step loop as about one step: why we count ourselves.
    xla = bench.compiled_flops(jax.jit(loop).lower(_spec(8, 16), _spec(16, 16)).compile())
    assert xla < 2 * one_matmul


def test_convolutions_count_their_window_and_feature_groups():
    def conv(x, k, groups=1):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)

    assert flops.count(conv, _spec(2, 8, 8, 3), _spec(3, 3, 3, 5)) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    assert flops.count(lambda x, k: conv(x, k, 2), _spec(2, 8, 8, 4), _spec(3, 3, 2, 6)) == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 2)
    forward = flops.count(conv, _spec(2, 8, 8, 3), _spec(3, 3, 3, 5))
    grads = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
    assert flops.count(grads, _spec(2, 8, 8, 3), _spec(3, 3, 3, 5)) == 3 * forward


def test_sd15_sized_unet_and_vae_decode_match_the_stack_table():
    """../shared/STACK.md (XLA cost analysis, 512x512): UNet forward 0.787 TFLOP, decode 2.504."""
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(models.SD15_UNET))
    forward = flops.count(lambda p, x, c: unet.apply({"params": p}, x, jnp.int32(10), c),
                          nn_unet.abstract_params(unet), _spec(1, 4, 64, 64), _spec(1, 77, 768))
    assert forward / 1e12 == pytest.approx(0.787, rel=0.03)
    vae = nn_vae.AutoencoderKL(nn_vae.VaeConfig.from_dict(models.SD15_VAE), layout="NHWC")
    decode = flops.count(lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
                         nn_vae.abstract_params(vae), _spec(1, 64, 64, 4))
    assert decode / 1e12 == pytest.approx(2.504, rel=0.01)


def test_a_generation_chunk_counts_every_denoising_step(loaded_sd):
    sd, params = loaded_sd
    mesh = sharding.make_mesh(1, 8)
    generator = Generator(sd, mesh, sampler="ddim", steps=3, max_images_per_device=1)
    compiled, args = generator.compiled_chunk(params, 8)
    chunk = flops.count(generator.chunk_function, *args)
    size = sd.resolution // sd.vae_scale_factor
    context = generator.text_embeddings(params.text_encoder, [""])
    cfg_forward = flops.count(lambda p, x, c: sd.apply_unet(p, x, jnp.int32(0), c),  # one t per step
                              params.unet, _spec(16, sd.latent_channels, size, size),
                              _spec(16, *np.shape(context)[1:]))
    decode = flops.count(sd.decode_latents, params.vae, _spec(8, sd.latent_channels, size, size))
    # Equal but for the timestep embedding, which the vmapped loop computes for one image's two
    # rows per step (the timestep is shared), not for all 16 (0.05% of the work here).
    assert chunk == pytest.approx(3 * cfg_forward + decode, rel=1e-3)
    assert chunk < 3 * cfg_forward + decode
    # XLA's figure for the same executable (one device's share, times 8) holds one step, not three.
    assert bench.compiled_flops(compiled) * 8 < 0.6 * chunk
