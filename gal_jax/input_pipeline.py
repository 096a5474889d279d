"""The input pipeline: a training set (`data.write_training_set`) read back as global batches.

`make_train_iterator` is a grain DataLoader over the set's records: shuffled with a seed and
repeated, each record preprocessed into its instance and class examples (crop, flip, scale to
[-1, 1]; MuDI's Seg-Mix for multi-subject sets), batched per process. Its state is checkpointed
with the train state, so a killed round resumes with the same next batch, and the global batches
are the same for any process count (`_GlobalBatchSlice`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from gal_jax.data import crop_and_flip, open_prior_set, open_training_set, to_unit_range
from gal_jax.multi_subject import mix_subjects, relative_scales, soft_mask

class _TrainingSource(grain.sources.RandomAccessDataSource):
    """The training set's records, named by their fingerprint for grain's check on restore."""

    def __init__(self, source: Sequence[dict[str, Any]], fingerprint: str):
        self._source = source
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[index]

    def __repr__(self) -> str:
        # grain checks this on restore: same contents, wherever the folder now lives. (`length`
        # is kept so that iterator states saved by earlier versions still restore.)
        return (
            f"GalTrainingSet(fingerprint={self._fingerprint}, records={len(self._source)}, "
            f"length={len(self._source)})"
        )


@dataclasses.dataclass(frozen=True)
class _Preprocess(grain.transforms.RandomMap):
    """Turns one record into its 1 (instance) or 2 (instance, class) training examples."""

    resolution: int
    random_crop: bool
    flip: bool

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        halves = ["instance"] + (["class"] if "class_image" in record else [])
        pixels = [
            crop_and_flip(record[f"{h}_image"], self.resolution, self.random_crop, self.flip, rng)
            for h in halves
        ]
        return {
            "pixel_values": to_unit_range(np.stack(pixels)),
            "input_ids": np.stack([record[f"{h}_ids"] for h in halves]).astype(np.int32),
            "weight": np.full(len(halves), record["weight"], np.float32),
            "is_prior": np.array([h == "class" for h in halves]),
        }


@dataclasses.dataclass(frozen=True)
class SegMix:
    """MuDI's Seg-Mix in the input pipeline (`config.data.segmix`).

    With `probability`, once the optimizer step reaches `start_step`, a record's instance is
    replaced by its subject cut out and pasted beside a random image of another subject on white
    (`multi_subject.segmix`), captioned "a photo of a {its phrase} and a {the other's}, simple
    background."; `relative_scale` fixes the subjects' scales (0: random), and the example's loss
    weighs each latent pixel by mask * (1 - soft_alpha) + soft_alpha (1: the plain loss).
    """

    probability: float
    start_step: int = 0
    relative_scale: float = 0.0
    soft_alpha: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"data.segmix.prob={self.probability} must lie in [0, 1]")
        if self.start_step < 0:
            raise ValueError(f"data.segmix.start_step={self.start_step} must be >= 0")
        relative_scales(self.relative_scale)  # raises for |s| > 1
        if not 0.0 <= self.soft_alpha <= 1.0:
            raise ValueError(f"data.segmix.soft_alpha={self.soft_alpha} must lie in [0, 1]")

    @classmethod
    def from_config(cls, config) -> "SegMix | None":
        """Returns config.data.segmix's settings, or None when Seg-Mix is off (prob 0, or absent)."""
        settings = config.data.get("segmix")
        if settings is None or not settings.prob:
            return None
        return cls(float(settings.prob), int(settings.start_step), float(settings.relative_scale),
                   float(settings.soft_alpha))


class _PositionedSource(_TrainingSource):
    """The training records, each with its position in the global record stream: Seg-Mix's start
    step depends on it. Keys are position * records + record (`_GlobalBatchSlice(positioned=True)`)."""

    _POSITIONS = 1 << 40  # grain reads key % len(source): the length covers every position

    def __len__(self) -> int:
        return len(self._source) * self._POSITIONS

    def __getitem__(self, key: int) -> dict[str, Any]:
        position, index = divmod(int(key), len(self._source))
        return {**self._source[index], "position": position}

    def __repr__(self) -> str:
        return (f"PositionedGalTrainingSet(fingerprint={self._fingerprint}, records={len(self._source)})")


