"""gal_jax.schedulers against the PyTorch diffusers schedulers, and its behaviour under jit/scan/vmap."""

import functools
import math
from unittest import mock

import chex
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from gal_jax import schedulers

diffusers.utils.logging.set_verbosity_error()

# An SD-1.x scheduler/scheduler_config.json as diffusers writes it (no timestep_spacing key).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}
CONFIGS = {
    "sd15": SD15,
    "v_prediction": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "leading"},
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "pixel_clipped": {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "clip_sample": True,
        "set_alpha_to_one": True,
        "timestep_spacing": "linspace",
        "skip_prk_steps": True,
    },
}
DPM_VARIANTS = {
    "solver_order_1": {**SD15, "solver_order": 1},
    "solver_order_3": {**SD15, "solver_order": 3},
    "heun": {**SD15, "solver_type": "heun"},
}
ALL_CONFIGS = {**CONFIGS, **DPM_VARIANTS}
TORCH_SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
LATENTS_SHAPE = (2, 4, 8, 8)


def fake_denoiser_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Returns a smooth, timestep-dependent stand-in for a UNet output."""
    t = int(t)
    return 0.1 * x * math.cos(t / 100) + 0.05 * math.sin(t / 37)


def fake_denoiser_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    """Returns the same function as fake_denoiser_torch, traceable."""
    t = t.astype(jnp.float32)
    return 0.1 * x * jnp.cos(t / 100) + 0.05 * jnp.sin(t / 37)


def initial_latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LATENTS_SHAPE).astype(np.float32)


def torch_scheduler(name: str, config: dict, num_inference_steps: int):
    scheduler = TORCH_SCHEDULERS[name].from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@jax.jit
def _normals(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda key: jax.random.normal(key, LATENTS_SHAPE, jnp.float32))(keys)


def ddpm_noises(sampler: schedulers.Sampler, key: jax.Array) -> list[np.ndarray]:
    """Returns the per-step noise sample_loop's ddpm draws from `key` (as its docstring specifies)."""
    return list(np.array(_normals(jax.random.split(key, sampler.num_steps))))


def torch_trajectory(name: str, config: dict, num_inference_steps: int, latents, noises) -> np.ndarray:
    """Returns the final latents of the diffusers scheduler; DDPM's step noise is taken from `noises`."""
    scheduler = torch_scheduler(name, config, num_inference_steps)
    noise_iter = iter(noises)
    with mock.patch(
        "diffusers.schedulers.scheduling_ddpm.randn_tensor",
        lambda shape, **kwargs: torch.from_numpy(next(noise_iter)),
    ):
        x = torch.from_numpy(latents)
        for t in scheduler.timesteps:
            x = scheduler.step(fake_denoiser_torch(x, t), t, x).prev_sample
    return x.numpy()


@functools.cache
def sampler_and_loop(name: str, config_name: str, num_inference_steps: int):
    """Returns a sampler and its jitted sample_loop, built once per test session (ddpm compiles slowly)."""
    sampler = schedulers.make_sampler(name, ALL_CONFIGS[config_name], num_inference_steps)
    return sampler, jax.jit(lambda x, k: schedulers.sample_loop(sampler, fake_denoiser_jax, x, k))


def assert_close_to_reference(actual: np.ndarray, reference: np.ndarray) -> None:
    """Asserts max-abs error <= 1e-4 of the reference's scale (at least 1).

    float32 rounding leaves about 1e-6; the tolerance is tight enough to tell DPM-Solver's heun
    variant from midpoint (they differ by about 4e-4 here).
    """
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_array_less(np.abs(actual - reference).max(), 1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# Noise schedule and training targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()},
    ],
    ids=["scaled_linear", "linear", "squaredcos_cap_v2", "trained_betas"],
)
def test_noise_schedule_matches_diffusers_alphas_cumprod(overrides):
    config = {**SD15, **overrides}
    schedule = schedulers.make_noise_schedule(config)
    expected = DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    assert schedule.num_train_timesteps == 1000
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), expected, rtol=2e-5)


def _training_batch():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(LATENTS_SHAPE).astype(np.float32)
    noise = rng.standard_normal(LATENTS_SHAPE).astype(np.float32)
    return x0, noise, np.array([3, 981], np.int64)


def test_add_noise_matches_diffusers():
    x0, noise, t = _training_batch()
    expected = DDPMScheduler.from_config(SD15).add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    schedule = schedulers.make_noise_schedule(SD15)
    actual = schedulers.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(actual), expected.numpy(), atol=1e-5)


