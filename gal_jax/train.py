"""Weighted DreamBooth fine-tuning of the UNet: sharded, compiled once, checkpointed, resumable.

Step 1 of a GAL round (GAL_SPEC.md): the UNet is fine-tuned from the *base* weights on the round's
references and their paired class images (prior preservation); VAE and text encoder stay frozen.

The math is pure functions of arrays (`weighted_dreambooth_loss`, `dreambooth_loss`, `train_step`).
`Trainer` is the edge that feeds them: it owns the compiled step (one compile per batch layout for
the whole run, so rounds never recompile), the data iterator, the latent cache, the checkpoints
and the progress bar.

The weights are absolute (GAL_SPEC.md): loss = mean over instance examples of w * mse +
prior_loss_weight * mean over class examples of w * mse, each mean dividing by the number of such
examples in the global batch, never by sum(w). Per-example losses are reduced once over the global
batch (scenic style), so the loss does not depend on how the batch is sharded.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gal_jax import checkpoint, data, schedulers, sharding
from gal_jax.models import StableDiffusion, StableDiffusionParams

Params = Any
Batch = dict[str, Any]
LR_SCHEDULES = ("constant", "cosine")
# Rematerialised with train.remat: the granularity of PyTorch diffusers' gradient checkpointing.
REMAT_BLOCKS = ("FlaxResnetBlock2D", "FlaxTransformer2DModel")
_INSIDE_REMAT_BLOCK = contextvars.ContextVar("inside_remat_block", default=False)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
    """The trained part of the model: UNet params, their AdamW state and the update count."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


@flax.struct.dataclass
class FrozenInputs:
    """What the step reads but never trains: VAE and text encoder weights, the noise schedule."""

    vae: Params
    text_encoder: Params
    noise_schedule: schedulers.NoiseSchedule


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) settings of the train step."""

    prior_loss_weight: float = 1.0
    grad_accum_steps: int = 1
    remat: bool = False

    @classmethod
    def from_config(cls, train_config) -> StepConfig:
        """Returns the step settings of `config.train`."""
        if train_config.prior_loss_weight < 0:
            raise ValueError(
                f"train.prior_loss_weight must be >= 0, got {train_config.prior_loss_weight}"
            )
        return cls(
            prior_loss_weight=float(train_config.prior_loss_weight),
            grad_accum_steps=int(train_config.grad_accum_steps),
            remat=bool(train_config.remat),
        )


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Returns the learning rate per update: constant or cosine decay, after a linear warmup."""
    lr, warmup, steps = train_config.learning_rate, train_config.warmup_steps, train_config.steps
    if train_config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"train.lr_schedule {train_config.lr_schedule!r} is not one of {LR_SCHEDULES}"
        )
    if not 0 <= warmup <= steps:
        raise ValueError(f"train.warmup_steps={warmup} must lie in [0, train.steps={steps}]")
    if train_config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Returns AdamW (decoupled weight decay) after global-norm clipping of the UNet gradient."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(train_config),
            b1=train_config.adam_b1,
            b2=train_config.adam_b2,
            eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def per_example_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Returns the float32 mean squared error of each example (mean over all but axis 0)."""
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return error.reshape(error.shape[0], -1).mean(axis=1)


def example_counts(is_prior: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (number of instance examples, number of class examples) of a batch."""
    is_prior = is_prior.astype(bool)
    return jnp.sum(~is_prior), jnp.sum(is_prior)


