"""Noise schedules and samplers (DDPM, DDIM, DPM-Solver++, PNDM/PLMS) as pure JAX functions.

Configured from a diffusers `scheduler_config.json` dict. The math follows the PyTorch schedulers of
diffusers 0.39 (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler) step for
step, quirks included, so a JAX sampling loop retraces a PyTorch pipeline's trajectory.

A `Sampler` is a static object: host-side tables of per-step coefficients, computed once in float64
numpy, and a pure `step` that looks them up at a traced step index. A whole sampling loop is then
one `lax.scan` that compiles once and can be vmapped over images (`sample_loop`).

Config keys missing from the dict take the diffusers class defaults of the chosen sampler. In
particular `timestep_spacing` defaults to "leading" for ddpm/ddim/pndm but to "linspace" for
dpmsolver++, exactly as `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` (the GAL
authors' code) resolves it for an SD-1.x config that does not name it. Unknown keys are ignored;
known keys set to values this module does not implement raise `SchedulerConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "pndm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Defaults of the diffusers scheduler classes, used for keys a config leaves out.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
}
_DPM_DEFAULTS = {"timestep_spacing": "linspace"}

# Known options, and the only values of them that are implemented here.
_COMMON_LIMITS: dict[str, tuple] = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}
_SAMPLER_LIMITS: dict[str, dict[str, tuple]] = {
    "ddpm": {"variance_type": (None, "fixed_small")},
    "ddim": {},
    "dpmsolver++": {
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (1, 2, 3),
        "solver_type": ("midpoint", "heun"),
        "euler_at_final": (False,),
        "final_sigmas_type": ("zero",),
        "lambda_min_clipped": (-math.inf,),
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
        "use_karras_sigmas": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
    },
    "pndm": {"skip_prk_steps": (True,), "prediction_type": ("epsilon", "v_prediction")},
}


class SchedulerConfigError(ValueError):
    """A scheduler config or sampler request names something this module does not implement."""


# ---------------------------------------------------------------------------------------------
# Noise schedule (shared by training and sampling)
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class NoiseSchedule:
    """Cumulative signal fractions alpha_bar_t of the forward process, t = 0 .. T-1."""

    alphas_cumprod: jax.Array  # (num_train_timesteps,) float32

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def _option(config: Mapping[str, Any], key: str, defaults: Mapping[str, Any] = _DEFAULTS) -> Any:
    """Returns config[key], or the diffusers default when the key is absent or null."""
    value = config.get(key)
    return defaults[key] if value is None else value


def _alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """Returns alpha_bar_t in float64 for the config's beta schedule (or its trained_betas)."""
    num_train = int(_option(config, "num_train_timesteps"))
    start, end = float(_option(config, "beta_start")), float(_option(config, "beta_end"))
    schedule = _option(config, "beta_schedule")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, num_train, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, num_train, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        steps = np.arange(num_train + 1, dtype=np.float64) / num_train
        alpha_bar = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    else:
        raise SchedulerConfigError(f"beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}")
    return np.cumprod(1.0 - betas)


def make_noise_schedule(config: Mapping[str, Any]) -> NoiseSchedule:
    """Returns the noise schedule of a diffusers scheduler config."""
    _check_limits(config, _COMMON_LIMITS)
    return NoiseSchedule(alphas_cumprod=jnp.asarray(_alphas_cumprod(config), jnp.float32))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """Returns values (shape t.shape) reshaped to broadcast against `like` along its leading axes."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _signal_and_noise_scales(
    schedule: NoiseSchedule, t: jax.Array, like: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Returns sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), broadcastable against `like`."""
    alpha_bar = _per_example(schedule.alphas_cumprod[jnp.asarray(t)], like)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Returns x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t has x0's leading shape."""
    signal, noise_scale = _signal_and_noise_scales(schedule, t, x0)
    return (signal * x0 + noise_scale * noise).astype(x0.dtype)


def velocity_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Returns the v-prediction target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
    signal, noise_scale = _signal_and_noise_scales(schedule, t, x0)
    return (signal * noise - noise_scale * x0).astype(x0.dtype)


