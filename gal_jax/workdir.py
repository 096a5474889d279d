"""The workdir DIR of a run: every path under it, its round records, its lock and its clean-up.

This module is the one owner of the layout; every other module asks it for paths:

  DIR/config.json                 the resolved config (a resume with another one is refused)
  DIR/inputs.json                 fingerprints of the input files (a resume with changed ones is refused)
  DIR/run.json                    where the run stands: complete (with the model and report) or
                                  awaiting_feedback (with the review page)
  DIR/.lock                       held by `gal-jax run` (and briefly by the review server's save)
  DIR/rounds/<r>/train_set/       the round's training set (TFDS array_record); train_set.done marks it
  DIR/rounds/<r>/checkpoints/     orbax training states (one folder per stage of a multi-stage
                                  method); deleted once the round's result is written (unless
                                  train.keep_training_state)
  DIR/rounds/<r>/unet/            DreamBooth's result: the fine-tuned UNet, diffusers layout
  DIR/rounds/<r>/personalization/ the other methods' result: unet/ (when trained),
                                  pytorch_lora_weights.safetensors (LoRA, PEFT keys),
                                  learned_embeds.safetensors (new tokens)
  DIR/rounds/<r>/train_loss.json  the round's training loss curve (written just before the result)
  DIR/rounds/<r>/images/          generated PNGs, p<prompt_id>_s<seed>.png
  DIR/rounds/<r>/generated.json   the index of the generated images (written after the last PNG)
  DIR/rounds/<r>/scores.json      CLIP similarities of every generated image
  DIR/rounds/<r>/eval.json        TXT-ALN / IMG-ALN / OVF of the round's model (evaluation on)
  DIR/rounds/<r>/review.html, review.json, selections.json    human feedback
  DIR/rounds/<r>/record.json      the round's record, written last (`records.RoundRecord`)
  DIR/report.html, DIR/report/    the report
  DIR/eval/results.{json,md}      `gal-jax evaluate` tables
  DIR/model/                      the final model: a complete diffusers Stable Diffusion folder
  DIR/samples/round-<r>/          `gal-jax sample --workdir=DIR` output

Paths stored in records are relative to DIR, so a moved or copied workdir keeps working.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from gal_jax import io_utils
from gal_jax.records import RecordError, RoundRecord

# The names diffusers' load_lora_weights and load_textual_inversion look for in a folder (in a
# round's personalization/ and in DIR/model/).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TOKEN_EMBEDDINGS = "learned_embeds.safetensors"

ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class WorkdirError(ValueError):
    """The workdir cannot be used: not a folder, not writable, damaged."""


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock."""


class AwaitingHumanFeedback(RuntimeError):
    """The run waits for a person to pick directions on a round's review page (exit code 3)."""


