"""Reference sets (init.json), class images, the TFDS/array_record training set.

The authors' layout, which users already have:

    reg_data/<concept>/images/*.jpg                      class images for prior preservation
    reference_images/<object|style>/<concept>/*.jpg       the concept's reference images
    reference_images/<object|style>/<concept>/init.json   [{"instance_prompt", "plain_prompt",
                                                            "instance_data_path", "weight"}, ...]

A training round writes its references and class images once, with `write_training_set`, as a
TFDS data set in array_record format (no TensorFlow involved), which `input_pipeline.py` reads back
as batches (a grain DataLoader whose state can be checkpointed, so a killed round resumes with the
same next batch).

Record i pairs instance i mod n with class image i mod m; there are max(n, m) records (diffusers
DreamBooth). Images are stored already resized (shorter side = resolution, as losslessly encoded
PNG), so reading only crops, flips and rescales.

A multi-subject concept's masked prior set (MuDI's class_metadata.jsonl) pairs by subject instead,
as MuDI's DreamBoothDataset does: record i's class image is image i mod m_c of its instance's
subject c (instances without a subject, GAL's queried images, cycle through all class images), with
its own caption, mask and subject; its images are also written once more, as a side set
(`GalPriorSet`), for Seg-Mix to draw any class image of another subject from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from gal_jax import io_utils
from gal_jax.images import ImageError, open_rgb, resize_shorter_side
from gal_jax.multi_subject import SEGMIX_CAPTION, MultiSubjectSet, load_mask

INIT_JSON = "init.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_REQUIRED_KEYS = ("instance_prompt", "instance_data_path", "weight")
_BUILDER_NAME = "gal_training_set"
_PRIOR_BUILDER_NAME = "gal_prior_set"
_WITH_PRIOR, _INSTANCES_ONLY = "with_prior", "instances_only"


class DataError(ValueError):
    """Malformed reference data; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference image with its caption and its weight in the training loss."""

    image: Path
    prompt: str
    plain_prompt: str | None
    weight: float
    source: str = "user"
    mask: Path | None = None  # multi-subject sets: the subject's segmentation (white = subject)
    subject: str = ""  # multi-subject sets: the subject's id (a key of metadata.jsonl's first line)


# ---------------------------------------------------------------------------------------------
# Reference sets and class images.


def load_concept(concept_dir: Path | str) -> list[Reference]:
    """Returns the references listed in `<concept_dir>/init.json`, image paths resolved."""
    concept_dir = Path(concept_dir).expanduser().absolute()
    init_path = concept_dir / INIT_JSON
    if not init_path.is_file():
        raise FileNotFoundError(f"{init_path}: no {INIT_JSON} in concept folder {concept_dir}")
    try:
        entries = json.loads(init_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{init_path}: not valid JSON: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{init_path}: expected a non-empty list of reference entries")
    return [_parse_entry(entry, i, init_path) for i, entry in enumerate(entries)]


def _parse_entry(entry: Any, index: int, init_path: Path) -> Reference:
    """Returns the Reference described by entry `index` of `init_path`, validated."""
    where = f"{init_path}: entry {index}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in entry:
            raise DataError(f"{where}: missing key '{key}' (required: {', '.join(_REQUIRED_KEYS)})")
    prompt = _non_empty_string(entry["instance_prompt"], f"{where}: key 'instance_prompt'")
    plain_prompt = entry.get("plain_prompt")
    if plain_prompt is not None:
        plain_prompt = _non_empty_string(plain_prompt, f"{where}: key 'plain_prompt'")
    weight = entry["weight"]
    # bool is an int subclass: `true` as a weight is a typo, not 1.0.
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(f"{where}: key 'weight' must be a number, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"{where}: key 'weight' must be a finite number >= 0, got {weight!r}")
    raw_path = _non_empty_string(entry["instance_data_path"], f"{where}: key 'instance_data_path'")
    tried = candidate_image_paths(raw_path, init_path.parent)
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        listing = "\n  ".join(str(p) for p in tried)
        raise FileNotFoundError(f"{where}: image {raw_path!r} not found; tried:\n  {listing}")
    return Reference(image=found, prompt=prompt, plain_prompt=plain_prompt, weight=float(weight))


def _non_empty_string(value: Any, what: str) -> str:
    """Returns `value` if it is a non-blank string, else raises naming `what`."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what} must be a non-empty string, got {value!r}")
    return value


