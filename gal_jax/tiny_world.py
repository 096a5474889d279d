"""The tiny world: captioned 64 px scenes of coloured objects in unmistakable contexts.

A scene is an object (teapot, chair, cat, flower, cup) of one colour and pattern, in the foreground
of a context that paints the whole picture (the paper's 18 object anchor contexts, "on a table"
where the concept's references stand, and a few held-out contexts for test prompts), optionally in
a global style. Its caption reads "a striped blue cup in a kitchen"; the context's phrase is the
anchor template's text after "{} ", so the caption "a red cat in park" lines up with the anchor
prompt "a sks teapot in park". A tenth of the captions carry a rare identifier word ("sks",
"olis", "hta") that changes nothing in the picture, so the towers know the placeholder "sks".

The concept is one teapot the base world never draws (two-tone: yellow over blue, with a gold
knob), shown four times on a table: plain DreamBooth learns the table along with the teapot. The style
concept is a style the base world never uses (stained glass).

Everything is numpy + PIL from a seeded rng: the same seed gives the same bytes. The judge
(`judge_context`, `context_scores`, and weaker `judge_colour`, `judge_object`, `judge_scene`)
reads a picture from the world's own rules (tiny_world_judge.py), not from a learned model.

    tiny_world_draw.py      the pen, the objects and the styles
    tiny_world_contexts.py  the contexts' painters and palettes
    tiny_world_judge.py     the rule-based judge
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gal_jax import anchors, io_utils
from gal_jax import tiny_world_contexts as contexts
from gal_jax import tiny_world_draw as draw
from gal_jax.tiny_world_judge import (  # noqa: F401  the judge is part of the world's API
    context_scores, judge_colour, judge_context, judge_object, judge_scene,
)

RESOLUTION = 64
ANCHOR_CONTEXTS: tuple[str, ...] = tuple(
    t.removeprefix("{} ") for t in anchors.PAPER_OBJECT_TEMPLATES
)
REFERENCE_CONTEXT = "on a table"
# Drawn in the training set but in no anchor template: test prompts about them ask whether a
# personalized model still follows prompts GAL never queried.
HELD_OUT_CONTEXTS: tuple[str, ...] = ("underwater", "next to a volcano", "on a boat", "in an autumn forest")
CONTEXTS: tuple[str, ...] = ANCHOR_CONTEXTS + (REFERENCE_CONTEXT,) + HELD_OUT_CONTEXTS
OBJECTS: tuple[str, ...] = tuple(draw.OBJECT_SHAPES)
COLOURS: tuple[str, ...] = tuple(draw.COLOURS)
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
STYLES: dict[str, str] = {
    "watercolor": "in watercolor painting style",
    "pixel art": "in pixel art style",
    "pencil sketch": "in pencil sketch style",
}
STYLED_FRACTION = 0.1  # of the training set: the base model knows the styles without being styled

# Rare single-token words (DreamBooth's and MuDI's identifiers) that a tenth of the training
# captions carry before the object word with no visual meaning ("a red sks cup on the beach"), as
# web captions carry stray tokens: the towers learn them, and that they change nothing in the
# picture. An identifier the text tower never saw keeps its random embedding, and shifts every
# CLIP similarity of a prompt holding it (an anchor prompt then beats the plain one on any picture).
IDENTIFIERS: tuple[str, ...] = ("sks", "olis", "hta")
IDENTIFIED_FRACTION = 0.1

OBJECT_CONCEPT = "teapot"
PLACEHOLDER = "sks"
# Two-tone, in halves large enough to survive the tiny VAE (it averages anything finer: the
# earlier magenta body with cyan checks came back from it a pale lavender teapot, so DreamBooth
# learned a pale teapot the world already draws, not the concept).
CONCEPT_BODY, CONCEPT_LOWER, CONCEPT_KNOB = draw.COLOURS["yellow"], draw.COLOURS["blue"], (240, 195, 40)
CONCEPT_PATTERN = "halves"
STYLE_CONCEPT = "stained_glass"
STYLE_CONCEPT_PHRASE = "in stained glass style"


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """One picture of the world with its caption and the attributes it was drawn from."""

    image: np.ndarray  # (resolution, resolution, 3) uint8
    caption: str
    object: str
    colour: str
    pattern: str
    context: str
    style: str | None

    def attributes(self) -> dict[str, Any]:
        """Returns the scene's attributes (everything but the image) as a JSON-ready dict."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "image"}


