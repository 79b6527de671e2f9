"""Caffe's WindowData layer: R-CNN's fine-tuning data layer.

Each batch holds windows (boxes) cut out of images listed in a *window file*, warped to
``crop_size`` × ``crop_size`` (Caffe 1.0's ``src/caffe/layers/window_data_layer.cpp``). The
window file is a stream of whitespace-separated tokens (read like C++'s ``>>``), one block per
image::

    # 0                      <- "#" then the image index: 0, 1, 2... in file order
    images/000005.jpg        <- path, read as root_folder + path
    3                        <- channels
    375                      <- height
    500                      <- width
    2                        <- number of windows of this image
    12 0.85 262 210 323 338  <- class_index overlap x1 y1 x2 y2 (0-based, inclusive corners)
    0 0.12 10 10 80 90

Only the last image's ``channels`` is used (it gives the data top's channel count, as in Caffe);
``height`` and ``width`` are not used (the decoded image's own size is).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import NamedTuple

import cv2
import numpy as np

from caffe_compat.data.image_list import imread
from caffe_compat.data.streams import RecordDraws, coin, uniform_int
from caffe_compat.data.transformer import load_mean_file
from caffe_compat.data.workers import Failed, map_in_order
from caffe_compat.errors import DataError
from caffe_compat.layers.base import register_layer
from caffe_compat.layers.data import _PrefetchingDataLayer

__all__ = [
    "WarpGeometry",
    "Window",
    "WindowDataLayer",
    "WindowImage",
    "read_window_file",
    "split_windows",
    "warp_geometry",
]

log = logging.getLogger(__name__)

_F32 = np.float32


class WindowImage(NamedTuple):
    """One image block of a window file."""

    path: str  #: root_folder + the path as written
    channels: int
    height: int
    width: int
    line: int  #: 1-based line of its "#" in the window file


class Window(NamedTuple):
    """One ``class_index overlap x1 y1 x2 y2`` entry (label and overlap as Caffe keeps them)."""

    image: int  #: index into the images
    label: int
    overlap: float  #: float32 value
    x1: int
    y1: int
    x2: int
    y2: int
    line: int  #: 1-based line of the entry in the window file


def _tokens(source: str):
    """The whitespace-separated tokens of ``source`` with their line, read as bytes as Caffe
    reads them (a Latin-1 image path is decoded with ``os.fsdecode``)."""
    from caffe_compat.data.image_list import read_list_bytes

    data = read_list_bytes(source, "window_data_param.source")
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if b"\x00" in line:
            raise DataError(f"{source}:{lineno}: unreadable line: it holds a NUL byte")
        for tok in line.split():
            yield os.fsdecode(tok), lineno


def read_window_file(source: str, root_folder: str = "") -> tuple[list[WindowImage], list[Window]]:
    """Parse a window file (see the module docstring) into its images and all their windows.

    Raises a DataError naming ``source:line`` for a missing file, an empty file, a block that
    does not start with ``#``, an image index out of sequence, a token that is not a number, a
    file that ends inside a block, a negative window count or a window with ``x2 < x1`` or
    ``y2 < y1``.
    """
    if not os.path.exists(source):
        raise DataError(f"window_data_param.source {source!r} not found (relative paths are read from {os.getcwd()!r})")
    toks = _tokens(source)
    images: list[WindowImage] = []
    windows: list[Window] = []
    last_line = 0
    block = 0

    def take(what: str) -> tuple[str, int]:
        try:
            return next(toks)
        except StopIteration:
            raise DataError(
                f"{source}:{last_line}: the window file ends inside image block {block} (expected {what})"
            ) from None

    def number(what: str, kind=int) -> tuple[int | float, int]:
        nonlocal last_line
        tok, line = take(what)
        last_line = line
        try:
            value = kind(tok)
        except ValueError:
            word = "an integer" if kind is int else "a number"
            raise DataError(f"{source}:{line}: {what} must be {word}, got {tok!r}") from None
        return value, line

    for tok, line in toks:
        last_line, block = line, len(images)
        if tok != "#":
            raise DataError(
                f"{source}:{line}: expected '#' to start image block {len(images)}, got {tok!r} "
                "(blocks are '# index', path, channels, height, width, num_windows, then the windows)"
            )
        index, _ = number("the image index after '#'")
        if index != len(images):
            raise DataError(
                f"{source}:{line}: image index {index} out of sequence; Caffe looks images up by index, "
                f"so block {len(images)} must be '# {len(images)}'"
            )
        path, last_line = take("the image path")
        channels, _ = number("channels")
        height, _ = number("height")
        width, _ = number("width")
        num_windows, nline = number("num_windows")
        if num_windows < 0:
            raise DataError(f"{source}:{nline}: num_windows must be >= 0, got {num_windows}")
        images.append(WindowImage(root_folder + path, channels, height, width, line))
        for _ in range(num_windows):
            label, wline = number("a window's class_index")
            overlap, _ = number("a window's overlap", float)
            x1, _ = number("a window's x1")
            y1, _ = number("a window's y1")
            x2, _ = number("a window's x2")
            y2, _ = number("a window's y2")
            if x2 < x1 or y2 < y1:
                raise DataError(
                    f"{source}:{wline}: window ({x1}, {y1}, {x2}, {y2}) has x2 < x1 or y2 < y1; "
                    "windows are 'x1 y1 x2 y2' with inclusive corners"
                )
            windows.append(Window(len(images) - 1, label, float(_F32(overlap)), x1, y1, x2, y2, wline))
    if not images:
        raise DataError(f"{source}: the window file is empty")
    return images, windows


def split_windows(
    windows: list[Window], fg_threshold: float, bg_threshold: float, source: str = "window file"
) -> tuple[list[Window], list[Window]]:
    """Caffe's foreground/background split: ``overlap >= fg_threshold`` is foreground (its label
    must be > 0), else ``overlap < bg_threshold`` is background with label and overlap set to 0;
    windows in between are dropped. Comparisons in float32, as Caffe."""
    fg_t, bg_t = _F32(fg_threshold), _F32(bg_threshold)
    fg, bg = [], []
    for w in windows:
        overlap = _F32(w.overlap)
        if overlap >= fg_t:
            if w.label <= 0:
                raise DataError(
                    f"{source}:{w.line}: foreground window (overlap {w.overlap:g} >= fg_threshold {fg_threshold:g}) "
                    f"has class_index {w.label}; foreground labels must be > 0 (0 is background)"
                )
            fg.append(w)
        elif overlap < bg_t:
            bg.append(w._replace(label=0, overlap=0.0))
    return fg, bg


def _round(x) -> int:
    """C's ``round`` (halves away from zero) of a float32 value."""
    v = float(x)
    r = math.floor(abs(v) + 0.5)
    return int(r) if v >= 0 else -int(r)