class _PriorSegments:
    """A masked prior set's class images by subject index, read from its side set when Seg-Mix
    draws one (grain workers pickle only the folder and the index)."""

    def __init__(self, data_dir: Path, image_subjects: Sequence[int], num_subjects: int):
        self._dir = Path(data_dir)
        self._by_subject = [[j for j, s in enumerate(image_subjects) if s == subject]
                            for subject in range(num_subjects)]
        self._source = None

    @property
    def counts(self) -> list[int]:
        """The number of class images of each subject."""
        return [len(images) for images in self._by_subject]

    def __call__(self, subject: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (RGB uint8, mask float32 in [0, 1]) of class image `index` of subject `subject`."""
        if self._source is None:
            self._source = open_prior_set(self._dir)
        record = self._source[self._by_subject[subject][index]]
        return np.asarray(record["image"]), record["mask"][..., 0].astype(np.float32) / 255.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}


@dataclasses.dataclass(frozen=True)
class _SegMixPreprocess(_Preprocess):
    """`_Preprocess`, then Seg-Mix on the instance half (see `SegMix`); adds `loss_mask` (halves,
    h, w) at latent resolution (ones for every example not mixed, as in MuDI). When the instance
    is mixed and its class image has a subject (a masked prior set), the class half is mixed too,
    as MuDI mixes its prior: the class image's segment on the left, beside a random class image of
    another prior subject, both at one height, at random scales."""

    segmix: SegMix = SegMix(0.0)
    records_per_step: int = 1
    latent_size: int = 8
    segments: tuple = ()  # per subject index: ((pixels uint8 (H, W, 3), mask float32 (H, W)), ...)
    pair_ids: np.ndarray | None = None  # (subjects, subjects, L) int32: Seg-Mix's caption per pair
    prior: _PriorSegments | None = None  # a masked prior set's class images
    prior_pair_ids: np.ndarray | None = None  # (prior subjects, prior subjects, L) int32

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        position = record["position"]
        coin = rng.random()
        example = super().random_map(record, rng)
        halves = len(example["weight"])
        mask = np.ones((halves, self.latent_size, self.latent_size), np.float32)
        subject = int(record["instance_subject"])
        started = position // self.records_per_step >= self.segmix.start_step
        if started and coin < self.segmix.probability and subject >= 0:
            counts = [len(images) for images in self.segments]
            mask[0] = self._mix(example, record, "instance", counts, lambda s, i: self.segments[s][i], self.pair_ids,
                                rng)
            if self.prior is not None and int(record.get("class_subject", -1)) >= 0:
                mask[1] = self._mix(example, record, "class", self.prior.counts, self.prior, self.prior_pair_ids, rng)
        example["loss_mask"] = mask
        return example

    def _mix(self, example: dict[str, np.ndarray], record: dict[str, Any], half: str, counts: Sequence[int],
             image: Callable[[int, int], tuple[np.ndarray, np.ndarray]], pair_ids: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
        """Replaces the example's `half` ("instance", or "class" in the prior's layout) by the
        Seg-Mix of the record's with a random image (`image(s, i)`, i < counts[s]) of another
        subject; returns its soft mask at latent resolution."""
        row = 0 if half == "instance" else 1
        own = (record[f"{half}_image"], record[f"{half}_mask"][..., 0].astype(np.float32) / 255.0)
        subject = int(record[f"{half}_subject"])
        pixels, union, other = mix_subjects(own, subject, counts, image, rng, self.resolution,
                                            relative_scale=self.segmix.relative_scale, prior=half == "class")
        example["pixel_values"][row] = to_unit_range(pixels)
        example["input_ids"][row] = pair_ids[subject, other]
        return soft_mask(union.astype(np.float32), (self.latent_size,) * 2, self.segmix.soft_alpha)


def _prior_mix(data_dir: Path | str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Returns `_SegMixPreprocess`'s prior fields for a set with a masked prior set, else {}."""
    if not metadata.get("prior_subjects"):
        return {}
    prior = _PriorSegments(Path(data_dir).expanduser().absolute(), metadata["prior_image_subjects"],
                           len(metadata["prior_subjects"]))
    return {"prior": prior, "prior_pair_ids": np.asarray(metadata["prior_segmix_ids"], np.int32)}


def _subject_segments(records: Sequence[dict[str, Any]], metadata: dict[str, Any]) -> tuple:
    """Returns the masked instance images of a multi-subject set by subject index."""
    segments = [[] for _ in metadata["subjects"]]
    for index in range(metadata["num_instances"]):  # record i < n holds instance i
        record = records[index]
        subject = int(record["instance_subject"])
        if subject >= 0:
            mask = record["instance_mask"][..., 0].astype(np.float32) / 255.0
            segments[subject].append((np.asarray(record["instance_image"]), mask))
    return tuple(tuple(images) for images in segments)


