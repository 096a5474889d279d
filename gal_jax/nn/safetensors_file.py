"""The safetensors format, read by byte ranges and written tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header {key: {dtype, shape,
data_offsets}} (plus an optional "__metadata__" of strings), then the tensors' bytes, C-ordered
and contiguous. The safetensors package reads through a memory map: every page a load touches
stays resident (and counted in the process's RSS) until the file is closed, so loading a model
shard by shard would still hold the whole file in memory. Here each read is a plain `readinto` of
the smallest byte range holding the requested part, straight into the array that is returned, and
writing streams one tensor at a time to a temporary file renamed into place: neither side ever
holds more than one tensor beyond what it keeps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit
_ALIGNMENT = 8  # the header is padded with spaces so the tensors start 8-byte aligned
METADATA_KEY = "__metadata__"


class SafetensorsReader:
    """An open safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `read(key, index)`.

    A malformed file (short, a header that is not JSON, offsets outside the file or overlapping)
    raises ValueError naming the file when opened, not later while reading.
    """

    def __init__(self, file: str | Path):
        self.file = Path(file)
        try:
            self._handle = open(self.file, "rb")
        except OSError as err:
            raise ValueError(f"{self.file}: cannot open the weights file ({err.strerror})") from err
        try:
            self._entries, self.metadata, self._data_start = _read_header(self._handle, self.file)
        except BaseException:
            self._handle.close()
            raise

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def read(self, key: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """Returns the tensor `key`, or its part `index` (one step-1 slice per axis).

        Only the bytes from the part's first element to its last are read: a part sliced on the
        leading axis reads exactly its own bytes; other parts read at most the whole tensor.
        """
        dtype, shape, begin = self._entry(key)
        ranges = _ranges(shape, index, self.file, key)
        # Axes before the first partial one are read whole, the partial one only as far as needed.
        lead = next((axis for axis, (start, stop) in enumerate(ranges) if (start, stop) != (0, shape[axis])), len(shape))
        if lead == len(shape):
            return self._read_range(begin, shape, dtype)
        if all(stop - start == 1 for start, stop in ranges[:lead]):  # fixed outer indices: one slab
            outer = sum(start * math.prod(shape[axis + 1:]) for axis, (start, _) in enumerate(ranges[:lead]))
            start, stop = ranges[lead]
            row = math.prod(shape[lead + 1:])
            slab = self._read_range(
                begin + (outer + start * row) * dtype.itemsize, (stop - start, *shape[lead + 1:]), dtype
            )
            part = slab[(slice(None), *(slice(a, b) for a, b in ranges[lead + 1:]))]
            return np.ascontiguousarray(part.reshape(tuple(b - a for a, b in ranges)))
        whole = self._read_range(begin, shape, dtype)
        return np.ascontiguousarray(whole[tuple(slice(a, b) for a, b in ranges)])

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.file}: no tensor {key!r}") from None

    def _read_range(self, begin: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._handle.seek(self._data_start + begin)
        done = 0
        while done < len(view):
            count = self._handle.readinto(view[done:])
            if not count:
                raise _bad(self.file, "a tensor ends past the end of the file")
            done += count
        return out


def _read_header(handle, file: Path):
    """Returns ({key: (dtype, shape, byte offset)}, metadata, data start) of an open file."""
    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise _bad(file, f"{size} bytes, shorter than its header length")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
        raise _bad(file, f"header length {header_bytes} in a {size}-byte file")
    try:
        header = json.loads(handle.read(header_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(file, f"its header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _bad(file, "its header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None) or {}
    data_bytes = size - 8 - header_bytes
    entries, spans = {}, []
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(dim) for dim in info["shape"])
            begin, end = (int(offset) for offset in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            problem = f"unknown dtype {info.get('dtype')!r}" if isinstance(info, dict) and "dtype" in info else err
            raise _bad(file, f"tensor {key!r} has a bad header entry: {problem}") from None
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise _bad(file, f"tensor {key!r}: shape {list(shape)} does not fit its {end - begin} bytes")
        if begin < 0 or end > data_bytes:
            raise _bad(file, f"tensor {key!r} ends at byte {end} of {data_bytes}")
        entries[key] = (dtype, shape, begin)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad(file, f"tensors {key!r} and {other!r} overlap")
    return entries, metadata, 8 + header_bytes


def _bad(file: Path, detail: str) -> ValueError:
    return ValueError(f"{file}: unreadable or truncated safetensors file ({detail})")


def _ranges(shape, index, file, key) -> list[tuple[int, int]]:
    if index is None:
        return [(0, dim) for dim in shape]
    if len(index) != len(shape):
        raise ValueError(f"{file}: tensor {key!r} has {len(shape)} axes, asked for {len(index)}")
    ranges = []
    for part, dim in zip(index, shape):
        start, stop, step = part.indices(dim)
        if step != 1:
            raise ValueError(f"{file}: tensor {key!r}: only step-1 slices are read")
        ranges.append((start, max(start, stop)))
    return ranges


def keys(file: str | Path) -> list[str]:
    """Returns the tensor names in the safetensors `file`."""
    with SafetensorsReader(file) as reader:
        return reader.keys()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write(
    file: str | Path,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes the safetensors `file` holding, for every key of `specs` ({key: (shape, dtype)}),
    the array `produce(key)`; returns `file`.

    Tensors are produced and written one at a time in `specs`' order, into a temporary file that
    replaces `file` only once complete: an interrupted write leaves any earlier `file` as it was.
    """
    file = Path(file)
    header, offset = {}, 0
    for key, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"{file}: tensor {key!r}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {METADATA_KEY: {str(k): str(v) for k, v in metadata.items()}, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGNMENT)
    file.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_complete(file) as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for key, (shape, dtype) in specs.items():
            value = np.asarray(produce(key))
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{file}: tensor {key!r} came as {value.dtype}{list(value.shape)}, "
                    f"declared {np.dtype(dtype)}{list(shape)}"
                )
            out.write(memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8)))
    return file


@contextlib.contextmanager
def replaced_when_complete(file: Path, mode: str = "wb"):
    """Yields a temporary file beside `file` opened in `mode`, which replaces `file` (synced to
    disk first) only when the block completes: an interrupted write leaves any earlier `file`
    as it was, and no temporary behind."""
    temporary = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)


def write_arrays(file: str | Path, tensors: Mapping[str, np.ndarray], *, metadata=None) -> Path:
    """Writes the in-memory `tensors` as the safetensors `file` (atomically, as `write` does)."""
    specs = {key: (np.shape(value), np.asarray(value).dtype) for key, value in tensors.items()}
    return write(file, specs, lambda key: tensors[key], metadata=metadata)

