"""Small file helpers with atomic writes and errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import logging
from PIL import Image

from gal_jax import COMPILATION_CACHE, faults
from gal_jax.images import read_rgb_array

TEMP_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"^\.tmp-.*$")
# A temporary's name carries its maker: ".tmp-<target>.<host>-<pid>.<random>", so leftovers of a
# killed process are told from the work of one still running (outside a locked workdir).
_OWNED_TEMPORARY = re.compile(r"^\.tmp-(?P<target>.*)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+$")


def is_primary() -> bool:
    """Returns True in the process that writes files (process 0; the only one on a single host).

    A process that has not imported JAX is a single-host helper (the review server): it is primary,
    and asking does not start JAX.
    """
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def is_temporary_name(name: str) -> bool:
    """Returns True for the name of a temp file or folder an atomic write makes (and may leave
    behind when killed)."""
    return bool(_TEMPORARY.match(name))


def _host_tag() -> str:
    """Returns this host's name as temporary names carry it (anything but [A-Za-z0-9_-] as _)."""
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _temporary_prefix(target_name: str) -> str:
    return f"{TEMP_PREFIX}{target_name}.{_host_tag()}-{os.getpid()}."


def remove_dead_temporaries(parent: Path, target_name: str | None = None) -> list[Path]:
    """Deletes the temp files and folders in `parent` (those for `target_name`, or all) that a
    process of this host made and that is no longer running: what a kill -9 left behind. Others'
    temporaries, and those of other hosts, are kept. Returns what was removed."""
    import shutil

    parent = Path(parent)
    if not parent.is_dir():
        return []
    host = _host_tag()
    removed = []
    for entry in parent.iterdir():
        owned = _OWNED_TEMPORARY.match(entry.name)
        if owned is None or owned["host"] != host or _is_running(int(owned["pid"])):
            continue
        if target_name is not None and owned["target"] != target_name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sync(name: str) -> None:
    """Waits until every process reaches this point (after process 0 wrote what they will read)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes `payload` to a temp file beside `path` and renames it into place (process 0 only:
    in a multi-host run the others hold the same values and wait at `sync`)."""
    if not is_primary():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        # mkstemp creates 0600 files; results are meant to be read by others on shared machines.
        os.chmod(tmp, 0o644)
        faults.maybe_kill("write", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # ... and the rename itself survives a power cut


def fsync_dir(folder: Path) -> None:
    """Flushes a folder's entries (renames, new files) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_dir_beside(target: Path) -> Path:
    """Returns a new empty folder next to `target` (same filesystem), named as a temporary of this
    process. What dead processes of this host left for the same target (a kill -9 mid-build) is
    removed first; a workdir's sweep removes the rest of a killed run's leftovers."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target.parent, target.name)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temporary_prefix(target.name)))
    folder.chmod(0o755)  # mkdtemp's 0o700 would become the finished folder's permissions
    return folder


def replace_dir(new: Path, target: Path) -> None:
    """Moves the finished folder `new` to `target`, replacing what was there, and syncs the parent."""
    import shutil

    target = Path(target)
    if target.exists():
        old = temporary_dir_beside(target)
        os.replace(target, old / "old")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)


def write_json(path: Path, value: Any) -> None:
    """Writes `value` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    """Returns the JSON in `path`; a missing or malformed file raises ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def read_text(path: Path) -> str:
    """Returns a text file's contents; a missing file raises FileNotFoundError naming it."""
    try:
        return Path(path).read_text()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: file not found") from err


def touch(path: Path) -> None:
    """Creates an empty marker file, atomically."""
    atomic_write_bytes(path, b"")