def candidate_image_paths(raw_path: str, concept_dir: Path) -> list[Path]:
    """Returns, in the order tried, where an init.json image path may point.

    Authors' files name images relative to their repo root (`./data/object/cat/imgs/0.jpg`);
    users' relative to the data root (`./reference_images/object/cat/0.jpg`), to the concept folder,
    or absolutely. Tried: the path as is if absolute; relative to the concept folder; relative to
    the data root; then ever shorter tails of it inside the concept folder, down to the bare file
    name (`imgs/0.jpg`, then `0.jpg`).
    """
    path = Path(raw_path).expanduser()
    candidates = [path] if path.is_absolute() else [concept_dir / path]
    data_root = _data_root(concept_dir)
    if not path.is_absolute() and data_root is not None:
        candidates.append(data_root / path)
    parts = path.parts[1:] if path.is_absolute() else path.parts
    candidates += [concept_dir.joinpath(*parts[k:]) for k in range(1, len(parts))]
    return list(dict.fromkeys(candidates))


def _data_root(concept_dir: Path) -> Path | None:
    """Returns the folder holding `reference_images/` (or the authors' `data/`), if any."""
    for ancestor in concept_dir.parents:
        if ancestor.name == "reference_images":
            return ancestor.parent
    # <root>/<data folder>/<object|style>/<concept>: the root is two levels above the kind folder.
    return concept_dir.parents[2] if len(concept_dir.parents) > 2 else None


