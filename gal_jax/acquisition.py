"""Direction-based uncertainty sampling: overfit flags, entropy, top-k queries, openness, stopping.

Pure host-side functions of small arrays (GAL_SPEC.md, steps 3-7). Shapes: D anchor directions
(the prompts still in the pool, in pool order), N generated images per direction, P distinct plain
prompts of the original references.

An image is *overfit* when `sim_anchor <= max_j sim_plain_j` (non-strict, as the authors' training
scripts: `sim > sim_src` counts as not overfit). The evaluation metric OVF in `metrics.py` uses a
strict `<`, as the authors' evaluation notebook does; the two differ only on exact ties.

With several subjects (MuDI) and `gal.identity_check` on, an image also fails when its subjects'
identities are mixed (`identity_mixed`: the image cut into one vertical strip per subject, each
strip most similar to a subject's references, and not every subject found): a direction's rate
is then the fraction of images that are overfit or mixed, so GAL queries where the subjects get
confused as well as where the references are copied.

Directions of equal entropy rank in pool order (`TIE_BREAK`); with 10 images a direction's entropy
takes only 6 distinct values, so ties are common. `score_directions` computes H from the minority
count so that p and 1 - p (3 and 7 overfit images of 10) give the same float and truly tie: the
formula evaluated at 0.3 and at 0.7 differs in the last bit, which would rank them by rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

TIE_BREAK = "pool order"  # how `top_k_uncertain` ranks directions of equal entropy
BEST_IMAGE_RULE = "highest sim_anchor"  # the image uncertainty sampling queries in a direction
RANDOM_IMAGE_RULES = ("random", "best")  # random feedback: a random image (the paper's) or the best


def random_image_rule(seed: int) -> str:
    """Returns the record's name of the paper's random-feedback image rule under `seed`."""
    return f"random (seed {seed})"


@dataclasses.dataclass(frozen=True)
class DirectionScores:
    """Per-direction results of scoring one round's generated images."""

    flags: np.ndarray  # bool (D, N): image n of direction d fails (overfit, or identity mixed)
    rates: np.ndarray  # float (D,): fraction of failed images per direction
    entropies: np.ndarray  # float (D,): binary entropy of the rate, natural log
    best_images: np.ndarray  # int (D,): per direction, the image with the highest sim_anchor
    overfit: np.ndarray  # bool (D, N): sim_anchor <= max sim_plain (the flags without the identity check)
    mixed: np.ndarray | None = None  # bool (D, N): identities mixed; None without the identity check


@dataclasses.dataclass(frozen=True)
class Selection:
    """What one round of uncertainty sampling queries; empty when the stop rule fired."""

    directions: tuple[int, ...]  # positions in the scored pool, most uncertain first
    images: tuple[int, ...]  # for each chosen direction, the image that becomes a reference
    weight: float  # loss weight of the new references
    openness: float  # lambda * mean entropy over the directions scored this round
    stopped: bool  # fewer than k directions had H > 0: this round's model is the final one


def overfit_flags(sim_anchor: ArrayLike, sim_plain: ArrayLike) -> np.ndarray:
    """Returns bool flags, True where sim_anchor <= max_j sim_plain[..., j].

    Args:
      sim_anchor: (...,) cosine of each image with its anchor prompt, e.g. (N,) or (D, N).
      sim_plain: (..., P) cosine of each image with each plain reference prompt, P >= 1.
    """
    sim_anchor = _finite("sim_anchor", sim_anchor)
    sim_plain = _finite("sim_plain", sim_plain)
    if sim_plain.ndim != sim_anchor.ndim + 1 or sim_plain.shape[:-1] != sim_anchor.shape:
        raise ValueError(
            f"sim_plain shape {sim_plain.shape} must be sim_anchor shape {sim_anchor.shape} "
            "plus one trailing axis of plain prompts"
        )
    if sim_plain.shape[-1] == 0:
        raise ValueError("sim_plain has no plain prompts (trailing axis of size 0)")
    return sim_anchor <= sim_plain.max(axis=-1)


def identity_mixed(sim_subjects: ArrayLike) -> np.ndarray:
    """Returns bool flags, True where an image's subjects are mixed: its strips' most similar
    subjects (argmax over the last axis; the first on ties) are not all different.

    Args:
      sim_subjects: (..., S, S) similarity of each of an image's S vertical strips (left to right)
        to each of the S subjects' references (in the concept's subject order), S >= 2.
    """
    sims = _finite("sim_subjects", sim_subjects)
    if sims.ndim < 2 or sims.shape[-1] != sims.shape[-2] or sims.shape[-1] < 2:
        raise ValueError(f"sim_subjects must be (..., S, S) with S >= 2 subjects, got {sims.shape}")
    found = np.sort(np.argmax(sims, axis=-1), axis=-1)
    return np.any(found != np.arange(sims.shape[-1]), axis=-1)