def signal_to_noise(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Returns SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32, shaped like t."""
    alpha_bar = schedule.alphas_cumprod[jnp.asarray(t)].astype(jnp.float32)
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Returns the Min-SNR-gamma loss weight of each timestep (Hang et al. 2023), as diffusers'
    training scripts apply it with `--snr_gamma`: min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction, min(SNR, gamma) for sample prediction. It turns
    the MSE on the target into the (clipped) MSE on x0, so the low-noise steps, whose loss is easy,
    stop dominating the gradient."""
    snr = signal_to_noise(schedule, t)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str
) -> jax.Array:
    """Returns what the denoiser is trained to output for x_t = add_noise(schedule, x0, noise, t)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity_target(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def convert_model_output(
    model_output: jax.Array, sample: jax.Array, alpha_bar: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Returns (predicted x0, predicted noise) from a denoiser output at noise level alpha_bar."""
    signal, noise_scale = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (sample - noise_scale * model_output) / signal, model_output
    if prediction_type == "v_prediction":
        return signal * sample - noise_scale * model_output, signal * model_output + noise_scale * sample
    if prediction_type == "sample":
        return model_output, (sample - signal * model_output) / noise_scale
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SamplerState:
    """What a multistep sampler carries between steps (empty for ddpm and ddim)."""

    history: tuple[jax.Array, ...]  # earlier model outputs (converted), oldest first
    saved_sample: jax.Array | None  # pndm: the sample of step 0, reused by step 1


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler bound to a config and step count: host coefficient tables plus a pure `step`.

    `timesteps[i]` is the timestep to call the denoiser with at step i (pndm calls it
    num_inference_steps + 1 times). `tables` maps a name to a (num_steps, ...) float32 array.
    """

    name: str
    timesteps: np.ndarray
    prediction_type: str
    tables: Mapping[str, np.ndarray]
    history_length: int
    clip_sample_range: float | None = None
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init_state(self, latents_shape: Sequence[int], dtype: Any = jnp.float32) -> SamplerState:
        """Returns the state before step 0 for latents of this shape and dtype."""
        zeros = jnp.zeros(tuple(latents_shape), dtype)
        return SamplerState(
            history=(zeros,) * self.history_length,
            saved_sample=zeros if self.name == "pndm" else None,
        )

    def step(
        self,
        state: SamplerState,
        model_output: jax.Array,
        step_index: jax.Array | int,
        sample: jax.Array,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, SamplerState]:
        """Returns (the sample of the next step, the new state); ddpm draws its noise from `key`."""
        if self.name == "ddpm" and key is None:
            raise ValueError("the ddpm sampler adds noise at every step: step() needs a PRNG key")
        return _STEP_FNS[self.name](self, state, model_output, step_index, sample, key)

    def _coefficient(self, name: str, step_index: jax.Array | int) -> jax.Array:
        return jnp.asarray(self.tables[name])[step_index]


def _ddpm_step(sampler, state, model_output, step_index, sample, key):
    """DDPM ancestral step with the posterior variance ("fixed_small")."""
    coef = sampler._coefficient
    x = sample.astype(jnp.float32)
    x0, _ = convert_model_output(model_output, x, coef("alpha_bar", step_index), sampler.prediction_type)
    x0 = _clip(x0, sampler.clip_sample_range)
    noise = jax.random.normal(key, sample.shape, jnp.float32)
    prev = coef("x0", step_index) * x0 + coef("sample", step_index) * x
    prev = prev + coef("noise_std", step_index) * noise
    return prev.astype(sample.dtype), state


def _ddim_step(sampler, state, model_output, step_index, sample, key):
    """Deterministic DDIM step (eta = 0)."""
    del key
    coef = sampler._coefficient
    x = sample.astype(jnp.float32)
    x0, eps = convert_model_output(model_output, x, coef("alpha_bar", step_index), sampler.prediction_type)
    x0 = _clip(x0, sampler.clip_sample_range)
    prev = coef("x0", step_index) * x0 + coef("eps", step_index) * eps
    return prev.astype(sample.dtype), state


def _dpm_step(sampler, state, model_output, step_index, sample, key):
    """DPM-Solver++ multistep step: linear in the sample and the last `solver_order` x0 predictions."""
    del key
    coef = sampler._coefficient
    x = sample.astype(jnp.float32)
    x0, _ = convert_model_output(model_output, x, coef("alpha_bar", step_index), sampler.prediction_type)
    weights = coef("outputs", step_index)  # over [current, history[-1], history[-2], ...]
    prev = coef("sample", step_index) * x + weights[0] * x0
    for lag, earlier in enumerate(reversed(state.history), start=1):
        prev = prev + weights[lag] * earlier.astype(jnp.float32)
    history = (state.history[1:] + (x0.astype(sample.dtype),)) if state.history else ()
    return prev.astype(sample.dtype), state.replace(history=history)


def _pndm_step(sampler, state, model_output, step_index, sample, key):
    """PLMS step (diffusers PNDM with skip_prk_steps): Adams-Bashforth over past model outputs."""
    del key
    coef = sampler._coefficient
    first, reuse = step_index == 0, coef("reuse_saved", step_index) > 0
    x = jnp.where(reuse, state.saved_sample, sample).astype(jnp.float32)
    weights = coef("outputs", step_index)  # over [current, history[-1], history[-2], history[-3]]
    combined = weights[0] * model_output.astype(jnp.float32)
    for lag, earlier in enumerate(reversed(state.history), start=1):
        combined = combined + weights[lag] * earlier.astype(jnp.float32)
    # diffusers converts v to eps after combining the raw outputs, at the step's (shifted) timestep.
    _, eps = convert_model_output(combined, x, coef("alpha_bar", step_index), sampler.prediction_type)
    prev = coef("sample", step_index) * x - coef("eps", step_index) * eps
    pushed = state.history[1:] + (model_output.astype(sample.dtype),)
    history = tuple(jnp.where(reuse, old, new) for old, new in zip(state.history, pushed))
    saved = jnp.where(first, sample, state.saved_sample).astype(state.saved_sample.dtype)
    return prev.astype(sample.dtype), SamplerState(history=history, saved_sample=saved)


_STEP_FNS: dict[str, Callable] = {
    "ddpm": _ddpm_step,
    "ddim": _ddim_step,
    "dpmsolver++": _dpm_step,
    "pndm": _pndm_step,
}


def _clip(x0: jax.Array, clip_range: float | None) -> jax.Array:
    """Returns x0 clipped to [-clip_range, clip_range], or x0 when clipping is off."""
    return x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)


# ---------------------------------------------------------------------------------------------
# Host-side tables
# ---------------------------------------------------------------------------------------------


def _spaced_timesteps(config: Mapping[str, Any], num_steps: int, defaults: Mapping[str, Any]) -> np.ndarray:
    """Returns descending int64 timesteps as DDIMScheduler.set_timesteps spaces them."""
    num_train = int(_option(config, "num_train_timesteps"))
    spacing = _option(config, "timestep_spacing", defaults)
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(num_steps) * ratio)[::-1].astype(np.int64) + int(_option(config, "steps_offset"))
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
    raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")


def _final_alpha_bar(config: Mapping[str, Any], alpha_bar: np.ndarray) -> float:
    """Returns the alpha_bar that ddim and pndm step to after timestep 0."""
    return 1.0 if _option(config, "set_alpha_to_one") else float(alpha_bar[0])


def _alpha_bar_at(alpha_bar: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    """Returns alpha_bar[t], with `final` wherever t < 0 (past the end of the chain)."""
    return np.where(t >= 0, alpha_bar[np.maximum(t, 0)], final)


Tables = dict[str, np.ndarray]


def _ddpm_tables(
    config: Mapping[str, Any], alpha_bar: np.ndarray, timesteps: np.ndarray, num_steps: int
) -> tuple[Tables, int]:
    """Returns (DDPM posterior-mean and fixed_small noise coefficients per step, history length 0)."""
    del config, num_steps
    prev_t = np.append(timesteps[1:], -1)
    a_t, a_prev = alpha_bar[timesteps], _alpha_bar_at(alpha_bar, prev_t, 1.0)
    beta_t = 1.0 - a_t / a_prev
    variance = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
    tables = {
        "alpha_bar": a_t,
        "x0": np.sqrt(a_prev) * beta_t / (1.0 - a_t),
        "sample": np.sqrt(1.0 - beta_t) * (1.0 - a_prev) / (1.0 - a_t),
        "noise_std": np.where(timesteps > 0, np.sqrt(variance), 0.0),
    }
    return tables, 0


def _ddim_tables(
    config: Mapping[str, Any], alpha_bar: np.ndarray, timesteps: np.ndarray, num_steps: int
) -> tuple[Tables, int]:
    """Returns (DDIM eta=0 coefficients of predicted x0 and noise per step, history length 0)."""
    # diffusers steps to t - T // n whatever the spacing, not to the next listed timestep.
    prev_t = timesteps - int(_option(config, "num_train_timesteps")) // num_steps
    a_prev = _alpha_bar_at(alpha_bar, prev_t, _final_alpha_bar(config, alpha_bar))
    tables = {"alpha_bar": alpha_bar[timesteps], "x0": np.sqrt(a_prev), "eps": np.sqrt(1.0 - a_prev)}
    return tables, 0


def _dpm_timesteps(config: Mapping[str, Any], num_steps: int) -> np.ndarray:
    """Returns DPMSolverMultistepScheduler's timesteps: n+1 spaced points minus the last, or trailing."""
    defaults = {**_DEFAULTS, **_DPM_DEFAULTS}
    if _option(config, "timestep_spacing", defaults) == "trailing":
        return _spaced_timesteps(config, num_steps, defaults)
    return _spaced_timesteps(config, num_steps + 1, defaults)[:-1]


