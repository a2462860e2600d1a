"""Reading `.npy` / `.npz` arrays with their size checked before a byte is allocated.

Every array raysim reads from a data file goes through here. The `.npy` header gives the shape
and dtype; an array is refused before it is read when the header declares more bytes than the
file (or zip member) holds, more than this machine's memory, more values than the caller's
limit (one for a scalar, PIL's `Image.MAX_IMAGE_PIXELS` per image), or when the file is not
what it claims (an npz that is not a zip archive: numpy would suggest `allow_pickle`, which
raysim never sets). A `MemoryError` while reading is a last-resort one-line DataError.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from raysim.datasets.base import DataError

READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError)
BOMB = "a decompression bomb or a corrupt header"


def image_pixel_limit() -> int | None:
    """Values one image may hold: PIL's `Image.MAX_IMAGE_PIXELS` (None: no limit)."""
    from PIL import Image  # pillow comes with torchvision

    return Image.MAX_IMAGE_PIXELS


def machine_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def read_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of the `.npy` data in `stream`; a DataError if it has none."""
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except READ_ERRORS as err:
        raise DataError(f"{where}: not a readable .npy array ({' '.join(str(err).split())[:160]})") from err
    return tuple(int(n) for n in shape), dtype, stream.tell()


def check_size(name: str, shape: tuple[int, ...], dtype: np.dtype, payload: int | None, *, max_values: int | None = None, per_item: bool = False, corrupt: str = "") -> None:
    """A DataError unless an array `name` of `shape` / `dtype` fits: in the caller's limit
    (`max_values`, for the whole array or, `per_item`, for each item along the first axis: one
    image of a stack), in the `payload` bytes its file holds (else it is `corrupt`, default
    `name`) and in this machine's memory."""
    values = math.prod(shape)
    nbytes = values * dtype.itemsize
    counted = math.prod(shape[1:]) if per_item else values
    if max_values is not None and counted > max_values:
        unit = "values per image" if per_item else "values"
        raise DataError(f"{name} declares shape {shape} = {counted} {unit}, over the limit of {max_values} (PIL's Image.MAX_IMAGE_PIXELS; {BOMB})")
    if dtype.hasobject:
        raise DataError(f"{name} holds Python objects ({dtype}); expected a numeric array")
    if payload is not None and nbytes > payload:
        raise DataError(f"{corrupt or name} is corrupt (its header declares shape {shape} of {dtype} = {nbytes} bytes, but the file holds {payload}: {BOMB})")
    memory = machine_bytes()
    if memory is not None and nbytes > memory:
        raise DataError(f"{name} declares shape {shape} of {dtype} = {nbytes} bytes, more than this machine's {memory} bytes of memory ({BOMB})")


def _guarded(name: str, read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()`, its errors (MemoryError the last resort) as one-line DataErrors naming `name`."""
    try:
        return read()
    except MemoryError as err:
        raise DataError(f"{name} does not fit in memory (MemoryError while reading it)") from err
    except READ_ERRORS as err:
        raise DataError(f"{name} is corrupt ({' '.join(str(err).split())[:160]})") from err


def open_npz(path: Path, expected: str = "") -> Any:
    """`np.load` of an npz, refused when it is not a zip archive (numpy's message would then
    invite `allow_pickle`). `expected`: what the file must hold, for the message."""
    hint = f" {expected}" if expected else ""
    if path.is_dir():
        raise DataError(f"{path}: a directory, not an npz file{hint}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable npz file{hint} (File is not a zip file)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable npz file{hint} ({' '.join(str(err).split())[:160]})") from err


def npz_header(data: Any, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload bytes) of member `key` of an open npz, from its header (no values read)."""
    name = f"{path}: array {key!r}"
    try:
        info = data.zip.getinfo(f"{key}.npy")
        with data.zip.open(info) as stream:
            shape, dtype, offset = read_header(stream, name)
    except READ_ERRORS as err:
        raise DataError(f"{name} is corrupt ({' '.join(str(err).split())[:160]})") from err
    return shape, dtype, info.file_size - offset


def read_npz_array(data: Any, key: str, path: Path, *, max_values: int | None = None, per_item: bool = False) -> np.ndarray:
    """Member `key` of an open npz, its header checked (`check_size`) before it is read."""
    shape, dtype, payload = npz_header(data, key, path)
    check_size(f"{path}: {key}", shape, dtype, payload, max_values=max_values, per_item=per_item, corrupt=f"{path}: array {key!r}")
    return _guarded(f"{path}: array {key!r}", lambda: data[key])


def load_npy(path: Path, *, max_values: int | None = None) -> np.ndarray:
    """A `.npy` file, its header checked (`check_size`) before it is read; never pickles."""
    try:
        with open(path, "rb") as stream:
            shape, dtype, offset = read_header(stream, str(path))
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    check_size(str(path), shape, dtype, path.stat().st_size - offset, max_values=max_values)
    return _guarded(str(path), lambda: np.load(path, allow_pickle=False))


def read_npz_scalar(data: Any, key: str, path: Path) -> Any:
    """The one number or text of member `key` of an open npz (bytes decoded as UTF-8), its
    header checked first: a scalar that declares any other shape is refused before it is read."""
    shape, dtype, payload = npz_header(data, key, path)
    if math.prod(shape) != 1 or dtype.kind not in "biufUS":
        raise DataError(f"{path}: {key} must be a scalar (a 0-d number or text array), got {dtype} of shape {shape}")
    check_size(f"{path}: {key}", shape, dtype, payload, corrupt=f"{path}: array {key!r}")
    value = _guarded(f"{path}: array {key!r}", lambda: data[key]).item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