def overfit_rate(flags: ArrayLike) -> float:
    """Returns the fraction of overfit images among one direction's (N,) flags."""
    flags = np.asarray(flags, dtype=bool)
    if flags.ndim != 1 or flags.size == 0:
        raise ValueError(f"overfit flags must be a non-empty 1-D array, got shape {flags.shape}")
    return float(flags.mean())


def direction_entropies(rates: ArrayLike) -> np.ndarray:
    """Returns H(p) = -p ln p - (1-p) ln(1-p) elementwise, exactly 0 where p is 0 or 1."""
    p = np.asarray(rates, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"overfit rates must lie in [0, 1], got {p}")
    inside = (p > 0) & (p < 1)
    # Evaluate the logs only strictly inside (0, 1): 0 * log(0) would give NaN, not the limit 0.
    q = np.where(inside, p, 0.5)
    return np.where(inside, -q * np.log(q) - (1 - q) * np.log1p(-q), 0.0)


def direction_entropy(rate: float) -> float:
    """Returns the binary entropy (natural log) of one direction's overfit rate."""
    return float(direction_entropies(np.float64(rate)))


def openness(entropies: ArrayLike, lam: float) -> float:
    """Returns lam * mean(H) over the directions scored this round (0.0 when none were scored)."""
    if not lam >= 0:
        raise ValueError(f"openness lambda must be >= 0, got {lam}")
    entropies = _entropy_vector(entropies)
    return float(lam * entropies.mean()) if entropies.size else 0.0


def top_k_uncertain(entropies: ArrayLike, k: int) -> list[int]:
    """Returns the positions of the min(k, D) highest entropies, ties broken by pool order.

    Directions with H == 0 rank last, so one is returned only when fewer than k directions have
    H > 0; that is exactly when `should_stop` fires, so `select_queries` never queries them.
    """
    _check_k(k)
    entropies = _entropy_vector(entropies)
    # A stable sort of -H keeps pool order among equal entropies (np.argsort(H)[::-1], as in the
    # authors' code, would reverse it).
    return np.argsort(-entropies, kind="stable")[:k].tolist()


def should_stop(entropies: ArrayLike, k: int) -> bool:
    """Returns True when fewer than k directions have H > 0 (nothing left worth querying)."""
    _check_k(k)
    return int((_entropy_vector(entropies) > 0).sum()) < k


def best_image(sim_anchor: ArrayLike) -> int:
    """Returns the index of the image with the highest sim_anchor (the first one on ties)."""
    sim_anchor = _finite("sim_anchor", sim_anchor)
    if sim_anchor.ndim != 1 or sim_anchor.size == 0:
        raise ValueError(f"sim_anchor must be a non-empty 1-D array, got shape {sim_anchor.shape}")
    return int(np.argmax(sim_anchor))


def new_reference_weight(openness_value: float, balance: bool) -> float:
    """Returns the loss weight of a new reference: the round's openness with balance, else 1.0."""
    if not openness_value >= 0:
        raise ValueError(f"openness must be >= 0, got {openness_value}")
    return float(openness_value) if balance else 1.0


def random_directions(num_pool: int, k: int, seed: int, round_index: int) -> list[int]:
    """Returns min(k, num_pool) distinct pool positions, in pool order, fixed by (seed, round)."""
    _check_k(k)
    if num_pool < 0 or seed < 0 or round_index < 0:
        raise ValueError(
            f"num_pool, seed and round must be >= 0, got {num_pool}, {seed}, {round_index}"
        )
    rng = np.random.default_rng([seed, round_index])
    return sorted(rng.choice(num_pool, size=min(k, num_pool), replace=False).tolist())


def random_image(num_images: int, seed: int, round_index: int, prompt_id: int) -> int:
    """Returns one of a direction's `num_images` images, drawn at random, fixed by (seed, round, prompt_id).

    The draw is a child stream of `random_directions`'s (numpy's spawn key), so it is independent
    of which directions were drawn and depends only on the direction, not on its pool position.
    """
    if num_images < 1 or min(seed, round_index, prompt_id) < 0:
        raise ValueError(
            f"num_images must be >= 1 and seed, round, prompt_id >= 0, got "
            f"{num_images}, {seed}, {round_index}, {prompt_id}"
        )
    stream = np.random.SeedSequence([seed, round_index], spawn_key=(prompt_id,))
    return int(np.random.default_rng(stream).integers(num_images))


