"""Weighted DreamBooth fine-tuning of the UNet: the loss, the sharded train step, its compilation.

Step 1 of a GAL round (GAL_SPEC.md): the model is fine-tuned from the *base* weights on the round's
references and their paired class images (prior preservation). What is trained is the method's
(`personalize.py`): the whole UNet (DreamBooth), LoRA deltas, new token embeddings, or a stage's
subset; the step differentiates only that part of the model tree and takes the rest, with the VAE,
as frozen input.

The math is pure functions of arrays (`weighted_dreambooth_loss`, `dreambooth_loss`, `train_step`).
`trainer.Trainer` is the edge that feeds them: the loop over rounds, data, latent cache,
checkpoints and progress bar.

The weights are absolute (GAL_SPEC.md): loss = mean over instance examples of w * mse +
prior_loss_weight * mean over class examples of w * mse, each mean dividing by the number of such
examples in the global batch, never by sum(w). Per-example losses are reduced once over the global
batch (scenic style), so the loss does not depend on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from gal_jax import loss_terms as loss_terms_lib
from gal_jax import personalize, schedulers, sharding
from gal_jax.models import StableDiffusion
from gal_jax.nn import layers as nn_layers

Params = Any
Batch = dict[str, Any]
LR_SCHEDULES = ("constant", "cosine")
# How the step sums the batch shards' gradients (config.train.grad_all_reduce): "xla" leaves it to
# the SPMD partitioner (one all-reduce per gradient leaf, which GPU and TPU compilers combine),
# "flat" sums them in one all-reduce of the flattened gradients inside a shard_map, "auto" takes
# "flat" on the CPU backend where the layout allows it (XLA:CPU runs each of its hundreds of
# all-reduces alone) and "xla" elsewhere.
GRAD_ALL_REDUCES = ("auto", "xla", "flat")


@flax.struct.dataclass
class TrainState:
    """The trained part of the model tree (`personalize.split`), its AdamW state and the update count."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


@flax.struct.dataclass
class FrozenInputs:
    """What the step reads but never trains: the VAE, the untrained part of the model tree (e.g.
    the text encoder, or the whole base UNet under LoRA), the noise schedule."""

    vae: Params
    model: Params
    noise_schedule: schedulers.NoiseSchedule


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) settings of the train step."""

    prior_loss_weight: float = 1.0
    grad_accum_steps: int = 1
    remat: str = "none"  # a policy of nn.layers.REMAT_POLICIES
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma weighting of every example's loss (0: plain MSE)
    lora_scale: float = 1.0  # alpha / rank of the model tree's LoRA deltas
    # The active extra loss terms, ((name, settings), ...) (loss_terms.active_terms), and the id of
    # the method's new token (-1: none), which terms such as AttnDreamBooth's watch.
    loss_terms: tuple[tuple[str, loss_terms_lib.Settings], ...] = ()
    new_token_id: int = -1
    grad_all_reduce: str = "auto"  # one of GRAD_ALL_REDUCES

    @property
    def captures_attention(self) -> bool:
        return bool(loss_terms_lib.names_with(self.loss_terms, "captures_attention"))

    @property
    def needs_reference(self) -> bool:
        return bool(loss_terms_lib.names_with(self.loss_terms, "needs_reference"))

    @property
    def replaces_instance_loss(self) -> bool:
        return bool(loss_terms_lib.names_with(self.loss_terms, "replaces_instance_loss"))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the loss metrics the step returns."""
        return ("loss", "instance_loss", "prior_loss") + tuple(
            loss_terms_lib.metric_name(name) for name, _ in self.loss_terms)

    @classmethod
    def from_config(cls, train_config, *, lora_scale: float = 1.0, new_token_id: int = -1,
                    where: str = "train") -> StepConfig:
        """Returns the step settings of `config.train` (or a stage's, named `where` in errors);
        `lora_scale` and `new_token_id` come from the method (personalize.Method)."""
        if train_config.prior_loss_weight < 0:
            raise ValueError(
                f"{where}.prior_loss_weight must be >= 0, got {train_config.prior_loss_weight}"
            )
        snr_gamma = float(train_config.get("snr_gamma", 0.0))
        if not snr_gamma >= 0:
            raise ValueError(f"{where}.snr_gamma must be >= 0 (0: off; diffusers' scripts suggest 5), got {snr_gamma}")
        grad_all_reduce = train_config.get("grad_all_reduce", "auto")
        if grad_all_reduce not in GRAD_ALL_REDUCES:
            raise ValueError(f"{where}.grad_all_reduce={grad_all_reduce!r}: expected one of {', '.join(GRAD_ALL_REDUCES)}")
        for legacy in ("attention_loss_mean", "attention_loss_var"):
            if legacy in train_config:
                raise ValueError(f"{where}.{legacy} is now {where}.loss_terms.attention_map.{legacy.rpartition('_')[2]}")
        return cls(
            prior_loss_weight=float(train_config.prior_loss_weight),
            grad_accum_steps=int(train_config.grad_accum_steps),
            remat=nn_layers.remat_policy(train_config.remat, f"{where}.remat"),
            snr_gamma=snr_gamma,
            lora_scale=float(lora_scale),
            loss_terms=loss_terms_lib.active_terms(train_config.get("loss_terms"), new_token_id=new_token_id,
                                                   where=f"{where}.loss_terms"),
            new_token_id=int(new_token_id),
            grad_all_reduce=grad_all_reduce,
        )


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(train_config, where: str = "train") -> optax.Schedule:
    """Returns the learning rate per update: constant or cosine decay, after a linear warmup.
    Errors name the settings as `where`.<field> (config.train, or a stage's)."""
    lr, warmup, steps = train_config.learning_rate, train_config.warmup_steps, train_config.steps
    if train_config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"{where}.lr_schedule {train_config.lr_schedule!r} is not one of {LR_SCHEDULES}"
        )
    if not 0 <= warmup <= steps:
        raise ValueError(f"{where}.warmup_steps={warmup} must lie in [0, {where}.steps={steps}]")
    if train_config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)