def caption(obj: str, colour: str, pattern: str, context: str, style: str | None = None,
            identifier: str | None = None) -> str:
    """Returns the scene's caption, e.g. 'a striped blue cup in a kitchen in pixel art style'; an
    identifier goes before the object word ('a blue sks cup in a kitchen')."""
    look = colour if pattern == "plain" else f"{pattern} {colour}"
    named = f"{identifier} {obj}" if identifier else obj
    text = f"a {look} {named} {context}"
    return f"{text} {STYLES[style]}" if style else text


def render(
    rng: np.random.Generator, context: str, obj: str, body: draw.Colour, pattern: str, *,
    pattern_colour: draw.Colour, knob: draw.Colour | None = None,
    resolution: int = RESOLUTION,
) -> np.ndarray:
    """Returns a (resolution, resolution, 3) uint8 picture of the object in the context."""
    size = resolution * draw.SUPERSAMPLE
    canvas = Image.new("RGB", (size, size))
    contexts.CONTEXT_PAINTERS[context](draw.Pen(canvas), rng, contexts.CONTEXT_PALETTES[context])
    draw.draw_object(canvas, rng, obj, body, pattern, pattern_colour=pattern_colour, knob=knob)
    return np.asarray(canvas.reduce(draw.SUPERSAMPLE))


def sample_scene(
    rng: np.random.Generator, *, context: str | None = None, obj: str | None = None,
    colour: str | None = None, pattern: str | None = None, style: str | None = None,
    resolution: int = RESOLUTION,
) -> Scene:
    """Returns a scene; every attribute not given is drawn at random (style: none)."""
    context = context or CONTEXTS[rng.integers(len(CONTEXTS))]
    obj = obj or OBJECTS[rng.integers(len(OBJECTS))]
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    pattern = pattern or PATTERNS[rng.integers(len(PATTERNS))]
    _check(context, CONTEXTS, "context")
    _check(obj, OBJECTS, "object")
    _check(colour, COLOURS, "colour")
    _check(pattern, PATTERNS, "pattern")
    if style is not None:
        _check(style, tuple(STYLES), "style")
    image = render(rng, context, obj, draw.shade(rng, draw.COLOURS[colour], 10), pattern,
                   resolution=resolution, pattern_colour=draw.pattern_colour(colour))
    if style:
        image = draw.STYLE_TRANSFORMS[style](image, rng)
    return Scene(image, caption(obj, colour, pattern, context, style), obj, colour, pattern, context, style)


def without_identifiers(text: str) -> str:
    """Returns the caption with its identifier words (`IDENTIFIERS`) taken out."""
    return " ".join(w for w in text.split() if w not in IDENTIFIERS)


def object_swaps(text: str) -> tuple[str, ...]:
    """Returns the caption once with each other object kind in its object's place ('a red cup on
    the beach' -> 'a red teapot on the beach', ...), in `OBJECTS` order: the hard negatives that
    make CLIP's contrastive loss need the object kind (random batches almost never hold two
    pictures that differ in the object only, so without them CLIP learns contexts and colours)."""
    return _word_swaps(text, OBJECTS, "object kinds")


def colour_swaps(text: str) -> tuple[str, ...]:
    """Returns the caption once with each other colour in its colour's place ('a red cup on the
    beach' -> 'a blue cup on the beach', ...), in `COLOURS` order: hard negatives beside
    `object_swaps`, so that learning the object kind does not cost the colour."""
    return _word_swaps(text, COLOURS, "colours")


def _word_swaps(text: str, vocabulary: tuple[str, ...], what: str) -> tuple[str, ...]:
    words = text.split()
    at = [i for i, w in enumerate(words) if w in vocabulary]
    if len(at) != 1:
        raise ValueError(f"caption {text!r} names {len(at)} {what}, expected exactly one of {', '.join(vocabulary)}")
    return tuple(" ".join(words[:at[0]] + [other] + words[at[0] + 1:])
                 for other in vocabulary if other != words[at[0]])


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; the world has {', '.join(allowed)}")


def prompt_context(prompt: str) -> str | None:
    """Returns the world context a prompt ends with ('teapot on the beach' -> 'on the beach'), if any."""
    text = " ".join(prompt.split()).lower()
    for style_phrase in list(STYLES.values()) + [STYLE_CONCEPT_PHRASE]:
        text = text.removesuffix(" " + style_phrase)
    found = [c for c in CONTEXTS if text == c or text.endswith(" " + c)]
    return max(found, key=len) if found else None


