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

__all__ = ["ImageEntry", "read_image", "read_image_list"]

#: One list entry: (path as written, label, 1-based line number in the list file).
ImageEntry = tuple[str, int, int]


def read_image_list(source: str, *, what: str = "source") -> list[ImageEntry]:
    """Parse a ``path label`` list file; blank lines are skipped, anything else must parse.

    Deliberate difference: Caffe splits at the last space only and reads a missing or
    non-numeric label as 0 (``atoi``); we split at the last run of whitespace and refuse such
    lines, naming the file and line.
    """
    if not os.path.isfile(source):
        raise DataError(f"{what} {source!r} not found (relative paths are read from {os.getcwd()!r})")
    entries: list[ImageEntry] = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{source}:{lineno}: expected 'path label', got {text!r}")
            path, label = parts
            try:
                value = int(label)
            except ValueError:
                raise DataError(f"{source}:{lineno}: label {label!r} is not an integer (line {text!r})") from None
            entries.append((path, value, lineno))
    return entries


def read_image(
    path: str, new_height: int = 0, new_width: int = 0, is_color: bool = True, *, where: str = ""
) -> np.ndarray:
    """Read an image as a uint8 C×H×W array (BGR, or 1 channel when ``is_color`` is false).

    ``where`` names the entry in error messages (e.g. ``"list.txt:3"``).
    """
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise DataError(f"{prefix}image file {path!r} not found (working directory {os.getcwd()!r})")
    img = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{prefix}could not decode image {path!r} (not an image OpenCV can read)")
    if new_height > 0 and new_width > 0:
        img = cv2.resize(img, (new_width, new_height))
    return image_to_chw(img)
