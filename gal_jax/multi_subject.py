"""Several subjects at once (MuDI): their data set as MuDI users lay it out, read unchanged.

    <dataset>/metadata.jsonl        line 1: {"id": {"a": "olis harry potter toy", "b": "hta corgi"}}
                                    then one line per image:
                                    {"id": "a", "file_name": "a00.jpg", "mask_path": "mask_a00.jpg",
                                     "text": "A photo of a olis harry potter toy on a desk."}
    <dataset>/a00.jpg, mask_a00.jpg, ...
    <reg>/class_metadata.jsonl      the prior set, the same layout (ids name the class words:
                                    {"a": "harry potter toy", "b": "Corgi"})

Masks are given (greyscale or RGB images of the image's size; white = the subject): segmentation
(SAM, OWLv2) stays outside this project. Paths in a line are relative to the metadata file's
folder (absolute ones are kept). Every problem is reported with the file and the line that has it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from gal_jax.images import ImageError, open_rgb, resize_shorter_side

METADATA = "metadata.jsonl"
CLASS_METADATA = "class_metadata.jsonl"
_LINE_KEYS = ("id", "file_name", "mask_path", "text")


class MultiSubjectDataError(ValueError):
    """A multi-subject data set that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class SubjectImage:
    """One image of one subject: its id (a key of the first line), files and caption."""

    subject: str
    image: Path
    mask: Path
    text: str
    line: int  # 1-based line of the metadata file, for messages


@dataclasses.dataclass(frozen=True)
class MultiSubjectSet:
    """A metadata.jsonl (or class_metadata.jsonl) as read: the subjects' identifier phrases by id,
    in the file's order, and their images."""

    file: Path
    subjects: dict[str, str]
    images: tuple[SubjectImage, ...]

    def of(self, subject: str) -> tuple[SubjectImage, ...]:
        """Returns the images of one subject, in file order."""
        return tuple(image for image in self.images if image.subject == subject)


def read_metadata(path: Path | str, *, check_images: bool = True) -> MultiSubjectSet:
    """Returns the data set of a MuDI `metadata.jsonl` (or `class_metadata.jsonl`), given the file
    or its folder (metadata.jsonl, else class_metadata.jsonl).

    Checks what would otherwise fail mid-training: the first line maps ids to non-empty phrases;
    every other line is an object with `id` (one of those), `file_name`, `mask_path` and `text`;
    every subject has an image; with `check_images`, every image and mask opens and each mask has
    its image's size. Blank lines are skipped.

    Raises:
      MultiSubjectDataError: naming the file and line of the first problem.
    """
    file = _metadata_file(Path(path))
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MultiSubjectDataError(f"{file}: cannot read ({err})") from None
    numbered = [(number, text) for number, text in enumerate(lines, start=1) if text.strip()]
    if not numbered:
        raise MultiSubjectDataError(f"{file}: empty; line 1 must map subject ids to their phrases, "
                                    '{"id": {"a": "olis harry potter toy", "b": "hta corgi"}}')
    first_number, first = numbered[0]
    subjects = _subject_phrases(_json_object(file, first_number, first), file, first_number)
    images = tuple(_subject_image(_json_object(file, number, text), file, number, subjects)
                   for number, text in numbered[1:])
    for subject, phrase in subjects.items():
        if not any(image.subject == subject for image in images):
            raise MultiSubjectDataError(f"{file}: subject {subject!r} ({phrase!r}) has no image line")
    if check_images:
        for image in images:
            _check_image_and_mask(image, file)
    return MultiSubjectSet(file=file, subjects=subjects, images=images)


def class_of(phrase: str) -> str:
    """Returns a subject's class from its identifier phrase: the phrase without its first word
    ("olis harry potter toy" -> "harry potter toy"), or the phrase when it is one word."""
    words = phrase.split()
    return " ".join(words[1:]) if len(words) > 1 else phrase


def replace_phrases(text: str, phrases: dict[str, str], replacements: dict[str, str]) -> str:
    """Returns `text` with every subject's phrase replaced by its replacement (longest phrases
    first, case-insensitively, so "A photo of a Olis toy" also loses its identifier)."""
    for subject in sorted(phrases, key=lambda s: -len(phrases[s])):
        text = re.sub(re.escape(phrases[subject]), lambda _, s=subject: replacements[s], text, flags=re.IGNORECASE)
    return text


