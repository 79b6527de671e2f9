"""Caffe's ``DataTransformer``: the per-image preprocessing of the data layers.

Caffe's ``src/caffe/data_transformer.cpp``, in its order of operations. For one C×H×W image
``x`` (uint8 pixels or float ``float_data``), with ``crop`` = ``crop_size`` (0: no crop)::

    do_mirror = mirror and Rand(2)                  # drawn first, in TRAIN and TEST alike
    h_off, w_off = Rand(H - crop + 1), Rand(W - crop + 1)   # TRAIN
                 = (H - crop) // 2, (W - crop) // 2         # TEST
    out[c, h, w'] = (x[c, h + h_off, w + w_off] - mean) * scale,  w' = crop_w - 1 - w if do_mirror

``mean`` is either the full-size (uncropped) ``mean_file`` image indexed at the *source*
position ``[c, h + h_off, w + w_off]``, or ``mean_value`` (one value for every channel, or one per
channel), never both. Arithmetic is float32 as in Caffe (``Dtype`` float), so results are
bit-identical for the same offsets and mirror decision; the data layers draw them from the
record's own counter-based words (``caffe_compat.data.streams``), a direct user from a NumPy
``Generator`` (Caffe uses boost's mt19937, so only the distribution can match).

Encoded Datums are decoded with OpenCV as Caffe does: ``force_color`` → ``IMREAD_COLOR``,
``force_gray`` → ``IMREAD_GRAYSCALE``, neither → ``IMREAD_UNCHANGED`` (native channels). Pixels
stay in OpenCV's BGR order; no channel swap happens anywhere.
"""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np

from caffe_compat.data.streams import coin, uniform_int
from caffe_compat.errors import DataError

__all__ = ["DataTransformer", "datum_to_array", "decode_image", "image_to_chw", "load_mean_file"]

log = logging.getLogger(__name__)


def image_to_chw(img: np.ndarray) -> np.ndarray:
    """OpenCV's H×W (gray) or H×W×C (BGR) image as a C×H×W array (no copy of the pixels' values)."""
    if img.ndim == 2:
        return img[None, :, :]
    return img.transpose(2, 0, 1)


def decode_image(buf: bytes, force_color: bool = False, force_gray: bool = False, *, where: str = "") -> np.ndarray:
    """Decode an encoded image (PNG, JPEG...) to a uint8 C×H×W array in BGR order, as Caffe's
    ``DecodeDatumToCVMat`` (forced colour/gray) or ``DecodeDatumToCVMatNative`` (neither)."""
    if force_color and force_gray:
        raise DataError(f"{where}: force_color and force_gray cannot both be set")
    flag = cv2.IMREAD_COLOR if force_color else cv2.IMREAD_GRAYSCALE if force_gray else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), flag) if len(buf) else None
    if img is None:
        raise DataError(f"{where}: could not decode the encoded image ({len(buf)} bytes)")
    if img.dtype != np.uint8:
        raise DataError(f"{where}: decoded image has depth {img.dtype}, Caffe accepts 8-bit images only")
    return image_to_chw(img)


def datum_to_array(datum, force_color: bool = False, force_gray: bool = False, *, where: str = "") -> np.ndarray:
    """A ``Datum``'s pixels as a C×H×W array: uint8 for ``data`` (raw or decoded), float32 for
    ``float_data``. ``where`` names the record in error messages (e.g. ``"db/ key '00000003'"``)."""
    if datum.encoded:
        return decode_image(datum.data, force_color, force_gray, where=where)
    c, h, w = datum.channels, datum.height, datum.width
    n = c * h * w
    if len(datum.data):
        if len(datum.data) != n:
            raise DataError(
                f"{where}: Datum holds {len(datum.data)} bytes but channels×height×width = {c}×{h}×{w} = {n}"
            )
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data):
        if len(datum.float_data) != n:
            raise DataError(
                f"{where}: Datum holds {len(datum.float_data)} float_data values but "
                f"channels×height×width = {c}×{h}×{w} = {n}"
            )
        return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)
    raise DataError(f"{where}: Datum has neither data nor float_data")


