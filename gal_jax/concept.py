"""The concept of an experiment: its original references and every prompt built from them.

Read once per run from the concept folder (the authors' `init.json` layout) and the config: the
concept phrase ("a <cute-cat> cat", or a style descriptor "in watercolor painting style"), the
plain prompts the overfit oracle compares with, the class prompt and images for prior
preservation, and the anchor pool (a prompt's index in it is its prompt_id for the whole run).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from gal_jax import anchors, data


@dataclasses.dataclass(frozen=True)
class Concept:
    """The concept of an experiment: its original references and the prompts built from them."""

    kind: str
    references: tuple[data.Reference, ...]
    class_images: tuple[Path, ...]
    class_prompt: str
    phrase: str
    plain_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]  # the original pool; a prompt's index is its prompt_id
    anchor_file: Path | None = None  # the user's template file, when one is used


def load_concept(config: ml_collections.ConfigDict, concept_dir: Path, class_dir: Path | None) -> Concept:
    """Returns the concept: references, class images, concept phrase, plain and anchor prompts."""
    kind = config.data.kind
    references = tuple(data.load_concept(concept_dir))
    if kind == "object":
        placeholder, class_word = _placeholder_and_class(config, references, concept_dir)
        phrase = anchors.concept_phrase_object(placeholder, class_word)
        plain = [r.plain_prompt or r.prompt for r in references]
        class_prompt = config.data.class_prompt or f"a {anchors.class_noun(class_word)}"
    else:
        phrase = anchors.style_descriptor(references[0].prompt)
        plain = [r.prompt for r in references]
        class_prompt = config.data.class_prompt
    use_prior = kind == "object" and config.train.with_prior and class_dir is not None
    class_images = tuple(data.list_class_images(class_dir)) if use_prior else ()
    templates = anchors.get_anchor_templates(config.gal.anchors, kind)
    named_set = (str(config.gal.anchors), kind) in anchors.ANCHOR_SETS
    return Concept(
        kind=kind,
        references=references,
        class_images=class_images,
        class_prompt=class_prompt,
        phrase=phrase,
        plain_prompts=tuple(dict.fromkeys(" ".join(p.split()) for p in plain)),
        anchor_prompts=anchors.anchor_prompts(templates, phrase),
        anchor_file=None if named_set else Path(config.gal.anchors).expanduser().absolute(),
    )


def _placeholder_and_class(config, references, concept_dir) -> tuple[str, str]:
    """Returns (placeholder, class word) from the config, or read off the first reference's captions."""
    if config.data.placeholder and config.data.class_word:
        return config.data.placeholder, config.data.class_word
    first = references[0]
    plain_words = set((first.plain_prompt or "").lower().split())
    words = first.prompt.split()
    for i, word in enumerate(words[:-1]):
        if word.lower() not in plain_words and words[i + 1].lower() in plain_words:
            return config.data.placeholder or word, config.data.class_word or words[i + 1]
    raise ValueError(
        f"{concept_dir}/init.json: cannot find the placeholder in {first.prompt!r} vs its plain prompt "
        f"{first.plain_prompt!r}; set config.data.placeholder and config.data.class_word."
    )