def _dpm_order(step: int, num_steps: int, order: int, lower_order_final: bool) -> int:
    """Returns the solver order diffusers uses at a step (lower at the start and, if short, the end)."""
    if step == num_steps - 1:  # final sigma 0: always a first-order step to the denoised sample
        return 1
    if step == num_steps - 2 and lower_order_final and num_steps < 15:
        order = min(order, 2)
    return min(order, step + 1)


def _dpm_output_weights(lam: np.ndarray, alpha_t: float, step: int, order: int, heun: bool) -> np.ndarray:
    """Returns the weights of [x0 now, x0 one step back, two back] in one DPM-Solver++ update."""
    h = lam[step + 1] - lam[step]
    phi = np.expm1(-h)
    d0 = np.array([1.0, 0.0, 0.0])
    if order == 1:
        return -alpha_t * phi * d0
    r0 = (lam[step] - lam[step - 1]) / h
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0
    if order == 2:
        d1_weight = alpha_t * (phi / h + 1.0) if heun else -0.5 * alpha_t * phi
        return -alpha_t * phi * d0 + d1_weight * d1_0
    r1 = (lam[step - 1] - lam[step - 2]) / h
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return -alpha_t * phi * d0 + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2


def _dpm_tables(
    config: Mapping[str, Any], alpha_bar: np.ndarray, timesteps: np.ndarray, num_steps: int
) -> tuple[Tables, int]:
    """Returns (DPM-Solver++ weights of the sample and of recent x0 predictions, history length)."""
    del num_steps
    order = int(_option(config, "solver_order"))
    heun = _option(config, "solver_type") == "heun"
    # sigma = sqrt((1 - alpha_bar) / alpha_bar) per step, then 0 ("final_sigmas_type": "zero").
    sigma = np.append(np.sqrt((1.0 - alpha_bar[timesteps]) / alpha_bar[timesteps]), 0.0)
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    with np.errstate(divide="ignore"):
        lam = -np.log(sigma)  # log(alpha / (alpha * sigma)); +inf at the final sigma 0
    outputs = np.zeros((len(timesteps), order))
    for step in range(len(timesteps)):
        step_order = _dpm_order(step, len(timesteps), order, bool(_option(config, "lower_order_final")))
        outputs[step] = _dpm_output_weights(lam, alpha[step + 1], step, step_order, heun)[:order]
    tables = {
        "alpha_bar": alpha_bar[timesteps],
        "sample": (sigma[1:] * alpha[1:]) / (sigma[:-1] * alpha[:-1]),
        "outputs": outputs,
    }
    return tables, order - 1


