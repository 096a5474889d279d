"""Evaluation metrics on CLIP embeddings: TXT-ALN, IMG-ALN, OVF (GAL_SPEC.md "Evaluation metrics").

Pure numpy on embedding rows; every function L2-normalises its inputs, so raw or normalised
embeddings give the same numbers.

OVF counts an image as overfit when cos(image, test prompt) < max_j cos(image, caption_j), strictly,
as the authors' evaluation notebook does. The acquisition rule in `acquisition.py` uses `<=`, as
their training scripts do; the two differ only on exact ties.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike

from gal_jax.anchors import class_noun


def cosine_matrix(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Returns the (M, K) cosine similarities between the rows of a (M, E) and b (K, E)."""
    a = _unit_rows("a", a)
    b = _unit_rows("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: a is {a.shape}, b is {b.shape}")
    return a @ b.T


def txt_alignment(img_emb: ArrayLike, prompt_emb: ArrayLike, scale: float = 1.0) -> float:
    """Returns scale * mean_i cos(image_i, prompt_i) (TXT-ALN; the notebook's scale is 2.5)."""
    if not scale > 0:
        raise ValueError(f"TXT-ALN scale must be > 0, got {scale}")
    return float(scale * _paired_cosines(img_emb, prompt_emb).mean())


def img_alignment(gen_emb: ArrayLike, ref_emb: ArrayLike) -> float:
    """Returns the mean cosine over all (generated image, reference image) pairs (IMG-ALN)."""
    return float(cosine_matrix(gen_emb, ref_emb).mean())


def overfit_fraction(img_emb: ArrayLike, prompt_emb: ArrayLike, caption_emb: ArrayLike) -> float:
    """Returns the fraction of images with cos(image, prompt) < max_j cos(image, caption_j) (OVF).

    Args:
      img_emb: (N, E) generated images.
      prompt_emb: (N, E) each image's test prompt (without the placeholder).
      caption_emb: (P, E) the plain reference captions, P >= 1.
    """
    to_prompt = _paired_cosines(img_emb, prompt_emb)
    to_captions = cosine_matrix(img_emb, caption_emb)
    return float((to_prompt < to_captions.max(axis=1)).mean())


def insert_placeholder(prompt: str, class_word: str, placeholder: str) -> str:
    """Returns the prompt with the placeholder before every whole-word occurrence of the class word.

    'cat swimming in a pool' -> '<cute-cat> cat swimming in a pool'; 'a study table in the style of
    table' -> 'a study <t> table in the style of <t> table' (the authors insert at every occurrence;
    a test prompt's last class word is often the one that names the concept). The match ignores
    case and keeps the prompt's spelling; a class word with '_' ('wooden_pot') matches 'wooden pot';
    'catalog' does not match 'cat'.
    """
    placeholder = placeholder.strip()
    if not placeholder:
        raise ValueError("placeholder must be non-empty")
    if placeholder in prompt:
        raise ValueError(f"prompt {prompt!r} already contains the placeholder {placeholder!r}")
    words = class_noun(class_word).split()
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
    inserted, count = re.subn(pattern, lambda match: f"{placeholder} {match.group(0)}", prompt, flags=re.IGNORECASE)
    if count == 0:
        raise ValueError(f"class word {class_word!r} does not occur as a word in prompt {prompt!r}")
    return inserted


def _unit_rows(name: str, embeddings: ArrayLike) -> np.ndarray:
    """Returns the rows of a non-empty finite (M, E) array scaled to unit L2 norm."""
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (rows, features) array, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row {int(np.argmin(norms))}: no direction")
    return array / norms


def _paired_cosines(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Returns cos(a_i, b_i) for row-paired (N, E) arrays."""
    a = _unit_rows("image embeddings", a)
    b = _unit_rows("prompt embeddings", b)
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have equal shapes, got {a.shape} and {b.shape}")
    return np.einsum("ne,ne->n", a, b)
