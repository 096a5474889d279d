"""The tiny world's rule-based judge as GAL's overfit oracle (`config.gal.oracle=tiny_world_judge`).

GAL scores each generated picture against its anchor prompt and the references' plain prompts and
calls it overfit when the plain prompt wins (GAL_SPEC step 3). The tiny CLIP misses most of the
tiny world's overfitting on generated pictures (README "The tiny world": it flags about a quarter
of the pictures the judge sees on the references' table), so GAL's rounds there act on its noise.
With this oracle a picture's "similarity" to a prompt is the judge's probability that the picture
shows the prompt's context (`tiny_world_judge.context_scores`), and the same rule decides: overfit
when the references' context is at least as likely as the anchor's. It plays the part of the
paper's human oracle, with the world's ground truth, so GAL's mechanism can be measured apart from
its CLIP. The records keep these scores in `sim_anchor` / `sim_plain`, so every decision still
recomputes from them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gal_jax import tiny_world, tiny_world_judge

ORACLES = ("clip", "tiny_world_judge")


def configured(config) -> str:
    """Returns config.gal.oracle ('clip' in configs written before it existed)."""
    return config.gal.get("oracle", "clip")


def prompt_contexts(prompts: Sequence[str], what: str) -> list[str]:
    """Returns tiny_world.prompt_contexts, its error saying which option needs them."""
    try:
        return tiny_world.prompt_contexts(prompts, what)
    except ValueError as error:
        raise ValueError(f"gal.oracle=tiny_world_judge: {error}") from None


class JudgeScorer:
    """Scores pictures as score.Scorer.similarities does, with the judge's context probabilities."""

    def similarities(
        self,
        images,
        anchor_index_per_image: Sequence[int],
        anchor_prompts: Sequence[str],
        plain_prompts: Sequence[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (sim_anchor (n,), sim_plain (n, len(plain_prompts))): the judge's probability that
        each picture shows its anchor prompt's context, and each plain prompt's."""
        images = np.asarray(images)
        anchor_index = np.asarray(anchor_index_per_image, dtype=np.int64).reshape(-1)
        if anchor_index.shape[0] != images.shape[0]:
            raise ValueError(f"anchor_index_per_image has {anchor_index.shape[0]} entries for {images.shape[0]} images")
        anchors = prompt_contexts(anchor_prompts, "anchor prompt")
        plains = prompt_contexts(plain_prompts, "plain prompt")
        scores = [tiny_world_judge.context_scores(image) for image in images]
        sim_anchor = np.asarray([s[anchors[i]] for s, i in zip(scores, anchor_index)], np.float32)
        sim_plain = np.asarray([[s[c] for c in plains] for s in scores], np.float32).reshape(len(images), len(plains))
        return sim_anchor, sim_plain