def list_images(folder: Path | str) -> list[Path]:
    """Returns the image files directly inside `folder`, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_reference_folder(folder: Path | str, prompt: str) -> list[Reference]:
    """Returns one Reference (weight 1.0, caption `prompt`) for every image in `folder`."""
    prompt = _non_empty_string(prompt, f"caption for {folder}")
    images = list_images(folder)
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [
        Reference(image=p.absolute(), prompt=prompt, plain_prompt=None, weight=1.0) for p in images
    ]


def list_class_images(reg_dir: Path | str) -> list[Path]:
    """Returns the class images of `reg_data/<concept>` or `reg_data/<concept>/images`, sorted."""
    reg_dir = Path(reg_dir).expanduser()
    folder = reg_dir / "images" if (reg_dir / "images").is_dir() else reg_dir
    images = list_images(folder)
    if not images:
        raise FileNotFoundError(f"{folder}: no class images ({', '.join(IMAGE_SUFFIXES)})")
    return [p.absolute() for p in images]


# ---------------------------------------------------------------------------------------------
# Image preprocessing (diffusers DreamBooth: resize the shorter side, crop, scale to [-1, 1]).


def _open_rgb(path: Path) -> Image.Image:
    """Returns the image at `path` upright in 8-bit RGB, read as every user image is (`open_rgb`)."""
    try:
        return open_rgb(path)
    except FileNotFoundError:  # ImageNotFoundError, naming the file
        raise
    except ImageError as e:
        raise DataError(str(e)) from e


def crop_and_flip(
    pixels: np.ndarray,
    resolution: int,
    random_crop: bool,
    flip: bool,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Returns a resolution x resolution crop of `pixels` (H, W, C), centred unless random_crop."""
    if (random_crop or flip) and rng is None:
        raise ValueError("random_crop and flip need an rng")
    height, width = pixels.shape[:2]
    if min(height, width) < resolution:
        raise ValueError(f"image of {height}x{width} is smaller than the {resolution} crop")
    if random_crop:
        top = int(rng.integers(0, height - resolution + 1))
        left = int(rng.integers(0, width - resolution + 1))
    else:  # torchvision CenterCrop's rounding
        top = int(round((height - resolution) / 2.0))
        left = int(round((width - resolution) / 2.0))
    pixels = pixels[top : top + resolution, left : left + resolution]
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Returns uint8 pixels as float32 in [-1, 1]."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def load_image(
    path: Path | str,
    resolution: int,
    *,
    random_crop: bool = False,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Returns the image at `path` as float32 (resolution, resolution, 3) in [-1, 1].

    The shorter side is resized to `resolution` (bilinear, as diffusers DreamBooth), then the image
    is cropped (centre, or uniformly at random) and optionally flipped left-right with p = 0.5.
    """
    image = resize_shorter_side(_open_rgb(Path(path)), resolution)
    pixels = crop_and_flip(np.asarray(image), resolution, random_crop, flip, rng)
    return to_unit_range(pixels)


def _encoded_resized(path: Path, resolution: int) -> bytes:
    """Returns the image at `path`, shorter side resized to `resolution`, as PNG bytes."""
    buffer = io.BytesIO()
    # PNG is lossless, so a stored image reads back exactly as load_image would compute it;
    # level 1 keeps writing fast at a modest size cost.
    resize_shorter_side(_open_rgb(path), resolution).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _mask_fields(ref: Reference, resolution: int, subject_ids: Sequence[str]) -> dict[str, Any]:
    """Returns a multi-subject record's mask fields for `ref`: its mask resized as its image
    (shorter side = resolution) as PNG bytes and its subject's index, or an empty mask and -1
    without a mask."""
    mask = _encoded_mask(Path(ref.image), None if ref.mask is None else Path(ref.mask), resolution)
    subject = -1 if ref.mask is None else subject_ids.index(ref.subject)
    return {"instance_mask": mask, "instance_subject": np.int32(subject)}


def _encoded_mask(image: Path, mask: Path | None, resolution: int) -> bytes:
    """Returns the mask of `image` (all black when None) resized as the image is (shorter side =
    resolution), as greyscale PNG bytes."""
    image_size = _open_rgb(image).size
    if mask is None:
        picture = Image.new("L", image_size, 0)
    else:
        values = load_mask(mask)
        if values.shape[::-1] != image_size:
            raise DataError(f"{mask}: mask of {values.shape[1]}x{values.shape[0]} pixels for image {image} of "
                            f"{image_size[0]}x{image_size[1]}")
        picture = Image.fromarray(np.round(values * 255).astype(np.uint8))
    buffer = io.BytesIO()
    resize_shorter_side(picture, resolution).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The training set: TFDS GeneratorBasedBuilder, array_record files.


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a set built here: nothing about it is in TFDS's bucket, so the builder's
    look-up there (which leaves an empty /tmp/tmp*tfds folder behind on every set written, and
    asks the network) is skipped."""

    def initialize_from_bucket(self) -> None:
        pass


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder of the record dicts it is given, in order (write_training_set passes them;
    reading back needs none)."""

    def __init__(self, *, records: Iterable[dict[str, Any]] | None = None, **kwargs):
        self._records = records
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if self._records is None:
            raise ValueError(f"{type(self).__name__} is built by write_training_set, which passes records")
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(self._records)


class GalTrainingSet(_RecordsBuilder):
    """TFDS builder of one round's DreamBooth records (instance, and its paired class image).

    Built with the record dicts; read back (without them) by `tfds.data_source`. The config says
    whether records carry a class half (prior preservation) or are instances only.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Instance/class pairs, token ids and per-record weights."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=_WITH_PRIOR, description="instance + class image pairs"),
        tfds.core.BuilderConfig(name=_INSTANCES_ONLY, description="instance images only"),
    ]

    def __init__(
        self,
        *,
        records: Iterable[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
        token_length: int = 77,
        with_masks: bool = False,
        with_class_masks: bool = False,
        **kwargs,
    ):
        self._metadata = metadata or {}
        self._token_length = token_length
        self._with_masks = with_masks
        self._with_class_masks = with_class_masks
        super().__init__(records=records, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
        ids = tfds.features.Tensor(shape=(self._token_length,), dtype=np.int32)
        features = {
            "instance_image": image,
            "instance_ids": ids,
            "instance_index": tfds.features.Scalar(dtype=np.int32),
            "weight": tfds.features.Scalar(dtype=np.float32),
        }
        if self._with_masks:  # multi-subject sets: each instance's mask and subject (-1: none)
            features.update(
                instance_mask=tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                instance_subject=tfds.features.Scalar(dtype=np.int32),
            )
        if self.builder_config.name == _WITH_PRIOR:
            features.update(
                class_image=image, class_ids=ids, class_index=tfds.features.Scalar(dtype=np.int32)
            )
            if self._with_class_masks:  # a masked prior set: each class image's mask and subject
                features.update(
                    class_mask=tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    class_subject=tfds.features.Scalar(dtype=np.int32),
                )
        return _LocalDatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            # Record i must stay record i: the pairing and resumption depend on it.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._metadata),
        )


class GalPriorSet(_RecordsBuilder):
    """TFDS builder of a masked prior set's images (image, mask, subject index), beside the
    training records: Seg-Mix draws a random class image of another subject from all of them,
    not only from those the records pair."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Class images with their masks and subject indices."}

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "subject": tfds.features.Scalar(dtype=np.int32),
        }))


def _tokenize_checked(
    tokenize: Callable[[Sequence[str]], np.ndarray], captions: Sequence[str]
) -> np.ndarray:
    """Returns tokenize(captions) as int32 (len(captions), L), checking the shape."""
    ids = np.asarray(tokenize(list(captions)))
    if ids.ndim != 2 or ids.shape[0] != len(captions) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"tokenize must return integer ids of shape ({len(captions)}, L), "
            f"got {ids.dtype} {ids.shape}"
        )
    return ids.astype(np.int32)


def _fingerprint(
    references: Sequence[Reference], class_images: Sequence[Path], ids: np.ndarray, resolution: int,
    subjects: Sequence[str] = (), prior: MultiSubjectSet | None = None,
) -> str:
    """Returns a short hash of everything that decides the records' contents."""
    digest = hashlib.sha256(f"{resolution}".encode())
    digest.update(ids.tobytes())
    for ref in references:
        digest.update(f"{ref.weight!r}".encode())
    if subjects:  # only multi-subject sets: other sets keep the fingerprints they had
        digest.update(json.dumps([list(subjects), [ref.subject for ref in references]]).encode())
        for ref in references:
            digest.update(Path(ref.mask).read_bytes() if ref.mask else b"no mask")
    if prior is not None:  # only masked prior sets (their captions are in `ids`)
        digest.update(json.dumps([prior.subjects, [item.subject for item in prior.images]]).encode())
        for item in prior.images:
            digest.update(Path(item.mask).read_bytes())
    for path in [ref.image for ref in references] + list(class_images):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _paired_class_images(references: Sequence[Reference], num_class_images: int,
                        prior: MultiSubjectSet | None = None) -> list[int]:
    """Returns the class image of every record (indices into the class images): record i's is
    i mod m (diffusers DreamBooth), or with a masked `prior`, as MuDI pairs them, image i mod m_c of
    the record's instance's subject c (in file order; instances of no prior subject: i mod m)."""
    records = max(len(references), num_class_images)
    if not num_class_images:
        return []
    by_subject = {} if prior is None else {
        subject: [j for j, item in enumerate(prior.images) if item.subject == subject] for subject in prior.subjects}
    paired = []
    for i in range(records):
        own = by_subject.get(references[i % len(references)].subject)
        paired.append(own[i % len(own)] if own else i % num_class_images)
    return paired


def _records(
    references: Sequence[Reference],
    class_images: Sequence[Path],
    ids: np.ndarray,
    resolution: int,
    subject_ids: Sequence[str] = (),
    prior: MultiSubjectSet | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields the record dicts: record i pairs instance i mod n with its class image
    (`_paired_class_images`). With `subject_ids` (multi-subject sets) instances carry their mask and
    subject index; with a masked `prior`, class images carry their mask, their subject's index
    among the prior's ids and their own caption's ids (`ids[n + j]` for class image j)."""
    n, m = len(references), len(class_images)
    # The few instance images recur in every record; the many class images are encoded as they
    # come, so the whole set never sits in memory.
    instance_png = [_encoded_resized(Path(ref.image), resolution) for ref in references]
    masks = [_mask_fields(ref, resolution, subject_ids) for ref in references] if subject_ids else None
    paired = _paired_class_images(references, m, prior)
    for i in range(max(n, m)):
        record = {
            "instance_image": instance_png[i % n],
            "instance_ids": ids[i % n],
            "instance_index": np.int32(i % n),
            "weight": np.float32(references[i % n].weight),
        }
        if masks:
            record.update(masks[i % n])
        if m:
            j = paired[i]
            record.update(
                class_image=_encoded_resized(Path(class_images[j]), resolution),
                class_ids=ids[n + j] if prior is not None else ids[n],
                class_index=np.int32(j),
            )
            if prior is not None:
                record.update(_prior_fields(prior, j, resolution))
        yield record


def _prior_fields(prior: MultiSubjectSet, index: int, resolution: int) -> dict[str, Any]:
    """Returns the class mask (PNG, resized as its image) and subject index of the prior's image `index`."""
    item = prior.images[index]
    return {"class_mask": _encoded_mask(item.image, item.mask, resolution),
            "class_subject": np.int32(list(prior.subjects).index(item.subject))}


def _prior_side_records(prior: MultiSubjectSet, resolution: int) -> Iterator[dict[str, Any]]:
    """Yields the side set's records (`GalPriorSet`): every class image of the prior, in file order."""
    for index, item in enumerate(prior.images):
        fields = _prior_fields(prior, index, resolution)
        yield {"image": _encoded_resized(item.image, resolution), "mask": fields["class_mask"],
               "subject": fields["class_subject"]}


def _checked_prior(prior: MultiSubjectSet, class_images: Sequence[Path], subject_ids: Sequence[str]) -> None:
    """Raises ValueError unless `prior` is a masked prior set for these subjects and class images."""
    if not subject_ids:
        raise ValueError(f"{prior.file}: a masked prior set pairs class images with a multi-subject concept's "
                         "subjects; pass `subjects`")
    unknown = sorted(set(prior.subjects) - set(subject_ids))
    if unknown:
        raise ValueError(f"{prior.file}: prior ids {unknown} are not subjects of the concept ({list(subject_ids)})")
    if [Path(p) for p in class_images] != [Path(item.image) for item in prior.images]:
        raise ValueError(f"{prior.file}: class_images must be the prior set's images, in its order")


def write_training_set(
    references: Sequence[Reference],
    class_images: Sequence[Path],
    class_prompt: str | None,
    out_dir: Path | str,
    tokenize: Callable[[Sequence[str]], np.ndarray],
    resolution: int,
    subjects: dict[str, str] | None = None,
    prior: MultiSubjectSet | None = None,
) -> Path:
    """Writes the round's training records as TFDS array_record under `out_dir`; returns out_dir.

    Captions are tokenized once and stored as ids. With no class images (style runs) the records
    are the instances alone. Built in a temporary folder and renamed into place, so a killed write
    never leaves a half-written set; an existing set at `out_dir` is replaced.

    `subjects` ({id: identifier phrase}, a multi-subject concept's) makes a set Seg-Mix can read:
    every instance carries its mask (references without one, such as GAL's queried images, carry
    none and are never mixed) and its subject, and the metadata holds the token ids of Seg-Mix's
    caption for every ordered pair of subjects.

    `prior` (a multi-subject concept's masked prior set, MuDI's class_metadata.jsonl, whose images
    `class_images` are) pairs class images by subject, each with its own caption (no class_prompt),
    mask and subject; the metadata holds its class words and the ids of Seg-Mix's caption for every
    ordered pair of them, and a side set (`GalPriorSet`) all its images.
    """
    if not references:
        raise ValueError("write_training_set needs at least one reference")
    subject_ids = list(subjects or {})
    if prior is not None:
        _checked_prior(prior, class_images, subject_ids)
    elif class_images and not (class_prompt and class_prompt.strip()):
        raise ValueError("class images need a non-empty class_prompt")
    unknown = sorted({ref.subject for ref in references if ref.mask is not None} - set(subject_ids))
    if unknown:
        raise ValueError(f"references with masks name subjects {unknown} that `subjects` lacks ({subject_ids})")
    out_dir = Path(out_dir).expanduser().absolute()
    class_captions = [item.text for item in prior.images] if prior else [class_prompt] if class_images else []
    ids = _tokenize_checked(tokenize, [ref.prompt for ref in references] + class_captions)
    metadata = {
        "resolution": resolution,
        "num_instances": len(references),
        "num_class_images": len(class_images),
        "class_prompt": class_prompt if class_images and prior is None else None,
        "fingerprint": _fingerprint(references, class_images, ids, resolution, subject_ids, prior),
    }
    if subject_ids:
        phrases = [subjects[s] for s in subject_ids]
        metadata.update(subjects=subject_ids, subject_phrases=phrases, segmix_ids=_pair_ids(tokenize, phrases))
    if prior is not None:
        words = list(prior.subjects.values())
        metadata.update(prior_subjects=list(prior.subjects), prior_words=words,
                        prior_segmix_ids=_pair_ids(tokenize, words),
                        prior_image_subjects=[list(prior.subjects).index(item.subject) for item in prior.images])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = io_utils.temporary_dir_beside(out_dir)
    try:
        # The round already shows progress; TFDS's own bars and "Downloading..." lines are noise.
        tfds.display_progress_bar(False)
        with contextlib.redirect_stdout(io.StringIO()):
            GalTrainingSet(
                records=_records(references, class_images, ids, resolution, subject_ids, prior),
                metadata=metadata,
                token_length=ids.shape[1],
                with_masks=bool(subject_ids),
                with_class_masks=prior is not None,
                config=_WITH_PRIOR if class_images else _INSTANCES_ONLY,
                data_dir=str(tmp_dir),
            ).download_and_prepare(file_format="array_record")
            if prior is not None:
                GalPriorSet(records=_prior_side_records(prior, resolution), data_dir=str(tmp_dir)
                            ).download_and_prepare(file_format="array_record")
        io_utils.replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _pair_ids(tokenize: Callable[[Sequence[str]], np.ndarray], words: Sequence[str]) -> list:
    """Returns the token ids (nested lists, (k, k, L)) of Seg-Mix's caption for every ordered pair
    of the k subjects named by `words` (first: the example's own subject)."""
    pairs = [SEGMIX_CAPTION.format(first, second) for first in words for second in words]
    return _tokenize_checked(tokenize, pairs).reshape(len(words), len(words), -1).tolist()


def _config_name(data_dir: Path) -> str:
    """Returns which GalTrainingSet config was written under `data_dir`."""
    written = [c for c in (_WITH_PRIOR, _INSTANCES_ONLY) if (data_dir / _BUILDER_NAME / c).is_dir()]
    if len(written) != 1:
        raise FileNotFoundError(f"{data_dir}: not a training set written by write_training_set")
    return written[0]


def open_training_set(data_dir: Path | str) -> tuple[Sequence[dict[str, Any]], dict[str, Any]]:
    """Returns (random-access records, metadata) of the training set written under `data_dir`."""
    data_dir = Path(data_dir).expanduser().absolute()
    versions = sorted((data_dir / _BUILDER_NAME / _config_name(data_dir)).iterdir())
    # Built from the folder's own dataset_info, so the features (the token length of the
    # tokenizer that wrote the set) are the written ones, not the builder class's defaults.
    builder = tfds.builder_from_directory(str(versions[-1]))
    return builder.as_data_source(split="train"), dict(builder.info.metadata)


def open_prior_set(data_dir: Path | str) -> Sequence[dict[str, Any]]:
    """Returns the random-access side set of a training set's masked prior (`GalPriorSet`): every
    class image with its mask and subject index, in the prior file's order."""
    versions = sorted((Path(data_dir).expanduser().absolute() / _PRIOR_BUILDER_NAME).iterdir())
    return tfds.builder_from_directory(str(versions[-1])).as_data_source(split="train")


def num_records(data_dir: Path | str) -> int:
    """Returns the number of records (instance examples) in the training set at `data_dir`."""
    return len(open_training_set(data_dir)[0])
