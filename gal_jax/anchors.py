"""Anchor directions: template sets, concept phrases and anchor prompts (GAL_SPEC.md "Anchor sets").

A template holds exactly one `{}` where the concept phrase goes. Object phrases are placeholder +
class word ("{} in park" + "a <cute-cat> cat" -> "a <cute-cat> cat in park"); style phrases are the
reference caption's descriptor ("A tie {}" + "in watercolor painting style" -> "A tie in watercolor
painting style"). Filling uses plain substitution, never `str.format`, so other braces in a user's
template are kept as written.

A multi-subject concept (MuDI's metadata.jsonl, subjects "a", "b", ...) also reads templates with
named slots, one per subject it mentions: "{a} and {b} playing together on the beach" -> "olis
harry potter toy and hta corgi playing together on the beach". A `{}` there names all subjects
("olis harry potter toy and hta corgi"), so every named set and one-slot file works for it too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

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


def get_anchor_templates(name_or_path: str | Path, kind: str, subjects: Sequence[str] = ()) -> tuple[str, ...]:
    """Returns the anchor templates of a named set ('paper', 'official') or of a text file.

    A file holds one template a line; blank lines and lines starting with '#' are skipped; every
    template must contain exactly one `{}` (or, given the `subjects` ids of a multi-subject
    concept, instead named slots `{id}` of those ids, each at most once) and appear once.
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
    return read_anchor_file(path, subjects)


def read_anchor_file(path: Path, subjects: Sequence[str] = ()) -> tuple[str, ...]:
    """Returns the templates of an anchor file, raising AnchorFileError naming file and line."""
    templates: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        problem = slot_problem(template, subjects)
        if problem:
            raise AnchorFileError(f"{path}:{number}: template {template!r} {problem}")
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


def named_slots(text: str, subjects: Sequence[str]) -> list[str]:
    """Returns the subject ids whose named slot `{id}` appears in `text`, in order of appearance
    (other braces are not slots)."""
    known = set(subjects)
    return [m.group(1) for m in re.finditer(r"\{(\w+)\}", text) if m.group(1) in known]


def slot_problem(template: str, subjects: Sequence[str] = ()) -> str:
    """Returns what is wrong with a template's slots ('' when nothing): exactly one `{}`, or (with
    the `subjects` ids of a multi-subject concept) named slots of those ids, each at most once."""
    named = named_slots(template, subjects)
    count = template.count(SLOT)
    if named:
        repeated = sorted({s for s in named if named.count(s) > 1})
        if count:
            return "mixes '{}' with named subject slots; use one or the other"
        if repeated:
            return f"names subject slot(s) {', '.join('{' + s + '}' for s in repeated)} more than once"
        return ""
    if count != 1:
        hint = f" or named subject slots ({', '.join('{' + s + '}' for s in subjects)})" if subjects else ""
        return f"must contain exactly one '{{}}'{hint} (found {count} '{{}}')"
    return ""


def fill_named_slots(text: str, phrases: Mapping[str, str]) -> str:
    """Returns `text` with every named slot `{id}` of a subject replaced by its phrase (other
    braces kept as written)."""
    return re.sub(r"\{(\w+)\}", lambda m: phrases.get(m.group(1), m.group(0)), text)


def fill_anchor(template: str, phrase: str, subjects: Mapping[str, str] | None = None) -> str:
    """Returns the anchor prompt: the template with the concept phrase in its `{}`, or (given a
    multi-subject concept's identifier phrases by id) each named slot `{id}` filled with its
    subject's phrase."""
    subjects = dict(subjects or {})
    problem = slot_problem(template, list(subjects))
    if problem:
        raise ValueError(f"anchor template {template!r} {problem}")
    phrase = " ".join(phrase.split())
    if not phrase:
        raise ValueError("concept phrase must be non-empty")
    if named_slots(template, list(subjects)):
        filled = fill_named_slots(template, {s: " ".join(p.split()) for s, p in subjects.items()})
    else:
        filled = template.replace(SLOT, phrase)
    # Collapse spacing so "{} in park" and " {}  in park" give the same prompt.
    return " ".join(filled.split())


def anchor_prompts(templates: Sequence[str], phrase: str,
                   subjects: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Returns the anchor prompt of every template, in pool order (`subjects`: a multi-subject
    concept's phrases by id, for templates with named slots)."""
    return tuple(fill_anchor(template, phrase, subjects) for template in templates)

