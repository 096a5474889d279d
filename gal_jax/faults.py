"""Kill points for crash tests: `GAL_JAX_KILL_AT` makes the process SIGKILL itself at a named point.

A kill -9 from outside cannot be aimed at "while the record is being written": the window is a few
microseconds. The tests set `GAL_JAX_KILL_AT` instead, and the run kills itself there, exactly as
an outside `kill -9` would (no clean-up, no flushing, no exception handlers):

  GAL_JAX_KILL_AT=write:record.json         before the rename of the n-th atomic write whose
  GAL_JAX_KILL_AT=write:*.png#5             file name matches the glob (default: the first);
                                            the temp file is fully written, the target untouched
  GAL_JAX_KILL_AT=train:7                   after training step 7 is dispatched
  GAL_JAX_KILL_AT=phase:export              at the start of a named phase of the driver

Unset (always, outside tests), every check is one dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
from pathlib import Path

ENV = "GAL_JAX_KILL_AT"
_counts: dict[str, int] = {}
_lock = threading.Lock()


def _target() -> tuple[str, str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    pattern, _, nth = rest.partition("#")
    return kind, pattern, int(nth or 1)


def maybe_kill(kind: str, what: str | Path | int) -> None:
    """SIGKILLs this process when GAL_JAX_KILL_AT names this point (kind, what)."""
    target = _target()
    if target is None or target[0] != kind:
        return
    _, pattern, nth = target
    name = Path(what).name if kind == "write" else str(what)
    if not fnmatch.fnmatchcase(name, pattern):
        return
    with _lock:  # writes may come from several threads (io_utils.write_pngs)
        _counts[pattern] = _counts.get(pattern, 0) + 1
        if _counts[pattern] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