def weighted_dreambooth_loss(
    per_example_loss: jax.Array,
    weight: jax.Array,
    is_prior: jax.Array,
    prior_loss_weight: float,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, {instance_loss, prior_loss}) of DreamBooth with absolute example weights.

    loss = sum_instance(w * l) / n_instance + prior_loss_weight * sum_class(w * l) / n_class, with
    (n_instance, n_class) = `counts`, by default this batch's; pass the whole global batch's
    when this batch is one micro-batch of it. The weights are never normalised: an example of
    weight w pulls exactly w times as hard as one of weight 1, even alone in its batch.
    """
    is_prior = is_prior.astype(bool)
    num_instance, num_prior = example_counts(is_prior) if counts is None else counts
    weighted = weight.astype(jnp.float32) * per_example_loss
    instance_loss = jnp.sum(jnp.where(is_prior, 0.0, weighted)) / jnp.maximum(num_instance, 1)
    prior_loss = jnp.sum(jnp.where(is_prior, weighted, 0.0)) / jnp.maximum(num_prior, 1)
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}


def encode_latent_moments(
    sd: StableDiffusion, vae_params: Params, pixels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Returns the VAE posterior's (mean, std) of NHWC pixels in [-1, 1], scaled NCHW float32.

    mean + std * eps, eps ~ N(0, I), is distributed as `sd.encode_images`; keeping the
    (deterministic) encoder apart from the sampling lets fixed images be encoded once per round.
    """
    posterior = sd.vae.apply(
        {"params": vae_params}, jnp.transpose(pixels, (0, 3, 1, 2)), method=sd.vae.encode
    ).latent_dist

    def scaled_nchw(x):
        return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32) * sd.latent_scale

    return scaled_nchw(posterior.mean), scaled_nchw(posterior.std)


