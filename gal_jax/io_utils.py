"""Small file helpers with atomic writes and errors that name the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

COMPILATION_CACHE = Path(os.environ.get("GAL_JAX_CACHE", "~/.cache/gal_jax")).expanduser() / "xla"


def is_primary() -> bool:
    """Returns True in the process that writes files (process 0; the only one on a single host)."""
    import jax

    return jax.process_index() == 0


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        # mkstemp creates 0600 files; results are meant to be read by others on shared machines.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_images(paths: Sequence[Path]) -> np.ndarray:
    """Returns the images at `paths` stacked as uint8 (n, H, W, 3)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable image ({err})") from err
    return np.stack(images)


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


def enable_compilation_cache(directory: Path = COMPILATION_CACHE) -> None:
    """Turns on JAX's persistent compilation cache, so reruns skip XLA compiles."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
