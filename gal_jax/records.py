"""The round record's schema: typed, frozen dataclasses with JSON round trips.

A round record (`DIR/rounds/<r>/record.json`) holds everything needed to recompute the round's
decisions: the references it trained on, every scored direction with its images' similarities and
overfit flags, the openness, what was selected and whether the stop rule fired. Records are written
once and never rewritten; `schema_version` says which layout a file has. Files without the field
are version 1 (the first landing), which has the same fields: old workdirs still resume. Version 3
adds the identity check of multi-subject runs (`identity_check`, `subjects`, and each image's
`sim_subjects` and `identity_mixed`; a direction's overfit_rate then counts images that are overfit
or mixed); a record without the check is written as version 2, field for field as before.

Reading is strict: a missing or mistyped field raises `RecordError` naming the file and the field,
so a damaged record never becomes a wrong decision.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Mapping

SCHEMA_VERSION = 3
KNOWN_VERSIONS = (1, 2, 3)
NO_IDENTITY_CHECK = "none"
# Version-3 fields, left out of records without the identity check (written as version 2).
_IDENTITY_RECORD_FIELDS = ("identity_check", "subjects")
_IDENTITY_IMAGE_FIELDS = ("sim_subjects", "identity_mixed")


class RecordError(ValueError):
    """A round record (or an entry of it) lacks a field or has one of the wrong type."""


def _json_name(field: dataclasses.Field) -> str:
    return field.metadata.get("json", field.name)


@dataclasses.dataclass(frozen=True)
class ImageScore:
    """One generated image of a direction and its CLIP similarities."""

    path: str  # relative to DIR
    seed: int
    sim_anchor: float
    sim_plain: tuple[float, ...]  # one per plain prompt of the original references
    overfit: bool  # sim_anchor <= max(sim_plain)
    # v3, multi-subject runs with the identity check: per vertical strip (left to right), the mean
    # cosine to each subject's references (the record's `subjects` order), and whether the strips'
    # best subjects miss one (acquisition.identity_mixed).
    sim_subjects: tuple[tuple[float, ...], ...] = ()
    identity_mixed: bool = False


@dataclasses.dataclass(frozen=True)
class Direction:
    """One anchor direction scored this round."""

    prompt_id: int  # index in the original anchor pool
    prompt: str
    overfit_rate: float  # fraction of images overfit (or, with the identity check, overfit or mixed)
    entropy: float
    images: tuple[ImageScore, ...]


@dataclasses.dataclass(frozen=True)
class ReferenceEntry:
    """One reference image a round trained on."""

    image: str  # relative to DIR when inside it, else absolute
    prompt: str
    plain_prompt: str | None
    weight: float
    source: str  # "user" or "round-<r>"


@dataclasses.dataclass(frozen=True)
class SelectedEntry:
    """One image a round queried: it becomes a reference of the next round."""

    prompt_id: int
    prompt: str
    image: str
    weight: float


@dataclasses.dataclass(frozen=True)
class LossPoint:
    """The mean training loss of one log window, ending at `step`."""

    step: int
    loss: float


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """Everything one GAL round decided, and what it decided it from."""

    round: int
    feedback: str
    balance: bool
    openness_lambda: float = dataclasses.field(metadata={"json": "lambda"})
    k: int
    concept_phrase: str
    plain_prompts: tuple[str, ...]
    references: tuple[ReferenceEntry, ...]
    directions: tuple[Direction, ...]
    openness: float
    selected: tuple[SelectedEntry, ...]
    stopped: bool
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # How directions with equal entropy are ranked, and how a queried direction's image is chosen.
    tie_break: str = "pool order"
    image_rule: str = "highest sim_anchor"
    train_loss: tuple[LossPoint, ...] = ()  # the round's training loss curve (v2; empty in v1)
    # v3: the identity check of a multi-subject run ("clip") and its subject ids, in sim_subjects order.
    identity_check: str = NO_IDENTITY_CHECK
    subjects: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        # The layout a record has: version 3 only with the identity check's fields.
        version = SCHEMA_VERSION if self.identity_check != NO_IDENTITY_CHECK else min(self.schema_version, 2)
        object.__setattr__(self, "schema_version", version)

    def to_json(self) -> dict:
        """Returns the record as JSON-ready dicts and lists (the file's layout): version 3 with the
        identity check, else version 2 without its fields."""
        data = _to_json(self)
        if self.identity_check != NO_IDENTITY_CHECK:
            return data
        for name in _IDENTITY_RECORD_FIELDS:
            data.pop(name)
        for direction in data["directions"]:
            for image in direction["images"]:
                for name in _IDENTITY_IMAGE_FIELDS:
                    image.pop(name)
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "round record") -> "RoundRecord":
        """Returns the record read from parsed JSON; raises RecordError naming `source` and the field."""
        if not isinstance(data, dict):
            raise RecordError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", 1)
        if version not in KNOWN_VERSIONS:
            raise RecordError(
                f"{source}: schema_version {version!r} is not one this gal_jax reads {KNOWN_VERSIONS}; "
                "it was written by a newer version"
            )
        record = _from_json(cls, {**data, "schema_version": version}, source)
        _check_consistent(record, source)
        return record

    @property
    def scored(self) -> bool:
        """True when the round generated and scored directions (every round but a final one)."""
        return bool(self.directions)


def _check_consistent(record: RoundRecord, source: str) -> None:
    """Raises RecordError when the record's parts contradict each other."""
    if record.round < 1:
        raise RecordError(f"{source}: round {record.round} must be >= 1")
    prompt_ids = [d.prompt_id for d in record.directions]
    if len(set(prompt_ids)) != len(prompt_ids):
        raise RecordError(f"{source}: a prompt_id appears twice among the directions")
    for entry in record.selected:
        if record.directions and entry.prompt_id not in prompt_ids:
            raise RecordError(f"{source}: selected prompt_id {entry.prompt_id} was not scored this round")
    if record.identity_check != NO_IDENTITY_CHECK:
        n = len(record.subjects)
        for direction in record.directions:
            for image in direction.images:
                if len(image.sim_subjects) != n or any(len(row) != n for row in image.sim_subjects):
                    raise RecordError(f"{source}: image {image.path} has sim_subjects that are not "
                                      f"{n} strips x {n} subjects {list(record.subjects)}")


# ---------------------------------------------------------------------------------------------
# A small typed JSON converter for the dataclasses above.


def to_json(value: Any) -> Any:
    """Returns a record (or any part of one) as JSON-ready dicts and lists."""
    return _to_json(value)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_json_name(f): _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type, data: Any, source: str = "record") -> Any:
    """Returns a record part (`Direction`, `ImageScore`, ...) read from parsed JSON, checked."""
    return _from_json(cls, data, source)


def _from_json(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        name = _json_name(field)
        if name not in data:
            has_default = (field.default is not dataclasses.MISSING
                           or field.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise RecordError(f"{where}: missing field {name!r}")
        values[field.name] = _convert(hints[field.name], data[name], f"{where}: field {name!r}")
    return cls(**values)


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _from_json(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {_short(value)}")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {_short(value)}")
        return {str(k): _convert(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    return _scalar(kind, value, where)


def _scalar(kind: type, value: Any, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if isinstance(value, bool):  # bool is an int subclass: `true` as a number is a typo
        raise RecordError(f"{where}: expected {_KIND_NAMES.get(kind, kind.__name__)}, got {_short(value)}")
    if kind is int:
        if not isinstance(value, int):
            raise RecordError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if kind is float:
        if not isinstance(value, (int, float)):
            raise RecordError(f"{where}: expected a number, got {_short(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise RecordError(f"{where}: expected a string, got {_short(value)}")
        return value
    raise TypeError(f"records: no JSON conversion for {kind!r}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