def write_png(path: Path, image: np.ndarray) -> None:
    """Writes a uint8 HWC image as PNG, atomically."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_pngs(paths: Sequence[Path], images: np.ndarray, *, workers: int | None = None) -> None:
    """Writes image i to paths[i] as write_png does, on a pool of threads (`PngWriter`). The
    first error is raised after the other writes finish; each file is whole or absent."""
    with PngWriter(workers) as writer:
        writer.submit(paths, images)


class PngWriter:
    """Writes PNGs as write_png does on a pool of threads while the caller goes on (PNG
    compression and fsync release the GIL: ~2x on 2 cores for a round's grid), so a round's
    images are written while the next chunk generates.

    `wait()` returns once every submitted image is written and raises the first error (after the
    other writes finish); leaving the `with` block waits too, so no write outlives it. Only
    process 0 writes (the others skip the encoding too).
    """

    def __init__(self, workers: int | None = None):
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers or min(16, os.cpu_count() or 1), thread_name_prefix="write_png")
        self._pending: list = []

    def submit(self, paths: Sequence[Path], images: np.ndarray) -> None:
        """Queues image i for paths[i]; `images` must not change until written."""
        if len(paths) != len(images):
            raise ValueError(f"{len(paths)} paths for {len(images)} images")
        if is_primary():
            self._pending += [self._pool.submit(write_png, path, image) for path, image in zip(paths, images)]

    def wait(self) -> None:
        """Returns when every queued image is written; raises the first write's error."""
        import concurrent.futures

        pending, self._pending = self._pending, []
        concurrent.futures.wait(pending)
        for future in pending:
            future.result()

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.wait()
            else:  # the block's error wins; the writes still finish before it propagates
                import concurrent.futures

                concurrent.futures.wait(self._pending)
        finally:
            self._pool.shutdown(wait=True)


def read_images(paths: Sequence[Path]) -> np.ndarray:
    """Returns the images at `paths` stacked as uint8 (n, H, W, 3), read as every user image is
    (`images.read_rgb_array`: upright, 8-bit, transparency on white); errors name the file."""
    return np.stack([read_rgb_array(path) for path in paths])


def resolve(root: Path, path: str | Path) -> Path:
    """Returns `path` if absolute, else `root / path`."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def relative_if_inside(root: Path, path: Path) -> str:
    """Returns `path` relative to `root` when it lies inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


# The persistent cache's size limit: past it, the least recently used executables are deleted
# (an SD 1.5 run stores a few hundred MB; tests and benchmarks of many shapes add up).
COMPILATION_CACHE_MAX_BYTES = int(float(os.environ.get("GAL_JAX_CACHE_MAX_GB", "8")) * 2**30)


def enable_compilation_cache(directory: Path = COMPILATION_CACHE,
                             max_bytes: int = COMPILATION_CACHE_MAX_BYTES) -> None:
    """Turns on JAX's persistent compilation cache, so reruns skip XLA compiles; beyond `max_bytes`
    the least recently used entries are deleted."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    repair_compilation_cache(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def repair_compilation_cache(directory: Path, lock_timeout_s: float = 10.0) -> list[str]:
    """Deletes the half-written entries of a size-limited persistent cache and returns their names.

    jax writes an entry ("<key>-cache") and then its access-time file ("<key>-atime"); a process
    killed between the two (or during the first, leaving it truncated) leaves an entry without an
    access time, and from then on every write to the folder fails ("Error writing persistent
    compilation cache entry ... FileNotFoundError: ...-atime"), for every process, so nothing new is
    ever cached. Runs under jax's own lock file, so no live writer is interrupted; if another
    process holds it for `lock_timeout_s`, the repair is left to the next start."""
    import filelock

    try:
        with filelock.FileLock(directory / ".lockfile", timeout=lock_timeout_s):
            names = set(os.listdir(directory))
            entries = {name[:-len("-cache")] for name in names if name.endswith("-cache")}
            stamps = {name[:-len("-atime")] for name in names if name.endswith("-atime")}
            removed = sorted([f"{key}-cache" for key in entries - stamps] + [f"{key}-atime" for key in stamps - entries])
            for name in removed:
                (directory / name).unlink(missing_ok=True)
    except filelock.Timeout:
        logging.warning("The compilation cache %s is locked by another process; not checked for half-written entries.",
                        directory)
        return []
    if removed:
        logging.warning("Removed %d half-written compilation cache entries from %s (a process was killed while "
                        "writing them).", len(removed), directory)
    return removed


class _ExecutableLog:
    """Names of the XLA executables this process built (compiled, or loaded from the persistent
    cache), from jax.monitoring's backend-compile events; one listener for the process."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.names: list[str] = []
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        del duration
        if event == self.EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))


_executable_log: _ExecutableLog | None = None


def executables_built() -> list[str]:
    """Returns the names of the executables built so far (counting starts at the first call)."""
    global _executable_log
    if _executable_log is None:
        _executable_log = _ExecutableLog()
    return list(_executable_log.names)


@contextlib.contextmanager
def timed(timings: dict, name: str):
    """Adds the wall time of a `with` block to timings[name] (seconds, summed over blocks)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