@dataclasses.dataclass(frozen=True)
class _FlattenPairs(grain.transforms.Map):
    """Merges the (records, halves) leading axes: instance 0, its class image, instance 1, ..."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


class _GlobalBatchSlice:
    """A grain sampler: this process's rows of every global batch of one global record order.

    The order is grain's IndexSampler over all records (shuffled with the seed, a new permutation
    each epoch, the random-augmentation rng of a record drawn from its global position), the same
    for any process count. Global batch b holds positions [b * G, (b + 1) * G); process p reads
    rows [p * n, (p + 1) * n) of each, n = G / process_count. So the global batches, and with them
    training, do not depend on how many processes read them.
    """

    def __init__(self, num_records: int, *, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, num_epochs: int | None, positioned: bool = False):
        self._num_records, self._positioned = num_records, positioned
        self._order = grain.samplers.IndexSampler(
            num_records=num_records, shard_options=grain.sharding.NoSharding(), shuffle=True,
            num_epochs=num_epochs, seed=seed,
        )
        self._global = global_batch_size
        self._rows = _records_per_process(global_batch_size, process_index, process_count)
        self._first_row = process_index * self._rows
        full_batches = None if num_epochs is None else len(self._order) // global_batch_size
        self._length = sys.maxsize if full_batches is None else full_batches * self._rows
        if process_count == 1 and not positioned:
            # The order grain's per-process sharding gave one process, which earlier versions
            # used: their checkpointed iterator states restore (grain compares the reprs).
            sharded = grain.sharding.ShardOptions(0, 1, drop_remainder=True)
            self._describe = repr(grain.samplers.IndexSampler(
                num_records=num_records, shard_options=sharded, shuffle=True, num_epochs=num_epochs, seed=seed))
            return
        self._describe = (f"GlobalBatchSlice(records={num_records}, global_batch_size={global_batch_size}, "
                          f"rows={self._first_row}:{self._first_row + self._rows}, seed={seed}, "
                          f"num_epochs={num_epochs}{', positioned' if positioned else ''})")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"sampler index {index} not in [0, {self._length})")
        batch, row = divmod(index, self._rows)
        position = batch * self._global + self._first_row + row
        chosen = self._order[position]
        key = chosen.record_key + (position * self._num_records if self._positioned else 0)
        return grain.RecordMetadata(index=index, record_key=key, rng=chosen.rng)

    def __repr__(self) -> str:
        return self._describe


def _records_per_process(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Returns global_batch_size / process_count, checking the batch splits evenly."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return global_batch_size // process_count


def make_train_iterator(
    data_dir: Path | str,
    *,
    global_batch_size: int,
    seed: int,
    resolution: int,
    random_crop: bool = False,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    segmix: SegMix | None = None,
    latent_size: int = 0,
) -> grain.DataLoaderIterator:
    """Returns a checkpointable grain iterator over this process's batches of the training set.

    Shuffled with `seed` and repeated (`num_epochs=None`: forever). The global batches are the
    same for any process count: each process reads only its global_batch_size // process_count
    rows of each (see `_GlobalBatchSlice`). Batches are dicts of
    numpy arrays, b examples each:
      pixel_values (b, H, W, 3) float32 in [-1, 1], input_ids (b, L) int32,
      weight (b,) float32, is_prior (b,) bool,
    where with class images each record gives two examples, the instance and then its paired class
    image (which inherits the instance's weight), so b = 2 * records. The iterator's
    `get_state()` / `set_state(state)` (or `grain.checkpoint.CheckpointSave/Restore` with orbax)
    resume it exactly; restoring needs the same data, seed, batch size, process layout and
    worker_count (> 0: that many grain worker processes crop and scale).

    `segmix` (a multi-subject set's, see `SegMix`) mixes instances as MuDI does, a global batch
    being one optimizer step for its start step, and with a masked prior set the class image of
    every mixed instance; batches then also hold loss_mask (b, latent_size, latent_size) float32.
    """
    records_per_process = _records_per_process(global_batch_size, process_index, process_count)
    records, metadata = open_training_set(data_dir)
    if metadata["resolution"] != resolution:
        raise ValueError(
            f"{data_dir}: training set was written at resolution {metadata['resolution']}, "
            f"asked for {resolution}"
        )
    preprocess = _Preprocess(resolution, random_crop, flip)
    source = _TrainingSource(records, metadata["fingerprint"])
    if segmix is not None:
        segments = _subject_segments(records, metadata) if metadata.get("subjects") else ()
        if sum(bool(images) for images in segments) < 2:
            raise ValueError(f"{data_dir}: Seg-Mix (data.segmix.prob={segmix.probability}) needs a multi-subject "
                             "set with masked images of at least two subjects (a metadata.jsonl concept)")
        if latent_size < 1:
            raise ValueError("Seg-Mix needs the latent_size of its loss masks")
        preprocess = _SegMixPreprocess(
            resolution, random_crop, flip, segmix=segmix, records_per_step=global_batch_size,
            latent_size=latent_size, segments=segments,
            pair_ids=np.asarray(metadata["segmix_ids"], np.int32), **_prior_mix(data_dir, metadata))
        source = _PositionedSource(records, metadata["fingerprint"])
    loader = grain.DataLoader(
        data_source=source,
        sampler=_GlobalBatchSlice(
            len(records), global_batch_size=global_batch_size, process_index=process_index,
            process_count=process_count, seed=seed, num_epochs=num_epochs, positioned=segmix is not None,
        ),
        shard_options=grain.sharding.NoSharding(),  # the sampler reads this process's rows
        operations=[
            preprocess,
            grain.transforms.Batch(records_per_process, drop_remainder=True),
            _FlattenPairs(),
        ],
        worker_count=worker_count,
        # grain's default read-ahead (500 decoded records) is large at 512 px; a few batches do.
        read_options=grain.ReadOptions(
            num_threads=4, prefetch_buffer_size=4 * records_per_process + 8
        ),
    )
    return iter(loader)
