"""Extra terms of the train step's loss, registered by name (config.train.loss_terms).

The step's loss is the weighted DreamBooth loss (train.weighted_dreambooth_loss) plus one scalar
per active term, each computed inside the same jitted function from what the step already holds:
the batch, the UNet's prediction and target, the per-example losses and, for terms that ask for
them, the cross-attention probabilities the UNet's capture hook sows. A term is a pure function
`compute(outputs: StepOutputs, **settings) -> scalar` with named float settings:

    config.train.loss_terms.attention_map.mean = 2.0     # AttnDreamBooth's regularizer

A term whose settings leave it off (by default: weight 0) is not traced at all, so an unused term
costs nothing and a stage's terms change its step only through the stage's own compile. Stages
override a term's settings like any train.* field (`loss_terms=dict(attention_map=dict(mean=2.0))`).

To add a term, `register("name", LossTerm(compute, settings={"weight": 0.0, ...}))` before the run
starts (e.g. in the config module) and set `config.train.loss_terms.name = dict(weight=...)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# A term's settings as the (hashable) StepConfig keeps them: ((name, value), ...), sorted.
Settings = tuple[tuple[str, float], ...]


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What a loss term can read, for one (micro-)batch of the step.

    batch: the step's batch (input_ids, weight, is_prior, ... and its noise and timesteps);
    prediction, target: the UNet's output and the training target, (B, C, h, w) latents;
    per_example_loss: (B,) MSE of each example (Min-SNR-weighted when that is on), before the
        example weights; counts: (instance, class) examples in the *global* batch, so a term that
        averages divides by them and stays exact under gradient accumulation;
    attention: {layer name: (B, heads, pixels, tokens) probabilities} when a term captures them;
    new_token_id: the id of the method's new token (-1: none);
    reference_loss: (B,) the same per-example loss of the base UNet (LoRA deltas off, no
        gradient) when a term needs a reference.
    """

    batch: Mapping[str, Any]
    prediction: jax.Array
    target: jax.Array
    per_example_loss: jax.Array
    counts: tuple[jax.Array, jax.Array]
    attention: Mapping[str, jax.Array] | None = None
    new_token_id: int = -1
    reference_loss: jax.Array | None = None


def weight_is_on(settings: Mapping[str, float]) -> bool:
    return settings.get("weight", 0.0) != 0.0


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A registered term: `compute(outputs, **settings)` returns its scalar contribution (already
    weighted); `settings` names every setting with its default; `is_on(settings)` says whether the
    step computes it; `captures_attention` asks the UNet for its cross-attention probabilities;
    `needs_new_token` refuses methods without a new token; `needs_reference` asks for the base
    UNet's per-example losses (LoRA methods); `replaces_instance_loss`: the term stands for the
    instance part of the weighted loss instead of adding to it (at most one active term may);
    `check(settings)` returns an error message for settings it cannot use, or ''."""

    compute: Callable[..., jax.Array]
    settings: Mapping[str, float]
    is_on: Callable[[Mapping[str, float]], bool] = weight_is_on
    captures_attention: bool = False
    needs_new_token: bool = False
    needs_reference: bool = False
    replaces_instance_loss: bool = False
    check: Callable[[Mapping[str, float]], str] = lambda settings: ""


REGISTRY: dict[str, LossTerm] = {}


def register(name: str, term: LossTerm) -> LossTerm:
    """Adds `term` under `name` (a config key: letters, digits, underscores); returns it."""
    if not name.isidentifier():
        raise ValueError(f"loss term name {name!r} must be a Python identifier (it is a config key)")
    if name in REGISTRY and REGISTRY[name] is not term:
        raise ValueError(f"a loss term named {name!r} is already registered")
    REGISTRY[name] = term
    return term


def active_terms(loss_terms: Mapping[str, Mapping[str, float]] | None, *, new_token_id: int = -1,
                 where: str = "config.train.loss_terms") -> tuple[tuple[str, Settings], ...]:
    """Returns ((name, settings), ...) of the terms `loss_terms` turns on, in name order, each
    term's defaults completed by the given values.

    Raises ValueError naming the entry for a term that is not registered, a setting the term does
    not have, a value that is not a finite number, settings the term refuses, and a term that needs
    a new token when the method adds none.
    """
    active = []
    for name in sorted(loss_terms or {}):
        given = dict(loss_terms[name] or {})
        if name not in REGISTRY:
            raise ValueError(f"{where}.{name}: no loss term of that name (registered: {sorted(REGISTRY)})")
        term = REGISTRY[name]
        settings = dict(term.settings)
        for key, value in given.items():
            if key not in settings:
                raise ValueError(f"{where}.{name}.{key}: the term's settings are {sorted(settings)}")
            try:
                settings[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{name}.{key}={value!r} is not a number") from None
            if not math.isfinite(settings[key]):
                raise ValueError(f"{where}.{name}.{key}={value!r} is not finite")
        if not term.is_on(settings):
            continue
        problem = term.check(settings)
        if problem:
            raise ValueError(f"{where}.{name}: {problem}")
        if term.needs_new_token and new_token_id < 0:
            raise ValueError(f"{where}.{name} needs the new token of a method that adds one "
                             "(textual_inversion, attndreambooth)")
        active.append((name, tuple(sorted(settings.items()))))
    replacing = names_with(tuple(active), "replaces_instance_loss")
    if len(replacing) > 1:
        raise ValueError(f"{where}: {' and '.join(replacing)} each replace the instance loss; turn one off")
    return tuple(active)


def names_with(terms: tuple[tuple[str, Settings], ...], flag: str) -> list[str]:
    """Returns the names of the `terms` whose LossTerm sets `flag` (e.g. "captures_attention")."""
    return [name for name, _ in terms if getattr(REGISTRY[name], flag)]


def metric_name(name: str) -> str:
    """The step metric that holds term `name`'s value."""
    return f"{name}_loss"


