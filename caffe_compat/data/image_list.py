"""Image list files (``path label`` per line) and image reading as Caffe's ``ReadImageToCVMat``.

Caffe splits each line at its last space: the path may contain spaces, the label is an integer.
Images are read with OpenCV (``IMREAD_COLOR`` → 3-channel BGR, or ``IMREAD_GRAYSCALE``) and, when
both ``new_height`` and ``new_width`` are positive, resized with ``cv2.resize`` (bilinear, the
OpenCV default Caffe uses).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from caffe_compat.data.transformer import image_to_chw
from caffe_compat.errors import DataError

__all__ = ["ImageEntry", "imread", "read_image", "read_image_list", "read_list_bytes"]

#: One list entry: (path as written, label, 1-based line number in the list file).
ImageEntry = tuple[str, int, int]


def read_list_bytes(source: str, what: str) -> bytes:
    """The bytes of the list file ``source``, refused at once (naming it) when it is missing or
    not a regular file (a FIFO, a device, a directory)."""
    from caffe_compat.rawio import read_regular_file

    if not os.path.exists(source):
        raise DataError(f"{what} {source!r} not found (relative paths are read from {os.getcwd()!r})")
    return read_regular_file(source, f"{what} (a list file)", MAX_LIST_BYTES, error=DataError)


#: The largest list file read (4 GiB: tens of millions of entries).
MAX_LIST_BYTES = 4 << 30


def read_image_list(source: str, *, what: str = "source") -> list[ImageEntry]:
    """Parse a ``path label`` list file; blank lines are skipped, anything else must parse.

    The file is read as bytes, as Caffe reads it: a path that is not UTF-8 (a Latin-1 file name)
    is decoded with ``os.fsdecode``, so it names the file of those bytes. A line holding a NUL
    byte (no path can) is reported as ``file:line``.

    Deliberate difference: Caffe splits at the last space only and reads a missing or
    non-numeric label as 0 (``atoi``); we split at the last run of whitespace and refuse such
    lines, naming the file and line.
    """
    data = read_list_bytes(source, what)
    entries: list[ImageEntry] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        shown = os.fsdecode(line)
        if b"\x00" in line:
            raise DataError(f"{source}:{lineno}: unreadable line: it holds a NUL byte ({shown!r})")
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{source}:{lineno}: expected 'path label', got {shown!r}")
        path, label = parts
        try:
            value = int(label.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DataError(
                f"{source}:{lineno}: label {os.fsdecode(label)!r} is not an integer (line {shown!r})"
            ) from None
        entries.append((os.fsdecode(path), value, lineno))
    return entries


def _check_image_file(path: str, prefix: str = "") -> None:
    """Refuse an image path that is a FIFO, a device or a directory (OpenCV would block on a FIFO)."""
    from caffe_compat.rawio import check_regular_file

    try:
        check_regular_file(path, "an image file", error=DataError)
    except DataError as e:
        raise DataError(f"{prefix}{e}") from None


def imread(path: str, flags: int) -> np.ndarray | None:
    """``cv2.imread(path, flags)`` for any file name: a name that is not valid UTF-8 (os.fsdecode's
    surrogates, from a Latin-1 list) crashes OpenCV's imread, so such a file is read as bytes and
    decoded with ``cv2.imdecode``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except OSError:
            return None
        return cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), flags) if buf else None
    return cv2.imread(path, flags)


def read_image(
    path: str, new_height: int = 0, new_width: int = 0, is_color: bool = True, *, where: str = ""
) -> np.ndarray:
    """Read an image as a uint8 C×H×W array (BGR, or 1 channel when ``is_color`` is false).

    ``where`` names the entry in error messages (e.g. ``"list.txt:3"``).
    """
    prefix = f"{where}: " if where else ""
    if not os.path.exists(path):
        raise DataError(f"{prefix}image file {path!r} not found (working directory {os.getcwd()!r})")
    _check_image_file(path, prefix)
    img = imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{prefix}could not decode image {path!r} (not an image OpenCV can read)")
    if new_height > 0 and new_width > 0:
        img = cv2.resize(img, (new_width, new_height))
    return image_to_chw(img)