class WarpGeometry(NamedTuple):
    """Where one window comes from and where its warp goes in the crop_size × crop_size output."""

    x1: int  #: source region (clipped to the image), inclusive corners
    y1: int
    x2: int
    y2: int
    out_width: int  #: size the region is resized to
    out_height: int
    pad_w: int  #: column / row of the output where the warped region starts
    pad_h: int


def warp_geometry(
    window: tuple[int, int, int, int],
    image_hw: tuple[int, int],
    crop_size: int,
    context_pad: int,
    square: bool,
    mirror: bool,
) -> WarpGeometry:
    """Caffe 1.0's window geometry (float32 arithmetic and C rounding, as ``Dtype`` float).

    Without ``context_pad`` and in warp mode, the window itself is resized to crop_size ×
    crop_size. Otherwise the region is expanded by ``crop_size / (crop_size - 2 context_pad)``
    around the window's center (square mode: around its longer side), clipped to the image, and
    the clipped part is resized with the scale the unclipped region would have had; the cut-off
    part becomes zero padding (on the right instead of the left when mirrored) and the warped
    size is trimmed so that padding + warp fit in crop_size. Raises ValueError when the region
    misses the image.
    """
    x1, y1, x2, y2 = (int(v) for v in window)
    rows, cols = image_hw
    if context_pad <= 0 and not square:
        if x1 < 0 or y1 < 0 or x2 >= cols or y2 >= rows:
            raise ValueError(
                f"window ({x1}, {y1}, {x2}, {y2}) is not inside the {cols}×{rows} (width×height) image; warp mode "
                "without context_pad crops the window as is"
            )
        return WarpGeometry(x1, y1, x2, y2, crop_size, crop_size, 0, 0)
    crop = _F32(crop_size)
    context_scale = crop / _F32(crop_size - 2 * context_pad)
    half_h = _F32((y2 - y1 + 1) / 2.0)
    half_w = _F32((x2 - x1 + 1) / 2.0)
    center_x = _F32(x1) + half_w
    center_y = _F32(y1) + half_h
    if square:
        if half_h > half_w:
            half_w = half_h
        else:
            half_h = half_w
    x1 = _round(center_x - half_w * context_scale)
    x2 = _round(center_x + half_w * context_scale)
    y1 = _round(center_y - half_h * context_scale)
    y2 = _round(center_y + half_h * context_scale)
    unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
    pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
    pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
    x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
    if x2 < x1 or y2 < y1:
        raise ValueError(
            f"the expanded window ({x1 - pad_x1}, {y1 - pad_y1}, {x2 + pad_x2}, {y2 + pad_y2}) does not overlap "
            f"the {cols}×{rows} (width×height) image"
        )
    scale_x = crop / _F32(unclipped_w)
    scale_y = crop / _F32(unclipped_h)
    out_w = _round(_F32(x2 - x1 + 1) * scale_x)
    out_h = _round(_F32(y2 - y1 + 1) * scale_y)
    pad_x1 = _round(_F32(pad_x1) * scale_x)
    pad_x2 = _round(_F32(pad_x2) * scale_x)
    pad_y1 = _round(_F32(pad_y1) * scale_y)
    pad_h = pad_y1
    pad_w = pad_x2 if mirror else pad_x1  # the padding is mirrored too
    if pad_h + out_h > crop_size:
        out_h = crop_size - pad_h
    if pad_w + out_w > crop_size:
        out_w = crop_size - pad_w
    if out_w <= 0 or out_h <= 0:
        raise ValueError(
            f"window ({x1}, {y1}, {x2}, {y2}) clipped to the {cols}×{rows} image warps to {out_w}×{out_h} pixels; "
            "nothing of it is left in the crop"
        )
    return WarpGeometry(x1, y1, x2, y2, out_w, out_h, pad_w, pad_h)