def compute_terms(terms: tuple[tuple[str, Settings], ...], outputs: StepOutputs) -> dict[str, jax.Array]:
    """Returns {metric name: float32 scalar} of the active `terms` on `outputs`."""
    return {metric_name(name): jnp.asarray(REGISTRY[name].compute(outputs, **dict(settings)), jnp.float32)
            for name, settings in terms}


# ---------------------------------------------------------------------------------------------
# The registered terms
# ---------------------------------------------------------------------------------------------


def attention_map_loss(
    probabilities: Mapping[str, jax.Array], input_ids: jax.Array, new_token_id: int, mean_weight: float,
    var_weight: float,
) -> jax.Array:
    """Returns AttnDreamBooth's regularizer per example (B,): over the cross-attention layers'
    probabilities (each (B, heads, pixels, tokens)), the mean of

        mean_weight * (m(new) - m(next))^2 + var_weight * (v(new) - v(next))^2,

    m and v the mean and (unbiased) variance over heads and pixels of the attention map of the new
    token and of the token after it (the class word in "a photo of a <new> dog"). Examples
    without the new token get 0. Neither map is detached, as in the authors' code.
    """
    is_new = input_ids == new_token_id
    has_new = jnp.any(is_new, axis=1)
    position = jnp.argmax(is_new, axis=1)
    following = jnp.minimum(position + 1, input_ids.shape[1] - 1)
    total = jnp.zeros(input_ids.shape[0], jnp.float32)
    for probs in probabilities.values():
        def token_map(index):
            return jnp.take_along_axis(probs, index[:, None, None, None], axis=-1)[..., 0].reshape(probs.shape[0], -1)

        new_map, next_map = token_map(position), token_map(following)
        mean_gap = new_map.mean(axis=1) - next_map.mean(axis=1)
        var_gap = new_map.var(axis=1, ddof=1) - next_map.var(axis=1, ddof=1)
        total = total + mean_weight * jnp.square(mean_gap) + var_weight * jnp.square(var_gap)
    return jnp.where(has_new, total / max(len(probabilities), 1), 0.0)


def _attention_map(outputs: StepOutputs, *, mean: float, var: float) -> jax.Array:
    """AttnDreamBooth's term: the regularizer times the example weights, summed over the batch
    (the authors' sum over samples)."""
    regularizer = attention_map_loss(outputs.attention, outputs.batch["input_ids"], outputs.new_token_id, mean, var)
    return jnp.sum(outputs.batch["weight"].astype(jnp.float32) * regularizer)


register("attention_map", LossTerm(
    compute=_attention_map,
    settings={"mean": 0.0, "var": 0.0},
    is_on=lambda s: s["mean"] != 0.0 or s["var"] != 0.0,
    captures_attention=True,
    needs_new_token=True,
    check=lambda s: "mean and var are weights and must be >= 0" if min(s["mean"], s["var"]) < 0 else "",
))


def dco_loss(loss: jax.Array, reference_loss: jax.Array, beta: float) -> jax.Array:
    """Returns DCO's loss (Lee et al. 2024, as MuDI's training code computes it):
    -log sigmoid(-beta * (loss - reference_loss)), the model's loss judged against the base
    model's on the same noisy latents."""
    return -jax.nn.log_sigmoid(-beta * (loss - reference_loss))


def _dco(outputs: StepOutputs, *, beta: float) -> jax.Array:
    """DCO in place of the instance loss: each (micro-)batch's weighted instance loss and the base
    UNet's, both over its own instance examples as MuDI's per-step means, transformed, and
    counted in proportion to its share of the global batch's instance examples (so the
    micro-batches of an accumulated step average like their accumulation)."""
    is_instance = 1.0 - outputs.batch["is_prior"].astype(jnp.float32)
    weight = outputs.batch["weight"].astype(jnp.float32) * is_instance
    local = jnp.maximum(jnp.sum(is_instance), 1.0)
    mean = lambda losses: jnp.sum(weight * losses) / local
    share = jnp.sum(is_instance) / jnp.maximum(outputs.counts[0], 1)
    return share * dco_loss(mean(outputs.per_example_loss), mean(outputs.reference_loss), beta)


register("dco", LossTerm(
    compute=_dco,
    settings={"beta": 0.0},
    is_on=lambda s: s["beta"] != 0.0,
    needs_reference=True,
    replaces_instance_loss=True,
    check=lambda s: "beta must be > 0 (MuDI uses 1000)" if s["beta"] < 0 else "",
))