def prompt_contexts(prompts: Sequence[str], what: str = "prompt") -> list[str]:
    """Returns the world context each prompt names; raises ValueError naming one that names none."""
    contexts = [prompt_context(p) for p in prompts]
    for prompt, context in zip(prompts, contexts):
        if context is None:
            raise ValueError(f"the {what} {prompt!r} names no context of the tiny world "
                             f"(known: {', '.join(CONTEXTS)})")
    return contexts


# ---------------------------------------------------------------------------------------------
# Data sets.


def _balanced(rng: np.random.Generator, values: tuple, n: int) -> list:
    """Returns n values in random order, each of `values` appearing n // len(values) or one more times."""
    return [values[i] for i in rng.permutation(np.resize(np.arange(len(values)), n))]


def _training_specs(n: int, seed: int) -> list[tuple[str, str, str, str, str | None, str | None]]:
    """Returns the pretraining set's n (context, object, colour, pattern, style, identifier)."""
    schedule = np.random.default_rng([seed, n])
    styled = round(n * STYLED_FRACTION)
    styles = _balanced(schedule, tuple(STYLES), styled) + [None] * (n - styled)
    columns = (_balanced(schedule, CONTEXTS, n), _balanced(schedule, OBJECTS, n),
               _balanced(schedule, COLOURS, n), _balanced(schedule, PATTERNS, n),
               [styles[i] for i in schedule.permutation(n)])
    identified = round(n * IDENTIFIED_FRACTION)
    identifiers = _balanced(schedule, IDENTIFIERS, identified) + [None] * (n - identified)
    identifiers = [identifiers[i] for i in schedule.permutation(n)]
    return [(*spec, identifier) for spec, identifier in zip(zip(*columns), identifiers)]


def _spec_scene(seed: int, index: int, context: str, obj: str, colour: str, pattern: str, style: str | None,
                identifier: str | None, resolution: int) -> Scene:
    scene = sample_scene(np.random.default_rng([seed, index]), context=context, obj=obj, colour=colour,
                         pattern=pattern, style=style, resolution=resolution)
    if identifier:
        scene = dataclasses.replace(scene, caption=caption(obj, colour, pattern, context, style, identifier))
    return scene


def training_scenes(n: int, seed: int = 0, *, resolution: int = RESOLUTION) -> Iterator[Scene]:
    """Yields the pretraining set's n scenes: contexts, objects, colours, patterns balanced, one in
    ten styled, one in ten captioned with an identifier (`IDENTIFIERS`); never the concept's look.
    Scene i depends only on (seed, i, n)."""
    for index, spec in enumerate(_training_specs(n, seed)):
        yield _spec_scene(seed, index, *spec, resolution=resolution)


TWIN_ATTRIBUTES = ("object", "colour")


def training_twins(n: int, seed: int = 0, attributes: Sequence[str] = TWIN_ATTRIBUTES, *,
                   resolution: int = RESOLUTION) -> Iterator[Scene]:
    """Yields, for each scene of `training_scenes(n, seed)`, its twin: the same picture (same
    background, placement, pattern and style: the same random draws) with one of `attributes`
    (drawn per scene) changed to another value, and its caption changed to match. A batch that
    holds a scene and its twin makes CLIP's loss hinge on the one attribute they differ in, in
    both directions (minimal pairs): random batches of this world almost never hold two pictures
    that differ in the object only."""
    if not attributes or any(a not in TWIN_ATTRIBUTES for a in attributes):
        raise ValueError(f"twin attributes must be some of {', '.join(TWIN_ATTRIBUTES)}, got {list(attributes)}")
    vocabulary = {"object": OBJECTS, "colour": COLOURS}
    for index, (context, obj, colour, pattern, style, identifier) in enumerate(_training_specs(n, seed)):
        rng = np.random.default_rng([seed, index, 1])
        attribute = attributes[rng.integers(len(attributes))]
        look = {"object": obj, "colour": colour}
        others = [v for v in vocabulary[attribute] if v != look[attribute]]
        look[attribute] = others[rng.integers(len(others))]
        yield _spec_scene(seed, index, context, look["object"], look["colour"], pattern, style, identifier, resolution)


def training_set(n: int, seed: int = 0, *, resolution: int = RESOLUTION) -> list[Scene]:
    """Returns the pretraining set's n scenes (see training_scenes)."""
    return list(training_scenes(n, seed, resolution=resolution))


