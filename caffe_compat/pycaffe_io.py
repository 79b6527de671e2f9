"""pycaffe's ``caffe.io``: proto/array conversions, image loading, resizing, oversampling and the
``Transformer`` that turns images into net inputs.

Conventions (pycaffe's): images are ``H x W x K`` float32 in ``[0, 1]`` with channels in RGB
order (``load_image``); net inputs are ``K x H x W`` (after ``Transformer.preprocess``), usually
BGR in ``[0, 255]`` minus a mean for ImageNet models.

Deliberate differences from pycaffe:

- Images are read with OpenCV (matplotlib when OpenCV is missing) instead of scikit-image;
  the result is the same array (RGB, ``img_as_float`` scaling: 8-bit / 255, 16-bit / 65535).
  ``color=False`` on a colour image converts with scikit-image's ``rgb2gray`` weights
  (0.2125 R + 0.7154 G + 0.0721 B).
- ``resize_image`` interpolates with OpenCV (``interp_order`` 0: nearest, 1: bilinear, 3:
  bicubic; pixel centres aligned, edges replicated, no anti-aliasing) where pycaffe uses
  scikit-image / SciPy; resized values can differ from pycaffe's near the borders and when
  shrinking. Other orders raise ``ValueError``. Resizing to the same size returns the input.
- ``Transformer.preprocess`` never modifies the array it is given (pycaffe's can scale the
  caller's float32 array in place); the result is the same.
- ``datum_to_array`` also decodes encoded datums (JPEG/PNG bytes, ``encoded: true``) to
  ``K x H x W`` in the file's channel order (BGR for colour), as Caffe's data layers see them.
- ``blobproto_to_array`` honours ``shape`` and ``double_data`` (as current pycaffe does for
  ``shape``) and raises ``BlobShapeError`` (a ``FormatError`` and a ``ValueError``, which
  pycaffe raises) when the value count does not match the shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from caffe_compat.errors import DataError, FormatError
from caffe_compat.proto import caffe_pb2
from caffe_compat.rawio import array_to_blob, blob_to_array

__all__ = [
    "blobproto_to_array",
    "array_to_blobproto",
    "arraylist_to_blobprotovector_str",
    "arraylist_to_blobprotovecor_str",
    "blobprotovector_str_to_arraylist",
    "array_to_datum",
    "datum_to_array",
    "load_image",
    "resize_image",
    "oversample",
    "Transformer",
    "BlobShapeError",
]


# ---------------------------------------------------------------------------------------------
# proto / datum / ndarray conversion


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The data (``return_diff=False``) or diff of a ``BlobProto`` as a float64 array.

    The shape is the legacy ``(num, channels, height, width)`` when any of those is set, else
    ``shape.dim`` (none: a 0-d array, which takes exactly one value). float64, as pycaffe's
    ``np.array(blob.data)``. Values that do not fill the shape (a blob with no shape and
    several values or none, ``return_diff`` on a blob without diff) raise ``BlobShapeError``,
    a ``ValueError`` as in pycaffe.
    """
    try:
        values = blob_to_array(blob, diff=return_diff, what="blobproto_to_array")
    except FormatError as e:  # pycaffe's reshape raises ValueError there: scripts catch that
        raise BlobShapeError(str(e)) from None
    return values.astype(np.float64)


class BlobShapeError(FormatError, ValueError):
    """``blobproto_to_array``: the blob's values do not fill its shape (no shape at all, or
    another count); a ``ValueError`` as pycaffe's ``reshape`` raises, and a ``FormatError``."""


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """A ``BlobProto`` with ``shape`` = ``arr.shape`` and float32 ``data`` (and ``diff``)."""
    return array_to_blob(np.asarray(arr), None if diff is None else np.asarray(diff))