def load_mean_file(path: str) -> np.ndarray:
    """Read a mean ``.binaryproto`` (Caffe's ``BlobProto``) as a float32 C×H×W array."""
    from caffe_compat.rawio import blob_to_array, read_blobproto

    if not os.path.exists(path):
        raise DataError(f"mean_file {path!r} not found (relative paths are read from {os.getcwd()!r})")
    from caffe_compat.rawio import check_regular_file

    check_regular_file(path, "a mean_file (.binaryproto)", error=DataError)
    try:
        arr = np.asarray(blob_to_array(read_blobproto(path), what=f"mean_file {path!r}"), dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # a FormatError from io, or protobuf's DecodeError
        raise DataError(f"mean_file {path!r} is not a BlobProto .binaryproto: {e}") from e
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DataError(f"mean_file {path!r} has shape {arr.shape}; expected 1×C×H×W or C×H×W")
    return np.ascontiguousarray(arr)


class DataTransformer:
    """Caffe's DataTransformer, reading a ``TransformationParameter``.

    Parameters (caffe.proto defaults): ``scale`` 1, ``mirror`` false, ``crop_size`` 0 (no crop),
    ``mean_file`` (a BlobProto, path relative to the working directory) XOR ``mean_value``
    (repeated; one value or one per channel), ``force_color`` / ``force_gray`` false (encoded
    Datums only; Caffe logs an error and ignores them for raw Datums, as we do).

    ``transform(x)`` maps a C×H×W image to a float32 C×h×w array (h = w = crop_size when cropping).
    ``rng`` (a NumPy Generator) draws the mirror decision and, in TRAIN, the crop offsets, unless
    ``draw`` is given the record's words (the data layers do: see ``caffe_compat.data.streams``).
    ``where`` prefixes error messages (the layer's name).
    """

    def __init__(self, param, phase: int, rng: np.random.Generator, *, where: str = "transform_param"):
        from caffe_compat.proto import caffe_pb2

        self.where = where
        self.train = phase == caffe_pb2.TRAIN
        self.rng = rng
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise DataError(f"{where}: transform_param.force_color and force_gray cannot both be true")
        self._warned_raw = False
        self.mean: np.ndarray | None = None
        self.mean_values: np.ndarray | None = None
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise DataError(
                    f"{where}: transform_param sets both mean_file and mean_value; Caffe accepts one of them"
                )
            self.mean = load_mean_file(param.mean_file)
            self.mean_file = param.mean_file
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, chw: tuple[int, int, int]) -> tuple[int, int, int]:
        """Caffe's ``InferBlobShape`` for a C×H×W input (checks that the crop fits)."""
        c, h, w = chw
        if self.crop_size:
            if h < self.crop_size or w < self.crop_size:
                raise DataError(f"{self.where}: crop_size {self.crop_size} is larger than the {h}×{w} image")
            return (c, self.crop_size, self.crop_size)
        return (c, h, w)

    @property
    def random(self) -> bool:
        """Whether ``transform`` draws random numbers (``mirror``, or ``crop_size`` in TRAIN)."""
        return self.mirror or bool(self.crop_size and self.train)

    def decode(self, datum, *, where: str) -> np.ndarray:
        """A Datum's C×H×W pixels, decoded with this transformer's force_color/force_gray."""
        if not datum.encoded and (self.force_color or self.force_gray) and not self._warned_raw:
            self._warned_raw = True
            log.warning("%s: force_color and force_gray only apply to encoded Datums; ignored", self.where)
        return datum_to_array(datum, self.force_color, self.force_gray, where=where)

    def draw(self, chw: tuple[int, int, int], *, where: str = "", words=None) -> tuple[bool, int, int]:
        """The random draws (and checks) ``transform`` makes for a C×H×W image, in Caffe's order:
        ``(do_mirror, h_off, w_off)``. Raises a DataError when the crop or the mean does not fit.

        ``words`` (the record's four uint64 words from ``caffe_compat.data.streams``, as the data
        layers pass them): the mirror coin is word 0, the crop offsets words 1 and 2, so a
        record's draws depend on the record alone. Without ``words`` they come from ``rng``."""
        c, h, w = chw
        where = where or self.where
        if words is not None:
            do_mirror = self.mirror and coin(words[0])
        else:
            do_mirror = self.mirror and int(self.rng.integers(2)) == 1
        h_off = w_off = 0
        if self.crop_size:
            crop = self.crop_size
            if h < crop or w < crop:
                raise DataError(f"{where}: crop_size {crop} is larger than the {h}×{w} image")
            if self.train and words is not None:
                h_off = uniform_int(words[1], h - crop + 1)
                w_off = uniform_int(words[2], w - crop + 1)
            elif self.train:
                h_off = int(self.rng.integers(h - crop + 1))
                w_off = int(self.rng.integers(w - crop + 1))
            else:
                h_off = (h - crop) // 2
                w_off = (w - crop) // 2
        if self.mean is not None:
            if self.mean.shape != (c, h, w):
                raise DataError(
                    f"{where}: the {c}×{h}×{w} image does not match mean_file {self.mean_file!r} "
                    f"({'×'.join(map(str, self.mean.shape))}); the mean must have the input's full size"
                )
        elif self.mean_values is not None and self.mean_values.size not in (1, c):
            raise DataError(
                f"{where}: transform_param gives {self.mean_values.size} mean_value(s) for a {c}-channel image; "
                f"give 1 or {c}"
            )
        return do_mirror, h_off, w_off

    def apply(self, x: np.ndarray, drawn: tuple[bool, int, int]) -> np.ndarray:
        """Transform one C×H×W image with the draws ``draw`` made for it (no random state used:
        safe in another thread)."""
        do_mirror, h_off, w_off = drawn
        c, h, w = x.shape
        oh, ow = (self.crop_size, self.crop_size) if self.crop_size else (h, w)
        out = x[:, h_off : h_off + oh, w_off : w_off + ow].astype(np.float32)
        if self.mean is not None:
            out -= self.mean[:, h_off : h_off + oh, w_off : w_off + ow]
        elif self.mean_values is not None:
            mv = self.mean_values
            out -= mv.reshape(-1, 1, 1) if mv.size == c else mv[0]
        if self.scale != 1:
            out *= self.scale
        if do_mirror:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)

    def transform(self, x: np.ndarray, *, where: str = "") -> np.ndarray:
        """Transform one C×H×W image (uint8 or float32) into a new float32 array."""
        return self.apply(x, self.draw(x.shape, where=where))