def concept_scene(rng: np.random.Generator, context: str = REFERENCE_CONTEXT, *,
                  resolution: int = RESOLUTION) -> Scene:
    """Returns the concept teapot (yellow over blue, gold knob) in a context, captioned with the
    placeholder ('a sks teapot on a table')."""
    image = render(rng, context, OBJECT_CONCEPT, CONCEPT_BODY, CONCEPT_PATTERN, resolution=resolution,
                   pattern_colour=CONCEPT_LOWER, knob=CONCEPT_KNOB)
    return Scene(image, f"a {PLACEHOLDER} {OBJECT_CONCEPT} {context}", OBJECT_CONCEPT, "yellow",
                 CONCEPT_PATTERN, context, None)


def style_concept_scene(rng: np.random.Generator, *, resolution: int = RESOLUTION) -> Scene:
    """Returns the style concept's reference: an orange cat in park, in stained glass style."""
    image = render(rng, "in park", "cat", draw.COLOURS["orange"], "plain", resolution=resolution,
                   pattern_colour=draw.pattern_colour("orange"))
    image = draw.STYLE_TRANSFORMS["stained glass"](image, rng)
    return Scene(image, f"a cat {STYLE_CONCEPT_PHRASE}", "cat", "orange", "plain", "in park", "stained glass")


# ---------------------------------------------------------------------------------------------
# The world on disk, in the authors' layout.

NUM_REFERENCES = 4
NUM_CLASS_IMAGES = 50
NUM_TRAIN = 10_000
# Test prompts in the authors' style (naming the class): the held-out contexts first, which no
# anchor direction queries, then some of the anchors'.
TEST_CONTEXTS: tuple[str, ...] = HELD_OUT_CONTEXTS + (
    "on the beach", "on snowy ground", "on the moon", "in a kitchen", "in a forest", "under the night sky",
)
CONCEPTS_JSON = "concepts_list_tiny.json"
STYLE_CONCEPTS_JSON = "concepts_list_style_tiny.json"
_MARKER = ".tiny_world.json"  # written last: its presence means the world is complete
_FORMAT_VERSION = 3  # 2: test prompts start with 'a'; 3: placeholder sks, identifiers in captions


def world_paths(root: Path | str) -> dict[str, Path]:
    """Returns where write_world puts each part of the world under `root` (the keys of
    tiny_data.concept_paths, and the style test set and the pretraining set)."""
    root = Path(root).expanduser().absolute()
    return {
        "data_root": root,
        "object_concept": root / "reference_images" / "object" / OBJECT_CONCEPT,
        "style_concept": root / "reference_images" / "style" / STYLE_CONCEPT,
        "reg_dir": root / "reg_data" / OBJECT_CONCEPT / "images",
        "test_prompts": root / "test_prompts" / f"{OBJECT_CONCEPT}.txt",
        "concepts_json": root / CONCEPTS_JSON,
        "style_test_prompts": root / "test_prompts" / f"{STYLE_CONCEPT}.txt",
        "style_concepts_json": root / STYLE_CONCEPTS_JSON,
        "train_dir": root / "world" / "train",
    }


def write_world(
    root: Path | str, *, seed: int = 0, num_train: int = NUM_TRAIN, resolution: int = RESOLUTION,
    num_class_images: int = NUM_CLASS_IMAGES,
) -> dict[str, Path]:
    """Writes (once) the world under `root` in the authors' layout; returns world_paths(root).

    Built in a temporary folder beside `root` and renamed into place, so a killed build leaves no
    half world. A complete world made with the same arguments is kept as it is; one made with
    others is replaced; any other non-empty folder is refused.
    """
    root = Path(root).expanduser().absolute()
    wanted = {"version": _FORMAT_VERSION, "seed": seed, "num_train": num_train, "resolution": resolution,
              "num_class_images": num_class_images}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return world_paths(root)
    if root.exists() and not marker.is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists, is not empty and is not a tiny world; not replacing it")
    tmp = io_utils.temporary_dir_beside(root)
    try:
        _write_all(tmp, seed, num_train, resolution, num_class_images)
        (tmp / _MARKER).write_text(json.dumps(wanted, sort_keys=True) + "\n")
        io_utils.replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return world_paths(root)


