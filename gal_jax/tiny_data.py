"""Writes the tiny synthetic concept data (authors' layout) used by the tests and the default run.

    <root>/reference_images/object/teapot/{0..3}.jpg, init.json   one procedurally drawn teapot
    <root>/reference_images/style/watercolor/{0..3}.jpg, init.json four subjects in a wash style
    <root>/reg_data/teapot/images/{0..19}.jpg                      generic teapots (class images)
    <root>/test_prompts/teapot.txt, <root>/concepts_list_tiny.json evaluation set, authors' format
    <root>/multi_subject/teapot_and_cat/metadata.jsonl, a0*.jpg,  two subjects in MuDI's layout,
        b0*.jpg, mask_*.png                                       their masks drawn with them
    <root>/multi_subject/teapot_and_cat_prior/class_metadata.jsonl, ...   their masked prior set:
                                                                  generic teapots and cats

Everything is drawn with PIL from a numpy RNG, so a given (resolution, seed) always gives the same
bytes. Paths inside the JSON files are written the authors' way, relative to <root>.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gal_jax import io_utils

OBJECT_CONCEPT = "teapot"
PLACEHOLDER = "<tiny-teapot>"
STYLE_CONCEPT = "watercolor"
STYLE_PHRASE = "in watercolor painting style"
NUM_CLASS_IMAGES = 20
OBJECT_SCENES = ("on a table", "on a table", "on the grass", "on the grass")
STYLE_SUBJECTS = ("cat", "house", "tree", "boat")
TEST_PROMPTS = (
    "teapot on a beach",
    "teapot in the snow",
    "teapot floating in a pool",
    "a golden color teapot",
    "teapot under a tree",
)
CONCEPTS_JSON = "concepts_list_tiny.json"
_MARKER = ".tiny_concepts.json"  # written last: its presence means the set is complete
_FORMAT_VERSION = 3  # 2: the two-subject concept; 3: its masked prior set
MULTI_SUBJECTS = {"a": f"{PLACEHOLDER} {OBJECT_CONCEPT}", "b": "<tiny-cat> cat"}
PRIOR_CLASSES = {"a": OBJECT_CONCEPT, "b": "cat"}  # the prior set's ids name the class words
_SUPERSAMPLE = 4  # draw large, then downsample, for smooth edges at tiny resolutions
_CONCEPT_RED = (200, 40, 45)


def concept_paths(root: Path) -> dict[str, Path]:
    """Returns where make_tiny_concepts puts each part of the tiny data set under `root`."""
    return {
        "data_root": root,
        "object_concept": root / "reference_images" / "object" / OBJECT_CONCEPT,
        "style_concept": root / "reference_images" / "style" / STYLE_CONCEPT,
        "reg_dir": root / "reg_data" / OBJECT_CONCEPT / "images",
        "test_prompts": root / "test_prompts" / f"{OBJECT_CONCEPT}.txt",
        "concepts_json": root / CONCEPTS_JSON,
        "multi_subject_concept": root / "multi_subject" / "teapot_and_cat",
        "multi_subject_prior": root / "multi_subject" / "teapot_and_cat_prior",
    }


def make_tiny_concepts(root: Path | str, resolution: int = 64, seed: int = 0) -> dict[str, Path]:
    """Writes (once) the tiny object and style concepts under `root`; returns their paths.

    Built in a temporary folder and renamed into place, so a killed build never leaves half a set;
    if `root` already holds a complete set made with the same arguments, nothing is written.
    """
    root = Path(root).expanduser().absolute()
    wanted = {"version": _FORMAT_VERSION, "resolution": resolution, "seed": seed}
    if _is_complete(root, wanted):
        return concept_paths(root)
    tmp = io_utils.temporary_dir_beside(root)
    try:
        _write_all(tmp, resolution, np.random.default_rng(seed))
        (tmp / _MARKER).write_text(json.dumps(wanted, sort_keys=True))
        try:
            os.replace(tmp, root)  # atomic; succeeds when root is absent or an empty folder
        except OSError:
            if _is_older_version(root, wanted):  # an earlier release's set: this one adds parts
                io_utils.replace_dir(tmp, root)
            elif not _is_complete(root, wanted):  # not just another process finishing first
                raise FileExistsError(f"{root}: exists and is not a tiny concept set") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return concept_paths(root)


def _is_older_version(root: Path, wanted: dict) -> bool:
    """Returns whether `root` holds a finished set of an earlier format made with the same arguments."""
    marker = root / _MARKER
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    same = {k: v for k, v in found.items() if k != "version"} == {k: v for k, v in wanted.items() if k != "version"}
    return same and found.get("version", 0) < wanted["version"]


def _is_complete(root: Path, wanted: dict) -> bool:
    """Returns whether `root` holds a finished set; raises if it was made with other arguments
    (False for an earlier format's set made with the same ones: it is rebuilt)."""
    marker = root / _MARKER
    if not marker.is_file() or _is_older_version(root, wanted):
        return False
    found = json.loads(marker.read_text())
    if found != wanted:
        raise ValueError(f"{root}: holds a tiny concept set made with {found}, asked for {wanted}")
    return True


def _write_all(root: Path, resolution: int, rng: np.random.Generator) -> None:
    """Writes every file of the set under `root`, drawing from `rng` in a fixed order."""
    paths = concept_paths(root)
    captions = _write_object_concept(paths["object_concept"], root, resolution, rng)
    _write_class_images(paths["reg_dir"], resolution, rng)
    _write_style_concept(paths["style_concept"], root, resolution, rng)
    paths["test_prompts"].parent.mkdir(parents=True)
    paths["test_prompts"].write_text("\n".join(TEST_PROMPTS) + "\n")
    concepts = [
        {
            "class_prompt": OBJECT_CONCEPT,
            "placeholder": PLACEHOLDER,
            "test_prompts": _authors_path(paths["test_prompts"], root),
            "caption": captions,
            "concept": OBJECT_CONCEPT,
            "kind": "object",
        }
    ]
    paths["concepts_json"].write_text(json.dumps(concepts, indent=4) + "\n")
    # Its own rng, so the parts above keep the bytes they had before it existed.
    _write_multi_subject_concept(paths["multi_subject_concept"], resolution, np.random.default_rng([0, 7]))
    _write_multi_subject_prior(paths["multi_subject_prior"], resolution, np.random.default_rng([0, 8]))


def _authors_path(path: Path, root: Path) -> str:
    """Returns `path` as the authors write it: './' + the path relative to the data root."""
    return "./" + path.relative_to(root).as_posix()


def _save(image: Image.Image, path: Path, resolution: int) -> None:
    """Downsamples the supersampled `image` to resolution x resolution and saves it as JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((resolution, resolution), Image.Resampling.LANCZOS).save(path, quality=95)


# ---------------------------------------------------------------------------------------------
# The object concept and its class: teapots.


def _write_object_concept(
    folder: Path, root: Path, resolution: int, rng: np.random.Generator
) -> list[str]:
    """Writes the concept teapot's references and init.json; returns the distinct plain captions."""
    entries = []
    for index, scene in enumerate(OBJECT_SCENES):
        canvas = _scene_background(scene, resolution * _SUPERSAMPLE, rng)
        _draw_concept_teapot(canvas, rng)
        _save(canvas, folder / f"{index}.jpg", resolution)
        entries.append(
            {
                "instance_prompt": f"a {PLACEHOLDER} {OBJECT_CONCEPT} {scene}",
                "plain_prompt": f"a {OBJECT_CONCEPT} {scene}",
                "instance_data_path": _authors_path(folder / f"{index}.jpg", root),
                "weight": 1.0,
            }
        )
    (folder / "init.json").write_text(json.dumps(entries, indent=4) + "\n")
    return list(dict.fromkeys(entry["plain_prompt"] for entry in entries))


def _scene_background(scene: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Returns a wall over a wooden table, or a sky over grass, with a jittered horizon."""
    horizon = int(size * rng.uniform(0.55, 0.65))
    if scene == "on a table":
        upper, lower = (225, 215, 190), (130, 85, 50)
    else:
        upper, lower = (150, 195, 235), (70, 150, 60)
    canvas = Image.new("RGB", (size, size), upper)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, horizon, size, size], fill=lower)
    stripe = tuple(int(c * 0.8) for c in lower)
    for y in range(horizon + size // 16, size, size // 10):  # wood grain or grass rows
        tilt = int(rng.integers(-size // 40, size // 40 + 1))
        draw.line([0, y, size, y + tilt], stripe, size // 80)
    return canvas


def _draw_teapot(
    canvas: Image.Image,
    center: tuple[float, float],
    width: float,
    body: tuple[int, int, int],
    aspect: float = 0.75,
    knob: tuple[int, int, int] | None = None,
) -> None:
    """Draws a teapot (body, lid, knob, spout on the right, handle on the left) onto `canvas`."""
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    w, h = width / 2, width * aspect / 2
    dark = tuple(int(c * 0.6) for c in body)
    line = max(2, int(width / 14))
    draw.arc([cx - w * 1.45, cy - h * 0.6, cx - w * 0.55, cy + h * 0.6], 90, 270, dark, line)
    spout = [(cx + w * 0.8, cy), (cx + w * 1.5, cy - h * 0.9), (cx + w * 1.6, cy - h * 0.85),
             (cx + w * 0.9, cy + h * 0.45)]
    draw.polygon(spout, fill=dark)
    draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=body, outline=dark, width=line // 2)
    draw.ellipse([cx - w * 0.45, cy - h * 1.2, cx + w * 0.45, cy - h * 0.75], fill=dark)
    r = width / 14
    draw.ellipse([cx - r, cy - h * 1.2 - 2 * r, cx + r, cy - h * 1.2], fill=knob or dark)


def _draw_concept_teapot(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Draws the concept's own teapot (red, white dots, gold knob) at a jittered spot and size."""
    size = canvas.size[0]
    width = size * rng.uniform(0.38, 0.46)
    cx = size * rng.uniform(0.38, 0.58)
    cy = size * 0.62 - width * 0.2
    _draw_teapot(canvas, (cx, cy), width, _CONCEPT_RED, knob=(230, 190, 40))
    draw = ImageDraw.Draw(canvas)
    dot = width / 16
    for dx, dy in ((-0.25, -0.05), (0.2, -0.1), (0.0, 0.15), (-0.3, 0.2), (0.3, 0.15)):
        x, y = cx + dx * width, cy + dy * width
        draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(250, 250, 245))


def _write_class_images(folder: Path, resolution: int, rng: np.random.Generator) -> None:
    """Writes generic teapots of random colour, shape, place and backdrop (the class prior)."""
    size = resolution * _SUPERSAMPLE
    for index in range(NUM_CLASS_IMAGES):
        upper, lower = (tuple(int(c) for c in rng.integers(60, 240, 3)) for _ in range(2))
        canvas = Image.new("RGB", (size, size), upper)
        ImageDraw.Draw(canvas).rectangle([0, int(size * rng.uniform(0.5, 0.75)), size, size], lower)
        body = tuple(int(c) for c in rng.integers(20, 255, 3))
        width = size * rng.uniform(0.3, 0.5)
        center = (size * rng.uniform(0.35, 0.6), size * rng.uniform(0.45, 0.6))
        _draw_teapot(canvas, center, width, body, aspect=rng.uniform(0.55, 0.95))
        _save(canvas, folder / f"{index}.jpg", resolution)


# ---------------------------------------------------------------------------------------------
# Two subjects at once (MuDI's layout): the concept teapot and an orange cat, with their masks.


def _write_multi_subject_concept(folder: Path, resolution: int, rng: np.random.Generator) -> None:
    """Writes three images of each subject of MULTI_SUBJECTS on a table or grass, each with its
    mask, and metadata.jsonl as MuDI ships it."""
    draw = {"a": _draw_concept_teapot, "b": _draw_cat}
    _write_masked_set(folder / "metadata.jsonl", MULTI_SUBJECTS, draw, ("on a table", "on the grass", "on a table"),
                      resolution, rng)


def _write_multi_subject_prior(folder: Path, resolution: int, rng: np.random.Generator) -> None:
    """Writes the two subjects' masked prior set as MuDI ships one (class_metadata.jsonl, ids
    naming the class words): two generic teapots of random colour and shape, two cats."""
    draw = {"a": _draw_generic_teapot, "b": _draw_cat}
    _write_masked_set(folder / "class_metadata.jsonl", PRIOR_CLASSES, draw, ("on the grass", "on a table"),
                      resolution, rng)


def _write_masked_set(file: Path, phrases: dict[str, str], draw: dict, scenes: Sequence[str], resolution: int,
                      rng: np.random.Generator) -> None:
    """Writes one image per scene of each subject (`draw[id](canvas, rng)` draws it), each with
    its mask (the pixels where the subject drawn over two different backdrops agrees), and `file`
    in MuDI's metadata layout."""
    folder = file.parent
    folder.mkdir(parents=True)
    size = resolution * _SUPERSAMPLE
    lines = [json.dumps({"id": phrases})]
    for subject, phrase in phrases.items():
        for index, scene in enumerate(scenes):
            name = f"{subject}{index:02d}.jpg"
            canvas = _scene_background(scene, size, rng)
            state = rng.bit_generator.state
            draw[subject](canvas, rng)
            rng.bit_generator.state = state
            black, white = Image.new("RGB", (size, size), (0, 0, 0)), Image.new("RGB", (size, size), (255, 255, 255))
            draw[subject](black, rng)
            rng.bit_generator.state = state
            draw[subject](white, rng)
            same = np.all(np.asarray(black) == np.asarray(white), axis=-1)
            _save(canvas, folder / name, resolution)
            mask = Image.fromarray((same * 255).astype(np.uint8)).resize((resolution, resolution), Image.Resampling.BOX)
            mask.save(folder / f"mask_{subject}{index:02d}.png")
            lines.append(json.dumps({"id": subject, "file_name": name, "mask_path": f"mask_{subject}{index:02d}.png",
                                     "text": f"a photo of a {phrase} {scene}"}))
    file.write_text("\n".join(lines) + "\n")


def _draw_generic_teapot(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Draws a teapot of random colour, shape and place (a class image of the prior set)."""
    size = canvas.size[0]
    body = tuple(int(c) for c in rng.integers(20, 255, 3))
    center = (size * rng.uniform(0.4, 0.6), size * rng.uniform(0.5, 0.6))
    _draw_teapot(canvas, center, size * rng.uniform(0.35, 0.5), body, aspect=rng.uniform(0.55, 0.95))


def _draw_cat(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Draws the second subject, an orange cat (the style concept's shapes), at a jittered spot."""
    size = canvas.size[0]
    scale, dx = rng.uniform(0.8, 1.0), rng.uniform(-0.12, 0.12)
    draw = ImageDraw.Draw(canvas)
    for polygon, colour in _subject_shapes("cat"):
        points = [(size * (0.5 + (x - 0.5) * scale + dx), size * (0.95 - (0.95 - y) * scale)) for x, y in polygon]
        draw.polygon(points, fill=colour)


# ---------------------------------------------------------------------------------------------
# The style concept: soft translucent washes with darker rims on grainy paper.


def _write_style_concept(
    folder: Path, root: Path, resolution: int, rng: np.random.Generator
) -> None:
    """Writes one watercolour image per subject and the style's init.json (no plain prompts)."""
    entries = []
    for index, subject in enumerate(STYLE_SUBJECTS):
        image = _watercolor(subject, resolution * _SUPERSAMPLE, rng)
        _save(image, folder / f"{index}.jpg", resolution)
        article = "An" if subject[0] in "aeiou" else "A"
        entries.append(
            {
                "instance_prompt": f"{article} {subject} {STYLE_PHRASE}",
                "instance_data_path": _authors_path(folder / f"{index}.jpg", root),
                "weight": 1.0,
            }
        )
    (folder / "init.json").write_text(json.dumps(entries, indent=4) + "\n")


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> list[tuple[float, float]]:
    """Returns a 24-gon approximating an axis-aligned ellipse."""
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Returns the corners of an axis-aligned rectangle."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _subject_shapes(subject: str) -> list[tuple[list[tuple[float, float]], tuple[int, int, int]]]:
    """Returns the subject as (polygon in unit coordinates, colour) pairs, back to front."""
    water, wood = (90, 140, 200), (140, 95, 60)
    shapes = {
        "cat": [(_ellipse(0.5, 0.65, 0.22, 0.15), (240, 150, 60)),
                (_ellipse(0.68, 0.45, 0.12, 0.11), (240, 150, 60)),
                ([(0.58, 0.40), (0.60, 0.26), (0.67, 0.36)], (200, 110, 40)),
                ([(0.70, 0.36), (0.77, 0.26), (0.79, 0.40)], (200, 110, 40)),
                (_ellipse(0.26, 0.55, 0.04, 0.16), (200, 110, 40))],
        "house": [(_rect(0.28, 0.48, 0.72, 0.82), (230, 200, 120)),
                  ([(0.22, 0.50), (0.50, 0.24), (0.78, 0.50)], (190, 60, 60)),
                  (_rect(0.45, 0.64, 0.55, 0.82), wood)],
        "tree": [(_rect(0.46, 0.52, 0.54, 0.85), wood),
                 (_ellipse(0.40, 0.45, 0.14, 0.13), (80, 160, 70)),
                 (_ellipse(0.60, 0.43, 0.15, 0.14), (60, 140, 80)),
                 (_ellipse(0.50, 0.30, 0.15, 0.13), (100, 180, 80))],
        "boat": [(_rect(0.0, 0.70, 1.0, 1.0), water),
                 ([(0.25, 0.62), (0.75, 0.62), (0.66, 0.74), (0.34, 0.74)], wood),
                 (_rect(0.49, 0.22, 0.51, 0.62), wood),
                 ([(0.52, 0.24), (0.52, 0.58), (0.72, 0.58)], (235, 225, 200))],
    }
    return shapes[subject]


def _watercolor(subject: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Returns `subject` painted as layered, jittered, blurred washes on textured paper."""
    grain = rng.normal(0.0, 6.0, (size // 8, size // 8, 1))
    paper = np.clip(np.array([246, 240, 226]) + grain, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(paper).resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    for polygon, color in _subject_shapes(subject):
        for _ in range(3):  # overlapping translucent layers give uneven pigment and darker rims
            layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            jitter = rng.normal(0.0, 0.012, (len(polygon), 2))
            points = [
                (size * (x + dx), size * (y + dy)) for (x, y), (dx, dy) in zip(polygon, jitter)
            ]
            ImageDraw.Draw(layer).polygon(
                points, fill=color + (90,), outline=tuple(int(c * 0.7) for c in color) + (120,),
                width=max(1, size // 100),
            )
            layer = layer.filter(ImageFilter.GaussianBlur(size / 120))
            canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB")
