"""SDXL in the facade: two text encoders and tokenizers, the pooled embedding and time ids, zero
unconditional embeddings; checked against PyTorch diffusers' StableDiffusionXLPipeline on the
same tiny weights, and its bad folders refused with the file named."""

import shutil

import jax
import numpy as np
import pytest
import torch

from gal_jax import export, models, personalize, sample, schedulers, tiny, tiny_train_io
from gal_jax.nn import clip as nn_clip

PROMPTS = ["a photo of sks dog on the beach", "a red teapot"]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny.write_tiny_stable_diffusion_xl(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def loaded_sdxl(sdxl_folder):
    return models.load_stable_diffusion(sdxl_folder)


@pytest.fixture(scope="module")
def torch_pipeline(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float32)


def test_the_folder_reads_as_sdxl(loaded_sdxl):
    sd, params = loaded_sdxl
    assert sd.is_sdxl and sd.empty_prompt_is_zero
    assert sd.token_length == 2 * sd.max_length == 154
    assert sd.context_shape == (78, tiny.TINY_UNET_SDXL["cross_attention_dim"])
    assert set(params.text_encoder) == set(nn_clip.SDXL_TEXT_ENCODERS)
    assert sd.latent_scale == pytest.approx(0.13025)
    ids = sd.tokenize(PROMPTS)
    assert ids.shape == (2, 154)
    assert ids[0, 76] == 49407 and ids[0, 154 - 1] == 0  # the first pads with eos, the second with "!"


def test_text_conditioning_matches_diffusers_encode_prompt(loaded_sdxl, torch_pipeline):
    sd, params = loaded_sdxl
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = torch_pipeline.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    conditioning = jax.jit(sd.encode_text)(params.text_encoder, sd.tokenize(PROMPTS))
    context, ours_pooled = nn_clip.split_sdxl_conditioning(conditioning, sd.text_encoder.pooled_width)
    np.testing.assert_allclose(np.asarray(context), embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours_pooled), pooled.numpy(), atol=2e-5)
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, as ours (Generator) makes it.
    assert not negative.numpy().any() and not negative_pooled.numpy().any()
    assert np.asarray(conditioning[:, -1, sd.text_encoder.pooled_width:]).max() == 0  # padding of the pooled row


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
def test_denoising_matches_the_diffusers_sdxl_pipeline(loaded_sdxl, torch_pipeline, name):
    import diffusers

    sd, params = loaded_sdxl
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    conditioning = np.asarray(sd.encode_text(params.text_encoder, sd.tokenize(PROMPTS)))
    uncond = np.zeros_like(conditioning[0])
    sampler = schedulers.make_sampler(name, sd.scheduler_config, 3)
    run = jax.vmap(lambda x, c, k: sample.denoise(sd, sampler, 5.0, params.unet, x, c, uncond, k))
    ours = np.asarray(jax.jit(run)(latents, conditioning, jax.random.split(jax.random.key(1), 2)))
    torch_class = {"ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}[name]
    torch_pipeline.scheduler = getattr(diffusers, torch_class).from_config(sd.scheduler_config)
    with torch.no_grad():
        theirs = torch_pipeline(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=3, guidance_scale=5.0,
                                output_type="latent").images.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_time_ids_follow_the_latent_size(loaded_sdxl):
    sd, _ = loaded_sdxl
    conditioning = np.zeros((3, *sd.context_shape), np.float32)
    context, added = sd.unet_inputs(np.zeros((3, 4, 8, 12), np.float32), conditioning)
    assert context.shape == (3, 77, sd.context_shape[1])
    np.testing.assert_array_equal(added["time_ids"], [[32, 48, 0, 0, 32, 48]] * 3)
    assert added["text_embeds"].shape == (3, tiny.TINY_TEXT_SDXL_2["projection_dim"])


def test_new_token_methods_and_text_encoder_lora_are_refused_on_sdxl(loaded_sdxl):
    from configs import common

    sd, _ = loaded_sdxl
    for method, extra in (("textual_inversion", {}), ("attndreambooth", {}), ("lora", {"train_text_encoder": True})):
        config = common.get_config()
        config.train.method = method
        for key, value in extra.items():
            config.lora[key] = value
        with pytest.raises(personalize.MethodConfigError, match="SDXL"):
            personalize.prepare(config, sd, placeholder="sks", class_word="dog")


def test_compare_torch_says_sdxl_is_not_compared(loaded_sdxl):
    from configs import tiny_cpu

    from gal_jax import bench

    sd, params = loaded_sdxl
    config = tiny_cpu.get_config()
    config.bench.compare_torch = True
    assert bench.compare_sample(config, sd, params, None, 2) == {
        "torch": "not compared: the PyTorch references are SD 1.x/2.x pipelines, not SDXL yet"}


def _broken_copy(folder, tmp_path, name):
    broken = shutil.copytree(folder, tmp_path / name)
    return broken


def test_bad_sdxl_folders_are_refused_naming_the_problem(sdxl_folder, tmp_path):
    no_second = _broken_copy(sdxl_folder, tmp_path, "no_second")
    shutil.rmtree(no_second / "text_encoder_2")
    with pytest.raises(models.ModelLoadError, match=r"text_encoder_2/.*missing"):
        models.load_stable_diffusion(no_second)

    no_projection = _broken_copy(sdxl_folder, tmp_path, "no_projection")
    shutil.rmtree(no_projection / "text_encoder_2")
    shutil.copytree(sdxl_folder / "text_encoder", no_projection / "text_encoder_2")
    with pytest.raises(models.ModelLoadError, match="CLIPTextModelWithProjection"):
        models.load_stable_diffusion(no_projection)

    wrong_width = _broken_copy(sdxl_folder, tmp_path, "wrong_width")  # a UNet of another SDXL
    shutil.rmtree(wrong_width / "unet")
    tiny_train_io.save_random_unet(wrong_width / "unet", dict(tiny.TINY_UNET_SDXL, cross_attention_dim=64,
                                                              projection_class_embeddings_input_dim=96), 0)
    with pytest.raises(models.ModelLoadError) as err:
        models.load_stable_diffusion(wrong_width)
    message = str(err.value)
    assert str(wrong_width / "unet" / "config.json") in message, message
    assert "cross_attention_dim 64" in message and "projection_dim 40" in message, message


# ---------------------------------------------------------------------------------------------
# The GAL loop on SDXL, and what it leaves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, rounds", [("dreambooth", 2), ("lora", 1)])
def test_gal_runs_on_sdxl_and_pytorch_loads_the_exported_pipeline(tiny_assets, sdxl_folder, loaded_sdxl, tmp_path,
                                                                   method, rounds):
    from diffusers import StableDiffusionXLPipeline
    from driver_test import real_paths_config

    from gal_jax import driver

    config = real_paths_config(tiny_assets, train__method=method, gal__rounds=rounds, export__dtype="float32")
    if method == "lora":  # a few steps must move the (zero-started) deltas well past the parity tolerance
        config.train.learning_rate = 5e-2
    config.model.sd_path = str(sdxl_folder)
    workdir = tmp_path / "work"
    driver.run(config, workdir)
    records = driver.read_records(workdir)  # the random tiny CLIP may find nothing to query after round 1
    assert records and records[0].round == 1
    model = workdir / "model"
    assert (model / "text_encoder_2").is_dir() and (model / "tokenizer_2").is_dir()
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32)
    if method == "lora":
        pipe.load_lora_weights(model)
    sd, base = loaded_sdxl
    _, tuned = export.personalized_model(sd, base, model)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    conditioning = np.asarray(sd.encode_text(base.text_encoder, sd.tokenize(PROMPTS[:1])))
    context, added = sd.unet_inputs(latents, conditioning)
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents), 500, encoder_hidden_states=torch.from_numpy(np.array(context)),
                           added_cond_kwargs={k: torch.from_numpy(np.array(v)) for k, v in added.items()}).sample
    ours = np.asarray(sd.apply_unet(tuned.unet, latents, np.array([500]), conditioning))
    before = np.asarray(sd.apply_unet(base.unet, latents, np.array([500]), conditioning))
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)
    assert np.abs(ours - before).max() > 1e-3  # training changed the UNet (or its LoRA) beyond the tolerance