class _WindowSource:
    """Produces WindowData batches: (data N×C×crop×crop, labels N)."""

    def __init__(self, layer: WindowDataLayer, seed: int):
        self.images, self.fg, self.bg = layer.images, layer.fg_windows, layer.bg_windows
        self.source = layer.source
        self.batch_size, self.num_fg = layer.batch_size, layer.num_fg
        self.crop_size, self.context_pad, self.square = layer.crop_size, layer.context_pad, layer.square
        self.mirror, self.scale, self.channels = layer.mirror, layer.scale, layer.channels
        self.mean, self.mean_off, self.mean_values = layer.mean, layer.mean_off, layer.mean_values
        self.cache = layer.cache
        self.draws = RecordDraws(seed, 0)
        self.k = 0  # the stream's items drawn so far

    def draw_batch(self) -> list[tuple[Window, bool]]:
        """The random draws of one batch, in Caffe's order: the background windows first, then
        the foreground ones; per window, its index (uniform, with replacement) then, when
        ``mirror`` is on, the mirror coin. Item ``k`` of the stream draws from its own words
        (``streams.RecordDraws``: word 0 the index, word 1 the coin), so skipping is O(1)."""
        drawn = []
        words = self.draws.block(self.k, self.batch_size)
        for k in range(self.batch_size):
            pool = self.fg if k >= self.batch_size - self.num_fg else self.bg
            window = pool[uniform_int(words[k][0], len(pool))]
            drawn.append((window, self.mirror and coin(words[k][1])))
        self.k += self.batch_size
        return drawn

    def skip(self, n_batches: int) -> None:
        self.k += n_batches * self.batch_size

    def read(self, window: Window) -> np.ndarray:
        image = self.images[window.image]
        where = f"{self.source}:{image.line}"
        if self.cache is not None:
            img = cv2.imdecode(np.frombuffer(self.cache[window.image], dtype=np.uint8), cv2.IMREAD_COLOR)
        else:
            if not os.path.isfile(image.path):
                raise DataError(f"{where}: image file {image.path!r} not found (working directory {os.getcwd()!r})")
            img = imread(image.path, cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{where}: could not decode image {image.path!r} (not an image OpenCV can read)")
        return img

    def item(self, drawn: tuple[Window, bool]) -> np.ndarray:
        """One C×crop×crop output: the warped window, mean-subtracted and scaled, zero elsewhere."""
        window, do_mirror = drawn
        img = self.read(window)
        try:
            g = warp_geometry(
                (window.x1, window.y1, window.x2, window.y2),
                img.shape[:2],
                self.crop_size,
                self.context_pad,
                self.square,
                do_mirror,
            )
        except ValueError as e:
            raise DataError(f"{self.source}:{window.line}: {e} ({self.images[window.image].path!r})") from None
        patch = cv2.resize(
            img[g.y1 : g.y2 + 1, g.x1 : g.x2 + 1], (g.out_width, g.out_height), interpolation=cv2.INTER_LINEAR
        )
        if do_mirror:
            patch = patch[:, ::-1]
        pix = patch.transpose(2, 0, 1).astype(np.float32)
        h, w = pix.shape[1:]
        if self.mean is not None:
            r0, c0 = self.mean_off + g.pad_h, self.mean_off + g.pad_w
            pix -= self.mean[:, r0 : r0 + h, c0 : c0 + w]
        elif self.mean_values is not None:
            pix -= self.mean_values[:, None, None]
        out = np.zeros((self.channels, self.crop_size, self.crop_size), dtype=np.float32)
        out[:, g.pad_h : g.pad_h + h, g.pad_w : g.pad_w + w] = pix * self.scale
        return out

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        drawn = self.draw_batch()
        data = np.empty((self.batch_size, self.channels, self.crop_size, self.crop_size), dtype=np.float32)
        labels = np.array([w.label for w, _ in drawn], dtype=np.float32)
        for k, result in enumerate(map_in_order(self.item, drawn)):
            if isinstance(result, Failed):
                raise result.error
            data[k] = result
        return data, labels


@register_layer("WindowData")
class WindowDataLayer(_PrefetchingDataLayer):
    """Caffe's WindowDataLayer (R-CNN fine-tuning): batches of image windows, warped to a square.

    ``window_data_param`` (caffe.proto defaults): ``source`` (the window file, see
    :mod:`caffe_compat.layers.window_data`; required), ``batch_size`` (required), ``fg_threshold``
    0.5, ``bg_threshold`` 0.5, ``fg_fraction`` 0.25, ``context_pad`` 0, ``crop_mode`` "warp"
    ("warp" or "square"), ``scale`` 1, ``cache_images`` false, ``root_folder`` "" (prepended to
    every image path as a plain string). ``transform_param``: ``crop_size`` (required, > 0),
    ``mirror`` false, ``mean_file`` (a BlobProto) or ``mean_value`` (1 or 3 values), not both.
    The deprecated ``window_data_param`` fields ``crop_size``, ``mirror`` and ``mean_file`` are
    used when set (Caffe's upgrade moves them into ``transform_param``); set in both places they
    must agree. ``data_param.prefetch`` (4) batches are made ahead in a thread.

    Windows with ``overlap >= fg_threshold`` are foreground (their ``class_index`` must be > 0),
    else those with ``overlap < bg_threshold`` are background (label 0); the others are unused.
    Each batch draws ``batch_size - int(batch_size * fg_fraction)`` background windows, then the
    foreground ones, each uniformly with replacement, and for each a mirror coin when ``mirror``.
    Images are read with OpenCV as 3-channel BGR. A window is cut out and resized
    (``cv2.INTER_LINEAR``) to crop_size × crop_size; with ``context_pad`` > 0 or square mode, the
    region is first expanded so that the window ends ``context_pad`` pixels from each edge of the
    output (square: around the window's longer side), clipped to the image, and the part beyond
    the image is left as zero padding (see :func:`warp_geometry`). Mirroring flips the warped
    window and its padding. Each warped pixel becomes ``(pixel - mean) * scale``, the mean being
    ``mean_file`` at ``[c, mean_off + row, mean_off + col]`` with ``mean_off = (mean width -
    crop_size) // 2`` (for rows too, as Caffe) or ``mean_value[c]``; padding stays 0.

    Tops: data (batch_size, C, crop_size, crop_size) float32, C the window file's last
    ``channels`` (must be 3); label (batch_size,) float32. TRAIN and TEST behave alike.

    Differences from Caffe:

    - Random draws come from a NumPy Generator seeded from torch's RNG at construction
      (``caffe_compat.set_random_seed`` reproduces every batch, with or without prefetching);
      Caffe's boost mt19937 stream (``rand() % size``) cannot be reproduced, only its
      distribution.
    - ``scale`` is ``window_data_param.scale``, as Caffe 1.0 reads it; Caffe 1.0 silently
      ignores ``transform_param.scale`` (also where its V1 upgrade moved
      ``window_data_param.scale`` there), so a ``transform_param.scale`` other than 1 is refused
      rather than ignored, as is ``force_gray`` (images are always read in colour).
    - Errors instead of crashes or silently wrong batches: a window file with an image index out
      of sequence, a missing or undecodable image (checked at setup for existence; Caffe logs
      and returns a half-filled batch), a crop_mode other than "warp"/"square" (Caffe treats it
      as warp), ``2 * context_pad >= crop_size``, ``fg_fraction`` outside [0, 1], no foreground
      (background) window while the batch needs some, a window outside the image in plain warp
      mode or missing it after expansion, a mean_file smaller than the crop, a last-image
      ``channels`` other than 3, windows with ``x2 < x1`` or ``y2 < y1``.
    - ``cache_images`` keeps every image's encoded bytes in memory, read at setup, and decodes
      them at each use, as Caffe does (decoded images of a large detection set would not fit).
    - Resizing uses the installed OpenCV; its INTER_LINEAR fixed-point rounding may differ by one
      grey level from the OpenCV Caffe was built with.
    """

    exact_num_top = 2

    def setup(self, bottom_shapes):
        p = self.param.window_data_param
        tp = self.param.transform_param
        if not p.HasField("source"):
            raise self.error("window_data_param.source (the window file) is required")
        if p.batch_size <= 0:
            raise self.error("window_data_param.batch_size is required and must be positive")
        for field in ("crop_size", "mirror", "mean_file"):
            if p.HasField(field) and tp.HasField(field) and getattr(p, field) != getattr(tp, field):
                raise self.error(
                    f"window_data_param.{field} ({getattr(p, field)!r}) and transform_param.{field} "
                    f"({getattr(tp, field)!r}) disagree; set it in transform_param only"
                )
        crop_size = int(p.crop_size if p.HasField("crop_size") else tp.crop_size)
        mirror = bool(p.mirror if p.HasField("mirror") else tp.mirror)
        mean_file = p.mean_file if p.HasField("mean_file") else (tp.mean_file if tp.HasField("mean_file") else None)
        if crop_size <= 0:
            raise self.error("transform_param.crop_size is required and must be positive (the warped window's size)")
        if tp.HasField("scale") and tp.scale != 1:
            raise self.error(
                f"transform_param.scale ({tp.scale:g}) is ignored by Caffe's WindowData, which reads "
                "window_data_param.scale; move it there (or remove it to get Caffe 1.0's unscaled data)"
            )
        if tp.force_gray:
            raise self.error("transform_param.force_gray is not supported: WindowData reads images in colour, as Caffe")
        if p.crop_mode not in ("warp", "square"):
            raise self.error(f'window_data_param.crop_mode must be "warp" or "square", got {p.crop_mode!r}')
        if 2 * p.context_pad >= crop_size:
            raise self.error(
                f"window_data_param.context_pad {p.context_pad} leaves nothing of the window in crop_size "
                f"{crop_size}; need 2 * context_pad < crop_size"
            )
        if not 0 <= p.fg_fraction <= 1:
            raise self.error(f"window_data_param.fg_fraction must be in [0, 1], got {p.fg_fraction:g}")
        if mean_file is not None and len(tp.mean_value):
            raise self.error("transform_param sets both mean_file and mean_value; Caffe accepts one of them")

        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.num_fg = int(_F32(p.batch_size) * _F32(p.fg_fraction))
        self.crop_size, self.mirror = crop_size, mirror
        self.context_pad, self.square = int(p.context_pad), p.crop_mode == "square"
        self.scale = _F32(p.scale)
        try:
            self.images, windows = read_window_file(p.source, p.root_folder)
            self.fg_windows, self.bg_windows = split_windows(windows, p.fg_threshold, p.bg_threshold, p.source)
            self.channels = self.images[-1].channels
            if self.channels != 3:
                raise DataError(
                    f"{p.source}:{self.images[-1].line}: the last image lists {self.channels} channels; the data "
                    "top takes its channel count from it and images are read as 3-channel BGR, so it must be 3"
                )
            self.cache = self._check_images(p.cache_images)
            self.mean = self.mean_values = None
            self.mean_off = 0
            if mean_file is not None:
                self._load_mean(mean_file)
            elif len(tp.mean_value):
                mv = np.asarray(tp.mean_value, dtype=np.float32)
                if mv.size not in (1, self.channels):
                    raise DataError(
                        f"transform_param gives {mv.size} mean_value(s); give 1 or {self.channels} (one per channel)"
                    )
                self.mean_values = np.broadcast_to(mv, (self.channels,)).copy()
        except DataError as e:
            raise self._data_error(e) from e
        if self.batch_size - self.num_fg > 0 and not self.bg_windows:
            raise self.error(
                f"{p.source} has no background window (overlap < bg_threshold {p.bg_threshold:g}) but each batch "
                f"needs {self.batch_size - self.num_fg}"
            )
        if self.num_fg > 0 and not self.fg_windows:
            raise self.error(
                f"{p.source} has no foreground window (overlap >= fg_threshold {p.fg_threshold:g}) but each batch "
                f"needs {self.num_fg}"
            )
        hist = Counter(w.label for w in self.fg_windows)
        log.info(
            "layer %r: %d images, %d background and %d foreground windows (%s); %d fg of %d per batch",
            self.name,
            len(self.images),
            len(self.bg_windows),
            len(self.fg_windows),
            ", ".join(f"class {c}: {n}" for c, n in sorted(hist.items())),
            self.num_fg,
            self.batch_size,
        )
        seed, _ = self._seed()
        self._shapes = [(self.batch_size, self.channels, crop_size, crop_size), (self.batch_size,)]
        self._start_prefetch(_WindowSource(self, seed), self.param.data_param.prefetch)

    def _check_images(self, cache_images: bool) -> list[bytes] | None:
        """Check that every image file exists; with ``cache_images``, read their bytes."""
        cache: list[bytes] | None = [] if cache_images else None
        for image in self.images:
            if not os.path.isfile(image.path):
                root = self.param.window_data_param.root_folder
                hint = ""
                if root and not root.endswith(("/", os.sep)):
                    hint = " (root_folder is prepended as is: end it with '/')"
                raise DataError(
                    f"{self.source}:{image.line}: image file {image.path!r} not found "
                    f"(working directory {os.getcwd()!r}){hint}"
                )
            if cache is not None:
                with open(image.path, "rb") as f:
                    cache.append(f.read())
        return cache

    def _load_mean(self, mean_file: str) -> None:
        mean = load_mean_file(mean_file)
        c, h, w = mean.shape
        off = (w - self.crop_size) // 2 if w >= self.crop_size else -1
        if c != self.channels or off < 0 or off + self.crop_size > h:
            raise DataError(
                f"mean_file {mean_file!r} is {c}×{h}×{w}; WindowData needs {self.channels} channels and reads the "
                f"crop_size {self.crop_size} square at offset (width - crop_size) // 2 in both directions"
            )
        self.mean, self.mean_off = mean, off