def make_optimizer(train_config, where: str = "train") -> optax.GradientTransformation:
    """Returns AdamW (decoupled weight decay) after global-norm clipping of the gradient
    (train.max_grad_norm; 0 turns clipping off, as AttnDreamBooth's code effectively runs).
    Errors name the settings as `where`.<field> (config.train, or a stage's)."""
    if train_config.max_grad_norm < 0:
        raise ValueError(f"{where}.max_grad_norm={train_config.max_grad_norm} must be >= 0 (0: no clipping)")
    clip = optax.clip_by_global_norm(train_config.max_grad_norm) if train_config.max_grad_norm > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(
            learning_rate_schedule(train_config, where),
            b1=train_config.adam_b1,
            b2=train_config.adam_b2,
            eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def per_example_mse(prediction: jax.Array, target: jax.Array, pixel_weight: jax.Array | None = None) -> jax.Array:
    """Returns the float32 mean squared error of each example (mean over all but axis 0), each
    latent pixel's error times `pixel_weight` (B, h, w) when given (MuDI's masked loss: the mean
    over all elements of mask * error, not divided by the mask's sum)."""
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    if pixel_weight is not None:
        error = error * pixel_weight.astype(jnp.float32)[:, None]
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


def dreambooth_loss(
    trained: Params,
    batch: Batch,
    frozen: FrozenInputs,
    *,
    sd: StableDiffusion,
    config: StepConfig,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, parts) of a batch carrying its randomness (see draw_step_randomness).

    `trained` is the trained part of the model tree, `frozen.model` the rest (personalize.split).
    The batch holds `pixel_values` (encoded here) or cached `latent_mean` and `latent_std`, and
    optionally `loss_mask` (B, h, w) at latent resolution weighing each pixel's error (MuDI's
    soft mask, multi_subject.soft_mask). The config's extra loss terms (loss_terms.py) are added
    to the loss and returned among the parts.
    """
    tree = personalize.merge(trained, frozen.model)
    unet_params, text_params = personalize.materialize(tree, config.lora_scale)
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = sd.encode_posterior(frozen.vae, batch["pixel_values"])
    latents = jax.lax.stop_gradient(mean + std * batch["posterior_eps"])
    # Gradients reach the text encoder only where the trained part holds some of it (new tokens).
    context = sd.encode_text(text_params, batch["input_ids"])
    schedule, t = frozen.noise_schedule, jnp.asarray(batch["timesteps"])  # the UNet wants jax
    noisy = schedulers.add_noise(schedule, latents, batch["noise"], t)
    target = schedulers.training_target(schedule, latents, batch["noise"], t, sd.prediction_type)
    probabilities = None
    if config.captures_attention:
        prediction, probabilities = sd.apply_unet(unet_params, noisy, t, context, remat=config.remat,
                                                  capture_attention=True)
    else:
        prediction = sd.apply_unet(unet_params, noisy, t, context, remat=config.remat)
    def example_losses(predicted):
        per_example = per_example_mse(predicted, target, batch.get("loss_mask"))
        if config.snr_gamma > 0:
            per_example = per_example * schedulers.min_snr_weight(schedule, t, config.snr_gamma, sd.prediction_type)
        return per_example

    per_example = example_losses(prediction)
    counts = example_counts(batch["is_prior"]) if counts is None else counts
    loss, parts = weighted_dreambooth_loss(per_example, batch["weight"], batch["is_prior"],
                                           config.prior_loss_weight, counts)
    if config.loss_terms:
        reference = None
        if config.needs_reference:
            reference = example_losses(_reference_prediction(tree, noisy, t, context, sd=sd, config=config))
        outputs = loss_terms_lib.StepOutputs(batch=batch, prediction=prediction, target=target,
                                             per_example_loss=per_example, counts=counts,
                                             attention=probabilities, new_token_id=config.new_token_id,
                                             reference_loss=reference)
        extra = loss_terms_lib.compute_terms(config.loss_terms, outputs)
        parts.update(extra)
        if config.replaces_instance_loss:  # e.g. DCO: the term stands for the instance loss
            loss = loss - parts["instance_loss"]
        loss = loss + sum(extra.values())
    return loss, parts


def _reference_prediction(tree: Params, noisy: jax.Array, t: jax.Array, context: jax.Array, *,
                          sd: StableDiffusion, config: StepConfig) -> jax.Array:
    """Returns the base UNet's prediction (the model tree with its LoRA deltas off), without
    gradient: the reference of loss terms such as DCO. Only LoRA methods keep the base UNet
    apart from what they train; for the others there is no reference to compare with."""
    if "lora" not in tree or "unet" not in tree["lora"]:
        names = ", ".join(loss_terms_lib.names_with(config.loss_terms, "needs_reference"))
        raise ValueError(f"train.loss_terms.{names} compares the model with its base UNet, which only the LoRA "
                         "method keeps apart from what it trains (set train.method='lora')")
    return jax.lax.stop_gradient(sd.apply_unet(tree["unet"], noisy, t, jax.lax.stop_gradient(context),
                                               remat=config.remat))


# ---------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """Returns the batch as (num_micro, rows / num_micro, ...): micro-batch j takes rows j,
    j + num_micro, ..., so every device keeps its own rows."""

    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _loss_and_grads(params, batch, frozen, *, sd, config, counts=None) -> tuple[Params, dict[str, jax.Array]]:
    """Returns (gradient of the trained part, loss metrics) of the global batch, accumulated over
    micro-batches.

    Every micro-batch divides by the example counts of the whole batch (`counts`, by default those
    of `batch`), so the sums over the micro-batches are the loss and gradient of the batch taken
    at once.
    """
    counts = example_counts(batch["is_prior"]) if counts is None else counts

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
    totals = (jax.tree_util.tree_map(jnp.zeros_like, params), {name: zero for name in config.metric_names})
    micro_batches = _split_micro_batches(batch, config.grad_accum_steps)
    (grads, metrics), _ = jax.lax.scan(accumulate, totals, micro_batches)
    return grads, metrics


def _flat_all_reduced_loss_and_grads(params, batch, frozen, *, sd, config, mesh: Mesh) -> tuple[Params, dict]:
    """Returns what `_loss_and_grads` does, each batch shard taking its own rows (divided by the
    whole batch's example counts, so the shards' parts add up to the batch's) and the parts
    summed in one all-reduce of the flattened gradients and metrics.

    Needs replicated weights (`flat_all_reduce_obstacle`). The step's randomness is drawn for the
    global batch before it is split, so the draws are the same as with "xla"; only the order of
    the gradient's sums differs.
    """
    counts = example_counts(batch["is_prior"])

    def per_shard(params, batch, frozen, counts):
        with sharding.without_activation_sharding():  # the arrays here are each shard's block
            grads, metrics = _loss_and_grads(params, batch, frozen, sd=sd, config=config, counts=counts)
        flat, unravel = ravel_pytree(grads)
        flat, metrics = jax.lax.psum((flat, metrics), sharding.DATA_AXES)
        return unravel(flat), metrics

    replicated = sharding.REPLICATED
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(replicated, sharding.BATCH, replicated, replicated),
        out_specs=(replicated, replicated), check_vma=False,
    )(params, batch, frozen, counts)


def flat_all_reduce_obstacle(config: StepConfig, mesh: Mesh, shardings: Any) -> str | None:
    """Returns why the step cannot sum its gradients in one flattened all-reduce on `mesh` (with
    weights and frozen inputs laid out as the tree of `shardings`), or None when it can."""
    if mesh.shape["tensor"] > 1:
        return f"splits the batch only: mesh.tensor={mesh.shape['tensor']} splits the weights too"
    if not all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(shardings)):
        return (f"needs every weight replicated, and mesh.fsdp={mesh.shape['fsdp']} shards some of them "
                "(use grad_all_reduce='xla' or mesh.fsdp=1)")
    if config.loss_terms:
        names = ", ".join(name for name, _ in config.loss_terms)
        return (f"sums per-example losses only; train.loss_terms ({names}) are computed over the whole batch "
                "(use grad_all_reduce='xla')")
    return None


def uses_flat_all_reduce(config: StepConfig, mesh: Mesh, shardings: Any) -> bool:
    """Returns whether the step on `mesh` sums its gradients in one flattened all-reduce
    (config.grad_all_reduce, GRAD_ALL_REDUCES); raises ValueError naming the setting when "flat"
    was asked for and the layout does not allow it."""
    if config.grad_all_reduce == "xla" or sharding.num_batch_shards(mesh) == 1:
        return False
    obstacle = flat_all_reduce_obstacle(config, mesh, shardings)
    if config.grad_all_reduce == "flat":
        if obstacle:
            raise ValueError(f"train.grad_all_reduce='flat' {obstacle}")
        return True
    return obstacle is None and mesh.devices.flat[0].platform == "cpu"


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    frozen: FrozenInputs,
    *,
    sd: StableDiffusion,
    config: StepConfig,
    optimizer: optax.GradientTransformation,
    flat_all_reduce_mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Returns the state after one AdamW update on the global `batch`, and the step's metrics.

    The step's randomness is fold_in(rng, step): it depends on the step alone, never on the
    device count, so a resumed run draws what the uninterrupted run would have drawn. With
    `flat_all_reduce_mesh` the batch shards' gradients are summed in one flattened all-reduce
    over its batch axes (`uses_flat_all_reduce`).
    """
    key = jax.random.fold_in(rng, state.step)
    num_train_timesteps = frozen.noise_schedule.alphas_cumprod.shape[0]
    batch = {**batch, **draw_step_randomness(key, sd, batch, num_train_timesteps)}
    if flat_all_reduce_mesh is None:
        grads, metrics = _loss_and_grads(state.params, batch, frozen, sd=sd, config=config)
    else:
        grads, metrics = _flat_all_reduced_loss_and_grads(state.params, batch, frozen, sd=sd, config=config,
                                                          mesh=flat_all_reduce_mesh)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------
# Sharded state and the compiled step
# ---------------------------------------------------------------------------------------------


def _new_state(trained: Params, optimizer: optax.GradientTransformation) -> TrainState:
    # Copied, so that donating the state to the step never frees the caller's base weights.
    params = jax.tree_util.tree_map(jnp.copy, trained)
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
    trained: Params, optimizer: optax.GradientTransformation, mesh: Mesh, logical_axes: Params,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> TrainState:
    """Returns the TrainState as ShapeDtypeStructs carrying their shardings (nothing allocated).

    `trained` (the trained part of the model tree) may be abstract; `logical_axes` is the model
    tree's logical PartitionSpecs (`personalize.logical_axes(sd)`). Params and AdamW moments (whose
    paths end in the param paths) are sharded by those axes and `rules`; LoRA deltas, new token
    rows and scalars are replicated.
    """
    abstract = jax.eval_shape(functools.partial(_new_state, optimizer=optimizer), trained)
    return _with_shardings(abstract, sharding.param_shardings(abstract, mesh, logical_axes, rules))


def state_initializer(
    trained: Params, optimizer: optax.GradientTransformation, mesh: Mesh, logical_axes: Params,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> Callable[[Params], TrainState]:
    """Returns init(params) -> a fresh TrainState (step 0, copied params, zero AdamW moments) laid
    out on `mesh`, for params shaped like `trained` (arrays or ShapeDtypeStructs).

    Keep the function to initialise again: it compiles on its first call only, where a new
    jax.jit per round would compile (or at least look up the compilation cache) every round.
    """
    state_shardings = shardings_of(abstract_train_state(trained, optimizer, mesh, logical_axes, rules))
    init = jax.jit(
        functools.partial(_new_state, optimizer=optimizer),
        in_shardings=(state_shardings.params,),
        out_shardings=state_shardings,
    )
    return lambda params: init(jax.device_put(params, state_shardings.params))


def init_train_state(
    trained: Params, optimizer: optax.GradientTransformation, mesh: Mesh, logical_axes: Params,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> TrainState:
    """Returns a fresh TrainState (step 0, copied params, zero AdamW moments) laid out on `mesh`."""
    return state_initializer(trained, optimizer, mesh, logical_axes, rules)(trained)


def _frozen_inputs(vae: Params, rest: Params, sd: StableDiffusion) -> FrozenInputs:
    return FrozenInputs(vae=vae, model=rest, noise_schedule=schedulers.make_noise_schedule(sd.scheduler_config))


def frozen_shardings(
    frozen: FrozenInputs, sd: StableDiffusion, mesh: Mesh,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> FrozenInputs:
    """Returns the shardings of (possibly abstract) FrozenInputs: the VAE and the model tree's
    frozen part by their logical axes and `rules`, the noise schedule replicated."""
    return FrozenInputs(
        vae=sharding.param_shardings(frozen.vae, mesh, sd.logical_axes().vae, rules),
        model=sharding.param_shardings(frozen.model, mesh, personalize.logical_axes(sd), rules),
        noise_schedule=jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), frozen.noise_schedule),
    )


def place_frozen(
    vae: Params, rest: Params, sd: StableDiffusion, mesh: Mesh,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> FrozenInputs:
    """Returns the frozen VAE weights, the model tree's untrained part `rest` and the noise
    schedule, on `mesh`."""
    frozen = _frozen_inputs(vae, rest, sd)
    return jax.device_put(frozen, frozen_shardings(frozen, sd, mesh, rules))


def abstract_frozen_inputs(
    vae: Params, rest: Params, sd: StableDiffusion, mesh: Mesh,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
) -> FrozenInputs:
    """Returns the FrozenInputs as ShapeDtypeStructs carrying the shardings of `place_frozen`.

    `vae` and `rest` may be abstract.
    """
    frozen = jax.eval_shape(functools.partial(_frozen_inputs, sd=sd), vae, rest)
    return _with_shardings(frozen, frozen_shardings(frozen, sd, mesh, rules))


def abstract_batch(
    sd: StableDiffusion, mesh: Mesh, *, num_examples: int, resolution: int, cached_latents: bool,
    loss_mask: bool = False,
) -> Batch:
    """Returns the ShapeDtypeStructs of a global batch of `num_examples` rows (instance + class),
    sharded over the mesh's batch axes (with a per-pixel `loss_mask` when Seg-Mix is on)."""
    rows = (num_examples,)
    batch = {
        "input_ids": jax.ShapeDtypeStruct(rows + (sd.token_length,), jnp.int32),
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
    if loss_mask:
        size = resolution // sd.vae_scale_factor
        batch["loss_mask"] = jax.ShapeDtypeStruct(rows + (size, size), jnp.float32)
    return _with_shardings(batch, sharding.batch_sharding(mesh))


def check_batch_layout(num_examples: int, grad_accum_steps: int, mesh: Mesh, source: str = "") -> None:
    """Raises ValueError unless the batch splits into equal micro-batches that split evenly
    over the mesh; `source` says where the batch size comes from, e.g. "(train.batch_size=3,
    2 per instance)"."""
    if num_examples % grad_accum_steps:
        raise ValueError(
            f"a batch of {num_examples} examples does not split into train.grad_accum_steps="
            f"{grad_accum_steps} equal micro-batches"
        )
    micro, shards = num_examples // grad_accum_steps, sharding.num_batch_shards(mesh)
    if micro % shards:
        raise ValueError(
            f"a micro-batch of {micro} examples {source} does not split over the {shards} batch shards "
            f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}): make it a multiple of {shards}"
        )


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
    state_shardings, frozen_layout = shardings_of(abstract_state), shardings_of(abstract_frozen)
    replicated = sharding.replicated(mesh)
    in_shardings = (state_shardings, sharding.batch_sharding(mesh), replicated, frozen_layout)
    flat = uses_flat_all_reduce(config, mesh, (state_shardings, frozen_layout))
    if flat:
        logging.info("The train step sums its %d batch shards' gradients in one flattened all-reduce.",
                     sharding.num_batch_shards(mesh))
    step = jax.jit(
        functools.partial(train_step, sd=sd, config=config, optimizer=optimizer,
                          flat_all_reduce_mesh=mesh if flat else None),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    abstract_key = jax.eval_shape(jax.random.key, 0)
    start = time.perf_counter()
    with sharding.activation_sharding(mesh):  # the models' activation constraints apply while tracing
        compiled = step.lower(abstract_state, batch_spec, abstract_key, abstract_frozen).compile()
    logging.info("Compiled the train step in %.1f s.", time.perf_counter() - start)
    return compiled
