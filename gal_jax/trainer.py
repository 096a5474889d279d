"""The host side of training: the loop that feeds the compiled step, once per round and stage.

`Trainer` owns what `train.py`'s pure functions do not: the method's stages (`personalize.py`), the
compiled step of each (one compile per stage and batch layout for the whole run, so rounds never
recompile), the data iterator, the latent cache, the checkpoints and the progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gal_jax import checkpoint, data, faults, input_pipeline, personalize, sharding, train
from gal_jax.models import StableDiffusion, StableDiffusionParams
from gal_jax.train import Batch, FrozenInputs, Params, TrainState


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Latent cache (without random augmentation, an image always gives the same pixels)
# ---------------------------------------------------------------------------------------------


def _image_key(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """VAE posterior moments of every distinct training image, found by the image's pixel bytes.

    Valid only without random augmentation: then the pipeline yields an image's pixels bit for
    bit the same every time, so the bytes identify it.
    """

    rows: dict[bytes, int]
    mean: np.ndarray  # (num_images, C, h, w), scaled latents
    std: np.ndarray

    def replace_pixels(self, batch: Batch) -> Batch:
        """Returns the host batch with pixel_values replaced by cached latent_mean/latent_std."""
        try:
            rows = [self.rows[_image_key(pixels)] for pixels in batch["pixel_values"]]
        except KeyError:
            raise ValueError(
                "an image of the batch is not in the latent cache: latents can only be cached "
                "when the data pipeline does not augment (data.random_crop and data.flip off)"
            ) from None
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        return {**rest, "latent_mean": self.mean[rows], "latent_std": self.std[rows]}


def build_latent_cache(
    train_set_dir: Path,
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    resolution: int,
    chunk_size: int,
    known: dict[bytes, tuple[np.ndarray, np.ndarray]] | None = None,
) -> LatentCache:
    """Returns the latent moments of every distinct image of the training set, each encoded once.

    One pass over the set through the training pipeline itself (unaugmented), so the cached
    pixels are exactly those training sees; `encode` maps (chunk_size, H, W, 3) pixels to host
    (mean, std). `known` ({image key: (mean, std)}, filled in here) carries moments across calls:
    the class images and earlier references of a GAL run are encoded in its first round only.
    """
    known = {} if known is None else known
    one_pass = input_pipeline.make_train_iterator(
        train_set_dir, global_batch_size=1, seed=0, resolution=resolution, num_epochs=1
    )
    order: dict[bytes, None] = {}
    pending: dict[bytes, np.ndarray] = {}

    def encode_pending(count: int) -> None:
        keys = list(pending)[:count]
        mean, std = _encode_padded(encode, [pending.pop(key) for key in keys], chunk_size)
        known.update((key, (m, s)) for key, m, s in zip(keys, mean, std))

    for batch in one_pass:
        for pixels in batch["pixel_values"]:
            key = _image_key(pixels)
            if key not in order:
                order[key] = None
                if key not in known:
                    pending[key] = pixels
        if len(pending) >= chunk_size:
            encode_pending(chunk_size)
    if pending:
        encode_pending(len(pending))
    keys = list(order)
    return LatentCache(rows={key: row for row, key in enumerate(keys)},
                       mean=np.stack([known[key][0] for key in keys]),
                       std=np.stack([known[key][1] for key in keys]))


def _encode_padded(encode, images: list[np.ndarray], chunk_size: int):
    """Returns encode() of the images, padded to one chunk shape (so it compiles once)."""
    pixels = np.stack(images + [images[-1]] * (chunk_size - len(images)))
    mean, std = encode(pixels)
    return mean[: len(images)], std[: len(images)]


# ---------------------------------------------------------------------------------------------
# The round's training loop
# ---------------------------------------------------------------------------------------------


class _MetricLog:
    """Step metrics kept on device until a log step, then pulled, checked and shown in a bar."""

    def __init__(self, *, total: int, start: int, examples_per_step: int, progress: bool, desc: str,
                 loss_curve: list[dict] = ()):
        self.history: list[dict[str, float]] = []
        self.loss_curve = list(loss_curve)  # {"step", "loss"} per log window, across resumes
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.examples_per_step = examples_per_step
        self._bar = tqdm(
            total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
            disable=not progress or jax.process_index() != 0,
        )
        self._since = time.perf_counter()

    def start(self) -> None:
        """Starts the clocks of the bar's rate and of samples_per_s: call it once the step is
        compiled, so that neither counts the compile (the bar otherwise shows the first step's
        compile as its rate, an ETA of an hour for a 3-minute round)."""
        self._bar.unpause()
        self._since = time.perf_counter()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))
        self._bar.update(1)

    def pull(self) -> None:
        """Fetches the pending metrics; raises NonFiniteLossError naming the first bad step."""
        steps = [step for step, _ in self._pending]
        values = jax.device_get([metrics for _, metrics in self._pending])
        for step, metrics in zip(steps, values):
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(f"training loss is {metrics['loss']} at step {step}")
        elapsed = time.perf_counter() - self._since
        summary = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
        summary.update(step=steps[-1], samples_per_s=len(steps) * self.examples_per_step / elapsed)
        self.history.append(summary)
        self.loss_curve.append({"step": int(steps[-1]), "loss": summary["loss"]})
        self._bar.set_postfix(
            loss=f"{summary['loss']:.4f}", samples_per_s=f"{summary['samples_per_s']:.1f}"
        )
        self._pending, self._since = [], time.perf_counter()

    def __enter__(self) -> _MetricLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self._bar.close()


@dataclasses.dataclass(frozen=True)
class _TrainingStage:
    """A stage of the method with what its step needs built once: optimizer and step settings."""

    index: int
    stage: personalize.Stage
    optimizer: Any
    step_config: train.StepConfig

    @property
    def train(self):
        return self.stage.train


class Trainer:
    """Trains the method (`personalize.Method`; DreamBooth's whole UNet by default) from the base
    weights, once per GAL round; built once per run.

    Owns the compiled train step of every stage (compiled at the stage's first batch of the first
    round, then reused by every step of every round), the optimizers and the latent encoder.
    """

    def __init__(self, config, sd: StableDiffusion, mesh: Mesh, method: personalize.Method | None = None):
        """`sd` is the model the method trains (with its new tokens: `personalize.prepare`);
        `method` defaults to config.train.method, which must then add no tokens."""
        if method is None:
            sd, method = personalize.prepare(config, sd)
        self.config, self.sd, self.mesh, self.method = config, sd, mesh, method
        new_token_id = method.new_tokens.ids[0] if method.new_tokens else -1
        self.stages = []
        for index, stage in enumerate(method.stages):
            optimizer, step_config = _stage_settings(method.stages, stage, lora_scale=method.lora_scale,
                                                     new_token_id=new_token_id)
            self.stages.append(_TrainingStage(index, stage, optimizer, step_config))
        # How params and AdamW moments are laid out on the mesh: the model tree's logical axes, the rules.
        self.model_axes, self.rules = personalize.logical_axes(sd), sharding.logical_rules(config.mesh.get("rules"))
        augment = config.data.random_crop or config.data.flip
        self.segmix = input_pipeline.SegMix.from_config(config)
        # Seg-Mix composites are new images every time: they are encoded in the step.
        self.cache_latents = bool(config.train.cache_latents) and not augment and self.segmix is None
        self.compile_seconds = 0.0
        self._compiled: dict[Any, jax.stages.Compiled] = {}
        self._initializers: dict[Any, Callable[[Params], TrainState]] = {}
        # Made on the mesh inside jit: device_put of a key onto devices of other processes fails.
        self._rng = jax.jit(lambda: jax.random.key(config.train.seed), out_shardings=sharding.replicated(mesh))()
        self._encode = jax.jit(sd.encode_posterior, out_shardings=sharding.replicated(mesh))
        # VAE moments of every training image seen this run, by pixel bytes (build_latent_cache).
        self._latents: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._latents_vae: list[jax.Array] = []  # the VAE weights they were encoded with

    @property
    def optimizer(self):
        """The first stage's optimizer (the only one of single-stage methods)."""
        return self.stages[0].optimizer

    @property
    def step_config(self) -> train.StepConfig:
        """The first stage's step settings (the only ones of single-stage methods)."""
        return self.stages[0].step_config

    @property
    def num_compiles(self) -> int:
        """Returns how many times a train step has been compiled."""
        return len(self._compiled)

    def model_tree(self, base_params: StableDiffusionParams) -> dict[str, Params]:
        """Returns the model tree a round starts from (`personalize.model_tree`; the LoRA init is
        drawn from train.seed, the same every round)."""
        key = jax.random.fold_in(jax.random.key(self.config.train.seed), 1)
        return personalize.model_tree(self.method, base_params, key)

    def train_round(
        self,
        base_params: StableDiffusionParams,
        train_set_dir: Path,
        checkpoint_dir: Path | None = None,
        progress: bool = True,
        desc: str = "train",
        final_checkpoint: bool = True,
    ) -> tuple[personalize.Personalization, dict[str, Any]]:
        """Returns (what the method learned from base_params on the set, metrics): every stage in
        turn, each from the model tree the previous one left.

        With a checkpoint_dir (each stage of a multi-stage method in its own folder under it):
        saves every train.checkpoint_every steps and at a stage's end, keeps the last
        train.keep_checkpoints, and resumes from the latest one there (params, AdamW state, step,
        data position); a finished stage's last checkpoint holds its result, so a kill in stage 2
        resumes in stage 2. `final_checkpoint=False` skips the save after the last stage's last
        step, for a caller that writes the result itself and then deletes the checkpoints: a kill
        before that write resumes from the previous checkpoint and redoes at most
        checkpoint_every steps, to the same params.

        `base_params` is never modified or donated. Metrics: start_step, steps, loss (mean of the
        last log window), history (a dict per log step of this call), loss_curve ({"step", "loss"}
        per log step since step 0, steps counted across stages, carried across resumes by the
        checkpoints), when steps ran train_seconds, samples_per_s and compile_seconds, and with
        several stages `stages` (each stage's metrics).
        """
        train_set_dir = Path(train_set_dir)
        self.check_train_set(train_set_dir)
        tree = self.model_tree(base_params)
        trained_parts: set[str] = set()
        results = []
        for stage in self.stages:
            several = len(self.stages) > 1
            stage_dir = checkpoint_dir
            if checkpoint_dir is not None and several:
                stage_dir = Path(checkpoint_dir) / stage.stage.name
            trained, rest = personalize.split(tree, stage.stage.trainable)
            trained_parts |= set(trained)
            last = stage is self.stages[-1]
            trained, metrics = self._train_stage(
                stage, trained, rest, base_params.vae, train_set_dir, stage_dir, progress,
                f"{desc} {stage.stage.name}" if several else desc, final_checkpoint or not last)
            tree = personalize.merge(trained, rest)
            results.append(metrics)
        return self.method.result(tree, sorted(trained_parts)), _combined_metrics(results, self.compile_seconds)

    def check_train_set(self, train_set_dir: Path) -> None:
        """Raises ValueError when the set's batches cannot be split evenly over the mesh (for
        any stage)."""
        for stage in self.stages:
            train_config = stage.train
            examples = self._examples_per_step(train_set_dir, train_config)
            halves = examples // (train_config.batch_size * train_config.grad_accum_steps)
            train.check_batch_layout(
                examples,
                train_config.grad_accum_steps,
                self.mesh,
                source=f"({_stage_field(self.method.stages, stage.stage)}.batch_size="
                f"{train_config.batch_size}, {halves} per instance)",
            )

    def compiled_step(
        self, state: TrainState, batch: Batch, frozen: FrozenInputs, stage: int = 0
    ) -> jax.stages.Compiled:
        """Returns stage `stage`'s step compiled for these arrays' shapes (compiling the first
        time only)."""
        specs = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (state, batch, frozen),
        )
        return self._compiled_for(self.stages[stage], specs)

    def split_for(self, base_params: StableDiffusionParams, stage: int = 0) -> tuple[Params, Params]:
        """Returns (trained, rest) of the model tree at stage `stage`'s start for base params
        (under jax.eval_shape for abstract ones): for benchmarks."""
        return personalize.split(self.model_tree(base_params), self.stages[stage].stage.trainable)

    def compile_for(
        self, base_params: StableDiffusionParams, num_examples: int, stage: int = 0
    ) -> jax.stages.Compiled:
        """Returns stage `stage`'s step compiled for `base_params` (arrays or ShapeDtypeStructs)
        and global batches of `num_examples` rows, without reading data: for benchmarks."""
        compiled_stage = self.stages[stage]
        trained, rest = jax.eval_shape(lambda base: self.split_for(base, stage), base_params)
        state = train.abstract_train_state(trained, compiled_stage.optimizer, self.mesh, self.model_axes, self.rules)
        frozen = train.abstract_frozen_inputs(base_params.vae, rest, self.sd, self.mesh, self.rules)
        batch = train.abstract_batch(
            self.sd, self.mesh, num_examples=num_examples, resolution=self.config.data.resolution,
            cached_latents=self.cache_latents, loss_mask=self.segmix is not None,
        )
        return self._compiled_for(compiled_stage, (state, batch, frozen))

    def _compiled_for(self, stage: _TrainingStage, specs: tuple[TrainState, Batch, FrozenInputs]) -> jax.stages.Compiled:
        key = (stage.index, _shapes_key(specs))
        if key not in self._compiled:
            start = time.perf_counter()
            what = "the train step" + (f" of stage {stage.stage.name}" if len(self.stages) > 1 else "")
            if jax.process_index() == 0:
                tqdm.write(f"compiling {what} ...")
            self._compiled[key] = train.compile_train_step(
                self.sd, stage.optimizer, stage.step_config, self.mesh, *specs
            )
            self.compile_seconds += time.perf_counter() - start
            if jax.process_index() == 0:
                tqdm.write(f"compiled {what} in {time.perf_counter() - start:.1f}s")
        return self._compiled[key]

    def _train_stage(self, stage: _TrainingStage, trained, rest, vae_params, train_set_dir: Path,
                     checkpoint_dir: Path | None, progress: bool, desc: str, final_checkpoint: bool):
        """Returns (the trained part after the stage's steps, the stage's metrics)."""
        frozen = train.place_frozen(vae_params, rest, self.sd, self.mesh, self.rules)
        iterator = self._data_iterator(train_set_dir, stage.train)
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = checkpoint.Checkpointer(checkpoint_dir, max_to_keep=stage.train.keep_checkpoints)
        try:
            state, metadata = self._initial_state(stage, trained, iterator, ckpt)
            start = int(jax.device_get(state.step))
            curve = metadata.get("loss_curve", [])
            if start >= stage.train.steps:
                done = {"start_step": start, "steps": start, "loss": metadata.get("loss"), "history": [],
                        "loss_curve": curve}
                return state.params, done
            cache = self._latent_cache(train_set_dir, frozen, vae_params, stage.train) if self.cache_latents else None
            host_batches = iter(iterator)
            first = next(host_batches)
            self._check_token_ids(first, trained, train_set_dir)
            batches = (self._device_batch(batch, cache) for batch in itertools.chain([first], host_batches))
            log = _MetricLog(total=stage.train.steps, start=start, progress=progress, desc=desc, loss_curve=curve,
                             examples_per_step=self._examples_per_step(train_set_dir, stage.train))
            return self._run(stage, state, batches, frozen, iterator, ckpt, log, train_set_dir, final_checkpoint)
        finally:
            if ckpt is not None:
                ckpt.close()

    def _data_iterator(self, train_set_dir: Path, train_config):
        data_config = self.config.data
        return input_pipeline.make_train_iterator(
            train_set_dir,
            global_batch_size=train_config.batch_size * train_config.grad_accum_steps,
            seed=train_config.seed,
            resolution=data_config.resolution,
            random_crop=data_config.random_crop,
            flip=data_config.flip,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            segmix=self.segmix,
            latent_size=data_config.resolution // self.sd.vae_scale_factor,
        )

    def _initial_state(self, stage: _TrainingStage, trained, iterator, ckpt) -> tuple[TrainState, dict]:
        """Returns (state, the metadata saved with it): the latest checkpoint's, moving `iterator`
        to the position saved with it, or a fresh state and {}."""
        if ckpt is None or ckpt.latest_step() is None:
            key = (stage.index, _shapes_key(trained))
            if key not in self._initializers:
                self._initializers[key] = train.state_initializer(
                    trained, stage.optimizer, self.mesh, self.model_axes, self.rules)
            return self._initializers[key](trained), {}
        abstract = train.abstract_train_state(trained, stage.optimizer, self.mesh, self.model_axes, self.rules)
        restored = ckpt.restore(abstract, data_iterator=iterator)
        total = restored.metadata.get("total_steps")
        if total != stage.train.steps:
            raise checkpoint.CheckpointError(
                f"{ckpt.directory}: checkpoint {restored.step} belongs to a run of {total} steps, "
                f"this one has {_stage_field(self.method.stages, stage.stage)}.steps={stage.train.steps}; "
                "use another checkpoint folder"
            )
        logging.info("Resuming training from %s at step %d.", ckpt.directory, restored.step)
        return restored.state, restored.metadata

    def _latent_cache(self, train_set_dir: Path, frozen: FrozenInputs, vae_params, train_config) -> LatentCache:
        # Moments encoded in earlier rounds are reused while the VAE weights are the same arrays.
        vae_leaves = jax.tree_util.tree_leaves(vae_params)
        if len(vae_leaves) != len(self._latents_vae) or any(a is not b for a, b in zip(vae_leaves, self._latents_vae)):
            self._latents, self._latents_vae = {}, vae_leaves
        # Encodes a training batch of images at a time, rounded up to fill every device.
        shards = sharding.num_batch_shards(self.mesh)
        images = train_config.batch_size * train_config.grad_accum_steps
        spec = sharding.batch_sharding(self.mesh)

        def encode(pixels):
            pixels = jax.make_array_from_callback(pixels.shape, spec, lambda index: pixels[index])
            return jax.device_get(self._encode(frozen.vae, pixels))

        return build_latent_cache(
            train_set_dir, encode, resolution=self.config.data.resolution,
            chunk_size=shards * -(-images // shards), known=self._latents,
        )

    def _check_token_ids(self, host_batch: Batch, trained, train_set_dir: Path) -> None:
        """Raises ValueError when the set's token ids lie beyond the text encoder's table, or when
        a stage trains new token rows but the set's prompts do not hold the tokens (tokenized by a
        tokenizer that lacks them): the rows would get no gradient."""
        ids, size = host_batch["input_ids"], self.sd.vocab_size
        if ids.max() >= size:
            raise ValueError(f"{train_set_dir}: token id {int(ids.max())} is beyond the text encoder's {size} rows: the "
                             "set was tokenized with a tokenizer that knows more tokens than this model")
        new = self.method.new_tokens
        if new is None or "new_tokens" not in trained or np.isin(ids, new.ids).any():
            return
        raise ValueError(
            f"{train_set_dir}: no prompt of the first batch holds the new token(s) {list(new.tokens)}; write the "
            "training set with this Trainer's sd.tokenize (its tokenizer knows them), and put the token in "
            "the instance prompts")

    def _device_batch(self, batch: Batch, cache: LatentCache | None) -> Batch:
        """Returns the global device batch assembled from this process's host batch."""
        if cache is not None:
            batch = cache.replace_pixels(batch)
        # A deliberate transfer: with several processes it goes through make_array_from_callback,
        # which the loop's transfer guard would otherwise refuse.
        with jax.transfer_guard_host_to_device("allow"):
            return sharding.global_batch_from_local(batch, self.mesh)

    def _examples_per_step(self, train_set_dir: Path, train_config=None) -> int:
        """Returns the examples of one step: instances, and as many class images with a prior."""
        train_config = train_config or self.stages[0].train
        _, metadata = data.open_training_set(train_set_dir)
        halves = 2 if metadata["num_class_images"] else 1
        return halves * train_config.batch_size * train_config.grad_accum_steps

    def _run(self, stage: _TrainingStage, state, batches, frozen, iterator, ckpt, log: _MetricLog, train_set_dir,
             final_checkpoint: bool):
        """Returns (trained params, metrics) after the stage's steps left from state.step."""
        train_config = stage.train
        start = int(jax.device_get(state.step))
        rng = self._rng
        first = next(batches)
        step_fn = self.compiled_step(state, first, frozen, stage.index)
        log.start()
        began = time.perf_counter()
        # Every host<->device copy in the loop is explicit (big_vision): an implicit one is a bug.
        # The batch's copy, the metrics' pull and the checkpoint's copy are the explicit ones.
        with log, jax.transfer_guard("disallow"):
            steps = zip(range(start + 1, train_config.steps + 1), itertools.chain([first], batches))
            for done, batch in steps:
                state, metrics = step_fn(state, batch, rng, frozen)
                log.add(done, metrics)
                faults.maybe_kill("train", done)
                last = done == train_config.steps
                periodic = done % train_config.checkpoint_every == 0
                save = ckpt is not None and (final_checkpoint if last else periodic)
                if save or last or done % train_config.log_every == 0:
                    log.pull()  # before saving: a non-finite state is never checkpointed
                if save:
                    metadata = {"total_steps": train_config.steps, "train_set": str(train_set_dir),
                                "loss": log.history[-1]["loss"], "loss_curve": log.loss_curve}
                    ckpt.save(done, state, metadata=metadata, data_iterator=iterator)
        seconds = time.perf_counter() - began
        return state.params, {
            "start_step": start,
            "steps": train_config.steps,
            "loss": log.history[-1]["loss"],
            "history": log.history,
            "loss_curve": log.loss_curve,
            "train_seconds": seconds,
            "samples_per_s": (train_config.steps - start) * log.examples_per_step / seconds,
            "compile_seconds": self.compile_seconds,
        }


def _combined_metrics(stages: list[dict[str, Any]], compile_seconds: float) -> dict[str, Any]:
    """Returns the round's metrics from its stages' (one stage: its own): steps and loss curve
    counted across stages, the last stage's loss, summed times."""
    if len(stages) == 1:
        return stages[0]
    offset, curve, history = 0, [], []
    for metrics in stages:
        curve += [{**point, "step": point["step"] + offset} for point in metrics["loss_curve"]]
        history += [{**entry, "step": entry["step"] + offset} for entry in metrics["history"]]
        offset += metrics["steps"]
    combined = {"start_step": stages[0]["start_step"], "steps": offset, "loss": stages[-1]["loss"],
                "history": history, "loss_curve": curve, "stages": stages}
    ran = [m for m in stages if "train_seconds" in m]
    if ran:
        seconds = sum(m["train_seconds"] for m in ran)
        combined.update(train_seconds=seconds, compile_seconds=compile_seconds,
                        samples_per_s=sum(m["samples_per_s"] * m["train_seconds"] for m in ran) / seconds)
    return combined


def _stage_field(stages: Sequence[personalize.Stage], stage: personalize.Stage) -> str:
    """Returns where a stage's settings come from: config.train, or config.train.stages.<name>."""
    return "train" if len(stages) == 1 else f"train.stages.{stage.name}"


def check_stages(stages: Sequence[personalize.Stage], adds_token: bool) -> None:
    """Raises ValueError naming the first training setting of `stages` that cannot work (counts,
    optimizer, loss settings), from the config alone: the driver calls it before a workdir is
    written (the Trainer meets the same errors as it builds each stage's optimizer and step).
    `adds_token`: the method learns a new token (its id is known once the tokenizer grows; any id
    stands in for it here)."""
    for stage in stages:
        _stage_settings(stages, stage, new_token_id=0 if adds_token else -1)


def _stage_settings(stages: Sequence[personalize.Stage], stage: personalize.Stage, *, lora_scale: float = 1.0,
                    new_token_id: int = -1) -> tuple[Any, train.StepConfig]:
    """Returns (optimizer, step settings) of one of `stages`, raising ValueError that names the
    first of its settings that cannot work by where it comes from (train.*, or train.stages.<name>.*)."""
    where = _stage_field(stages, stage)
    _check_train_config(stage.train, where)
    return (train.make_optimizer(stage.train, where),
            train.StepConfig.from_config(stage.train, lora_scale=lora_scale, new_token_id=new_token_id, where=where))


def _shapes_key(tree: Any) -> tuple:
    """Returns a hashable key of a tree's structure, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves)


def _check_train_config(train_config, where: str = "train") -> None:
    """Raises ValueError naming the first `where`.* count that is not a positive integer."""
    names = ("steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
             "keep_checkpoints")
    for name in names:
        value = train_config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")
