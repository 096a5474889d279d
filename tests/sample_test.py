"""Generation over (prompt, seed) grids: determinism across devices and batches, parity with PyTorch
diffusers' schedulers + UNet, one compilation per grid shape, files, bad input."""

import json
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from gal_jax import bench_torch, io_utils, memory, sample, schedulers, sharding

STEPS = 2
# The anchor pool: prompt_id is the index here. Tests generate subsets in other orders.
POOL = ["a <tiny-teapot> teapot in park", "a <tiny-teapot> teapot on the moon",
        "a <tiny-teapot> teapot in a kitchen", "a <tiny-teapot> teapot in desert"]


def assert_same_image(actual: np.ndarray, expected: np.ndarray) -> None:
    """Asserts two uint8 images are the same up to float rounding: XLA's kernels may sum in another
    order for another per-device batch size, which flips a rare pixel by one level."""
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def generator8(loaded_sd):
    """8 devices on a (4, 2) mesh, one image per device per call: every grid runs in chunks of 8."""
    sd, _ = loaded_sd
    return sample.Generator(sd, sharding.make_mesh(4, 2), sampler="ddpm", steps=STEPS, max_images_per_device=1)


@pytest.fixture(scope="module")
def reference(loaded_sd):
    """{(round, prompt_id, seed): image} from one device, 8 images per call, two grids of the pool."""
    sd, params = loaded_sd
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    generator = sample.Generator(sd, mesh, sampler="ddpm", steps=STEPS, max_images_per_device=8)
    images = {}
    for prompt_ids, num in (([3], 13), ([0, 1, 2], 4)):
        grid = generator.generate(params, [POOL[i] for i in prompt_ids], prompt_ids, 0, num, 0, progress=False)
        host = sample.to_host(grid, num)
        images.update({(0, p, s): host[row, s] for row, p in enumerate(prompt_ids) for s in range(num)})
    assert generator.traces == 1
    return images


@pytest.mark.parametrize(
    "prompt_ids, num_per_prompt",
    [([2], 3), ([1, 0], 4), ([3], 13)],
    ids=["grid3", "grid8-reversed-pool-order", "grid13-padded-two-chunks"],
)
def test_image_depends_only_on_round_prompt_and_seed(loaded_sd, generator8, reference, prompt_ids, num_per_prompt):
    _, params = loaded_sd
    prompts = [POOL[i] for i in prompt_ids]
    images = generator8.generate(params, prompts, prompt_ids, 0, num_per_prompt, base_seed=0, progress=False)
    host = sample.to_host(images, num_per_prompt)
    for row, prompt_id in enumerate(prompt_ids):
        for seed in range(num_per_prompt):
            assert_same_image(host[row, seed], reference[(0, prompt_id, seed)])


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((1, 1, 8), marks=pytest.mark.slow)])
def test_images_on_a_tensor_mesh_with_split_weights_equal_one_devices(loaded_sd, reference, monkeypatch, mesh_shape):
    sd, params = loaded_sd
    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 1)  # split every attention and MLP layer of the tiny UNet
    mesh = sharding.make_mesh(*mesh_shape)
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, sd.logical_axes()))
    block = placed.unet["mid_block"]["attentions_0"]["transformer_blocks_0"]
    assert block["attn2"]["to_out_0"]["kernel"].sharding.spec[0] == "tensor"
    assert block["ff"]["net_2"]["kernel"].sharding.spec[0] == "tensor"
    generator = sample.Generator(sd, mesh, sampler="ddpm", steps=STEPS, max_images_per_device=2)
    host = sample.to_host(generator.generate(placed, POOL[:3], [0, 1, 2], 0, 4, 0, progress=False), 4)
    for prompt_id in range(3):
        for seed in range(4):
            assert_same_image(host[prompt_id, seed], reference[(0, prompt_id, seed)])


