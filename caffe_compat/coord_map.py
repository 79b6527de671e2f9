"""pycaffe's ``caffe.coord_map``: how coordinates map between the tops of a ``NetSpec`` net, and
``crop(top_from, top_to)``, the Crop layer that aligns them (fully convolutional nets, FCN).

A map is ``(axis, a, b)``: coordinate ``x`` of the input maps to ``a * x + b`` of the output
along the spatial axes after ``axis`` (``axis`` None: independent of the axis, as pointwise
layers). Per layer:

- Convolution, Pooling, Im2col: ``a = 1 / stride``, ``b = (pad - (k_eff - 1) / 2) / stride``
  with ``k_eff = (kernel - 1) * dilation + 1``;
- Deconvolution: ``a = stride``, ``b = (k_eff - 1) / 2 - pad``;
- Crop: ``a = 1``, ``b = -offset`` on axis ``crop_param.axis - 1``;
- pointwise layers (``PASS_THROUGH_LAYERS``): the identity.

These facts are kept in one registry by type string, ``_COORD_MAPS``.

Maps compose along a path; ``coord_map_from_to`` walks both tops back to a common ancestor.
Parameters are read from the layer's keywords as given to ``L.<Type>(...)`` (pycaffe's
defaults: axis 1, stride 1, pad 0, dilation 1; Crop axis 2, offset 0). Legacy ``kernel_h`` /
``pad_h`` / ``stride_h`` keywords are refused, as in pycaffe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from caffe_compat.net_spec import Function, Top
from caffe_compat.net_spec import layers as L

__all__ = [
    "PASS_THROUGH_LAYERS",
    "UndefinedMapException",
    "AxisMismatchException",
    "conv_params",
    "crop_params",
    "coord_map",
    "compose",
    "inverse",
    "coord_map_from_to",
    "crop",
]

PASS_THROUGH_LAYERS = [
    "AbsVal",
    "BatchNorm",
    "Bias",
    "BNLL",
    "Dropout",
    "Eltwise",
    "ELU",
    "Log",
    "LRN",
    "Exp",
    "MVN",
    "Power",
    "ReLU",
    "PReLU",
    "Scale",
    "Sigmoid",
    "Split",
    "TanH",
    "Threshold",
]


def _as_dict(params) -> dict:
    # a sub-message may be given as a dict or as a caffe_pb2 message
    if isinstance(params, dict):
        return params
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(params, preserving_proto_field_name=True)


def conv_params(fn: Function) -> tuple:
    """``(axis, stride, effective kernel, pad)`` of a Convolution/Deconvolution/Im2col/Pooling."""
    entry = _COORD_MAPS.get(fn.type_name)
    field = entry.params_field if entry is not None and entry.params_field else "convolution_param"
    params = _as_dict(fn.params.get(field, fn.params))
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(params)
    if legacy:
        raise ValueError(
            f"coord_map: {fn.type_name} uses legacy parameters {sorted(legacy)}; cropping does not support _h/_w params"
        )
    if "kernel_size" not in params:
        raise ValueError(f"coord_map: {fn.type_name} has no kernel_size (global pooling has no coordinate map)")
    axis = params.get("axis", 1)
    ks = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (
        axis,
        np.array(params.get("stride", 1), ndmin=1),
        (ks - 1) * dilation + 1,
        np.array(params.get("pad", 0), ndmin=1),
    )


def crop_params(fn: Function) -> tuple:
    """``(axis, offset)`` of a Crop layer (defaults 2 and 0)."""
    params = _as_dict(fn.params.get("crop_param", fn.params))
    axis = params.get("axis", 2)
    offset = np.array(params.get("offset", 0), ndmin=1)
    return axis, offset


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (InnerProduct, global pooling, ...)."""


class AxisMismatchException(Exception):
    """Two maps to compose act on different axes."""


def _strided(fn: Function) -> tuple:
    axis, stride, ks, pad = conv_params(fn)
    return axis, 1 / stride, (pad - (ks - 1) / 2) / stride


