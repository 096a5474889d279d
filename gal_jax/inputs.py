"""Where a run's inputs come from, and their fingerprints.

`resolve(config)` is the one place that decides between the user's real paths and the embedded
tiny default, with no fallback hidden anywhere: the tiny default is used only when the config names
no real path at all; a config naming some real paths but not all that a command needs is an error
naming the missing field.

`fingerprints(...)` records the size and hash of every input file a run reads (init.json, reference
and class images, an anchor file, the model folders' config and tokenizer files), so that a resume
with changed inputs is refused naming the changed file (`check_fingerprints`), as a changed config is.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from gal_jax import io_utils

# The config fields that name real inputs; all empty means the tiny default.
REAL_PATH_FIELDS = {
    "sd": ("model", "sd_path"),
    "clip": ("model", "clip_path"),
    "concept": ("data", "concept_dir"),
    "class": ("data", "class_dir"),
}
FINGERPRINT_VERSION = 1
SD_CONFIG_FILES = (
    "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    # SDXL's second encoder and tokenizer (absent from SD 1.x / 2.x folders, then not listed)
    "text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
)
CLIP_CONFIG_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt",
                     "tokenizer_config.json")


class InputsError(ValueError):
    """A config names an incomplete set of inputs, or a missing one."""


class InputsChangedError(ValueError):
    """The input files of a workdir changed since the run started."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The model and data folders a command reads."""

    sd: Path | None
    clip: Path | None
    concept: Path | None
    class_dir: Path | None  # class images for prior preservation (objects), or None
    concepts_json: Path | None  # the tiny default's evaluation list, when the tiny default is used
    tiny: bool  # True when these are the embedded tiny default's paths


def _field(config, name: str) -> str:
    section, field = REAL_PATH_FIELDS[name]
    return str(config[section][field] or "").strip()


def _field_name(name: str) -> str:
    return "config." + ".".join(REAL_PATH_FIELDS[name])


def uses_tiny_default(config) -> bool:
    """Returns True when the config names no real input path (the embedded tiny default)."""
    return not any(_field(config, name) for name in REAL_PATH_FIELDS)


def resolve(config, need: Sequence[str] = ("sd", "clip", "concept")) -> RunPaths:
    """Returns the paths a command needs (`need` among sd, clip, concept), checked to exist.

    With no real path in the config, the embedded tiny default (built once under
    config.model.tiny_dir) provides every path. Otherwise each needed path must be set: a partial
    set is an error naming the missing field, never a quiet switch to the tiny default.
    """
    if uses_tiny_default(config):
        return _tiny_paths(config)
    missing = [name for name in need if not _field(config, name)]
    if missing:
        given = [_field_name(n) for n in REAL_PATH_FIELDS if _field(config, n)]
        raise InputsError(
            f"{', '.join(_field_name(m) for m in missing)} is empty, but {', '.join(given)} is set: "
            f"give every real path ({', '.join(_field_name(n) for n in need)}) or none of them "
            "for the embedded tiny default"
        )
    paths = RunPaths(
        sd=_existing(config, "sd", is_dir=True) if "sd" in need else None,
        clip=_existing(config, "clip", is_dir=True) if "clip" in need else None,
        concept=_existing(config, "concept", is_dir=True) if "concept" in need else None,
        class_dir=_existing(config, "class", is_dir=True) if _field(config, "class") else None,
        concepts_json=None,
        tiny=False,
    )
    return paths


def _existing(config, name: str, *, is_dir: bool) -> Path:
    path = Path(_field(config, name)).expanduser()
    if not path.exists():
        raise InputsError(f"{_field_name(name)}={str(path)!r}: no such folder")
    if is_dir and not path.is_dir():
        raise InputsError(f"{_field_name(name)}={str(path)!r}: is a file, expected a folder")
    return path


def _tiny_paths(config) -> RunPaths:
    from gal_jax import personalize, tiny

    trained = bool(config.model.get("tiny_world", False))
    root = Path(config.model.tiny_dir or tiny.default_dir(trained)).expanduser()
    if io_utils.is_primary():
        tiny.make_tiny(root, trained=trained)
    io_utils.sync("make_tiny")
    parts = tiny.make_tiny_paths(root, trained=trained)
    is_object = config.data.kind == "object"
    concept = "object_concept" if is_object else "style_concept"
    class_dir = "reg_dir"  # the tiny class images are teapots
    if config.train.get("method", "") in personalize.MULTI_SUBJECT_METHODS:
        concept, class_dir = "multi_subject_concept", "multi_subject_prior"  # teapots and cats, with masks
        if concept not in parts:
            raise InputsError("the tiny world has no multi-subject concept yet: set config.data.concept_dir to a "
                              "folder with MuDI's metadata.jsonl, or use the random tiny default (model.tiny_world=false)")
    return RunPaths(
        sd=parts["sd"],
        clip=parts["clip"],
        concept=parts[concept],
        class_dir=parts[class_dir] if is_object else None,
        concepts_json=parts["concepts_json"],
        tiny=True,
    )


# ---------------------------------------------------------------------------------------------
# Fingerprints


def file_fingerprint(path: Path) -> dict:
    """Returns {"size", "blake2b"} of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "blake2b": digest.hexdigest()}


def input_files(paths: RunPaths, references: Iterable[Path], class_images: Iterable[Path],
                anchor_file: Path | None = None, extra: Iterable[Path] = (), *,
                concept_file: str = "init.json") -> list[Path]:
    """Returns every input file a run reads whose change would change its results (no weights:
    hashing gigabytes each start is too slow; the config files pin the architecture);
    `concept_file` is the concept folder's list of references (a multi-subject set's metadata.jsonl)."""
    files = []
    if paths.concept is not None:
        files.append(paths.concept / concept_file)
    files += list(references) + list(class_images)
    if anchor_file is not None:
        files.append(anchor_file)
    for folder, names in ((paths.sd, SD_CONFIG_FILES), (paths.clip, CLIP_CONFIG_FILES)):
        if folder is not None:
            files += [folder / name for name in names if (folder / name).is_file()]
    files += list(extra)
    return list(dict.fromkeys(Path(f).absolute() for f in files))


def fingerprints(files: Sequence[Path]) -> dict:
    """Returns the fingerprints of `files` as written to DIR/inputs.json."""
    return {"version": FINGERPRINT_VERSION, "files": {str(f): file_fingerprint(Path(f)) for f in files}}


def check_fingerprints(saved: dict, current: dict, source: Path) -> None:
    """Raises InputsChangedError naming every input file that changed, appeared or went missing."""
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict):
        raise InputsChangedError(f"{source}: not a fingerprint file written by gal-jax (no 'files')")
    before, now = saved["files"], current["files"]
    changes = [f"{path} (changed)" for path in before if path in now and before[path] != now[path]]
    changes += [f"{path} (missing or no longer used)" for path in before if path not in now]
    changes += [f"{path} (new)" for path in now if path not in before]
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise InputsChangedError(
            f"{source}: the inputs changed since this workdir was started: {shown}. Restore them, "
            "or use a new --workdir."
        )