def score_directions(sim_anchor: ArrayLike, sim_plain: ArrayLike,
                     sim_subjects: ArrayLike | None = None) -> DirectionScores:
    """Returns flags, rates, entropies and best images for (D, N) and (D, N, P) similarities;
    with (D, N, S, S) `sim_subjects` (the identity check) a mixed image fails too."""
    sim_anchor = np.asarray(sim_anchor, dtype=np.float64)
    if sim_anchor.ndim != 2 or sim_anchor.shape[1] == 0:
        raise ValueError(
            f"sim_anchor must be (directions, images) with images >= 1, got {sim_anchor.shape}"
        )
    overfit = overfit_flags(sim_anchor, sim_plain)
    mixed = None
    if sim_subjects is not None:
        mixed = identity_mixed(sim_subjects)
        if mixed.shape != overfit.shape:
            raise ValueError(f"sim_subjects shape {np.shape(sim_subjects)} must be sim_anchor shape "
                             f"{sim_anchor.shape} plus (subjects, subjects)")
    flags = overfit if mixed is None else overfit | mixed
    counts, num_images = flags.sum(axis=1), flags.shape[1]
    return DirectionScores(
        flags=flags,
        rates=flags.mean(axis=1),
        # H(p) == H(1 - p): the minority count gives both the same float (module docstring).
        entropies=direction_entropies(np.minimum(counts, num_images - counts) / num_images),
        best_images=np.argmax(sim_anchor, axis=1),
        overfit=overfit,
        mixed=mixed,
    )


def select_queries(scores: DirectionScores, k: int, lam: float, balance: bool) -> Selection:
    """Returns the round's queries: top-k uncertain directions and their best images, or a stop."""
    round_openness = openness(scores.entropies, lam)
    weight = new_reference_weight(round_openness, balance)
    if should_stop(scores.entropies, k):
        return Selection((), (), weight, round_openness, stopped=True)
    directions = top_k_uncertain(scores.entropies, k)
    images = tuple(int(scores.best_images[d]) for d in directions)
    return Selection(tuple(directions), images, weight, round_openness, stopped=False)


def select_random(scores: DirectionScores, prompt_ids: Sequence[int], k: int, lam: float, balance: bool,
                  seed: int, round_index: int, image: str = "random") -> Selection:
    """Returns the random baseline's queries: k random directions, each with one image.

    `image` is "random" (the paper's baseline: one image of the direction drawn at random, see
    `random_image`) or "best" (the highest sim_anchor, as uncertainty sampling takes). Every
    direction was scored, so openness (and with balance the new weight) is measured as in
    uncertainty sampling. The random baseline never stops early.
    """
    if image not in RANDOM_IMAGE_RULES:
        raise ValueError(f"random feedback image rule {image!r}; expected one of {RANDOM_IMAGE_RULES}")
    if len(prompt_ids) != scores.flags.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompt_ids for {scores.flags.shape[0]} scored directions")
    round_openness = openness(scores.entropies, lam)
    directions = random_directions(len(prompt_ids), k, seed, round_index)
    num_images = scores.flags.shape[1]
    images = [
        int(scores.best_images[d]) if image == "best" else random_image(num_images, seed, round_index, prompt_ids[d])
        for d in directions
    ]
    return Selection(tuple(directions), tuple(images), new_reference_weight(round_openness, balance),
                     round_openness, stopped=False)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (directions queried per round) must be an integer >= 1, got {k!r}")


def _finite(name: str, values: ArrayLike) -> np.ndarray:
    """Returns values as a float64 array, raising if any entry is NaN or infinite."""
    array = np.asarray(values, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name} has a non-finite value {array[where]} at index {where}")
    return array


def _entropy_vector(entropies: ArrayLike | Sequence[float]) -> np.ndarray:
    """Returns entropies as a 1-D float64 array, raising on NaN or negative values."""
    array = _finite("entropies", entropies)
    if array.ndim != 1:
        raise ValueError(f"entropies must be a 1-D array over directions, got shape {array.shape}")
    if (array < 0).any():
        raise ValueError(f"entropies must be >= 0, got {array}")
    return array