# Adams-Bashforth weights of [current, history[-1], history[-2], history[-3]] for PLMS step i.
_PLMS_WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],  # step 1 redoes step 0's interval with the mean of both outputs
        [1.5, -0.5, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ]
)


def _pndm_timesteps(config: Mapping[str, Any], num_steps: int) -> np.ndarray:
    """Returns PLMS timesteps: the spaced ones with the second used twice (num_steps + 1 calls)."""
    spaced = _spaced_timesteps(config, num_steps, _DEFAULTS)
    return np.concatenate([spaced[:1], spaced[1:2], spaced[1:]])


def _pndm_tables(
    config: Mapping[str, Any], alpha_bar: np.ndarray, timesteps: np.ndarray, num_steps: int
) -> tuple[Tables, int]:
    """Returns (PLMS output weights and diffusers' _get_prev_sample coefficients per step, 3)."""
    ratio = int(_option(config, "num_train_timesteps")) // num_steps
    steps = np.arange(len(timesteps))
    reuse = steps == 1
    t = np.where(reuse, timesteps + ratio, timesteps)
    prev_t = np.where(reuse, timesteps, timesteps - ratio)
    a_t, a_prev = alpha_bar[t], _alpha_bar_at(alpha_bar, prev_t, _final_alpha_bar(config, alpha_bar))
    tables = {
        "alpha_bar": a_t,
        "sample": np.sqrt(a_prev / a_t),
        "eps": (a_prev - a_t) / (a_t * np.sqrt(1.0 - a_prev) + np.sqrt(a_t * (1.0 - a_t) * a_prev)),
        "outputs": _PLMS_WEIGHTS[np.minimum(steps, 4)],
        "reuse_saved": reuse.astype(np.float64),
    }
    return tables, 3


