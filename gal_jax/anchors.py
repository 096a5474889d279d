"""Anchor directions: template sets, concept phrases and anchor prompts (GAL_SPEC.md "Anchor sets").

A template holds exactly one `{}` where the concept phrase goes. Object phrases are placeholder +
class word ("{} in park" + "a <cute-cat> cat" -> "a <cute-cat> cat in park"); style phrases are the
reference caption's descriptor ("A tie {}" + "in watercolor painting style" -> "A tie in watercolor
painting style"). Filling uses plain substitution, never `str.format`, so other braces in a user's
template are kept as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

KINDS = ("object", "style")
SLOT = "{}"

# Paper, Appendix B, Table 5.
PAPER_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{} in park", "{} near a pool", "{} on street", "{} in a forest", "{} in a kitchen",
    "{} on the beach", "{} in a restaurant", "{} on snowy ground", "{} on the moon",
    "{} in desert", "{} in library", "{} under the night sky", "{} in front of the castle",
    "{} on the bridge", "{} next to waterfall", "{} in the cave", "{} at a concert venue",
    "{} on a balcony",
)

# Paper, Appendix B, Table 6 ("A tie in <descriptor> style"; the descriptor carries "in ... style").
PAPER_STYLE_TEMPLATES: tuple[str, ...] = (
    "A tie {}", "A table {}", "A broccoli {}", "A box {}", "Candy {}", "A billboard {}",
    "A drum {}", "A cell phone {}", "An empty bottle {}", "A glass {}", "A golden key {}",
    "A koala {}", "A toy {}", "A skateboard {}", "An apple on the table {}", "A bridge {}",
    "Beach scene {}", "A banana on the table {}",
)

# The authors' train_obj_gal_dreambooth.py `prompts_all`, verbatim (note "at an aquarium",
# "on a subway", "at a cafe").
OFFICIAL_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{} in a workshop", "{} in a museum", "{} on a plane", "{} on a boat", "{} in a laboratory",
    "{} at an aquarium", "{} on a subway", "{} in a pet store", "{} at a cafe", "{} in a gym",
    "{} at a bus stop", "{} in a garden", "{} at a train station", "{} in a junkyard",
    "{} in an alleyway", "{} in a schoolyard", "{} in a bank", "{} under a tree",
)

# The authors' train_style_gal_dreambooth.py `prompts_all`, verbatim.
OFFICIAL_STYLE_TEMPLATES: tuple[str, ...] = (
    "A tie {}", "candy {}", "A drum {}", "A koala {}", "Beach scene {}", "A shoe {}",
    "A pencil {}", "A kite {}", "A cheese {}", "A backpack {}", "A donut {}", "A leaf {}",
    "Moon {}", "A jacket {}", "A parrot {}", "A lantern {}", "A cluster of grapes {}",
    "A knife {}",
)

ANCHOR_SETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("paper", "object"): PAPER_OBJECT_TEMPLATES,
    ("paper", "style"): PAPER_STYLE_TEMPLATES,
    ("official", "object"): OFFICIAL_OBJECT_TEMPLATES,
    ("official", "style"): OFFICIAL_STYLE_TEMPLATES,
}


class AnchorFileError(ValueError):
    """A user's anchor template file is empty or has a malformed line."""


def get_anchor_templates(name_or_path: str | Path, kind: str) -> tuple[str, ...]:
    """Returns the anchor templates of a named set ('paper', 'official') or of a text file.

    A file holds one template a line; blank lines and lines starting with '#' are skipped; every
    template must contain exactly one `{}` and appear once.
    """
    if kind not in KINDS:
        raise ValueError(f"anchor kind must be one of {KINDS}, got {kind!r}")
    if (str(name_or_path), kind) in ANCHOR_SETS:
        return ANCHOR_SETS[(str(name_or_path), kind)]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"anchor set {str(name_or_path)!r} is neither a known name (paper, official) "
            "nor an existing file"
        )
    return read_anchor_file(path)


def read_anchor_file(path: Path) -> tuple[str, ...]:
    """Returns the templates of an anchor file, raising AnchorFileError naming file and line."""
    templates: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        if template.count(SLOT) != 1:
            raise AnchorFileError(
                f"{path}:{number}: template {template!r} must contain exactly one '{{}}' "
                f"(found {template.count(SLOT)})"
            )
        # Chosen prompts leave the pool by identity, so a repeated template would be ambiguous.
        if template in first_line:
            raise AnchorFileError(
                f"{path}:{number}: template {template!r} repeats line {first_line[template]}"
            )
        first_line[template] = number
        templates.append(template)
    if not templates:
        raise AnchorFileError(f"{path}: no anchor templates (only blank or comment lines)")
    return tuple(templates)


def class_noun(class_word: str) -> str:
    """Returns the class word as it reads in prompts: '_' becomes a space ('wooden_pot')."""
    noun = " ".join(class_word.replace("_", " ").split())
    if not noun:
        raise ValueError(f"class word must be non-empty, got {class_word!r}")
    return noun


def concept_phrase_object(placeholder: str, class_word: str) -> str:
    """Returns an object's concept phrase, e.g. ('<cute-cat>', 'cat') -> 'a <cute-cat> cat'."""
    placeholder = placeholder.strip()
    if not placeholder:
        raise ValueError("placeholder must be non-empty")
    return f"a {placeholder} {class_noun(class_word)}"


def style_descriptor(caption: str) -> str:
    """Returns the caption from its last ' in ' on: 'A cat in oil style' -> 'in oil style'."""
    head, found, tail = caption.strip().rpartition(" in ")
    if not found or not head.strip() or not tail.strip():
        raise ValueError(
            f"style caption {caption!r} must read '<subject> in <style>' (needs ' in ' between "
            "a subject and a style)"
        )
    return f"in {tail.strip()}"


def fill_anchor(template: str, phrase: str) -> str:
    """Returns the anchor prompt: the template with the concept phrase in its `{}`."""
    if template.count(SLOT) != 1:
        raise ValueError(f"anchor template {template!r} must contain exactly one '{{}}'")
    phrase = " ".join(phrase.split())
    if not phrase:
        raise ValueError("concept phrase must be non-empty")
    # Collapse spacing so "{} in park" and " {}  in park" give the same prompt.
    return " ".join(template.replace(SLOT, phrase).split())


def anchor_prompts(templates: Sequence[str], phrase: str) -> tuple[str, ...]:
    """Returns the anchor prompt of every template, in pool order."""
    return tuple(fill_anchor(template, phrase) for template in templates)