def test_images_change_with_round_seed_and_base_seed(loaded_sd, generator8, reference):
    _, params = loaded_sd
    round1 = sample.to_host(generator8.generate(params, POOL[:1], [0], 1, 2, 0, progress=False), 2)
    other_base = sample.to_host(generator8.generate(params, POOL[:1], [0], 0, 2, 7, progress=False), 2)
    for image in (round1[0, 0], other_base[0, 0], reference[(0, 0, 1)], reference[(0, 1, 0)]):
        assert np.abs(image.astype(int) - reference[(0, 0, 0)]).mean() > 1.0
    assert reference[(0, 0, 0)].std() > 1.0  # the images are not blank


def test_generation_compiles_once_across_rounds_and_grid_sizes(loaded_sd, generator8):
    _, params = loaded_sd
    for round_index, (prompt_ids, num) in enumerate([([0, 1, 2], 2), ([3, 1], 2), ([2], 5), ([0], 13)]):
        generator8.generate(params, [POOL[i] for i in prompt_ids], prompt_ids, round_index, num, 0, progress=False)
    # Every test in this module uses chunks of 8 on generator8: one trace in all.
    assert generator8.traces == 1


def test_output_is_prompt_major_uint8_and_sharded_over_the_batch_axes(loaded_sd, generator8, reference):
    _, params = loaded_sd
    images = generator8.generate(params, POOL[:2], [0, 1], 0, 4, 0, progress=False)
    chex.assert_shape(images, (8, 64, 64, 3))
    assert images.dtype == jnp.uint8
    assert images.sharding.is_equivalent_to(sharding.batch_sharding(generator8.mesh), images.ndim)
    assert_same_image(np.asarray(images)[5], reference[(0, 1, 1)])  # image 1 of prompt 1
    # 3 images cannot be split over 8 shards: the result is replicated instead.
    odd = generator8.generate(params, POOL[:1], [0], 0, 3, 0, progress=False)
    assert odd.shape[0] == 3 and odd.sharding.is_fully_replicated


def test_compiled_chunk_reports_flops_and_generates_a_chunk(loaded_sd, generator8):
    _, params = loaded_sd
    compiled, args = generator8.compiled_chunk(params, 13)
    assert isinstance(compiled, jax.stages.Compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] > 0
    chex.assert_shape(compiled(*args), (generator8.chunk_size(13), 64, 64, 3))


def test_chunk_size_is_bounded_per_device_and_a_multiple_of_the_shards(loaded_sd):
    sd, _ = loaded_sd
    generator = sample.Generator(sd, sharding.make_mesh(8, 1), sampler="ddim", steps=2, max_images_per_device=3)
    assert [generator.chunk_size(n) for n in (1, 8, 9, 17, 180)] == [8, 8, 16, 24, 24]


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch diffusers: the scheduler + UNet trajectory with classifier-free guidance
# ---------------------------------------------------------------------------------------------

TORCH_SCHEDULERS = bench_torch.TORCH_SCHEDULERS