def _upsampling(fn: Function) -> tuple:
    axis, stride, ks, pad = conv_params(fn)
    return axis, stride, (ks - 1) / 2 - pad


def _cropping(fn: Function) -> tuple:
    axis, offset = crop_params(fn)
    return axis - 1, 1, -offset


def _identity(fn: Function) -> tuple:
    return None, 1, 0


@dataclasses.dataclass(frozen=True)
class _CoordMap:
    """How a layer type maps coordinates: ``map(fn) -> (axis, a, b)``; the keyword holding its
    parameters for ``conv_params`` (pycaffe's ``L.Pooling(pooling_param=...)``); how many
    bottoms it maps (None: all; Crop maps its first, the second only gives the size)."""

    map: Callable[[Function], tuple]
    params_field: str = ""
    mapped_bottoms: int | None = None


#: The one registry of the layer types that have a coordinate map, by Caffe's type string.
_COORD_MAPS: dict[str, _CoordMap] = {
    "Convolution": _CoordMap(_strided, "convolution_param"),
    "Pooling": _CoordMap(_strided, "pooling_param"),
    "Im2col": _CoordMap(_strided, "convolution_param"),
    "Deconvolution": _CoordMap(_upsampling, "convolution_param"),
    "Crop": _CoordMap(_cropping, mapped_bottoms=1),
    **{t: _CoordMap(_identity) for t in PASS_THROUGH_LAYERS},
}


def coord_map(fn: Function) -> tuple:
    """The ``(axis, scale, shift)`` map of one layer; see the module docstring."""
    entry = _COORD_MAPS.get(fn.type_name)
    if entry is None:
        raise UndefinedMapException(fn.type_name)
    return entry.map(fn)


def compose(base_map: tuple, next_map: tuple) -> tuple:
    """``base`` then ``next``: the scales multiply, ``next``'s shift is scaled by ``base``'s."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        ax = ax2
    elif ax2 is None or ax1 == ax2:
        ax = ax1
    else:
        raise AxisMismatchException(f"cannot compose maps on axis {ax1} and axis {ax2}")
    return ax, a1 * a2, a1 * b2 + b1


def inverse(cmap: tuple) -> tuple:
    """The inverse map: ``x -> (x - b) / a``."""
    ax, a, b = cmap
    return ax, 1 / a, -b / a


def _bottoms(top: Top) -> tuple:
    entry = _COORD_MAPS.get(top.fn.type_name)
    bottoms = top.fn.inputs
    if entry is not None and entry.mapped_bottoms is not None:
        bottoms = bottoms[: entry.mapped_bottoms]
    return bottoms


def coord_map_from_to(top_from: Top, top_to: Top) -> tuple:
    """The map from coordinates of ``top_from`` to those of ``top_to``: ``(axis, a, b)``.

    Raises ``RuntimeError`` when the two are not connected through layers with a map.
    """
    from_maps = {top_from: (None, 1, 0)}
    frontier = {top_from}
    while frontier:
        top = frontier.pop()
        try:
            for bottom in _bottoms(top):
                from_maps[bottom] = compose(from_maps[top], coord_map(top.fn))
                frontier.add(bottom)
        except UndefinedMapException:
            pass
    to_maps = {top_to: (None, 1, 0)}
    frontier = {top_to}
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            for bottom in _bottoms(top):
                to_maps[bottom] = compose(to_maps[top], coord_map(top.fn))
                frontier.add(bottom)
        except UndefinedMapException:
            continue
    raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cropping ``top_from`` to the extent of ``top_to`` (``L.Crop`` with the
    ``axis`` and ``offset`` the coordinate map gives).

    Raises ``AssertionError`` (as pycaffe) when the scales differ, the offset is negative
    (``top_from`` smaller than ``top_to``) or not an integer.
    """
    ax, a, b = coord_map_from_to(top_from, top_to)
    a = np.asarray(a)
    b = np.asarray(b)
    if not (a == 1).all():
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    return L.Crop(top_from, top_to, crop_param=dict(axis=ax + 1, offset=[int(v) for v in -np.round(b).astype(int)]))