def arraylist_to_blobprotovector_str(arraylist: Sequence[np.ndarray]) -> bytes:
    """Serialize a list of arrays as a ``BlobProtoVector`` (bytes)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


# pycaffe's original (misspelt) name, kept for old scripts.
arraylist_to_blobprotovecor_str = arraylist_to_blobprotovector_str


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """Parse a serialized ``BlobProtoVector`` into a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A ``Datum`` from a ``K x H x W`` array: uint8 arrays go to ``data`` as bytes, others to
    ``float_data``. ``label`` is set when given."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum: the array must be 3-D (channels, height, width), got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float64).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The ``K x H x W`` array of a ``Datum`` (uint8 for byte data, float64 for ``float_data``).

    The label is not returned (read ``datum.label``).
    """
    if datum.encoded:
        import cv2

        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError("datum_to_array: the datum is marked encoded but its data does not decode as an image")
        if img.ndim == 2:
            img = img[:, :, None]
        return np.ascontiguousarray(img.transpose(2, 0, 1))
    shape = (datum.channels, datum.height, datum.width)
    count = int(np.prod(shape))
    if len(datum.data):
        if len(datum.data) != count:
            raise DataError(
                f"datum_to_array: shape {shape} needs {count} bytes of data, the datum holds {len(datum.data)}"
            )
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    if len(datum.float_data) != count:
        raise DataError(
            f"datum_to_array: shape {shape} needs {count} values, the datum's float_data holds {len(datum.float_data)}"
        )
    return np.array(datum.float_data, dtype=np.float64).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Image IO


def _as_float(img: np.ndarray) -> np.ndarray:
    # scikit-image's img_as_float: integers are scaled by their dtype's maximum
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535)
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    return img.astype(np.float32)


def _read_rgb(filename) -> np.ndarray:
    """The image as H x W (grey) or H x W x C (RGB / RGBA) in its stored dtype. ``filename`` is
    a path or a binary file object (read from its current position, as scikit-image's reader)."""
    is_file = hasattr(filename, "read")
    what = f"the file object {filename!r}" if is_file else f"image file {filename!r}"
    if is_file:
        import io as _io

        if isinstance(filename, _io.TextIOBase):
            raise TypeError(f"load_image: {what} is open in text mode; open it in binary mode ('rb')")
        data = filename.read()
        if isinstance(data, str):
            raise TypeError(f"load_image: {what} is open in text mode; open it in binary mode ('rb')")
        data = bytes(data)
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is a dependency
        import io as _io

        import matplotlib.image as mpimg

        return mpimg.imread(_io.BytesIO(data) if is_file else filename)
    if is_file:
        buf = np.frombuffer(data, np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    else:
        from caffe_compat.data.image_list import _check_image_file, imread

        filename = os.fspath(filename)
        if os.path.exists(filename):
            _check_image_file(filename, "load_image: ")
        img = imread(filename, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"load_image: cannot read {what} (missing, or not an image OpenCV can decode)")
    if img.ndim == 3:
        if img.shape[2] == 3:
            img = img[:, :, ::-1]
        elif img.shape[2] == 4:
            img = img[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(img)


def load_image(filename, color: bool = True) -> np.ndarray:
    """Load an image as float32 in ``[0, 1]``: ``H x W x 3`` RGB (``color=True``) or
    ``H x W x 1`` intensity (``color=False``).

    ``filename``: a path, or a binary file object such as ``io.BytesIO(jpeg_bytes)`` (as
    scikit-image's ``imread`` takes, which pycaffe calls).

    A grey image is tiled to 3 channels when ``color``; an alpha channel is dropped.
    """
    img = _as_float(_read_rgb(filename))
    if img.ndim == 3 and not color:
        rgb = img[:, :, :3]
        img = (rgb[:, :, 0] * 0.2125 + rgb[:, :, 1] * 0.7154 + rgb[:, :, 2] * 0.0721).astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img, dtype=np.float32)


_INTERP = {0: "INTER_NEAREST", 1: "INTER_LINEAR", 3: "INTER_CUBIC"}


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an ``H x W x K`` array to ``new_dims = (height, width)``; float32 out.

    ``interp_order``: 0 nearest, 1 bilinear (default), 3 bicubic. A constant image comes back
    constant (pycaffe's special case).
    """
    import cv2

    im = np.asarray(im)
    if im.ndim != 3:
        raise ValueError(f"resize_image: expected an H x W x K array, got shape {im.shape}")
    h, w = (int(d) for d in new_dims)
    if interp_order not in _INTERP:
        raise ValueError(
            f"resize_image: interp_order {interp_order} is not supported; use 0 (nearest), 1 (linear) or 3 (cubic)"
        )
    if (h, w) == im.shape[:2]:
        return im.astype(np.float32, copy=True)
    if im.size and im.min() == im.max():
        out = np.empty((h, w, im.shape[-1]), dtype=np.float32)
        out.fill(im.min())
        return out
    flag = getattr(cv2, _INTERP[interp_order])
    src = np.ascontiguousarray(im, dtype=np.float32)
    chunks = []
    for c0 in range(0, src.shape[2], 4):  # OpenCV handles up to 4 channels per call everywhere
        part = cv2.resize(np.ascontiguousarray(src[:, :, c0 : c0 + 4]), (w, h), interpolation=flag)
        if part.ndim == 2:
            part = part[:, :, None]
        chunks.append(part)
    return np.concatenate(chunks, axis=2).astype(np.float32, copy=False)


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """The 10 crops of each ``H x W x K`` image: the 4 corners (top-left, top-right,
    bottom-left, bottom-right), the centre, then those 5 mirrored left-right.

    Returns ``(10 * N) x crop_h x crop_w x K`` float32. All images must share one shape.
    """
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    if (crop_dims > im_shape[:2]).any():
        raise ValueError(f"oversample: crop {tuple(crop_dims)} is larger than the images {tuple(im_shape[:2])}")
    im_center = im_shape[:2] / 2.0
    h_indices = (0, im_shape[0] - crop_dims[0])
    w_indices = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    k = 0
    for i in h_indices:
        for j in w_indices:
            crops_ix[k] = (i, j, i + crop_dims[0], j + crop_dims[1])
            k += 1
    # the centre crop's corners truncate toward zero, as pycaffe's int assignment does
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for c in crops_ix:
            crops[ix] = im[c[0] : c[2], c[1] : c[3], :]
            ix += 1
        crops[ix - 5 : ix] = crops[ix - 5 : ix, :, ::-1, :]
    return crops


# ---------------------------------------------------------------------------------------------
# Pre-processing


class Transformer:
    """pycaffe's input ``Transformer``: images to net inputs and back.

    ``Transformer({"data": net.blobs["data"].data.shape})``; per input, optionally:
    ``set_transpose`` (e.g. ``(2, 0, 1)``: HxWxK → KxHxW), ``set_channel_swap`` (e.g.
    ``(2, 1, 0)``: RGB → BGR, applied after the transpose), ``set_raw_scale`` (e.g. 255),
    ``set_mean`` (per-channel ``(K,)`` or elementwise ``(K, H, W)``), ``set_input_scale``.

    ``preprocess(in_, data)``, in this order: to float32; resize to the input's ``H x W`` when
    the image's first two dimensions differ; transpose; channel swap; ``* raw_scale``;
    ``- mean``; ``* input_scale``. ``deprocess`` undoes them in reverse order (without the
    resize) after squeezing singleton dimensions.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]):
        self.inputs = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, Sequence[int]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise ValueError(f"{in_!r} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An ``H' x W' x K`` image as the ``K x H x W`` net input ``in_`` (see the class doc)."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32, copy=True)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            caffe_in -= mean
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Undo ``preprocess`` (except the resize): a net input back to an image."""
        self._check_input(in_)
        decaf_in = np.array(data, copy=True).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """The axis order from the image to the input, e.g. ``(2, 0, 1)`` for HxWxK → KxHxW."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ValueError(
                f"set_transpose({in_!r}, {tuple(order)}): the order needs {len(self.inputs[in_]) - 1} axes, "
                f"as many as the input {self.inputs[in_]} has after the batch axis"
            )
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """The channel order taken after the transpose, e.g. ``(2, 1, 0)`` for RGB → BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ValueError(
                f"set_channel_swap({in_!r}, {tuple(order)}): needs one entry per input channel ({self.inputs[in_][1]})"
            )
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Scale applied before the mean (e.g. 255 for models trained on [0, 255] images)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """The mean to subtract: ``(K,)`` per channel, or elementwise ``(K, H, W)`` / ``(H, W)``.

        An elementwise mean of another ``H x W`` than the input's is resized to the input's
        (BVLC's io.py: e.g. the 256 x 256 ImageNet mean for a 227 x 227 input, as
        ``python/classify.py`` passes it), bilinearly with ``resize_image``; its channels must
        be the input's (or one, broadcast).
        """
        self._check_input(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError(
                    f"set_mean({in_!r}): mean channels {ms[0]} incompatible with input channels {self.inputs[in_][1]}"
                )
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError(f"set_mean({in_!r}): mean shape {mean.shape} invalid; give (K,), (H, W) or (K, H, W)")
            in_shape = self.inputs[in_][1:]
            if len(in_shape) != 3:
                raise ValueError(
                    f"set_mean({in_!r}): an elementwise mean needs a K x H x W input; the input is {self.inputs[in_]}"
                )
            if ms[0] not in (1, in_shape[0]):
                raise ValueError(
                    f"set_mean({in_!r}): mean channels {ms[0]} incompatible with input channels {in_shape[0]}"
                )
            if ms[1:] != in_shape[1:]:
                hwk = mean.reshape(ms).transpose(1, 2, 0)
                resized = resize_image(hwk, in_shape[1:]).transpose(2, 0, 1)
                mean = resized if mean.ndim == 3 else resized[0]
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Scale applied after the mean subtraction (e.g. 0.017 for std normalisation)."""
        self._check_input(in_)
        self.input_scale[in_] = scale