def _torch_trajectory(folder, scheduler_config, name, steps, latents, context, uncond, guidance, noises):
    """Returns the final latents of diffusers' pipeline loop; DDPM's step noise comes from `noises`."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    scheduler = getattr(diffusers, TORCH_SCHEDULERS[name]).from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    both = torch.from_numpy(np.concatenate([np.broadcast_to(uncond, context.shape), context]))
    noise_iter = iter(noises)
    x = torch.from_numpy(latents) * scheduler.init_noise_sigma
    with torch.no_grad(), mock.patch(
        "diffusers.schedulers.scheduling_ddpm.randn_tensor",
        lambda shape, **kwargs: torch.from_numpy(next(noise_iter)),
    ):
        for t in scheduler.timesteps:
            uncond_out, cond_out = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            x = scheduler.step(uncond_out + guidance * (cond_out - uncond_out), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name, steps", [("ddpm", 3), ("ddim", 3), ("dpmsolver++", 4), ("pndm", 4)])
def test_denoising_trajectory_on_the_tiny_unet_matches_diffusers(tiny_models, loaded_sd, name, steps):
    sd, params = loaded_sd
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    uncond = rng.standard_normal((77, 32)).astype(np.float32)
    sampler = schedulers.make_sampler(name, sd.scheduler_config, steps)
    keys = jax.random.split(jax.random.key(1), 2)
    run = jax.vmap(lambda x, c, k: sample.denoise(sd, sampler, 7.5, params.unet, x, c, uncond, k))
    ours = np.asarray(jax.jit(run)(latents, context, keys))
    # sample_loop's ddpm noise at step i for image b: normal(split(key_b, num_steps)[i]).
    per_image = [[jax.random.normal(k, (4, 16, 16)) for k in jax.random.split(key, sampler.num_steps)]
                 for key in keys]
    noises = [np.stack(step) for step in zip(*per_image)]
    theirs = _torch_trajectory(tiny_models["sd"], sd.scheduler_config, name, steps, latents, context, uncond,
                               7.5, noises)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_guidance_one_is_the_conditional_prediction_and_larger_scales_extrapolate(tiny_models, loaded_sd):
    import diffusers

    sd, params = loaded_sd
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16, 16)).astype(np.float32)
    context, uncond = (rng.standard_normal((77, 32)).astype(np.float32) for _ in range(2))
    guided = jax.jit(lambda t: [sample.guided_prediction(sd, params.unet, x, t, context, uncond, g) for g in (1.0, 3.0)])
    guided_once, guided_thrice = guided(jnp.int32(501))
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_models["sd"] / "unet").eval()
    with torch.no_grad():
        both = unet(torch.from_numpy(np.stack([x, x])), 501, torch.from_numpy(np.stack([uncond, context])))
    uncond_out, cond_out = both.sample.numpy()
    np.testing.assert_allclose(guided_once, cond_out, atol=1e-4)
    np.testing.assert_allclose(guided_thrice, uncond_out + 3.0 * (cond_out - uncond_out), atol=3e-4)


# ---------------------------------------------------------------------------------------------
# Keys, files, bad input
# ---------------------------------------------------------------------------------------------


def test_image_key_folds_in_round_then_prompt_then_seed():
    expected = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 2), 17), 3)
    traced = jax.jit(sample.image_key)(5, 2, 17, 3)
    np.testing.assert_array_equal(jax.random.key_data(traced), jax.random.key_data(expected))


def test_write_images_writes_pngs_and_an_index(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    index = sample.write_images(images, ["a", "a", "b"], [0, 1, 0], tmp_path)
    assert json.loads((tmp_path / "index.json").read_text()) == index
    assert [(e["prompt"], e["seed"]) for e in index] == [("a", 0), ("a", 1), ("b", 0)]
    for entry, image in zip(index, images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / entry["path"])), image)
    assert not list(tmp_path.rglob("*.tmp"))


def test_sample_to_dir_writes_the_grid_in_prompt_major_order(loaded_sd, tmp_path):
    sd, params = loaded_sd
    config = ml_collections.ConfigDict({
        "mesh": {"data": 8, "fsdp": 1},
        "sample": {"sampler": "ddim", "steps": 1, "guidance_scale": 1.0, "max_images_per_device": 1, "seed": 3},
    })
    prompts = ["a red teapot", "a blue teapot", "a cat"]
    index = sample.sample_to_dir(config, sd, params, prompts, 4, tmp_path / "out")  # 2 chunks of 8, 1 padded
    assert [(e["prompt"], e["seed"]) for e in index[:5]] == [
        ("a red teapot", 0), ("a red teapot", 1), ("a red teapot", 2), ("a red teapot", 3), ("a blue teapot", 0)]
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    files = np.stack([np.asarray(Image.open(tmp_path / "out" / e["path"])) for e in index])
    expected = sample.Generator.from_config(config, sd, sharding.make_mesh(8, 1)).generate(
        params, prompts, range(3), 0, 4, 3, progress=False)
    np.testing.assert_array_equal(files, np.asarray(expected))  # each chunk's rows written to their files
    assert np.abs(files[0].astype(int) - files[1]).mean() > 1.0


def test_empty_prompt_list_is_rejected(loaded_sd, generator8):
    with pytest.raises(ValueError, match="prompt list is empty"):
        generator8.generate(loaded_sd[1], [], [], 0, 2, 0)


def test_zero_images_per_prompt_is_rejected(loaded_sd, generator8):
    with pytest.raises(ValueError, match="num_per_prompt=0"):
        generator8.generate(loaded_sd[1], POOL[:1], [0], 0, 0, 0)


@pytest.mark.parametrize(
    "prompt_ids, round_index, base_seed, match",
    [([0, 1], 0, 0, "1 prompts but 2 prompt_ids"), ([-1], 0, 0, "prompt_ids value -1"),
     ([0], -2, 0, "round_index value -2"), ([0], 0, 2**31, "base_seed")],
)
def test_bad_grid_requests_name_the_value(loaded_sd, generator8, prompt_ids, round_index, base_seed, match):
    with pytest.raises(ValueError, match=match):
        generator8.generate(loaded_sd[1], POOL[:1], prompt_ids, round_index, 1, base_seed)


def test_duplicate_prompt_ids_are_rejected(loaded_sd, generator8):
    with pytest.raises(ValueError, match="distinct"):
        generator8.generate(loaded_sd[1], POOL[:2], [1, 1], 0, 1, 0)


def test_over_long_prompt_is_truncated_with_a_warning(loaded_sd, generator8):
    _, params = loaded_sd
    long_prompt = "a teapot " + "very " * 100 + "shiny"
    with pytest.warns(sample.PromptTruncatedWarning, match="truncated to the tokenizer limit of 77"):
        images = generator8.generate(params, [long_prompt], [0], 0, 1, 0, progress=False)
    assert images.shape == (1, 64, 64, 3)


def test_guidance_below_one_is_rejected_and_one_means_no_guidance(loaded_sd):
    sd, _ = loaded_sd
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="guidance_scale=0.5 must be >= 1"):
        sample.Generator(sd, mesh, sampler="ddim", steps=2, guidance_scale=0.5)
    assert sample.Generator(sd, mesh, sampler="ddim", steps=2, guidance_scale=1.0).guidance_scale == 1.0


def test_unknown_sampler_and_bad_chunk_bound_are_rejected(loaded_sd):
    sd, _ = loaded_sd
    with pytest.raises(schedulers.SchedulerConfigError, match="unknown sampler 'euler'"):
        sample.Generator(sd, sharding.make_mesh(), sampler="euler")
    with pytest.raises(ValueError, match="max_images_per_device=-1"):
        sample.Generator(sd, sharding.make_mesh(), max_images_per_device=-1)


def auto_generator(sd, mesh=None):
    return sample.Generator(sd, mesh or sharding.make_mesh(4, 2), sampler="ddim", steps=STEPS,
                            max_images_per_device=sample.AUTO)


def test_auto_chunk_falls_back_on_cpu_says_why_once_and_keeps_its_size(loaded_sd, capsys):
    sd, params = loaded_sd
    generator = auto_generator(sd)
    with pytest.raises(ValueError, match="pass its params"):
        generator.chunk_size(100)
    # 100 images over 8 shards: 13 a device, two chunks under the fallback bound of 8 -> 7 each.
    assert generator.chunk_size(100, params) == 7 * 8
    assert generator.chunk_size(16) == generator.chunk_size(1000, params) == 7 * 8  # a shrinking pool: no new shape
    logged = capsys.readouterr().out
    assert logged.count("generation chunk:") == 1
    assert ("generation chunk: 7 images/device (auto: cpu devices report no free memory: the default bound "
            f"of {sample.AUTO_FALLBACK_PER_DEVICE})") in logged


def test_auto_chunk_follows_free_memory_and_stays_a_multiple_of_the_shards(loaded_sd, monkeypatch, capsys):
    sd, params = loaded_sd
    mesh = sharding.make_mesh(4, 2)
    need = auto_generator(sd, mesh).chunk_memory(params)  # the chunk compiled at two sizes, on XLA:CPU
    assert need.per_item > 0
    monkeypatch.setattr(sample.Generator, "chunk_memory", lambda self, params, with_init=False: need)

    def chosen(images_that_fit: float, num_images=None, in_use=3 * 2**30):
        free = (need.fixed + images_that_fit * need.per_item) / sample.AUTO_FREE_FRACTION
        stats = {"bytes_limit": in_use + int(free) + 2**20, "bytes_in_use": in_use}  # + the MiB free_bytes rounds off
        monkeypatch.setattr(memory, "device_memory_stats", lambda device: stats)
        return auto_generator(sd, mesh).chunk_size(num_images, params)

    assert chosen(5.3) == 5 * 8
    assert chosen(11.2) == 11 * 8
    assert chosen(11.2, in_use=40 * 2**30) == 11 * 8  # what is free counts, not the limit
    assert chosen(0.3) == 8  # not even one fits: one a device, and the log says so
    assert "not even one image fits" in capsys.readouterr().out
    assert chosen(10_000) == sample.AUTO_MAX_PER_DEVICE * 8
    assert chosen(10_000, num_images=3 * 8) == 3 * 8  # no more than the grid
    assert chosen(11.2, num_images=13 * 8) == 7 * 8  # 13 a device in two equal chunks
    logged = capsys.readouterr().out
    assert f"generation chunk: 7 images/device (auto: {need.per_item / 2**20:.1f} MiB/image" in logged
    monkeypatch.setattr(memory, "device_memory_stats", lambda device: None)
    assert memory.free_bytes(mesh.devices.flat) is None


def test_generate_hands_each_chunk_on_once_the_next_is_queued(loaded_sd, generator8, monkeypatch):
    _, params = loaded_sd
    dispatched, chunk_fn = [], generator8.chunk_function

    def counted(*args):
        dispatched.append(len(dispatched))
        return chunk_fn(*args)

    monkeypatch.setattr(generator8, "_chunk_fn", counted)
    handed = []

    def on_chunk(rows, images):
        handed.append((rows, len(dispatched), jax.device_get(images)))

    images = generator8.generate(params, POOL[3:], [3], 0, 20, 0, progress=False, on_chunk=on_chunk)
    assert [(rows, queued) for rows, queued, _ in handed] == [(range(0, 8), 2), (range(8, 16), 3), (range(16, 20), 3)]
    assert all(chunk.shape == (8, 64, 64, 3) for _, _, chunk in handed)
    stitched = np.concatenate([chunk[: len(rows)] for rows, _, chunk in handed])
    np.testing.assert_array_equal(stitched, jax.device_get(images))


def test_pngs_written_per_chunk_during_generation_are_the_files_written_after_it(loaded_sd, generator8, tmp_path):
    """The driver's overlapped writing (PngWriter fed by on_chunk) against the former path (the
    whole grid gathered, then write_pngs): the same files, byte for byte."""
    _, params = loaded_sd
    overlapped, after = tmp_path / "overlapped", tmp_path / "after"
    names = [f"{i:05d}.png" for i in range(13)]
    with io_utils.PngWriter() as writer:
        images = generator8.generate(
            params, POOL[3:], [3], 0, 13, 0, progress=False,
            on_chunk=lambda rows, chunk: writer.submit([overlapped / names[i] for i in rows],
                                                      sample.rows_to_host(chunk)[: len(rows)]))
    io_utils.write_pngs([after / name for name in names], sample.to_host(images, 13).reshape(13, 64, 64, 3))
    assert sorted(path.name for path in overlapped.iterdir()) == names
    for name in names:
        assert (overlapped / name).read_bytes() == (after / name).read_bytes()