def draw_step_randomness(
    key: jax.Array, sd: StableDiffusion, batch: Batch, num_train_timesteps: int
) -> dict[str, jax.Array]:
    """Returns the noise, timesteps and posterior draws of every example of the global batch.

    Drawn for the whole global batch at once (partitionable threefry), so they depend neither on
    the device count and sharding nor on the split into accumulation micro-batches.
    """
    if "latent_mean" in batch:
        latent = tuple(batch["latent_mean"].shape[1:])
    else:
        height, width = batch["pixel_values"].shape[1:3]
        latent = (sd.latent_channels, height // sd.vae_scale_factor, width // sd.vae_scale_factor)
    num_examples = batch["weight"].shape[0]
    noise_key, time_key, posterior_key = jax.random.split(key, 3)
    return {
        "noise": jax.random.normal(noise_key, (num_examples,) + latent, jnp.float32),
        "timesteps": jax.random.randint(time_key, (num_examples,), 0, num_train_timesteps),
        "posterior_eps": jax.random.normal(posterior_key, (num_examples,) + latent, jnp.float32),
    }


def _remat_blocks(next_fun, args, kwargs, context):
    """Flax method interceptor: runs the __call__ of REMAT_BLOCKS under nn.remat."""
    module = context.module
    if (
        _INSIDE_REMAT_BLOCK.get()
        or context.method_name != "__call__"
        or type(module).__name__ not in REMAT_BLOCKS
    ):
        return next_fun(*args, **kwargs)
    static = tuple(i + 1 for i, arg in enumerate(args) if not isinstance(arg, jax.Array))

    def block(remat_module, *block_args):
        # The remat'ed clone's call comes back through this interceptor: let it run plainly.
        token = _INSIDE_REMAT_BLOCK.set(True)
        try:
            return remat_module(*block_args, **kwargs)
        finally:
            _INSIDE_REMAT_BLOCK.reset(token)

    return nn.remat(block, static_argnums=static)(module, *args)


def apply_unet(sd: StableDiffusion, params: Params, latents, timesteps, context, remat: bool):
    """Returns the UNet prediction; with `remat`, resnet and transformer blocks are recomputed in
    the backward pass instead of stored. (SD UNets have no dropout: inference mode is exact.)"""
    if not remat:
        return sd.apply_unet(params, latents, timesteps, context)
    with nn.intercept_methods(_remat_blocks):
        return sd.apply_unet(params, latents, timesteps, context)


def dreambooth_loss(
    unet_params: Params,
    batch: Batch,
    frozen: FrozenInputs,
    *,
    sd: StableDiffusion,
    config: StepConfig,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, parts) of a batch carrying its randomness (see draw_step_randomness).

    The batch holds `pixel_values` (encoded here) or cached `latent_mean` and `latent_std`.
    """
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = encode_latent_moments(sd, frozen.vae, batch["pixel_values"])
    latents = jax.lax.stop_gradient(mean + std * batch["posterior_eps"])
    context = jax.lax.stop_gradient(sd.encode_text(frozen.text_encoder, batch["input_ids"]))
    schedule, t = frozen.noise_schedule, jnp.asarray(batch["timesteps"])  # the UNet wants jax
    noisy = schedulers.add_noise(schedule, latents, batch["noise"], t)
    target = schedulers.training_target(schedule, latents, batch["noise"], t, sd.prediction_type)
    prediction = apply_unet(sd, unet_params, noisy, t, context, config.remat)
    return weighted_dreambooth_loss(
        per_example_mse(prediction, target),
        batch["weight"],
        batch["is_prior"],
        config.prior_loss_weight,
        counts,
    )


# ---------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """Returns the batch as (num_micro, rows / num_micro, ...): micro-batch j takes rows j,
    j + num_micro, ..., so every device keeps its own rows."""

    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _loss_and_grads(params, batch, frozen, *, sd, config) -> tuple[Params, dict[str, jax.Array]]:
    """Returns (UNet gradient, loss metrics) of the global batch, accumulated over micro-batches.

    Every micro-batch divides by the example counts of the whole batch, so the sums over the
    micro-batches are the loss and gradient of the batch taken at once.
    """
    counts = example_counts(batch["is_prior"])

    def loss_fn(p, b):
        loss, parts = dreambooth_loss(p, b, frozen, sd=sd, config=config, counts=counts)
        return loss, {"loss": loss, **parts}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if config.grad_accum_steps == 1:
        (_, metrics), grads = grad_fn(params, batch)
        return grads, metrics

    def accumulate(carry, micro_batch):
        (_, metrics), grads = grad_fn(params, micro_batch)
        return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

    zero = jnp.zeros((), jnp.float32)
    totals = (jax.tree_util.tree_map(jnp.zeros_like, params),
              {"loss": zero, "instance_loss": zero, "prior_loss": zero})
    micro_batches = _split_micro_batches(batch, config.grad_accum_steps)
    (grads, metrics), _ = jax.lax.scan(accumulate, totals, micro_batches)
    return grads, metrics


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    frozen: FrozenInputs,
    *,
    sd: StableDiffusion,
    config: StepConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Returns the state after one AdamW update on the global `batch`, and the step's metrics.

    The step's randomness is fold_in(rng, step): it depends on the step alone, never on the
    device count, so a resumed run draws what the uninterrupted run would have drawn.
    """
    key = jax.random.fold_in(rng, state.step)
    num_train_timesteps = frozen.noise_schedule.alphas_cumprod.shape[0]
    batch = {**batch, **draw_step_randomness(key, sd, batch, num_train_timesteps)}
    grads, metrics = _loss_and_grads(state.params, batch, frozen, sd=sd, config=config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------
# Sharded state and the compiled step
# ---------------------------------------------------------------------------------------------


def _new_state(unet_params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    # Copied, so that donating the state to the step never frees the caller's base weights.
    params = jax.tree_util.tree_map(jnp.copy, unet_params)
    step = jnp.zeros((), jnp.int32)
    return TrainState(step=step, params=params, opt_state=optimizer.init(params))


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    """Returns the tree of ShapeDtypeStructs with the given shardings (a tree, or one for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, abstract)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def shardings_of(tree: Any) -> Any:
    """Returns the tree of shardings of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree_util.tree_map(lambda a: a.sharding, tree)


def abstract_train_state(
    unet_params: Params, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Returns the TrainState as ShapeDtypeStructs carrying their shardings (nothing allocated).

    `unet_params` may be abstract. Params and AdamW moments (whose path names end in the param
    names) are sharded by the partition rules of `sharding`; scalars are replicated.
    """
    abstract = jax.eval_shape(functools.partial(_new_state, optimizer=optimizer), unet_params)
    return _with_shardings(abstract, sharding.param_shardings(abstract, mesh))


def init_train_state(
    unet_params: Params, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Returns a fresh TrainState (step 0, copied params, zero AdamW moments) laid out on `mesh`."""
    state_shardings = shardings_of(abstract_train_state(unet_params, optimizer, mesh))
    init = jax.jit(
        functools.partial(_new_state, optimizer=optimizer),
        in_shardings=(state_shardings.params,),
        out_shardings=state_shardings,
    )
    return init(jax.device_put(unet_params, state_shardings.params))


def _frozen_inputs(base_params: StableDiffusionParams, sd: StableDiffusion) -> FrozenInputs:
    return FrozenInputs(
        vae=base_params.vae,
        text_encoder=base_params.text_encoder,
        noise_schedule=schedulers.make_noise_schedule(sd.scheduler_config),
    )


def place_frozen(
    base_params: StableDiffusionParams, sd: StableDiffusion, mesh: Mesh
) -> FrozenInputs:
    """Returns the frozen VAE and text encoder weights and the noise schedule, on `mesh`."""
    frozen = _frozen_inputs(base_params, sd)
    return jax.device_put(frozen, sharding.param_shardings(frozen, mesh))


def abstract_batch(
    sd: StableDiffusion, mesh: Mesh, *, num_examples: int, resolution: int, cached_latents: bool
) -> Batch:
    """Returns the ShapeDtypeStructs of a global batch of `num_examples` rows (instance + class),
    sharded over the mesh's batch axes."""
    rows = (num_examples,)
    batch = {
        "input_ids": jax.ShapeDtypeStruct(rows + (sd.max_length,), jnp.int32),
        "weight": jax.ShapeDtypeStruct(rows, jnp.float32),
        "is_prior": jax.ShapeDtypeStruct(rows, jnp.bool_),
    }
    if cached_latents:
        size = resolution // sd.vae_scale_factor
        moments = jax.ShapeDtypeStruct(rows + (sd.latent_channels, size, size), jnp.float32)
        batch.update(latent_mean=moments, latent_std=moments)
    else:
        pixels = rows + (resolution, resolution, 3)
        batch["pixel_values"] = jax.ShapeDtypeStruct(pixels, jnp.float32)
    return _with_shardings(batch, sharding.batch_sharding(mesh))


def check_batch_layout(
    num_examples: int, grad_accum_steps: int, mesh: Mesh, what: str = "examples a micro-batch"
) -> None:
    """Raises ValueError unless the batch splits into equal micro-batches that split evenly
    over the mesh."""
    if num_examples % grad_accum_steps:
        raise ValueError(
            f"a batch of {num_examples} examples does not split into train.grad_accum_steps="
            f"{grad_accum_steps} equal micro-batches"
        )
    sharding.check_batch_divisible(num_examples // grad_accum_steps, mesh, what=what)


def compile_train_step(
    sd: StableDiffusion,
    optimizer: optax.GradientTransformation,
    config: StepConfig,
    mesh: Mesh,
    abstract_state: TrainState,
    batch_spec: Batch,
    abstract_frozen: FrozenInputs,
) -> jax.stages.Compiled:
    """Returns the train step compiled ahead of time for these shapes, with the state donated.

    Call it as compiled(state, batch, rng, frozen). A batch of another shape raises instead of
    recompiling; `compiled.cost_analysis()` gives its FLOPs.
    """
    check_batch_layout(batch_spec["weight"].shape[0], config.grad_accum_steps, mesh)
    state_shardings = shardings_of(abstract_state)
    replicated = sharding.replicated(mesh)
    in_shardings = (
        state_shardings,
        sharding.batch_sharding(mesh),
        replicated,
        sharding.param_shardings(abstract_frozen, mesh),
    )
    step = jax.jit(
        functools.partial(train_step, sd=sd, config=config, optimizer=optimizer),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    abstract_key = jax.eval_shape(jax.random.key, 0)
    start = time.perf_counter()
    compiled = step.lower(abstract_state, batch_spec, abstract_key, abstract_frozen).compile()
    logging.info("Compiled the train step in %.1f s.", time.perf_counter() - start)
    return compiled


# ---------------------------------------------------------------------------------------------
# Latent cache (without random augmentation, an image always gives the same pixels)
# ---------------------------------------------------------------------------------------------


def _image_key(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """VAE posterior moments of every distinct training image, found by the image's pixel bytes.

    Valid only without random augmentation: then the pipeline yields an image's pixels bit for
    bit the same every time, so the bytes identify it.
    """

    rows: dict[bytes, int]
    mean: np.ndarray  # (num_images, C, h, w), scaled latents
    std: np.ndarray

    def replace_pixels(self, batch: Batch) -> Batch:
        """Returns the host batch with pixel_values replaced by cached latent_mean/latent_std."""
        try:
            rows = [self.rows[_image_key(pixels)] for pixels in batch["pixel_values"]]
        except KeyError:
            raise ValueError(
                "an image of the batch is not in the latent cache: latents can only be cached "
                "when the data pipeline does not augment (data.random_crop and data.flip off)"
            ) from None
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        return {**rest, "latent_mean": self.mean[rows], "latent_std": self.std[rows]}


def build_latent_cache(
    train_set_dir: Path,
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    resolution: int,
    chunk_size: int,
) -> LatentCache:
    """Returns the latent moments of every distinct image of the training set, each encoded once.

    One pass over the set through the training pipeline itself (unaugmented), so the cached
    pixels are exactly those training sees; `encode` maps (chunk_size, H, W, 3) pixels to host
    (mean, std).
    """
    one_pass = data.make_train_iterator(
        train_set_dir, global_batch_size=1, seed=0, resolution=resolution, num_epochs=1
    )
    rows: dict[bytes, int] = {}
    pending: list[np.ndarray] = []
    moments: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in one_pass:
        for pixels in batch["pixel_values"]:
            key = _image_key(pixels)
            if key not in rows:
                rows[key] = len(rows)
                pending.append(pixels)
        if len(pending) >= chunk_size:
            moments.append(_encode_padded(encode, pending[:chunk_size], chunk_size))
            pending = pending[chunk_size:]
    if pending:
        moments.append(_encode_padded(encode, pending, chunk_size))
    mean, std = (np.concatenate(parts) for parts in zip(*moments))
    return LatentCache(rows=rows, mean=mean, std=std)


def _encode_padded(encode, images: list[np.ndarray], chunk_size: int):
    """Returns encode() of the images, padded to one chunk shape (so it compiles once)."""
    pixels = np.stack(images + [images[-1]] * (chunk_size - len(images)))
    mean, std = encode(pixels)
    return mean[: len(images)], std[: len(images)]


# ---------------------------------------------------------------------------------------------
# The round's training loop
# ---------------------------------------------------------------------------------------------


class _MetricLog:
    """Step metrics kept on device until a log step, then pulled, checked and shown in a bar."""

    def __init__(self, *, total: int, start: int, examples_per_step: int, progress: bool):
        self.history: list[dict[str, float]] = []
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._examples_per_step = examples_per_step
        self._bar = tqdm(
            total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
            disable=not progress or jax.process_index() != 0,
        )
        self._since = time.perf_counter()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))
        self._bar.update(1)

    def pull(self) -> None:
        """Fetches the pending metrics; raises NonFiniteLossError naming the first bad step."""
        steps = [step for step, _ in self._pending]
        values = jax.device_get([metrics for _, metrics in self._pending])
        for step, metrics in zip(steps, values):
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(f"training loss is {metrics['loss']} at step {step}")
        elapsed = time.perf_counter() - self._since
        summary = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
        summary.update(step=steps[-1], samples_per_s=len(steps) * self._examples_per_step / elapsed)
        self.history.append(summary)
        self._bar.set_postfix(
            loss=f"{summary['loss']:.4f}", samples_per_s=f"{summary['samples_per_s']:.1f}"
        )
        self._pending, self._since = [], time.perf_counter()

    def __enter__(self) -> _MetricLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self._bar.close()


class Trainer:
    """Fine-tunes the UNet from the base weights, once per GAL round; built once per run.

    Owns the compiled train step (compiled at the first batch of the first round, then reused by
    every step of every round), the optimizer and the latent encoder.
    """

    def __init__(self, config, sd: StableDiffusion, mesh: Mesh):
        _check_train_config(config.train)
        self.config, self.sd, self.mesh = config, sd, mesh
        self.optimizer = make_optimizer(config.train)
        self.step_config = StepConfig.from_config(config.train)
        augment = config.data.random_crop or config.data.flip
        self.cache_latents = bool(config.train.cache_latents) and not augment
        self.compile_seconds = 0.0
        self._compiled: dict[Any, jax.stages.Compiled] = {}
        self._encode = jax.jit(
            functools.partial(encode_latent_moments, sd), out_shardings=sharding.replicated(mesh)
        )

    @property
    def num_compiles(self) -> int:
        """Returns how many times the train step has been compiled."""
        return len(self._compiled)

    def train_round(
        self,
        base_params: StableDiffusionParams,
        train_set_dir: Path,
        checkpoint_dir: Path | None = None,
        progress: bool = True,
    ) -> tuple[Params, dict[str, Any]]:
        """Returns (UNet params after train.steps updates from base_params.unet, metrics).

        With a checkpoint_dir: saves every train.checkpoint_every steps and at the end, keeps the
        last train.keep_checkpoints, and resumes from the latest one there (params, AdamW state,
        step, data position). `base_params` is never modified or donated. Metrics: start_step,
        steps, loss (mean of the last log window), history (a dict per log step), and when steps
        ran, train_seconds, samples_per_s and compile_seconds.
        """
        train_set_dir = Path(train_set_dir)
        self.check_train_set(train_set_dir)
        frozen = place_frozen(base_params, self.sd, self.mesh)
        iterator = self._data_iterator(train_set_dir)
        ckpt = None
        if checkpoint_dir is not None:
            keep = self.config.train.keep_checkpoints
            ckpt = checkpoint.Checkpointer(checkpoint_dir, max_to_keep=keep)
        try:
            state, loss = self._initial_state(base_params.unet, iterator, ckpt)
            start = int(jax.device_get(state.step))
            if start >= self.config.train.steps:
                done = {"start_step": start, "steps": start, "loss": loss, "history": []}
                return state.params, done
            cache = self._latent_cache(train_set_dir, frozen) if self.cache_latents else None
            batches = (self._device_batch(batch, cache) for batch in iterator)
            return self._run(state, batches, frozen, iterator, ckpt, progress, train_set_dir)
        finally:
            if ckpt is not None:
                ckpt.close()

    def check_train_set(self, train_set_dir: Path) -> None:
        """Raises ValueError when the set's batches cannot be split evenly over the mesh."""
        _, metadata = data.open_training_set(train_set_dir)
        halves = 2 if metadata["num_class_images"] else 1
        train = self.config.train
        check_batch_layout(
            halves * train.batch_size * train.grad_accum_steps,
            train.grad_accum_steps,
            self.mesh,
            what=f"examples a micro-batch (train.batch_size={train.batch_size}, "
            f"{halves} per instance)",
        )

    def compiled_step(
        self, state: TrainState, batch: Batch, frozen: FrozenInputs
    ) -> jax.stages.Compiled:
        """Returns the step compiled for these arrays' shapes (compiling the first time only)."""
        specs = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (state, batch, frozen),
        )
        return self._compiled_for(specs)

    def compile_for(
        self, base_params: StableDiffusionParams, num_examples: int
    ) -> jax.stages.Compiled:
        """Returns the step compiled for `base_params` (arrays or ShapeDtypeStructs) and global
        batches of `num_examples` rows, without reading data: for benchmarks."""
        state = abstract_train_state(base_params.unet, self.optimizer, self.mesh)
        frozen = jax.eval_shape(functools.partial(_frozen_inputs, sd=self.sd), base_params)
        frozen = _with_shardings(frozen, sharding.param_shardings(frozen, self.mesh))
        batch = abstract_batch(
            self.sd, self.mesh, num_examples=num_examples, resolution=self.config.data.resolution,
            cached_latents=self.cache_latents,
        )
        return self._compiled_for((state, batch, frozen))

    def _compiled_for(self, specs: tuple[TrainState, Batch, FrozenInputs]) -> jax.stages.Compiled:
        leaves, treedef = jax.tree_util.tree_flatten(specs)
        key = (treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = compile_train_step(
                self.sd, self.optimizer, self.step_config, self.mesh, *specs
            )
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def _data_iterator(self, train_set_dir: Path):
        train, data_config = self.config.train, self.config.data
        return data.make_train_iterator(
            train_set_dir,
            global_batch_size=train.batch_size * train.grad_accum_steps,
            seed=train.seed,
            resolution=data_config.resolution,
            random_crop=data_config.random_crop,
            flip=data_config.flip,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def _initial_state(self, unet_params, iterator, ckpt) -> tuple[TrainState, float | None]:
        """Returns (state, its last logged loss): the latest checkpoint's, moving `iterator` to
        the position saved with it, or a fresh state."""
        if ckpt is None or ckpt.latest_step() is None:
            return init_train_state(unet_params, self.optimizer, self.mesh), None
        abstract = abstract_train_state(unet_params, self.optimizer, self.mesh)
        restored = ckpt.restore(abstract, data_iterator=iterator)
        total = restored.metadata.get("total_steps")
        if total != self.config.train.steps:
            raise checkpoint.CheckpointError(
                f"{ckpt.directory}: checkpoint {restored.step} belongs to a run of {total} steps, "
                f"this one has train.steps={self.config.train.steps}; use another checkpoint folder"
            )
        logging.info("Resuming training from %s at step %d.", ckpt.directory, restored.step)
        return restored.state, restored.metadata.get("loss")

    def _latent_cache(self, train_set_dir: Path, frozen: FrozenInputs) -> LatentCache:
        # Encodes a training batch of images at a time, rounded up to fill every device.
        shards = sharding.batch_size_per_device_multiple(self.mesh)
        images = self.config.train.batch_size * self.config.train.grad_accum_steps
        spec = sharding.batch_sharding(self.mesh)

        def encode(pixels):
            pixels = jax.make_array_from_callback(pixels.shape, spec, lambda index: pixels[index])
            return jax.device_get(self._encode(frozen.vae, pixels))

        return build_latent_cache(
            train_set_dir, encode, resolution=self.config.data.resolution,
            chunk_size=shards * -(-images // shards),
        )

    def _device_batch(self, batch: Batch, cache: LatentCache | None) -> Batch:
        """Returns the global device batch assembled from this process's host batch."""
        if cache is not None:
            batch = cache.replace_pixels(batch)
        return sharding.global_batch_from_local(batch, self.mesh)

    def _run(self, state, batches, frozen, iterator, ckpt, progress, train_set_dir):
        """Returns (params, metrics) after the steps left from state.step."""
        train = self.config.train
        start = int(jax.device_get(state.step))
        rng = jax.device_put(jax.random.key(train.seed), sharding.replicated(self.mesh))
        first = next(batches)
        step_fn = self.compiled_step(state, first, frozen)
        per_step = first["weight"].shape[0]
        log = _MetricLog(
            total=train.steps, start=start, examples_per_step=per_step, progress=progress
        )
        began = time.perf_counter()
        # Every host<->device copy in the loop is explicit (big_vision): an implicit one is a bug.
        with log, jax.transfer_guard("disallow"):
            steps = zip(range(start + 1, train.steps + 1), itertools.chain([first], batches))
            for done, batch in steps:
                state, metrics = step_fn(state, batch, rng, frozen)
                log.add(done, metrics)
                last = done == train.steps
                save = ckpt is not None and (done % train.checkpoint_every == 0 or last)
                if save or last or done % train.log_every == 0:
                    log.pull()  # before saving: a non-finite state is never checkpointed
                if save:
                    metadata = {"total_steps": train.steps, "train_set": str(train_set_dir),
                                "loss": log.history[-1]["loss"]}
                    ckpt.save(done, state, metadata=metadata, data_iterator=iterator)
        seconds = time.perf_counter() - began
        return state.params, {
            "start_step": start,
            "steps": train.steps,
            "loss": log.history[-1]["loss"],
            "history": log.history,
            "train_seconds": seconds,
            "samples_per_s": (train.steps - start) * per_step / seconds,
            "compile_seconds": self.compile_seconds,
        }


def _check_train_config(train_config) -> None:
    """Raises ValueError naming the first train.* count that is not a positive integer."""
    names = ("steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
             "keep_checkpoints")
    for name in names:
        value = train_config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