def test_mudi_trains_with_segmix_and_dco_and_generates_from_the_collage_on_sdxl(tiny_assets, loaded_sdxl, tmp_path):
    """configs/sd_mudi.py:sdxl's method on a tiny SDXL: Seg-Mix batches (both tokenizers' ids of the
    mixed caption), DCO's base-UNet reference through the packed conditioning, mean-shifted noise."""
    from configs import tiny_cpu

    from gal_jax import concept as concept_lib, data, sharding, trainer as trainer_lib

    sd, params = loaded_sdxl
    config = tiny_cpu.get_config("mudi")
    concept = concept_lib.load_concept(config, tiny_assets["multi_subject_concept"], None)
    train_set = data.write_training_set(list(concept.references), [], None, tmp_path / "set", sd.tokenize, 64,
                                        subjects=concept.subjects)
    config.train.steps, config.train.batch_size, config.train.grad_accum_steps = 2, 8, 1
    config.data.segmix.prob = 1.0
    mesh = sharding.make_mesh()
    result, metrics = trainer_lib.Trainer(config, sd, mesh).train_round(params, train_set, progress=False)
    last = metrics["loss_curve"][-1]
    assert last["step"] == 2 and np.isfinite(last["loss"])
    tuned = result.apply(params)
    generator = sample.Generator(sd, mesh, sampler="ddim", steps=2, max_images_per_device=1)
    collage = np.full((8, 64, 64, 3), 255, np.uint8)
    collage[:, 16:48, 8:30] = (200, 40, 40)

    def run(**init):
        return np.asarray(generator.generate(tuned, ["a teapot and a cat"], [0], 1, 8, 0, progress=False, **init))

    plain, shifted = run(), run(init_images=collage, init_gamma=2.0)
    assert plain.shape == (8, 64, 64, 3) and not np.array_equal(plain, shifted)