def test_velocity_target_matches_diffusers_get_velocity():
    x0, noise, t = _training_batch()
    expected = DDPMScheduler.from_config(SD15).get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    schedule = schedulers.make_noise_schedule(SD15)
    actual = schedulers.velocity_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(actual), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("prediction_type", schedulers.PREDICTION_TYPES)
def test_converting_the_training_target_recovers_x0_and_noise(prediction_type):
    x0, noise, t = (jnp.asarray(a) for a in _training_batch())
    schedule = schedulers.make_noise_schedule(SD15)
    noisy = schedulers.add_noise(schedule, x0, noise, t)
    target = schedulers.training_target(schedule, x0, noise, t, prediction_type)
    alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    pred_x0, pred_noise = schedulers.convert_model_output(target, noisy, alpha_bar, prediction_type)
    chex.assert_trees_all_close((pred_x0, pred_noise), (x0, noise), atol=2e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_diffusers_training_scripts(prediction_type):
    """diffusers' train_text_to_image.py: min(compute_snr, gamma) / snr (epsilon) or / (snr + 1)."""
    from diffusers.training_utils import compute_snr

    t = np.array([0, 3, 120, 500, 981, 999], np.int64)
    snr = compute_snr(DDPMScheduler.from_config(SD15), torch.from_numpy(t))
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    schedule = schedulers.make_noise_schedule(SD15)
    actual = schedulers.min_snr_weight(schedule, jnp.asarray(t), 5.0, prediction_type)
    np.testing.assert_allclose(np.asarray(actual), expected.numpy(), rtol=1e-4)  # float32 SNR at t=0
    assert np.asarray(actual)[0] < 0.01  # the nearly clean steps count little


def test_training_target_rejects_unknown_prediction_type():
    x0, noise, t = (jnp.asarray(a) for a in _training_batch())
    with pytest.raises(ValueError, match="flow"):
        schedulers.training_target(schedulers.make_noise_schedule(SD15), x0, noise, t, "flow")


# ---------------------------------------------------------------------------------------------
# Timesteps and trajectories against diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_timesteps_match_diffusers(name, config_name):
    config = CONFIGS[config_name]
    for num_inference_steps in (1, 3, 10, 25, 50, 500):
        sampler = schedulers.make_sampler(name, config, num_inference_steps)
        expected = torch_scheduler(name, config, num_inference_steps).timesteps.numpy()
        np.testing.assert_array_equal(sampler.timesteps, expected, err_msg=f"{num_inference_steps} steps")
        assert sampler.timesteps.dtype == np.int32


def test_dpmsolver_default_spacing_is_what_swapping_an_sd_pipeline_scheduler_gives():
    """DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) spaces by linspace, not leading."""
    pipeline_scheduler = PNDMScheduler.from_config(SD15)
    swapped = DPMSolverMultistepScheduler.from_config(pipeline_scheduler.config)
    swapped.set_timesteps(50)
    dpm = schedulers.make_sampler("dpmsolver++", SD15, 50)
    np.testing.assert_array_equal(dpm.timesteps, swapped.timesteps.numpy())
    assert dpm.timesteps[0] == 999 and schedulers.make_sampler("ddim", SD15, 50).timesteps[0] == 981


# Every sampler on every config at 10 and 25 steps, but ddpm at 25 steps on SD15 only: each ddpm
# compile pays seconds for jax.random.normal on a 2-core CPU, and 10 steps cover its math elsewhere.
TRAJECTORY_CASES = [
    (name, config_name, steps)
    for name in schedulers.SAMPLERS
    for config_name in CONFIGS
    for steps in (10, 25)
    if not (name == "ddpm" and steps == 25 and config_name != "sd15")
] + [("dpmsolver++", variant, steps) for variant in DPM_VARIANTS for steps in (10, 25)]


@pytest.mark.parametrize(
    "name,config_name,num_inference_steps",
    TRAJECTORY_CASES,
    ids=["-".join(map(str, case)) for case in TRAJECTORY_CASES],
)
def test_trajectory_matches_diffusers(name, config_name, num_inference_steps):
    """Same latents and denoiser; DDPM is fed the same per-step noise in both frameworks."""
    latents, key = initial_latents(), jax.random.PRNGKey(7)
    sampler, loop = sampler_and_loop(name, config_name, num_inference_steps)
    noises = ddpm_noises(sampler, key) if name == "ddpm" else []
    expected = torch_trajectory(name, ALL_CONFIGS[config_name], num_inference_steps, latents, noises)
    assert_close_to_reference(np.asarray(loop(jnp.asarray(latents), key)), expected)


def test_ddpm_is_deterministic_given_the_key_and_varies_with_it():
    _, run = sampler_and_loop("ddpm", "sd15", 10)
    latents = jnp.asarray(initial_latents())
    first = np.asarray(run(latents, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.asarray(run(latents, jax.random.PRNGKey(0))), first)
    assert np.abs(np.asarray(run(latents, jax.random.PRNGKey(1))) - first).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# jit / scan / vmap behaviour
# ---------------------------------------------------------------------------------------------


def test_sample_loop_traces_the_denoiser_once_and_compiles_once():
    sampler = schedulers.make_sampler("dpmsolver++", SD15, 25)
    denoiser_traces = []

    def counting_denoiser(x, t):
        denoiser_traces.append(t)
        return fake_denoiser_jax(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def generate(latents, key):
        return schedulers.sample_loop(sampler, counting_denoiser, latents, key)

    for seed in range(3):
        out = generate(jnp.asarray(initial_latents(seed)), jax.random.PRNGKey(seed))
        chex.assert_shape(out, LATENTS_SHAPE)
    assert len(denoiser_traces) == 1


@pytest.mark.parametrize("name", ["ddpm", "dpmsolver++", "pndm"])
def test_vmapped_sample_loop_matches_per_image_runs(name):
    """vmap over (latents, key) gives each image exactly what a run on that image alone gives."""
    _, run_one = sampler_and_loop(name, "sd15", 10)
    latents = jnp.asarray(initial_latents())
    keys = jax.random.split(jax.random.PRNGKey(3), LATENTS_SHAPE[0])
    batched = jax.jit(jax.vmap(run_one))(latents, keys)
    singles = jnp.stack([run_one(latents[i], keys[i]) for i in range(LATENTS_SHAPE[0])])
    chex.assert_trees_all_close(batched, singles, rtol=1e-5, atol=1e-5)


def test_sample_loop_keeps_the_latents_dtype():
    sampler = schedulers.make_sampler("dpmsolver++", SD15, 10)
    latents = jnp.asarray(initial_latents())
    full = schedulers.sample_loop(sampler, fake_denoiser_jax, latents)
    half = schedulers.sample_loop(sampler, fake_denoiser_jax, latents.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    error = np.abs(np.asarray(half, np.float32) - np.asarray(full)).max()
    assert error < 0.02 * np.abs(np.asarray(full)).max()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_sampler_error_lists_the_valid_ones():
    with pytest.raises(ValueError, match="euler.*ddpm, ddim, dpmsolver\\+\\+, pndm"):
        schedulers.make_sampler("euler", SD15, 10)


@pytest.mark.parametrize("num_inference_steps", [0, -3, 1001])
def test_step_count_outside_one_to_num_train_timesteps_is_rejected(num_inference_steps):
    with pytest.raises(ValueError, match=f"num_inference_steps={num_inference_steps}"):
        schedulers.make_sampler("ddim", SD15, num_inference_steps)


@pytest.mark.parametrize(
    "name,overrides,named",
    [
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"timestep_spacing": "karras"}, "karras"),
        ("ddim", {"beta_schedule": "sigmoid"}, "sigmoid"),
        ("ddim", {"prediction_type": "flow_prediction"}, "flow_prediction"),
        ("ddpm", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmsolver++", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ],
)
def test_unsupported_config_values_are_rejected_by_name(name, overrides, named):
    with pytest.raises(ValueError, match=named):
        schedulers.make_sampler(name, {**SD15, **overrides}, 10)


def test_timesteps_past_the_end_of_the_chain_are_rejected():
    """With steps_offset 1, leading spacing over all 1000 steps would ask for timestep 1000."""
    with pytest.raises(ValueError, match="outside \\[0, 999\\]"):
        schedulers.make_sampler("ddim", SD15, 1000)


def test_dpmsolver_rejects_step_counts_that_repeat_timesteps():
    with pytest.raises(ValueError, match="repeats timesteps"):
        schedulers.make_sampler("dpmsolver++", {**SD15, "timestep_spacing": "linspace"}, 1000)


def test_ddpm_step_without_a_key_is_rejected():
    sampler = schedulers.make_sampler("ddpm", SD15, 10)
    latents = jnp.asarray(initial_latents())
    with pytest.raises(ValueError, match="PRNG key"):
        sampler.step(sampler.init_state(LATENTS_SHAPE), latents, 0, latents)
