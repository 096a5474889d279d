r"""Evaluation: TXT-ALN, IMG-ALN and OVF per concept and per round (GAL_SPEC.md "Evaluation metrics").

    gal-jax evaluate --workdir=DIR     # gathers DIR/rounds/<r>/eval.json into DIR/eval/results.{json,md}

The test set is the authors' concepts list JSON, read as it is:

    [{"class_prompt": "cat", "placeholder": "<cute-cat>",
      "test_prompts": "./data/test_prompts/cat.txt", "caption": ["a cat on the stairs"]}, ...]

Object test prompts name the class ("cat swimming in a pool"); generation inserts the placeholder
before the class word ("<cute-cat> cat swimming in a pool") and TXT-ALN scores the image against the
prompt as written, without it. The authors' style list ({"class_prompt", "instance_prompt",
"instance_data_path"}) is read too: every test prompt (their PartiPrompts.csv by default) gets the
caption's style descriptor appended, the image is scored against that prompt (as their style
notebook does, there being no placeholder), and the caption is the whole reference caption.

Relative paths in a concepts list are tried against the JSON's folder, its parent (the authors'
files name paths from their repo root, one level above `data/`) and the working directory.

The driver generates evaluation images with a Generator of its own, built from config.eval: by
default the authors' notebooks' protocol (the SD pipeline's default PNDM sampler, 50 steps,
guidance 7.5, seed 8888) with the paper's 8 images per test prompt, whatever sampler the GAL loop
uses. Each result's `settings` records that protocol.

The metric math is `metrics.py`; this module gathers embeddings (a `score.Scorer`, optionally a
DINOv2 `dino.DinoEmbedder`) and files. DINO reproduces the authors' evaluator (transformers' slow
BitImageProcessor, DINOv2's last hidden state mean-pooled) on our Flax DINOv2 (`gal_jax.nn.dino`)
under jit, without PyTorch; it is an optional extra beside IMG-ALN.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from gal_jax import anchors, eval_results, io_utils, metrics
from gal_jax.workdir import Workdir

KINDS = ("object", "style")
# Keys that may name a concept's reference images (a folder or one image): the authors' style list,
# diffusers' DreamBooth flag and the authors' notebook argument.
REFERENCE_KEYS = ("instance_data_path", "instance_data_dir", "src_img_dir")
DEFAULT_STYLE_PROMPTS = "PartiPrompts.csv"
EVAL_ROUND_INDEX = 0  # generation keys of evaluation images: the same noise every round


class ConceptsListError(ValueError):
    """A concepts list or one of its test prompt files is malformed; the message names the file."""


class ImageEmbedder(Protocol):
    def image_embeddings(self, images: Any) -> Any: ...


class TextImageEmbedder(ImageEmbedder, Protocol):
    def text_embeddings(self, prompts: Sequence[str]) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Concepts lists and prompt files


@dataclasses.dataclass(frozen=True)
class EvalConcept:
    """One concept of a test set: its test prompts, plain captions and (optionally) references."""

    name: str
    kind: str
    class_prompt: str
    placeholder: str | None  # objects: inserted before the class word for generation
    style_descriptor: str | None  # styles: appended to every test prompt ("in watercolor style")
    test_prompts: tuple[str, ...]  # as written in the prompt file
    captions: tuple[str, ...]  # plain reference captions: OVF's rivals to the test prompt
    reference_images: tuple[Path, ...] = ()
    source: Path | None = None  # the concepts list it was read from

    def generation_prompts(self) -> list[str]:
        """Returns the prompts to generate with: placeholder inserted, or style appended."""
        if self.kind == "style":
            return self.scoring_prompts()
        return [metrics.insert_placeholder(p, self.class_prompt, self.placeholder) for p in self.test_prompts]

    def scoring_prompts(self) -> list[str]:
        """Returns the prompts TXT-ALN and OVF score against (objects: without the placeholder)."""
        if self.kind == "style":
            return [f"{p} {self.style_descriptor}" for p in self.test_prompts]
        return list(self.test_prompts)


def read_concepts_list(path: str | Path) -> list[EvalConcept]:
    """Returns the concepts of an authors'-format concepts list JSON, test prompts read."""
    path = Path(path).expanduser().absolute()
    entries = io_utils.read_json(path)
    if not isinstance(entries, list) or not entries:
        raise ConceptsListError(f"{path}: expected a non-empty JSON list of concept entries")
    concepts = [_parse_concept(entry, index, path) for index, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for index, concept in enumerate(concepts):
        if concept.name in seen:
            raise ConceptsListError(
                f"{path}: entries {seen[concept.name]} and {index} both name the concept "
                f"{concept.name!r}; give them distinct 'concept' fields"
            )
        seen[concept.name] = index
    return concepts


def _parse_concept(entry: Any, index: int, path: Path) -> EvalConcept:
    """Returns entry `index` of concepts list `path` as an EvalConcept, validated."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise ConceptsListError(f"{where}: expected an object, got {type(entry).__name__}")
    class_prompt = _string(entry, "class_prompt", where)
    is_style_list = "instance_prompt" in entry and "placeholder" not in entry  # the authors' style format
    kind = entry.get("kind") or ("style" if is_style_list else "object")
    if kind not in KINDS:
        raise ConceptsListError(f"{where}: 'kind' is {kind!r}; expected one of {KINDS}")
    common = dict(
        name=_string(entry, "concept", where) if "concept" in entry else class_prompt,
        kind=kind,
        class_prompt=class_prompt,
        reference_images=_reference_images(entry, where, path),
        source=path,
    )
    parse = _style_concept if kind == "style" else _object_concept
    return parse(entry, where, path, common)


def _object_concept(entry: dict, where: str, path: Path, common: dict) -> EvalConcept:
    """Returns an object concept: placeholder, test prompts naming the class, plain captions."""
    prompts_path = resolve_listed_path(_string(entry, "test_prompts", where), path, f"{where}: 'test_prompts'")
    concept = EvalConcept(
        placeholder=_string(entry, "placeholder", where),
        style_descriptor=None,
        test_prompts=tuple(read_prompt_file(prompts_path)),
        captions=_captions(entry, where),
        **common,
    )
    _check_class_word(concept, prompts_path)
    return concept


def _style_concept(entry: dict, where: str, path: Path, common: dict) -> EvalConcept:
    """Returns a style concept: the caption's style descriptor, test prompts (Parti by default)."""
    caption = _string(entry, "instance_prompt", where)
    raw_prompts = _string(entry, "test_prompts", where) if "test_prompts" in entry else DEFAULT_STYLE_PROMPTS
    try:
        descriptor = anchors.style_descriptor(caption)
    except ValueError as err:
        raise ConceptsListError(f"{where}: {err}") from err
    return EvalConcept(
        placeholder=None,
        style_descriptor=descriptor,
        test_prompts=tuple(read_prompt_file(resolve_listed_path(raw_prompts, path, f"{where}: test prompts"))),
        captions=(caption,),
        **common,
    )


def _string(entry: dict, key: str, where: str) -> str:
    """Returns entry[key], which must be a non-blank string."""
    if key not in entry:
        raise ConceptsListError(f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise ConceptsListError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _captions(entry: dict, where: str) -> tuple[str, ...]:
    """Returns the entry's plain captions: a non-empty list of non-blank strings (or one string)."""
    captions = entry.get("caption")
    if isinstance(captions, str):  # one caption written without the list brackets
        captions = [captions]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ConceptsListError(
            f"{where}: key 'caption' must be a non-empty list of plain reference captions, got {captions!r}"
        )
    return tuple(" ".join(c.split()) for c in captions)


def _check_class_word(concept: EvalConcept, prompts_path: Path) -> None:
    """Raises naming the file and line of the first test prompt the placeholder cannot go into."""
    for number, prompt in enumerate(concept.test_prompts, start=1):
        try:
            metrics.insert_placeholder(prompt, concept.class_prompt, concept.placeholder)
        except ValueError as err:
            raise ConceptsListError(f"{prompts_path}: prompt {number}: {err}") from err


def _reference_images(entry: dict, where: str, path: Path) -> tuple[Path, ...]:
    """Returns the images named by the entry's reference key (a folder or one image), if any."""
    key = next((k for k in REFERENCE_KEYS if k in entry), None)
    if key is None:
        return ()
    found = resolve_listed_path(_string(entry, key, where), path, f"{where}: {key!r}")
    if found.is_file():
        return (found,)
    from gal_jax import data

    images = data.list_images(found)
    if not images:
        raise ConceptsListError(f"{where}: {key!r} folder {found} holds no images")
    return tuple(p.absolute() for p in images)


def resolve_listed_path(raw: str, listing: Path, what: str) -> Path:
    """Returns the existing path a concepts list names: absolute, or relative to the list's folder,
    its parent, or the working directory (tried in that order)."""
    raw_path = Path(raw).expanduser()
    if raw_path.is_absolute():
        candidates = [raw_path]
    else:
        candidates = [listing.parent / raw_path, listing.parent.parent / raw_path, Path.cwd() / raw_path]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = "\n  ".join(map(str, candidates))
    raise FileNotFoundError(f"{what}: {raw!r} not found; tried:\n  {tried}")


def read_prompt_file(path: str | Path) -> list[str]:
    """Returns the prompts of a text file (one a line, blank lines skipped) or a CSV ('Prompt' column)."""
    path = Path(path)
    text = io_utils.read_text(path)
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "Prompt" not in rows[0]:
            raise ConceptsListError(f"{path}: a CSV of prompts needs a 'Prompt' column (PartiPrompts layout)")
        lines = [row["Prompt"] or "" for row in rows]
    else:
        lines = text.splitlines()
    prompts = [" ".join(line.split()) for line in lines if line.strip()]
    if not prompts:
        raise ConceptsListError(f"{path}: no prompts (one prompt a line)")
    return prompts


# ---------------------------------------------------------------------------------------------
# Metrics from embeddings


def evaluate_images(
    scorer: TextImageEmbedder,
    images: Any,
    test_prompts: Sequence[str],
    reference_images: Any,
    captions: Sequence[str],
    *,
    txt_scale: float = 1.0,
    dino: ImageEmbedder | None = None,
) -> dict:
    """Returns TXT-ALN, IMG-ALN, OVF (and DINO) of generated images, with counts and per-image sims.

    Args:
      scorer: CLIP embeddings (`score.Scorer`): L2-normalised rows.
      images: uint8 (n, H, W, 3) generated images, numpy or device arrays.
      test_prompts: the n prompts the images are scored against (objects: without the placeholder).
      reference_images: uint8 (k, H', W', 3) reference images.
      captions: the plain reference captions OVF compares with (at least one).
      txt_scale: TXT-ALN multiplier (the authors' notebook uses 2.5; Table 1 is raw, 1.0).
      dino: optional DINOv2 embedder (`dino.DinoEmbedder`) for the DINO image similarity.
    """
    test_prompts, captions = list(test_prompts), list(captions)
    if len(test_prompts) != images.shape[0]:
        raise ValueError(f"evaluation: {images.shape[0]} images but {len(test_prompts)} test prompts")
    if not captions:
        raise ValueError("evaluation: OVF needs at least one plain reference caption")
    if reference_images.shape[0] == 0:
        raise ValueError("evaluation: IMG-ALN needs at least one reference image")
    image_emb = np.asarray(scorer.image_embeddings(images))
    distinct = {prompt: i for i, prompt in enumerate(dict.fromkeys(test_prompts))}
    prompt_of_image = np.asarray([distinct[p] for p in test_prompts])
    prompt_emb = np.asarray(scorer.text_embeddings(list(distinct)))[prompt_of_image]
    caption_emb = np.asarray(scorer.text_embeddings(captions))
    result = {
        "txt_aln": metrics.txt_alignment(image_emb, prompt_emb, txt_scale),
        "img_aln": metrics.img_alignment(image_emb, np.asarray(scorer.image_embeddings(reference_images))),
        "ovf": metrics.overfit_fraction(image_emb, prompt_emb, caption_emb),
    }
    if dino is not None:
        result["dino"] = metrics.img_alignment(
            np.asarray(dino.image_embeddings(images)), np.asarray(dino.image_embeddings(reference_images))
        )
    result["counts"] = {"images": len(test_prompts), "prompts": len(distinct),
                        "references": int(reference_images.shape[0]), "captions": len(captions)}
    result["settings"] = {"txt_scale": float(txt_scale)}
    result["per_image"] = _per_image(image_emb, prompt_emb, caption_emb, test_prompts)
    return result


def _per_image(image_emb, prompt_emb, caption_emb, test_prompts) -> list[dict]:
    """Returns each image's raw cosines to its prompt and to every caption, and its OVF flag."""
    to_captions = metrics.cosine_matrix(image_emb, caption_emb)
    return [
        {
            "prompt": prompt,
            "sim_prompt": metrics.txt_alignment(image_emb[i : i + 1], prompt_emb[i : i + 1]),
            "sim_captions": [float(s) for s in to_captions[i]],
            "overfit": metrics.overfit_fraction(image_emb[i : i + 1], prompt_emb[i : i + 1], caption_emb) > 0,
        }
        for i, prompt in enumerate(test_prompts)
    ]


def evaluate_model(
    generator,
    scorer: TextImageEmbedder,
    params,
    concept: EvalConcept,
    reference_images: Any = None,
    *,
    num_per_prompt: int,
    seed: int,
    txt_scale: float = 1.0,
    dino: ImageEmbedder | None = None,
    desc: str = "evaluate",
) -> dict:
    """Returns `evaluate_images` of `num_per_prompt` images per test prompt generated by `params`
    (`desc` names the generation's progress bar).

    Generation uses the concept's generation prompts (placeholder inserted); TXT-ALN and OVF score
    against its scoring prompts (without it). Every call draws the same noise (round index 0 and
    `seed`), so rounds are compared on equal footing. The result's settings name the protocol:
    `num_per_prompt`, `seed` and the generator's sampler, steps and guidance scale.
    `reference_images` is a uint8 array, a list of image paths, or None for the concept's own
    `reference_images`.
    """
    generation_prompts = concept.generation_prompts()
    images = generator.generate(
        params, generation_prompts, range(len(generation_prompts)), EVAL_ROUND_INDEX, num_per_prompt, seed,
        desc=desc,
    )
    scoring = [p for p in concept.scoring_prompts() for _ in range(num_per_prompt)]
    references = concept.reference_images if reference_images is None else reference_images
    if not hasattr(references, "shape"):
        if not references:
            raise ValueError(f"evaluation of {concept.name!r}: no reference images given or listed")
        references = load_images(references, scorer.clip.image_size)
    result = evaluate_images(
        scorer, images, scoring, references, concept.captions, txt_scale=txt_scale, dino=dino
    )
    result["settings"].update(num_per_prompt=int(num_per_prompt), seed=int(seed), **generator.settings)
    result["generation_prompts"] = generation_prompts
    return {"concept": concept.name, "kind": concept.kind, **result}


def load_images(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Returns the images at `paths` as uint8 (n, H, W, 3).

    Images of one size come back as they are (the Scorer preprocesses them on device). A set of
    mixed sizes (users' reference photos) is brought to size x size first, as CLIPImageProcessor
    does (PIL bicubic resize of the shortest side, center crop), so one compiled function embeds it.
    """
    if not paths:
        raise ValueError("load_images: no image paths")
    images = [io_utils.read_images([p])[0] for p in paths]
    if len({image.shape for image in images}) == 1:
        return np.stack(images)
    return np.stack([_resize_and_crop(image, size) for image in images])


def _resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Returns `image` with its shortest side resized to `size` (bicubic) and center-cropped square."""
    from PIL import Image

    from gal_jax.score import resized_shape

    height, width = resized_shape(image.shape[0], image.shape[1], size)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    top, left = (height - size) // 2, (width - size) // 2
    return resized[top : top + size, left : left + size]


# ---------------------------------------------------------------------------------------------
# Folders of existing images


def evaluate_folder(
    images_dir: str | Path,
    prompts_file: str | Path | None,
    references_dir: str | Path,
    captions: Sequence[str],
    clip_path: str | Path,
    *,
    txt_scale: float = 1.0,
    placeholder: str | None = None,
    name: str | None = None,
    dino_path: str | Path | None = None,
    allow_bin: bool = False,
) -> dict:
    """Returns the metrics of existing images scored with the CLIP model at `clip_path`.

    Each image's prompt comes from `images_dir/index.json` (written by `gal-jax sample`) when it
    exists, else image i (by sorted file name) goes with line i of `prompts_file`. A `placeholder`
    is removed from the prompts before scoring (TXT-ALN scores against the prompt without it).
    """
    from gal_jax import data, models, score, sharding
    from gal_jax.dino import DinoEmbedder

    images_dir = Path(images_dir)
    paths, prompts = _images_and_prompts(images_dir, prompts_file)
    if placeholder:
        prompts = [" ".join(p.replace(placeholder.strip(), " ").split()) for p in prompts]
    # No run config here: the backend's fastest attention, CLIP read straight onto every device.
    mesh = sharding.make_mesh()
    clip, clip_params = models.load_clip(clip_path, attention="auto", mesh=mesh, rules=(), allow_bin=allow_bin)
    scorer = score.Scorer(clip, clip_params, mesh)
    references = data.list_images(references_dir)
    if not references:
        raise FileNotFoundError(f"{references_dir}: no reference images")
    result = evaluate_images(
        scorer,
        load_images(paths, clip.image_size),
        prompts,
        load_images(references, clip.image_size),
        captions,
        txt_scale=txt_scale,
        dino=DinoEmbedder(dino_path) if dino_path else None,
    )
    return {"concept": name or images_dir.resolve().name, "round": None, **result}


def _images_and_prompts(images_dir: Path, prompts_file: str | Path | None) -> tuple[list[Path], list[str]]:
    """Returns the image paths of a folder and each one's prompt (index.json, else the prompts file)."""
    index_path = images_dir / "index.json"
    if index_path.is_file():
        index = io_utils.read_json(index_path)
        if not isinstance(index, list) or not index or not all(map(_is_index_entry, index)):
            raise ValueError(f"{index_path}: expected a non-empty list of {{'prompt': str, 'path': str}}")
        return [io_utils.resolve(images_dir, e["path"]) for e in index], [e["prompt"] for e in index]
    if prompts_file is None:
        raise ValueError(f"{images_dir}: no index.json; give a prompts file (image i <-> prompt line i)")
    from gal_jax import data

    paths = data.list_images(images_dir)
    prompts = read_prompt_file(prompts_file)
    if len(paths) != len(prompts):
        raise ValueError(
            f"{images_dir} holds {len(paths)} images but {prompts_file} has {len(prompts)} prompts; "
            "image i (sorted by name) goes with prompt line i"
        )
    return paths, prompts


def _is_index_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("path", "prompt"))


# ---------------------------------------------------------------------------------------------
# The command


def evaluate_command(
    workdir: str | Path,
    config=None,
    *,
    images: str | Path | None = None,
    prompts: str | Path | None = None,
    references: str | Path | None = None,
    captions: Sequence[str] = (),
    clip_path: str | Path | None = None,
    placeholder: str | None = None,
) -> Path:
    """Returns DIR/eval/results.md after writing results.json and results.md there.

    Without `images`: gathers the per-round results a run wrote (DIR/rounds/<r>/eval.json). With
    `images` (and `references`, `captions`; `prompts` unless the folder has index.json): scores
    those images with the CLIP model at `clip_path` (default: the config's model.clip_path).
    """
    workdir = Path(workdir)
    if images is not None:
        if references is None:
            raise ValueError("evaluating an image folder needs --references (a folder of reference images)")
        eval_config = config.eval if config is not None else {}
        results = [evaluate_folder(
            images, prompts, references, captions, clip_path or _config_clip_path(config),
            txt_scale=float(eval_config.get("txt_scale", 1.0)),
            placeholder=placeholder,
            dino_path=eval_config.get("dino_path") or None,
            allow_bin=bool(config.model.get("allow_bin", False)) if config is not None else False,
        )]
    else:
        results = _gathered_round_results(workdir)
    _, md_path = eval_results.write_results(results, Workdir(workdir).eval_dir)
    print(md_path.read_text())
    return md_path


def _gathered_round_results(workdir: Path) -> list[dict]:
    """Returns the round results of a workdir; raises saying how to get some when there are none."""
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir}: workdir does not exist")
    results = eval_results.read_round_results(workdir)
    if not results:
        raise FileNotFoundError(
            f"{workdir}: no evaluation results (rounds/<r>/eval.json). Evaluation runs after each round "
            "only when enabled: rerun `gal-jax run` with --config.eval.enabled=true "
            "--config.eval.concepts_json=<concepts list JSON>, or score existing images with "
            "`gal-jax evaluate --images=DIR --prompts=FILE --references=DIR` (evaluate.evaluate_folder)."
        )
    return results


def _config_clip_path(config) -> Path:
    """Returns the CLIP folder a config names (the tiny default's when it names no real path)."""
    if config is None:
        raise ValueError("evaluating an image folder needs a CLIP model: pass --clip_path or --config")
    from gal_jax import inputs

    return inputs.resolve(config, need=("clip",)).clip