@dataclasses.dataclass(frozen=True)
class RoundPaths:
    """The files of one round, `DIR/rounds/<r>/...`."""

    index: int
    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    @property
    def train_set(self) -> Path:
        return self.dir / "train_set"

    @property
    def train_set_done(self) -> Path:
        return self.dir / "train_set.done"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def train_loss(self) -> Path:
        return self.dir / "train_loss.json"

    @property
    def unet(self) -> Path:
        return self.dir / "unet"

    @property
    def personalization(self) -> Path:
        return self.dir / "personalization"

    def result(self, method: str) -> Path:
        """Returns where the round's trained result is: unet/ for DreamBooth, else personalization/."""
        return self.unet if method == "dreambooth" else self.personalization

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def generated(self) -> Path:
        return self.dir / "generated.json"

    @property
    def scores(self) -> Path:
        return self.dir / "scores.json"

    @property
    def eval(self) -> Path:
        return self.dir / "eval.json"

    @property
    def review_html(self) -> Path:
        return self.dir / "review.html"

    @property
    def review_json(self) -> Path:
        return self.dir / "review.json"

    @property
    def selections(self) -> Path:
        return self.dir / "selections.json"

    def image(self, prompt_id: int, seed: int) -> Path:
        """Returns the PNG of generated image `seed` of anchor prompt `prompt_id`."""
        return self.images / f"p{prompt_id:03d}_s{seed:02d}.png"


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The run directory DIR: paths, records, lock and clean-up."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())

    # Paths ------------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs.json"

    @property
    def status(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def rounds_dir(self) -> Path:
        return self.root / "rounds"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def samples_dir(self, round_index: int) -> Path:
        return self.root / "samples" / f"round-{round_index}"

    def round(self, index: int) -> RoundPaths:
        if not isinstance(index, int) or index < 1:
            raise ValueError(f"round index must be an integer >= 1, got {index!r}")
        return RoundPaths(index, self.rounds_dir / str(index))

    def round_indices(self) -> list[int]:
        """Returns the indices of the round folders present (finished or not), ascending."""
        if not self.rounds_dir.is_dir():
            return []
        return sorted(int(d.name) for d in self.rounds_dir.iterdir() if d.is_dir() and d.name.isdigit()
                      and int(d.name) >= 1)

    def relative(self, path: Path | str) -> str:
        """Returns `path` relative to DIR when it lies inside, else absolute (for records)."""
        return io_utils.relative_if_inside(self.root, Path(path))

    def resolve(self, path: Path | str) -> Path:
        """Returns a record's path as a file path (relative ones are under DIR)."""
        return io_utils.resolve(self.root, path)

    # Records ----------------------------------------------------------------------------------

    def read_record(self, index: int) -> RoundRecord:
        """Returns round `index`'s record; raises WorkdirError naming the file when it is damaged."""
        path = self.round(index).record
        try:
            record = RoundRecord.from_json(io_utils.read_json(path), source=str(path))
        except RecordError as err:
            raise WorkdirError(f"{err}; the workdir is damaged (restore the file, or use a new --workdir)") from err
        except ValueError as err:  # not JSON
            raise WorkdirError(f"{err}; the workdir is damaged (restore the file, or use a new --workdir)") from err
        if record.round != index:
            raise WorkdirError(f"{path}: says round {record.round}, but lies in the folder of round {index}")
        return record

    def read_records(self) -> list[RoundRecord]:
        """Returns the records of the finished rounds in order (stops at the first round without one)."""
        records = []
        while self.round(len(records) + 1).record.is_file():
            records.append(self.read_record(len(records) + 1))
        return records

    def write_record(self, record: RoundRecord) -> Path:
        """Writes round `record.round`'s record atomically; returns its path."""
        path = self.round(record.round).record
        io_utils.write_json(path, record.to_json())
        return path

    def read_status(self) -> dict:
        """Returns DIR/run.json ({"status": "complete" | "awaiting_feedback", ...}), or {} if absent."""
        if not self.status.is_file():
            return {}
        try:
            status = io_utils.read_json(self.status)
        except ValueError as err:
            raise WorkdirError(f"{err}; delete it and rerun (it is rewritten)") from None
        return status if isinstance(status, dict) else {}

    def complete_message(self, status: dict) -> str:
        """Returns the line that tells a finished run is complete and where its results are."""
        model, report = (self.resolve(status.get(key, default)) for key, default in
                         (("model", "model"), ("report", "report.html")))
        return (f"{self.root}: complete, nothing to do (final model from round "
                f"{status.get('final_round', '?')}). Model: {model}  Report: {report}")

    def write_status(self, status: dict) -> None:
        """Writes DIR/run.json: where the run stands, for people and scripts."""
        io_utils.write_json(self.status, status)

    # Checks and clean-up ----------------------------------------------------------------------

    def check_usable(self, *, create: bool) -> None:
        """Raises WorkdirError unless DIR is (or can be made) a folder this process can write.

        Checked before any model is loaded, so a bad --workdir fails in a second, not after minutes.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise WorkdirError(f"{root}: --workdir is a file, not a folder")
        if not root.exists():
            if not create:
                raise WorkdirError(f"{root}: workdir does not exist")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise WorkdirError(f"{root}: cannot create the workdir ({err.strerror})") from err
        probe = root / f".write-test-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise WorkdirError(f"{root}: workdir is not writable ({err.strerror})") from err

    def remove_stale_temporaries(self) -> list[Path]:
        """Deletes what a killed run left half-written: temp files of atomic writes, unfinished
        orbax checkpoint folders and unfinished model folders. Returns what was removed."""
        removed = []
        for folder, dirs, files in os.walk(self.root):
            for name in files:
                if io_utils.is_temporary_name(name):
                    path = Path(folder) / name
                    path.unlink(missing_ok=True)
                    removed.append(path)
            for name in list(dirs):
                if ORBAX_TMP_SUFFIX in name or io_utils.is_temporary_name(name):
                    path = Path(folder) / name
                    shutil.rmtree(path, ignore_errors=True)
                    dirs.remove(name)
                    removed.append(path)
        return removed

    def lock(self, command: str = "gal-jax run") -> "WorkdirLock":
        """Returns the workdir's lock (a context manager; acquired on enter, without waiting)."""
        return WorkdirLock(self.lock_file, command)


def config_changes(previous: dict, current: dict) -> list[str]:
    """Returns the changed fields between a saved and the current config, as "name (old -> new)".

    A field that is new since the workdir was started is no change when it has its default value
    (configs/common.py): workdirs of earlier versions resume.
    """
    from configs import common

    defaults = json.loads(common.get_config().to_json_best_effort(sort_keys=True))
    changes = _diff_keys(_renamed_fields(previous), current, defaults)
    # Fields that cannot change what the run computes: benchmarks, evaluation while it is off, and
    # how the host's devices are laid out (as mesh.data=-1 runs on however many devices there are).
    eval_off = not (previous.get("eval") or {}).get("enabled") and not (current.get("eval") or {}).get("enabled")
    return [c for c in changes if not c.startswith(("bench.", *LAYOUT_FIELDS))
            and not (eval_off and c.startswith("eval."))]


# Config fields that say where the work runs, in what pieces and how often it is saved, not what
# it computes (each generated image's noise is its own, whatever chunk it is drawn in; a resumed
# round trains to the same params from any checkpoint; the gradients' all-reduce changes only the
# order of a sum).
LAYOUT_FIELDS = ("mesh.cpu_devices ", "mesh.train_devices ", "sample.max_images_per_device ",
                 "train.checkpoint_every ", "train.grad_all_reduce ")


# Fields of config.train renamed since workdirs were first written: old name -> path under it.
RENAMED_TRAIN_FIELDS = {
    "attention_loss_mean": ("loss_terms", "attention_map", "mean"),
    "attention_loss_var": ("loss_terms", "attention_map", "var"),
}


def _renamed_fields(saved: dict) -> dict:
    """Returns a copy of a saved config with renamed train fields (RENAMED_TRAIN_FIELDS) under
    their new names, in config.train and in each of its stages' entries."""
    saved = json.loads(json.dumps(saved))
    train = saved.get("train")
    if not isinstance(train, dict):
        return saved
    stages = train.get("stages") if isinstance(train.get("stages"), dict) else {}
    for fields in (train, *(entry for entry in stages.values() if isinstance(entry, dict))):
        for old, path in RENAMED_TRAIN_FIELDS.items():
            if old in fields:
                value, node = fields.pop(old), fields
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node.setdefault(path[-1], value)
    return saved


def _diff_keys(old: dict, new: dict, defaults: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        left, right, default = old.get(key), new.get(key), (defaults or {}).get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _diff_keys(left, right, default if isinstance(default, dict) else {}, f"{prefix}{key}.")
        elif key not in old and right == default:
            continue
        elif left != right:
            keys.append(f"{prefix}{key} ({left!r} -> {right!r})")
    return keys


def completed_run(root: Path | str, config) -> dict | None:
    """Returns DIR/run.json when the run in DIR is complete and was started with `config`, else None.

    Cheap (no JAX, no model): a rerun of a finished workdir answers at once.
    """
    workdir = Workdir(root)
    if not (workdir.status.is_file() and workdir.config.is_file()):
        return None
    try:
        status, saved = workdir.read_status(), io_utils.read_json(workdir.config)
    except ValueError:
        return None  # the full run names the damaged file
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if status.get("status") != "complete" or config_changes(saved, current):
        return None
    return status


class WorkdirLock:
    """An exclusive `fcntl.flock` on DIR/.lock, holding the holder's pid and command.

    Acquired without waiting: a second `gal-jax run` on the same workdir exits at once, naming
    the process that holds it. The kernel releases the lock when the holder dies (kill -9 too).
    """

    def __init__(self, path: Path, command: str):
        self.path, self.command = Path(path), command
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirBusyError(
                f"{self.path.parent}: in use by {self.holder()}; wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.command}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def holder(self) -> str:
        """Returns "pid N (command)" as the lock file records it."""
        try:
            pid, _, command = self.path.read_text().strip().partition(" ")
        except OSError:
            return "another process"
        return f"pid {pid} ({command})" if pid else "another process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def command_line() -> str:
    """Returns this process's command line, shortened, for the lock file."""
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]) if sys.argv else "python"
    return text[:200]
