"""Loading SD and CLIP from their real layouts, checked against PyTorch diffusers/transformers."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gal_jax import models, tiny


def _unet_parity(folder, sd, params, batch=2):
    from diffusers import UNet2DConditionModel

    torch_unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    rng = np.random.default_rng(0)
    size = sd.unet.config.sample_size
    latents = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    timesteps = np.array([3, 901][:batch], dtype=np.int32)
    context = rng.standard_normal((batch, 77, sd.unet.config.cross_attention_dim)).astype(np.float32)
    ours = sd.apply_unet(params.unet, jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(context))
    with torch.no_grad():
        theirs = torch_unet(
            torch.from_numpy(latents), torch.from_numpy(timesteps).long(), torch.from_numpy(context)
        ).sample.numpy()
    return np.abs(np.asarray(ours) - theirs).max()


def test_unet_forward_matches_pytorch_diffusers(tiny_models, loaded_sd):
    sd, params = loaded_sd
    assert _unet_parity(tiny_models["sd"], sd, params) <= 1e-4


def test_unet_with_sd2_block_layout_matches_pytorch(tmp_path):
    folder = tiny.write_tiny_stable_diffusion(tmp_path / "sd2", unet_config=tiny.TINY_UNET_SD2)
    sd, params = models.load_stable_diffusion(folder)
    assert sd.unet.config.use_linear_projection
    assert _unet_parity(folder, sd, params) <= 1e-4


def test_vae_encode_and_decode_match_pytorch(tiny_models, loaded_sd):
    from diffusers import AutoencoderKL

    sd, params = loaded_sd
    torch_vae = AutoencoderKL.from_pretrained(tiny_models["sd"] / "vae").eval()
    pixels = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
        # A zero-std sample is the mean: compare the deterministic part of the posterior.
        mean = posterior.mean.numpy() * sd.latent_scale
        decoded = torch_vae.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
    ours_mean, ours_std = sd.encode_posterior(params.vae, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(ours_std), posterior.std.numpy() * sd.latent_scale, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(ours_mean) - mean).max() <= 1e-4
    ours_decoded = sd.decode_latents(params.vae, jnp.asarray(mean))
    assert ours_decoded.shape == (2, 64, 64, 3)
    assert np.abs(np.asarray(ours_decoded) - decoded).max() <= 1e-4


def test_vae_sample_is_scaled_nchw_latent(loaded_sd):
    sd, params = loaded_sd
    latents = sd.encode_images(params.vae, jnp.zeros((3, 64, 64, 3)), jax.random.key(0))
    assert latents.shape == (3, sd.latent_channels, 16, 16)


def test_text_encoder_hidden_states_match_pytorch(tiny_models, loaded_sd):
    from transformers import CLIPTextModel

    sd, params = loaded_sd
    ids = sd.tokenize(["a <tiny-teapot> teapot on the moon", "a photo of a cat"])
    torch_text = CLIPTextModel.from_pretrained(tiny_models["sd"] / "text_encoder").eval()
    with torch.no_grad():
        theirs = torch_text(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    ours = np.asarray(sd.encode_text(params.text_encoder, jnp.asarray(ids)))
    assert np.abs(ours - theirs).max() <= 1e-5


def test_clip_embeddings_match_pytorch_transformers(tiny_models):
    from transformers import CLIPModel

    clip, params = models.load_clip(tiny_models["clip"])
    torch_clip = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    pixels = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ids = clip.tokenize(["a teapot on a table", "a cat in watercolor painting style"])
    with torch.no_grad():
        image_ref = torch_clip.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
        text_ref = torch_clip.get_text_features(input_ids=torch.from_numpy(ids).long()).numpy()
    assert np.abs(np.asarray(clip.image_features(params, jnp.asarray(pixels))) - image_ref).max() <= 1e-5
    assert np.abs(np.asarray(clip.text_features(params, jnp.asarray(ids))) - text_ref).max() <= 1e-5
    assert clip.image_size == 224


PROMPTS = [
    "a photo of a cat",
    "a <tiny-teapot> teapot on the beach",
    "A sks dog in a bucket",
    "A tie in watercolor painting style",
    "a <cute-cat> cat under the night sky, 4k, highly detailed!",
]


def test_tokenizer_ids_equal_transformers_clip_tokenizers(tiny_models, loaded_sd):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    sd, _ = loaded_sd
    ours = sd.tokenize(PROMPTS)
    folder = tiny_models["sd"] / "tokenizer"
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        reference = cls.from_pretrained(folder)(
            PROMPTS, padding="max_length", max_length=77, truncation=True
        ).input_ids
        np.testing.assert_array_equal(ours, np.array(reference))
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)


def test_tokenizer_uses_the_real_clip_vocabulary(loaded_sd):
    sd, _ = loaded_sd
    # Ids of OpenAI CLIP's tokenizer for "a photo of a cat".
    np.testing.assert_array_equal(sd.tokenize(["a photo of a cat"])[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])


def test_long_prompts_are_truncated_to_the_tokenizer_limit(loaded_sd):
    sd, _ = loaded_sd
    ids = sd.tokenize(["cat " * 200])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_bin_weights_load_like_safetensors(tiny_models, loaded_sd, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    unet_dir = folder / "unet"
    torch.save(load_file(unet_dir / "diffusion_pytorch_model.safetensors"), unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match=r"unet/diffusion_pytorch_model.bin: PyTorch .bin weights are a pickle"):
        models.load_stable_diffusion(folder)
    _, params = models.load_stable_diffusion(folder, allow_bin=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params.unet, loaded_sd[1].unet)


def test_bf16_param_dtype_casts_every_float_weight(tiny_models):
    _, params = models.load_stable_diffusion(tiny_models["sd"], param_dtype="bfloat16")
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


# --- bad input -------------------------------------------------------------------------------


def _copy(tiny_models, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    return folder


def test_folder_missing_unet_names_the_path(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    shutil.rmtree(folder / "unet")
    with pytest.raises(models.ModelLoadError, match=r"sd: not a Stable Diffusion folder.*missing unet/"):
        models.load_stable_diffusion(folder)


def test_truncated_safetensors_names_the_file(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(models.ModelLoadError, match=r"diffusion_pytorch_model.safetensors: unreadable or truncated"):
        models.load_stable_diffusion(folder)


def test_weights_from_another_config_are_refused(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 96]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors: weight .* has shape"):
        models.load_stable_diffusion(folder)


def test_wrong_component_class_is_refused(tiny_models, tmp_path):
    folder = _copy(tiny_models, tmp_path)
    shutil.rmtree(folder / "unet")
    shutil.copytree(folder / "vae", folder / "unet")
    with pytest.raises(models.ModelLoadError, match=r"unet/config.json: _class_name is .AutoencoderKL., expected .UNet2DConditionModel."):
        models.load_stable_diffusion(folder)


def test_clip_folder_given_as_stable_diffusion_is_refused(tiny_models):
    with pytest.raises(models.ModelLoadError, match=r"looks like a CLIP model folder"):
        models.load_stable_diffusion(tiny_models["clip"])


def test_stable_diffusion_folder_given_as_clip_is_refused(tiny_models):
    with pytest.raises(models.ModelLoadError, match=r"Stable Diffusion pipeline folder"):
        models.load_clip(tiny_models["sd"])


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(models.ModelLoadError, match=r"nowhere: model folder does not exist"):
        models.load_stable_diffusion(tmp_path / "nowhere")