_TIMESTEP_FNS: dict[str, Callable] = {
    "ddpm": lambda config, num_steps: _spaced_timesteps(config, num_steps, _DEFAULTS),
    "ddim": lambda config, num_steps: _spaced_timesteps(config, num_steps, _DEFAULTS),
    "dpmsolver++": _dpm_timesteps,
    "pndm": _pndm_timesteps,
}
_TABLE_FNS: dict[str, Callable] = {
    "ddpm": _ddpm_tables,
    "ddim": _ddim_tables,
    "dpmsolver++": _dpm_tables,
    "pndm": _pndm_tables,
}


def _check_limits(config: Mapping[str, Any], limits: Mapping[str, tuple]) -> None:
    """Raises SchedulerConfigError if the config sets an option to a value not implemented here."""
    for key, allowed in limits.items():
        if key in config and config[key] not in allowed:
            raise SchedulerConfigError(
                f"scheduler config {key}={config[key]!r} is not supported (supported: {allowed})"
            )


def _check_request(name: str, config: Mapping[str, Any], num_inference_steps: int) -> None:
    """Raises SchedulerConfigError for an unknown sampler, step count or unsupported config value."""
    if name not in SAMPLERS:
        raise SchedulerConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    num_train = int(_option(config, "num_train_timesteps"))
    if not 1 <= num_inference_steps <= num_train:
        raise SchedulerConfigError(
            f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={num_train}]"
        )
    prediction_type = _option(config, "prediction_type")
    if prediction_type not in PREDICTION_TYPES:
        raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    _check_limits(config, {**_COMMON_LIMITS, **_SAMPLER_LIMITS[name]})


def _check_timesteps(name: str, timesteps: np.ndarray, num_train: int, num_steps: int) -> None:
    """Raises SchedulerConfigError if the spacing leaves [0, T) or, for dpmsolver++, repeats a timestep."""
    if timesteps.min() < 0 or timesteps.max() >= num_train:
        raise SchedulerConfigError(
            f"{name} with {num_steps} steps gives timesteps outside [0, {num_train - 1}] "
            f"({timesteps.min()}..{timesteps.max()}): lower steps_offset or num_inference_steps"
        )
    if name == "dpmsolver++" and np.any(np.diff(timesteps) >= 0):
        raise SchedulerConfigError(
            f"dpmsolver++ with {num_steps} steps repeats timesteps under this timestep_spacing "
            "(its step size would be 0): use fewer steps"
        )


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """Returns the sampler `name` (one of SAMPLERS) for a diffusers config and a step count."""
    _check_request(name, scheduler_config, num_inference_steps)
    alpha_bar = _alphas_cumprod(scheduler_config)
    timesteps = _TIMESTEP_FNS[name](scheduler_config, num_inference_steps)
    _check_timesteps(name, timesteps, len(alpha_bar), num_inference_steps)
    tables, history_length = _TABLE_FNS[name](scheduler_config, alpha_bar, timesteps, num_inference_steps)
    clip = name in ("ddpm", "ddim") and bool(_option(scheduler_config, "clip_sample"))
    return Sampler(
        name=name,
        timesteps=np.asarray(timesteps, np.int32),
        prediction_type=_option(scheduler_config, "prediction_type"),
        tables={key: np.asarray(value, np.float32) for key, value in tables.items()},
        history_length=history_length,
        clip_sample_range=float(_option(scheduler_config, "clip_sample_range")) if clip else None,
    )


def sample_loop(
    sampler: Sampler,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    latents: jax.Array,
    key: jax.Array | None = None,
    mean_shift: jax.Array | None = None,
) -> jax.Array:
    """Returns the final latents of denoising `latents` with `model_fn(x, t)`, as one lax.scan.

    The loop starts from latents * init_noise_sigma, plus `mean_shift` when given (MuDI's
    mean-shifted noise: the initial latents' mean moved to gamma times a collage's latents).
    Step i of ddpm draws its noise from `jax.random.split(key, sampler.num_steps)[i]`, so under
    `jax.vmap` over (latents, key) every image depends only on its own latents and key.
    """
    keys = None if key is None else jax.random.split(key, sampler.num_steps)
    timesteps = jnp.asarray(sampler.timesteps)

    def body(carry, xs):
        x, state = carry
        step_index, step_key = xs
        model_output = model_fn(x, timesteps[step_index])
        return sampler.step(state, model_output, step_index, x, step_key), None

    x = latents * jnp.asarray(sampler.init_noise_sigma, latents.dtype)
    if mean_shift is not None:
        x = x + mean_shift.astype(x.dtype)
    carry = (x, sampler.init_state(latents.shape, latents.dtype))
    (x, _), _ = jax.lax.scan(body, carry, (jnp.arange(sampler.num_steps), keys))
    return x