def joined(parts: Sequence[str]) -> str:
    """Returns 'x', 'x and y', or 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _metadata_file(path: Path) -> Path:
    if path.is_dir():
        for name in (METADATA, CLASS_METADATA):
            if (path / name).is_file():
                return path / name
        raise MultiSubjectDataError(f"{path}: no {METADATA} or {CLASS_METADATA} in this folder")
    if not path.is_file():
        raise MultiSubjectDataError(f"{path}: file not found")
    return path


def _json_object(file: Path, number: int, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise MultiSubjectDataError(f"{file}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise MultiSubjectDataError(f"{file}, line {number}: expected a JSON object, got {type(value).__name__}")
    return value


def _subject_phrases(value: dict[str, Any], file: Path, number: int) -> dict[str, str]:
    subjects = value.get("id")
    if not isinstance(subjects, dict) or not subjects:
        raise MultiSubjectDataError(
            f"{file}, line {number}: the first line must map subject ids to their identifier phrases, "
            '{"id": {"a": "olis harry potter toy", "b": "hta corgi"}}; got ' + json.dumps(value)[:120])
    for key, phrase in subjects.items():
        if not isinstance(phrase, str) or not phrase.strip():
            raise MultiSubjectDataError(f"{file}, line {number}: subject {key!r} needs a non-empty phrase, "
                                        f"got {phrase!r}")
    return {str(key): phrase.strip() for key, phrase in subjects.items()}


def _subject_image(value: dict[str, Any], file: Path, number: int, subjects: dict[str, str]) -> SubjectImage:
    missing = [key for key in _LINE_KEYS if key not in value]
    if missing:
        raise MultiSubjectDataError(f"{file}, line {number}: missing {', '.join(map(repr, missing))} "
                                    f"(each image line has {', '.join(_LINE_KEYS)})")
    subject = value["id"]
    if not isinstance(subject, str) or subject not in subjects:
        raise MultiSubjectDataError(f"{file}, line {number}: id {subject!r} is not a subject of line 1 "
                                    f"({', '.join(map(repr, subjects))})")
    for key in ("file_name", "mask_path", "text"):
        if not isinstance(value[key], str) or not value[key].strip():
            raise MultiSubjectDataError(f"{file}, line {number}: {key} must be a non-empty string, "
                                        f"got {value[key]!r}")
    return SubjectImage(subject=subject, image=file.parent / value["file_name"], mask=file.parent / value["mask_path"],
                        text=value["text"].strip(), line=number)


def _check_image_and_mask(image: SubjectImage, file: Path) -> None:
    where = f"{file}, line {image.line}"
    for kind, path in (("file_name", image.image), ("mask_path", image.mask)):
        if not path.is_file():
            raise MultiSubjectDataError(f"{where}: {kind} {path} does not exist")
    try:
        with Image.open(image.image) as picture, Image.open(image.mask) as mask:
            size, mask_size = _upright_size(picture), _upright_size(mask)
    except (OSError, SyntaxError, ValueError) as err:
        raise MultiSubjectDataError(f"{where}: cannot read {image.image.name} or its mask ({err})") from None
    if size != mask_size:
        raise MultiSubjectDataError(f"{where}: mask {image.mask.name} is {mask_size[0]}x{mask_size[1]}, "
                                    f"its image {image.image.name} {size[0]}x{size[1]}")


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_mask(path: Path | str) -> np.ndarray:
    """Returns the mask file at `path` as float32 (H, W) in [0, 1] (the mean of its RGB channels,
    upright; a JPEG's soft edges are kept)."""
    try:
        rgb = np.asarray(open_rgb(path), np.float32)
    except ImageError as err:
        raise MultiSubjectDataError(str(err)) from None
    return rgb.mean(axis=-1) / 255.0


# ---------------------------------------------------------------------------------------------
# Seg-Mix (pure given the numpy Generator): segmented subjects pasted side by side on white
# ---------------------------------------------------------------------------------------------

# MuDI's caption of a mixed example: the item's own subject first, then the other.
SEGMIX_CAPTION = "a photo of a {} and a {}, simple background."


@dataclasses.dataclass(frozen=True)
class Segment:
    """A subject cut out of its image: RGB uint8 (h, w, 3) and its mask float32 (h, w) in [0, 1]."""

    pixels: np.ndarray
    mask: np.ndarray


def cut_out(pixels: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> Segment:
    """Returns the box of `pixels` (H, W, 3) around the subject (mask > threshold).

    Raises MultiSubjectDataError when the mask selects nothing (an all-black mask).
    """
    rows, cols = np.nonzero(mask > threshold)
    if rows.size == 0:
        raise MultiSubjectDataError("a mask selects no pixel (all below 0.5): nothing to cut out")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return Segment(np.ascontiguousarray(pixels[box]), np.ascontiguousarray(mask[box], np.float32))


def scaled(segment: Segment, rng: np.random.Generator, canvas: int, fixed_scale: float | None = None,
           columns: int = 2) -> Segment:
    """Returns `segment` resized for a `canvas`-pixel square shared with columns - 1 other subjects,
    as MuDI does for two: the largest factor f that keeps it within 1/columns of the width and the
    full height less a margin of canvas/32, times `fixed_scale` if given, else times a uniform draw
    in [0.75, 1]."""
    height, width = segment.mask.shape
    margin = canvas / 32
    largest = min((canvas / columns - margin) / width, (canvas - margin) / height)
    factor = largest * (fixed_scale if fixed_scale is not None else rng.uniform(0.75, 1.0))
    return _resized(segment, factor)


def _resized(segment: Segment, factor: float) -> Segment:
    """Returns `segment` scaled by `factor` (at least one pixel each way): pixels bicubic, the
    mask bilinear, clipped to [0, 1]."""
    height, width = segment.mask.shape
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    pixels = Image.fromarray(segment.pixels).resize(size, Image.Resampling.BICUBIC)
    mask = Image.fromarray(segment.mask.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return Segment(np.asarray(pixels), np.clip(np.asarray(mask, np.float32), 0.0, 1.0))


def _paste(image: np.ndarray, segment: Segment, top: int, left: int) -> np.ndarray:
    """Pastes `segment`'s pixels where its mask > 0.5 into `image` (in place) with its top-left
    corner at (top, left), clipped to the image; returns the bool mask (image's size) of the pixels
    pasted."""
    h = min(segment.mask.shape[0], image.shape[0] - top)
    w = min(segment.mask.shape[1], image.shape[1] - left)
    inside = segment.mask[:h, :w] > 0.5
    image[top:top + h, left:left + w][inside] = segment.pixels[:h, :w][inside]
    pasted = np.zeros(image.shape[:2], bool)
    pasted[top:top + h, left:left + w] = inside
    return pasted


def collage(left: Segment, right: Segment, rng: np.random.Generator, canvas: int, *,
            same_height: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (RGB uint8 (canvas, canvas, 3), mask bool (canvas, canvas)) of two segments on
    white, as MuDI's image_collage: `left` starts a random margin in [1, canvas/4] from the left
    edge, `right` ends one from the right edge; each at a random height (one shared height with
    `same_height`, as for the prior set). They may overlap; which one lies on top is a coin toss.
    The mask is the union of the two subjects' (mask > 0.5)."""
    margin_max = max(1, canvas // 4)
    heights = [left.mask.shape[0], right.mask.shape[0]]
    if same_height:
        top = int(rng.integers(0, canvas - max(heights) + 1))
        tops = [top, top]
    else:
        tops = [int(rng.integers(0, canvas - h + 1)) for h in heights]
    left_x = int(rng.integers(1, margin_max + 1))
    right_x = canvas - int(rng.integers(1, margin_max + 1)) - right.mask.shape[1]
    placed = [(left, tops[0], left_x), (right, tops[1], max(0, right_x))]
    if rng.random() < 0.5:
        placed.reverse()  # the later one is pasted on top
    image = np.full((canvas, canvas, 3), 255, np.uint8)
    union = np.zeros((canvas, canvas), bool)
    for segment, top, x in placed:
        union |= _paste(image, segment, top, x)
    return image, union


def segmix(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], rng: np.random.Generator,
           canvas: int, *, scales: tuple[float, float] | None = None, same_height: bool = False,
           first_on_left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns (RGB uint8, bool mask) of two (pixels, mask) subjects cut out, scaled (`scales`: their
    fixed factors, MuDI's relative_scale; None: random) and laid side by side on a white square of
    `canvas` pixels, `first` on the left unless `first_on_left` is False."""
    segments = [scaled(cut_out(*subject), rng, canvas, None if scales is None else scales[i])
                for i, subject in enumerate((first, second))]
    left, right = segments if first_on_left else segments[::-1]
    return collage(left, right, rng, canvas, same_height=same_height)


def relative_scales(relative_scale: float) -> tuple[float, float] | None:
    """MuDI's --relative_scale s (|s| <= 1) as fixed factors of (first id, second id): s > 0 ->
    (1, s), s < 0 -> (|s|, 1), 0 -> None (random scales)."""
    if not -1.0 <= relative_scale <= 1.0:
        raise ValueError(f"relative_scale={relative_scale} must lie in [-1, 1] (0: random scales)")
    if relative_scale > 0:
        return (1.0, relative_scale)
    if relative_scale < 0:
        return (-relative_scale, 1.0)
    return None


def soft_mask(mask: np.ndarray, latent_size: tuple[int, int], soft_alpha: float) -> np.ndarray:
    """Returns the per-pixel loss weight of a mask at latent resolution: the mask resized to
    `latent_size` (h, w) as MuDI does (torch's bilinear interpolate, half-pixel centres, no
    antialiasing: each latent pixel reads the 2 x 2 mask pixels around its centre), then
    mask * (1 - soft_alpha) + soft_alpha (MuDI's --soft_alpha: 1 weighs every pixel alike, 0 only
    the subjects)."""
    if not 0.0 <= soft_alpha <= 1.0:
        raise ValueError(f"soft_alpha={soft_alpha} must lie in [0, 1]")
    mask = np.asarray(mask, np.float32)
    rows = _bilinear_taps(mask.shape[0], latent_size[0])
    cols = _bilinear_taps(mask.shape[1], latent_size[1])
    small = np.einsum("ia,ab,jb->ij", rows, mask, cols)
    return (np.clip(small, 0, 1) * (1.0 - soft_alpha) + soft_alpha).astype(np.float32)


def _bilinear_taps(size_in: int, size_out: int) -> np.ndarray:
    """Returns the (size_out, size_in) weights of torch's bilinear resize along one axis
    (align_corners=False, antialias=False)."""
    source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    taps = np.zeros((size_out, size_in), np.float32)
    np.add.at(taps, (np.arange(size_out), low), 1 - frac)
    np.add.at(taps, (np.arange(size_out), high), frac)
    return taps


@dataclasses.dataclass(frozen=True)
class MixedExample:
    """One training example after Seg-Mix's coin: RGB uint8 (canvas, canvas, 3), the subjects'
    mask float32 (canvas, canvas) (all ones when not mixed), its caption and whether it was mixed."""

    pixels: np.ndarray
    mask: np.ndarray
    caption: str
    mixed: bool


def segmix_example(data: MultiSubjectSet, index: int, rng: np.random.Generator, canvas: int, *,
                   probability: float, relative_scale: float = 0.0, prior: bool = False,
                   load: Any = None) -> MixedExample:
    """Returns example `index` of `data` with MuDI's Seg-Mix applied with `probability`.

    Mixed: the example's subject and a random image of another subject (drawn uniformly among the
    other ids; the same id when there is only one, as for a one-class prior set), cut out, scaled
    and pasted on white; the caption SEGMIX_CAPTION with the example's subject's phrase first.
    Instance examples go left or right by a coin toss; prior examples (`prior`) always go left,
    both at one height, at random scales. Not mixed: the image as it is (`load(path)` -> RGB uint8
    array; default: the image file, upright) with an all-ones mask and its own caption.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"segmix probability {probability} must lie in [0, 1]")
    load = load or (lambda path: np.asarray(open_rgb(path)))
    item = data.images[index % len(data.images)]
    pixels = load(item.image)
    if rng.random() >= probability:
        return MixedExample(pixels, np.ones(pixels.shape[:2], np.float32), item.text, False)
    ids = list(data.subjects)
    images = [data.of(subject) for subject in ids]
    subject = ids.index(item.subject)
    image, mask, other = mix_subjects(
        (pixels, load_mask(item.mask)), subject, [len(of) for of in images],
        lambda s, i: (load(images[s][i].image), load_mask(images[s][i].mask)), rng, canvas,
        relative_scale=relative_scale, prior=prior)
    caption = SEGMIX_CAPTION.format(data.subjects[item.subject], data.subjects[ids[other]])
    return MixedExample(image, mask.astype(np.float32), caption, True)


def mix_subjects(own: tuple[np.ndarray, np.ndarray], subject: int, counts: Sequence[int],
                 image: Callable[[int, int], tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, canvas: int,
                 *, relative_scale: float = 0.0, prior: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (RGB uint8 composite, bool mask, the other subject's index) of MuDI's Seg-Mix of
    `own` (pixels, mask in [0, 1]) of subject index `subject` with a random image (`image(s, i)` ->
    (pixels, mask), i < counts[s]) of a random other subject (the same one when it is the only
    subject with images, as for a one-class prior set).

    Instances go left or right by a coin toss, at random scales or the fixed ones of
    `relative_scale` (which belong to the subjects in index order); prior examples (`prior`) always
    go left, both at one height, at random scales.
    """
    others = [s for s, count in enumerate(counts) if s != subject and count] or [subject]
    other = others[int(rng.integers(len(others)))]
    second = image(other, int(rng.integers(counts[other])))
    scales = None if prior else relative_scales(relative_scale)
    if scales is not None and subject != 0:
        scales = scales[::-1]  # the fixed factors belong to the ids, not to the positions
    on_left = True if prior else bool(rng.random() < 0.5)
    pixels, union = segmix(own, second, rng, canvas, scales=scales, same_height=prior, first_on_left=on_left)
    return pixels, union, other


# ---------------------------------------------------------------------------------------------
# MuDI's initialisation: a collage of the segmented subjects, whose latents shift the first noise
# ---------------------------------------------------------------------------------------------


def load_segment(image: Path | str, mask: Path | str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (RGB uint8, mask float32 in [0, 1]) of a subject image and its mask, both scaled as
    training images are (`images.resize_shorter_side`)."""
    pixels = resize_shorter_side(open_rgb(image), resolution)
    small = resize_shorter_side(Image.fromarray(load_mask(mask), mode="F"), resolution)
    return np.asarray(pixels), np.clip(np.asarray(small, np.float32), 0, 1)


def subjects_collage(segments: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], rng: np.random.Generator,
                     canvas: int) -> np.ndarray:
    """Returns MuDI's initial image (RGB uint8 (canvas, canvas, 3)): one random image of every
    subject (`segments`: (pixels, mask) images per subject), cut out, scaled and laid side by side
    on white in random order. Two subjects are laid out as Seg-Mix does; n > 2 each get a
    1/n-wide column at a random height."""
    chosen = [images[int(rng.integers(len(images)))] for images in segments]
    if len(chosen) == 2:
        pixels, _ = segmix(chosen[0], chosen[1], rng, canvas, first_on_left=bool(rng.random() < 0.5))
        return pixels
    image = np.full((canvas, canvas, 3), 255, np.uint8)
    column = canvas / len(chosen)
    for slot, subject in enumerate(rng.permutation(len(chosen))):
        segment = scaled(cut_out(*chosen[subject]), rng, canvas, columns=len(chosen))
        height, width = segment.mask.shape
        left = int(slot * column + rng.integers(0, max(1, int(column) - width) + 1))
        top = int(rng.integers(0, canvas - height + 1))
        _paste(image, segment, top, left)
    return image


def initial_images(references: Sequence[Any], subjects: Sequence[str], resolution: int, base_seed: int,
                   round_index: int, grid: Sequence[tuple[int, int]]) -> np.ndarray:
    """Returns MuDI's initial image (uint8 (len(grid), resolution, resolution, 3)) of every
    (prompt_id, seed) of a generation grid: `subjects_collage` of the references with masks
    (objects with .image, .mask and .subject), image (p, s) drawn from its own numpy generator
    seeded (base_seed, round_index, p, s), so it does not depend on how the grid is chunked."""
    segments = [[load_segment(r.image, r.mask, resolution) for r in masked]
                for masked in _masked_by_subject(references, subjects, "MuDI's initial collage")]
    return np.stack([subjects_collage(segments, np.random.default_rng([base_seed, round_index, p, s]), resolution)
                     for p, s in grid])


def _masked_by_subject(references: Sequence[Any], subjects: Sequence[str], purpose: str) -> list[list[Any]]:
    """Returns per subject (in `subjects` order) its references with masks (objects with .image,
    .mask and .subject); raises ValueError naming `purpose` when a subject has none."""
    masked = [[r for r in references if r.subject == subject and r.mask is not None] for subject in subjects]
    missing = [subject for subject, found in zip(subjects, masked) if not found]
    if missing:
        raise ValueError(f"subjects {missing} have no masked image for {purpose}")
    return masked


def subject_portrait(image: Path | str, mask: Path | str, size: int) -> np.ndarray:
    """Returns RGB uint8 (size, size, 3): the subject cut out by its mask's box, scaled to fill
    the square less a margin of size/16 on each side, centred on white (the reference the
    oracle's identity check compares an image's strips with)."""
    segment = cut_out(*load_segment(image, mask, size))
    segment = _resized(segment, (size - size / 8) / max(segment.mask.shape))
    height, width = segment.mask.shape
    portrait = np.full((size, size, 3), 255, np.uint8)
    _paste(portrait, segment, (size - height) // 2, (size - width) // 2)
    return portrait


def subject_portraits(references: Sequence[Any], subjects: Sequence[str], size: int) -> list[np.ndarray]:
    """Returns per subject (in `subjects` order) the uint8 (r, size, size, 3) portraits of its
    references with masks (objects with .image, .mask and .subject)."""
    return [np.stack([subject_portrait(r.image, r.mask, size) for r in masked])
            for masked in _masked_by_subject(references, subjects, "the identity check")]