def _write_all(root: Path, seed: int, num_train: int, resolution: int, num_class_images: int) -> None:
    """Writes every file of the world under `root`; each part draws from its own seeded rng."""
    paths = world_paths(root)
    part_rng = lambda part: np.random.default_rng([seed, part])  # noqa: E731
    captions = _write_object_concept(paths["object_concept"], root, part_rng(1), resolution)
    _write_class_images(paths["reg_dir"], part_rng(2), resolution, num_class_images)
    style_caption = _write_style_concept(paths["style_concept"], root, part_rng(3), resolution)
    paths["test_prompts"].parent.mkdir(parents=True)
    # Worded as the world's captions ("a teapot underwater"): the tiny text encoder knows no other form.
    paths["test_prompts"].write_text("".join(f"a {OBJECT_CONCEPT} {c}\n" for c in TEST_CONTEXTS))
    style_prompts = (f"a {obj} {context}\n" for obj, context in zip(OBJECTS * 2, TEST_CONTEXTS))
    paths["style_test_prompts"].write_text("".join(style_prompts))
    _write_json(paths["concepts_json"], [{
        "class_prompt": OBJECT_CONCEPT, "placeholder": PLACEHOLDER,
        "test_prompts": _authors_path(paths["test_prompts"], root), "caption": captions,
        "concept": OBJECT_CONCEPT, "kind": "object",
    }])
    _write_json(paths["style_concepts_json"], [{
        "class_prompt": "cat", "instance_prompt": style_caption,
        "instance_data_path": _authors_path(paths["style_concept"], root),
        "test_prompts": _authors_path(paths["style_test_prompts"], root),
        "concept": STYLE_CONCEPT, "kind": "style",
    }])
    _write_training_set(paths["train_dir"], seed, num_train, resolution)
    _write_json(root / "world" / "world.json", describe())


def describe() -> dict[str, Any]:
    """Returns the world's vocabulary and concepts as a JSON-ready dict (written as world.json)."""
    return {
        "contexts": list(CONTEXTS), "anchor_contexts": list(ANCHOR_CONTEXTS),
        "reference_context": REFERENCE_CONTEXT, "held_out_contexts": list(HELD_OUT_CONTEXTS),
        "test_contexts": list(TEST_CONTEXTS), "objects": list(OBJECTS), "colours": list(COLOURS),
        "patterns": list(PATTERNS), "styles": STYLES, "styled_fraction": STYLED_FRACTION,
        "object_concept": {"class": OBJECT_CONCEPT, "placeholder": PLACEHOLDER, "body": CONCEPT_BODY,
                           "pattern": CONCEPT_PATTERN, "lower_half": CONCEPT_LOWER, "knob": CONCEPT_KNOB},
        "style_concept": {"name": STYLE_CONCEPT, "phrase": STYLE_CONCEPT_PHRASE},
    }


def _authors_path(path: Path, root: Path) -> str:
    """Returns `path` as the authors write it: './' + the path relative to the data root."""
    return "./" + path.relative_to(root).as_posix()


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4) + "\n")


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _write_object_concept(folder: Path, root: Path, rng: np.random.Generator, resolution: int) -> list[str]:
    """Writes the concept's references (the teapot on a table) and init.json; returns the plain captions."""
    entries = []
    for index in range(NUM_REFERENCES):
        scene = concept_scene(rng, resolution=resolution)
        _save_png(scene.image, folder / f"{index}.png")
        entries.append({
            "instance_prompt": scene.caption,
            "plain_prompt": scene.caption.replace(f"{PLACEHOLDER} ", ""),
            "instance_data_path": _authors_path(folder / f"{index}.png", root),
            "weight": 1.0,
        })
    _write_json(folder / "init.json", entries)
    return list(dict.fromkeys(entry["plain_prompt"] for entry in entries))


def _write_class_images(folder: Path, rng: np.random.Generator, resolution: int, count: int) -> None:
    """Writes generic teapots (any colour and pattern) in random contexts: the class prior."""
    folder.mkdir(parents=True)
    for index in range(count):
        scene = sample_scene(rng, obj=OBJECT_CONCEPT, resolution=resolution)
        _save_png(scene.image, folder / f"{index:04d}.png")


def _write_style_concept(folder: Path, root: Path, rng: np.random.Generator, resolution: int) -> str:
    """Writes the style concept's one reference and its init.json (no plain prompt); returns its caption."""
    scene = style_concept_scene(rng, resolution=resolution)
    _save_png(scene.image, folder / "0.png")
    _write_json(folder / "init.json", [{
        "instance_prompt": scene.caption,
        "instance_data_path": _authors_path(folder / "0.png", root),
        "weight": 1.0,
    }])
    return scene.caption


def _write_training_set(folder: Path, seed: int, n: int, resolution: int) -> None:
    """Writes the pretraining scenes as <index>.png and their captions and attributes as captions.jsonl."""
    folder.mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as captions:
        for index, scene in enumerate(training_scenes(n, seed, resolution=resolution)):
            name = f"{index:06d}.png"
            _save_png(scene.image, folder / name)
            captions.write(json.dumps({"file": name, **scene.attributes()}) + "\n")
