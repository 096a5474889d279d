"""Orbax checkpoints of a training round: train state, data iterator position and metadata.

One `CheckpointManager` per round directory with three named items (maxdiffusion
`checkpointing_utils` style):
  state          the TrainState (params, optimizer state, step), saved sharded and restored straight
                 into an abstract tree of ShapeDtypeStructs carrying the target shardings;
  data_iterator  the grain iterator state, one JSON file per process (grain's orbax handler);
  metadata       a small JSON dict (step, total steps, what was trained on).
Saves are asynchronous: call `wait_until_finished` (or close, or leave the `with` block) before
reading the files or exiting. A save may run inside a disallowing transfer guard: it allows its own
device-to-host copy.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITERATOR = "data_iterator"
METADATA = "metadata"


class CheckpointError(ValueError):
    """A checkpoint directory holds nothing to restore or something that does not fit."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns: the step, the state and the metadata saved with it."""

    step: int
    state: Any
    metadata: dict


@functools.cache  # a process-wide registration: once is enough
def _save_replicas_whole_in_one_process() -> None:
    """Has orbax write a replicated array from one replica, in one piece, when a single process
    holds every replica: its replica-parallel saving splits each array between the replicas with
    a jitted slice per array shape (66 compiles for the tiny UNet's state on 2 CPU devices, 35 s
    on a cold compile cache), which only pays when the replicas live on several hosts."""
    if jax.process_count() == 1:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    """Saves and restores a round's train state, data iterator state and metadata with orbax."""

    def __init__(
        self, directory: Path | str, *, max_to_keep: int | None = None, async_save: bool = True
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 (or None to keep all), got {max_to_keep}")
        self.directory = Path(directory).expanduser().absolute()
        _save_replicas_whole_in_one_process()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA_ITERATOR, METADATA)
        )

    def latest_step(self) -> int | None:
        """Returns the newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, metadata: dict, data_iterator: Any = None) -> None:
        """Starts saving `state` (and the iterator's position, when given) as checkpoint `step`."""
        items = {
            STATE: ocp.args.StandardSave(state),
            METADATA: ocp.args.JsonSave({**metadata, "step": int(step)}),
        }
        if data_iterator is not None:
            items[DATA_ITERATOR] = grain.checkpoint.CheckpointSave(data_iterator)
        # Orbax copies the arrays to the host on this thread before writing them in the
        # background: a deliberate copy, which a caller's jax.transfer_guard("disallow") (the
        # train loop's) refuses on a GPU or TPU. Host-to-device copies stay as the caller set them.
        with jax.transfer_guard_device_to_host("allow"):
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(
        self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None
    ) -> Restored:
        """Returns checkpoint `step` (default: the latest), restored into `abstract_state`.

        `abstract_state` is a tree of jax.ShapeDtypeStruct carrying the shardings to restore into
        (see train.abstract_train_state); a given `data_iterator` is moved, in place, to the
        position saved with the state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        if step not in self.all_steps():
            raise CheckpointError(
                f"{self.directory}: no checkpoint at step {step} (have {self.all_steps()})"
            )
        items = {STATE: ocp.args.StandardRestore(abstract_state), METADATA: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(
                f"{self.directory}: checkpoint {step} does not fit this run's state or data ({err})"
            ) from err
        return Restored(step=int(step), state=restored[STATE], metadata=dict(restored[METADATA]))

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
