"""Our Flax AutoencoderKL (gal_jax.nn.vae) against diffusers' PyTorch AutoencoderKL on tiny random
models; loading and saving diffusers `vae/` folders."""

import functools
import json

import chex
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from gal_jax.nn import vae

import parity  # tests/parity.py

TOLERANCE = 1e-4  # relative to the reference's largest magnitude, float32
TINY_VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    scaling_factor=0.5,
)
# The optional parts left out, two resnets per level.
VARIANT = dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, layers_per_block=2)


_assert_parity = functools.partial(parity.assert_parity, tolerance=TOLERANCE)


def _torch_vae(**overrides) -> diffusers.AutoencoderKL:
    """Returns a tiny random diffusers VAE whose every param (norms included) is perturbed, so
    that a swapped scale and bias or a transposed kernel shows."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**dict(TINY_VAE, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _pixels(batch: int = 2, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def _jitted(model: vae.AutoencoderKL, method: str):
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=getattr(model, method)))


@pytest.fixture(scope="module", params=[{}, VARIANT], ids=["full", "variant"])
def torch_vae(request, tmp_path_factory):
    """(folder, torch model) of a tiny random diffusers VAE written with save_pretrained."""
    model = _torch_vae(**request.param)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_encode_and_decode_match_diffusers(torch_vae):
    folder, torch_model = torch_vae
    model, params = vae.load(folder)
    pixels = _pixels()
    with torch.no_grad():
        posterior = torch_model.encode(torch.from_numpy(pixels)).latent_dist
        decoded = torch_model.decode(posterior.mean).sample
    ours = _jitted(model, "encode")(params, pixels)
    name = "vae" if model.config.use_quant_conv else "vae without quant convs and mid attention, 2 layers"
    _assert_parity(ours.mean, posterior.mean, f"{name} encode mean")
    _assert_parity(ours.logvar, posterior.logvar, f"{name} encode logvar")
    _assert_parity(_jitted(model, "decode")(params, posterior.mean.numpy()), decoded, f"{name} decode")
    expected = {"encoder", "decoder"} | ({"quant_conv", "post_quant_conv"} if model.config.use_quant_conv else set())
    assert set(params) == expected
    assert ("attentions_0" in params["encoder"]["mid_block"]) == model.config.mid_block_add_attention


def test_posterior_sample_and_kl_follow_diffusers():
    rng = np.random.default_rng(1)
    mean, logvar, other_mean, other_logvar = rng.standard_normal((4, 2, 4, 8, 8)).astype(np.float32)
    ours = vae.DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
    other = vae.DiagonalGaussian(jnp.asarray(other_mean), jnp.asarray(other_logvar))
    theirs = DiagonalGaussianDistribution(torch.from_numpy(np.concatenate([mean, logvar], axis=1)))
    their_other = DiagonalGaussianDistribution(torch.from_numpy(np.concatenate([other_mean, other_logvar], axis=1)))
    _assert_parity(ours.kl(), theirs.kl(), "posterior kl to N(0, I)")
    _assert_parity(ours.kl(other), theirs.kl(their_other), "posterior kl to another posterior")
    _assert_parity(ours.std, theirs.std, "posterior std")
    key = jax.random.key(3)
    expected = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(np.asarray(ours.sample(key)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.mode()), mean)


def test_logvar_is_clipped_as_diffusers_clips_it(torch_vae):
    folder, torch_model = torch_vae
    model, params = vae.load(folder)
    params = jax.tree.map(lambda x: x, params)  # fresh dicts, to edit
    head = params["quant_conv"] if model.config.use_quant_conv else params["encoder"]["conv_out"]
    head["bias"] = head["bias"].at[4:].set(100.0)  # the logvar channels
    posterior = _jitted(model, "encode")(params, _pixels(1))
    assert float(jnp.max(posterior.logvar)) == 20.0


def test_fp16_variant_loads_cast_to_the_param_dtype(tmp_path):
    torch_model = _torch_vae()
    torch_model.to(torch.float16).save_pretrained(tmp_path, variant="fp16", safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model, params = vae.load(tmp_path, variant="fp16")
    kernel = params["decoder"]["up_blocks_1"]["resnets_1"]["conv1"]["kernel"]
    assert kernel.dtype == jnp.float32
    stored = torch_model.decoder.up_blocks[1].resnets[1].conv1.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel), stored.transpose(2, 3, 1, 0))
    _, bf16_params = vae.load(tmp_path, variant="fp16", param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.fixture(scope="module")
def initialised_vae():
    """(model, params) of the tiny VAE from our own init, every param perturbed (biases and norms
    included) so that the round trip checks their names too."""
    model = vae.AutoencoderKL(vae.VaeConfig.from_dict(TINY_VAE))
    params = vae.init_params(model, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, vae.abstract_params(model))
    rng = np.random.default_rng(7)
    return model, jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)


def test_saved_vae_loads_in_diffusers_with_equal_outputs(initialised_vae, tmp_path):
    model, params = initialised_vae
    file = vae.save_params(model, params, tmp_path)
    assert file == tmp_path / "diffusion_pytorch_model.safetensors"
    torch_model = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    pixels = _pixels()
    with torch.no_grad():
        posterior = torch_model.encode(torch.from_numpy(pixels)).latent_dist
        decoded = torch_model.decode(posterior.mean).sample
    ours = _jitted(model, "encode")(params, pixels)
    _assert_parity(ours.mean, posterior.mean, "round trip encode mean")
    _assert_parity(_jitted(model, "decode")(params, posterior.mean.numpy()), decoded, "round trip decode")
    assert vae.read_config(tmp_path) == model.config
    assert torch_model.config.scaling_factor == 0.5
    _, reloaded = vae.load(tmp_path)
    chex.assert_trees_all_equal(reloaded, params)


def test_saved_fp16_variant_loads_in_diffusers(initialised_vae, tmp_path):
    model, params = initialised_vae
    file = vae.save_params(model, params, tmp_path, dtype=np.float16, variant="fp16")
    assert file.name == "diffusion_pytorch_model.fp16.safetensors"
    assert safetensors.torch.load_file(file)["encoder.conv_in.weight"].dtype == torch.float16
    torch_model = diffusers.AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    kernel = params["encoder"]["conv_in"]["kernel"].astype(np.float16).astype(np.float32)
    stored = torch_model.encoder.conv_in.weight.detach().numpy()
    np.testing.assert_array_equal(stored, np.asarray(kernel).transpose(3, 2, 0, 1))


def test_missing_weight_and_wrong_shape_raise_naming_file_and_key(tmp_path):
    _torch_vae().save_pretrained(tmp_path, safe_serialization=True)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    model = vae.AutoencoderKL(vae.VaeConfig.from_dict(dict(TINY_VAE, latent_channels=8)))
    with pytest.raises(ValueError, match=r"safetensors: weight 'decoder\.conv_in\.weight' has shape \(32, 4, 3, 3\), "
                                         r"the config expects \(32, 8, 3, 3\)"):
        vae.load_params(model, tmp_path)
    state = safetensors.torch.load_file(file)
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    safetensors.torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: missing weight "
                                         r"'decoder\.mid_block\.attentions\.0\.to_k\.bias'"):
        vae.load(tmp_path)


def test_nhwc_layout_matches_nchw(torch_vae):
    folder, _ = torch_vae
    model, params = vae.load(folder)
    nhwc_model, nhwc_params = vae.load(folder, layout="NHWC")
    chex.assert_trees_all_equal(nhwc_params, params)
    pixels = _pixels(1)
    nchw = _jitted(model, "__call__")(params, pixels)
    nhwc = _jitted(nhwc_model, "__call__")(params, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(nhwc), np.asarray(nchw).transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"pixels of shape \(1, 3, 32, 32\): expected 3 channels \(NHWC\)"):
        jax.eval_shape(lambda p, x: nhwc_model.apply({"params": p}, x), params, pixels)


def test_config_reading_follows_diffusers(torch_vae, tmp_path):
    folder, torch_model = torch_vae
    config = vae.read_config(folder)
    assert config.block_out_channels == (16, 32) and config.norm_num_groups == 8
    assert config.use_quant_conv == torch_model.config.use_quant_conv
    assert config.downsampling_factor == 2
    assert vae.VaeConfig.from_dict(config.to_dict()) == config
    (tmp_path / "config.json").write_text(json.dumps(dict(config.to_dict(), _class_name="VQModel")))
    with pytest.raises(ValueError, match="_class_name is 'VQModel', expected 'AutoencoderKL'"):
        vae.read_config(tmp_path)
    with pytest.raises(ValueError, match="latents_mean is not supported"):
        vae.VaeConfig.from_dict(dict(TINY_VAE, latents_mean=[0.0] * 4))
    with pytest.raises(ValueError, match="only UpDecoderBlock2D"):
        vae.VaeConfig.from_dict(dict(TINY_VAE, up_block_types=["AttnUpDecoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="act_fn 'relu' is not supported"):
        vae.VaeConfig.from_dict(dict(TINY_VAE, act_fn="relu"))


def test_params_carry_logical_axis_names():
    model = vae.AutoencoderKL(vae.VaeConfig.from_dict(TINY_VAE))
    specs = jax.tree_util.tree_leaves_with_path(vae.logical_partition_specs(model))
    by_path = {"/".join(str(k.key) for k in path): spec for path, spec in specs}
    assert by_path["encoder/conv_in/kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    assert by_path["decoder/up_blocks_0/resnets_0/norm1/scale"] == jax.sharding.PartitionSpec("norm")
    assert by_path["encoder/mid_block/attentions_0/to_q/kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert by_path["decoder/mid_block/attentions_0/to_out_0/kernel"] == jax.sharding.PartitionSpec("heads", "embed")
