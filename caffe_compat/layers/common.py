"""Caffe's common layers: InnerProduct, blob plumbing (Concat, Slice, Split, Flatten, Reshape,
Crop, Tile, Silence), batch selection (Filter, BatchReindex), elementwise combinations (Eltwise, Scale, Bias), reductions (Reduction,
ArgMax, Softmax), Embed, and the layers that make blobs without bottoms (Parameter, Input,
DummyData).

Shape checks follow Caffe's ``Reshape`` CHECKs; they run in ``forward`` (which shape inference
runs on meta tensors), so a mismatch raises with the layer's name both at net construction and
when the net is later reshaped.
"""

from __future__ import annotations

import math
import os

import torch

from caffe_compat.layers.base import Layer, register_layer
from caffe_compat.proto import caffe_pb2

__all__ = [
    "InnerProductLayer",
    "EltwiseLayer",
    "ConcatLayer",
    "SliceLayer",
    "SplitLayer",
    "FlattenLayer",
    "ReshapeLayer",
    "CropLayer",
    "TileLayer",
    "ScaleLayer",
    "BiasLayer",
    "ReductionLayer",
    "ArgMaxLayer",
    "SoftmaxLayer",
    "EmbedLayer",
    "SilenceLayer",
    "ParameterLayer",
    "InputLayer",
    "DummyDataLayer",
    "FilterLayer",
    "BatchReindexLayer",
    "canonical_axis",
]


def canonical_axis(layer: Layer, axis: int, num_axes: int, field: str = "axis") -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: ``axis`` in [-num_axes, num_axes), negatives from the end."""
    if not -num_axes <= axis < num_axes:
        raise layer.error(
            f"{field} {axis} is out of range for a {num_axes}-D bottom (valid: {-num_axes} to {num_axes - 1})"
        )
    return axis + num_axes if axis < 0 else axis


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


# ---------------------------------------------------------------------------------------------
# InnerProduct

# oneDNN's inner product, through the op torch's own CPU fusion passes use. On CPUs where torch's
# BLAS (MKL) is slow for the small batches of a fully connected layer (AMD EPYC: AlexNet's fc6 at
# batch 10 takes 22 ms with ``F.linear`` and 9 ms here, its backward 41 ms and 17 ms), the same
# float32 products in IEEE arithmetic run 2-3x faster. ``None`` when this torch has no oneDNN.
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_onednn_linear_works: bool | None = None


def _onednn_linear_available() -> bool:
    """Whether oneDNN's inner product runs here and agrees with ``F.linear`` (checked once)."""
    global _onednn_linear_works
    if _onednn_linear_works is None:
        ok = False
        if _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                x, w = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
                b = torch.randn(4, generator=g)
                y = _ONEDNN_LINEAR(x, w, b, "none", [], "")
                gw = _ONEDNN_LINEAR(y.t(), x.t(), None, "none", [], "")
                ok = torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5) and (
                    torch.allclose(gw, y.t() @ x, rtol=1e-5, atol=1e-5)
                )
            except Exception:  # noqa: BLE001 - any failure means: use torch's BLAS instead
                ok = False
        _onednn_linear_works = ok
    return _onednn_linear_works


# From this many rows of x on, the forward computes ``(W x^T)^T``: oneDNN then streams the big
# weight matrix as its input and packs the small x as its weights, which is faster for a batch of
# a few rows (AlexNet's fc6 at batch 10: 9.9 -> 7.8 ms, fc7 4.4 -> 3.5 ms; batches 1-4 are
# faster the usual way). The same dot products: equal bits on the machines measured.
_SWAP_MIN_ROWS = 8


def _onednn_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] >= _SWAP_MIN_ROWS and w.shape[0] >= 64 and w.is_contiguous():
        y = _ONEDNN_LINEAR(w, x, None, "none", [], "").t().contiguous()
        return y.add_(b) if b is not None else y
    return _ONEDNN_LINEAR(x, w, b, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """``y = x W^T + b`` with forward and both backward products on oneDNN (CPU, float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn_forward(x, w, b)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx = dy W; for a single row torch's GEMV is as fast and needs no weight reorder.
            dx = dy @ w if dy.shape[0] < 4 else _ONEDNN_LINEAR(dy, w.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            dw = _ONEDNN_LINEAR(dy.t(), x.t(), None, "none", [], "")  # dW = dy^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x``; on the CPU in float32 through oneDNN's inner product
    (same float32 products, other kernels: results differ from ``F.linear`` in the last bits)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled  # torch.backends.mkldnn.flags(enabled=False) opts out
        and _onednn_linear_available()
    ):
        return _OneDnnLinear.apply(x, w, b)
    return torch.nn.functional.linear(x, w, b)


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected layer: ``y = x W^T + b`` on ``x`` flattened from ``axis`` on.

    Parameters (``inner_product_param``): ``num_output`` N (required), ``bias_term`` (true),
    ``weight_filler`` / ``bias_filler`` (unset: constant 0), ``axis`` (1), ``transpose`` (false).

    Blobs: weight ``(N, K)`` (``(K, N)`` when ``transpose``), then bias ``(N,)``.
    Bottom: ``(d0, ..., d_{axis-1}, ...)`` with ``K = d_axis * ... * d_last`` fixed at setup.
    Top: ``(d0, ..., d_{axis-1}, N)``.

    Implementation: float32 on the CPU runs forward and both backward products on oneDNN's inner
    product (``linear``), 2-3x faster than torch's BLAS at small batches on some CPUs; other
    devices and dtypes use ``F.linear``.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    #: The backward needs the bottom and the weights, not the top (see EagerRunner.run_steps).
    top_overwritable = True
    #: (``Layer.accepts_channels_last``) ``flatten`` reads a 4-D bottom in (C, H, W) order
    #: whatever its layout
    accepts_channels_last = True

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``2 · M · K · N``: M rows of K inputs, N outputs."""
        return 2 * (math.prod(bottom_shapes[0]) // self.K) * self.K * self.num_output

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("inner_product_param.num_output must be set to a positive number")
        self.axis_param = int(p.axis)
        shape = bottom_shapes[0]
        axis = canonical_axis(self, self.axis_param, len(shape), "inner_product_param.axis")
        self.K = math.prod(shape[axis:])
        self.transpose = bool(p.transpose)
        self.bias_term = bool(p.bias_term)
        wshape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.add_blob(wshape, p.weight_filler)
        if self.bias_term:
            self.add_blob((self.num_output,), p.bias_filler)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.axis_param == 1 and x.dim() > 2:  # (N, C, H, W...) after a conv/pooling: flatten
            x2 = x.flatten(1)
            if x2.shape[1] == self.K:
                x = x2
        if x.dim() == 2 and self.axis_param in (1, -1) and x.shape[1] == self.K:  # (N, K): as it is
            w = self.blobs[0]
            return (linear(x, w.t() if self.transpose else w, self.blobs[1] if self.bias_term else None),)
        axis = canonical_axis(self, self.axis_param, x.dim(), "inner_product_param.axis")
        lead = tuple(x.shape[:axis])
        k = math.prod(x.shape[axis:])
        if k != self.K:
            raise self.error(
                f"Input size incompatible with inner product parameters: the bottom {_shape_str(x.shape)} "
                f"has K = {k} values from axis {axis} on, the weights expect K = {self.K}"
            )
        w = self.blobs[0]
        if self.transpose:
            w = w.t()
        b = self.blobs[1] if self.bias_term else None
        y = linear(x.reshape(-1, k), w, b)
        if len(lead) != 1:  # a reshape view of y would make an in-place ReLU on it costlier
            y = y.reshape(lead + (self.num_output,))
        return (y,)


# ---------------------------------------------------------------------------------------------
# Eltwise


class _NaiveProdFunction(torch.autograd.Function):
    """PROD with ``stable_prod_grad: false``: Caffe's gradient ``dy * top / x_i``."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:
        y = xs[0]
        for x in xs[1:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, *xs = ctx.saved_tensors
        return tuple(dy * y / x for x in xs)


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    """Elementwise combination of two or more bottoms of one shape.

    Parameters (``eltwise_param``): ``operation`` (SUM):

    - SUM: ``y = sum_i c_i x_i``, ``coeff`` one per bottom (default all 1);
    - PROD: ``y = prod_i x_i`` (no ``coeff``); ``stable_prod_grad`` (true) computes
      ``dx_i = dy * prod_{j != i} x_j``, false gives Caffe's ``dy * y / x_i``;
    - MAX: ``y = max_i x_i``; the gradient goes to the bottom that won, bottom 0 against
      bottom 1 with ``x0 > x1 ? 0 : 1`` (ties to bottom 1), later bottoms only when strictly
      greater. Like Caffe, ``coeff`` is ignored for MAX.

    Bottoms: >= 2, all the same shape. Top: that shape.
    """

    #: (``Layer.layout_neutral``) the same values for a channels-last bottom
    layout_neutral = True

    min_bottom = 2
    exact_num_top = 1

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``(bottoms − 1) · count``, plus ``count`` per coefficient other than 1."""
        extra = sum(1 for c in self.coeff if c != 1)
        return (len(bottom_shapes) - 1 + extra) * sum(math.prod(s) for s in top_shapes)

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.eltwise_param
        E = caffe_pb2.EltwiseParameter
        self.op = p.operation
        if self.op == E.PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only for operation SUM (this layer is PROD)")
        if len(p.coeff) and len(p.coeff) != len(bottom_shapes):
            raise self.error(
                f"eltwise_param.coeff must be given once per bottom: {len(bottom_shapes)} bottoms, {len(p.coeff)} coeff"
            )
        self.coeff = [float(c) for c in p.coeff] or [1.0] * len(bottom_shapes)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        # (``Layer.top_overwritable``) two or more bottoms: the top is always a new tensor; only
        # Caffe's ``dy * y / x_i`` product gradient reads it
        self.top_overwritable = not (self.op == E.PROD and not self.stable_prod_grad)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        E = caffe_pb2.EltwiseParameter
        for i, x in enumerate(xs[1:], 1):
            if x.shape != xs[0].shape:
                raise self.error(
                    f"bottom {i} has shape {_shape_str(x.shape)}, bottom 0 has {_shape_str(xs[0].shape)}: "
                    f"Eltwise needs all bottoms the same shape"
                )
        if self.op == E.SUM:
            y = xs[0] * self.coeff[0] if self.coeff[0] != 1 else xs[0]
            for c, x in zip(self.coeff[1:], xs[1:]):
                y = y + (x * c if c != 1 else x)
            return (y,)
        if self.op == E.PROD:
            if not self.stable_prod_grad:
                return (_NaiveProdFunction.apply(*xs),)
            y = xs[0]
            for x in xs[1:]:
                y = y * x
            return (y,)
        if self.op == E.MAX:
            # where() sends each element's gradient to the branch it took: Caffe's argmax mask.
            y = torch.where(xs[0] > xs[1], xs[0], xs[1])
            for x in xs[2:]:
                y = torch.where(x > y, x, y)
            return (y,)
        raise self.error(f"eltwise_param.operation {self.op} is not one of PROD, SUM, MAX")


# ---------------------------------------------------------------------------------------------
# Blob plumbing


def _axis_with_legacy(layer: Layer, p, legacy_field: str, num_axes: int, what: str) -> int:
    """Concat/Slice: ``axis`` or its legacy alias (``concat_dim`` / ``slice_dim``), not both."""
    if p.HasField(legacy_field):
        if p.HasField("axis"):
            raise layer.error(f"{what}: set either axis or {legacy_field}, not both")
        axis = int(getattr(p, legacy_field))
        if axis >= num_axes:
            raise layer.error(f"{what}.{legacy_field} {axis} is out of range for a {num_axes}-D bottom")
        return axis
    return canonical_axis(layer, int(p.axis), num_axes, f"{what}.axis")


@register_layer("Concat")
class ConcatLayer(Layer):
    """Concatenate bottoms along ``axis``.

    Parameters (``concat_param``): ``axis`` (1; negative from the end), or the legacy
    ``concat_dim`` (not both). Bottoms: >= 1, same number of axes, equal sizes except along
    ``axis``. Top: the sizes along ``axis`` summed. One bottom: the top aliases it (as Caffe
    shares the data).
    """

    #: (``Layer.layout_neutral``) the same values for a channels-last bottom
    layout_neutral = True

    moves_data_only = True

    min_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.concat_param
        self.axis = _axis_with_legacy(self, p, "concat_dim", len(bottom_shapes[0]), "concat_param")

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s0 = xs[0].shape
        for i, x in enumerate(xs[1:], 1):
            if x.dim() != xs[0].dim():
                raise self.error(
                    f"All inputs must have the same #axes: bottom {i} has {x.dim()} "
                    f"{_shape_str(x.shape)}, bottom 0 has {xs[0].dim()} {_shape_str(s0)}"
                )
            for a in range(x.dim()):
                if a != self.axis and x.shape[a] != s0[a]:
                    raise self.error(
                        f"All inputs must have the same shape, except at concat axis {self.axis}: "
                        f"bottom {i} is {_shape_str(x.shape)}, bottom 0 is {_shape_str(s0)} (axis {a} differs)"
                    )
        if len(xs) == 1:
            return (xs[0].view(xs[0].shape),)
        return (torch.cat(xs, dim=self.axis),)


@register_layer("Slice")
class SliceLayer(Layer):
    """Split the bottom along ``axis`` into the tops.

    Parameters (``slice_param``): ``axis`` (1) or legacy ``slice_dim`` (not both);
    ``slice_point``: ``len(top) - 1`` strictly increasing indices inside the axis, or none for
    equal parts (the axis size must divide evenly). Bottom: any shape. Tops: the pieces, copies
    (as Caffe copies); one top aliases the bottom.
    """

    moves_data_only = True

    exact_num_bottom = 1
    min_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.slice_param
        self.axis = _axis_with_legacy(self, p, "slice_dim", len(bottom_shapes[0]), "slice_param")
        self.points = [int(s) for s in p.slice_point]
        self.num_top = len(self.param.top)
        if self.points and len(self.points) != self.num_top - 1:
            raise self.error(
                f"slice_param.slice_point must give len(top) - 1 = {self.num_top - 1} points, got {len(self.points)}"
            )
        prev = 0
        for sp in self.points:
            if sp <= prev:
                raise self.error(f"slice_param.slice_point must be strictly increasing and positive: {self.points}")
            prev = sp

    def _sizes(self, dim: int) -> list[int]:
        if self.points:
            if self.points[-1] >= dim:
                raise self.error(
                    f"slice_param.slice_point {self.points} must lie inside the bottom's axis {self.axis} of size {dim}"
                )
            edges = [0] + self.points + [dim]
            return [b - a for a, b in zip(edges[:-1], edges[1:])]
        if dim % self.num_top:
            raise self.error(f"Number of top blobs ({self.num_top}) should evenly divide input slice axis ({dim})")
        return [dim // self.num_top] * self.num_top

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = self._sizes(x.shape[self.axis])
        if self.num_top == 1:
            return (x.view(x.shape),)
        return tuple(t.clone() for t in torch.split(x, sizes, dim=self.axis))


@register_layer("Split")
class SplitLayer(Layer):
    """Copy one blob to several consumers (the net inserts it, as Caffe does).

    Each top is a distinct tensor aliasing the bottom's data (Caffe's Split shares data), so
    autograd keeps each top's gradient apart; the bottom's gradient is their sum.
    Bottom: any shape. Tops: >= 1, that shape.
    """

    #: (``Layer.layout_neutral``) the same values for a channels-last bottom
    layout_neutral = True

    moves_data_only = True

    exact_num_bottom = 1
    min_top = 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view(x.shape) for _ in range(self.num_tops))


@register_layer("Flatten")
class FlattenLayer(Layer):
    """Collapse axes ``axis`` .. ``end_axis`` (inclusive) into one.

    Parameters (``flatten_param``): ``axis`` (1), ``end_axis`` (-1). Bottom: any shape.
    Top: ``shape[:axis] + (prod(shape[axis:end_axis+1]),) + shape[end_axis+1:]`` (aliases the data).
    """

    moves_data_only = True

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.flatten_param
        self.axis_param = int(p.axis)
        self.end_axis_param = int(p.end_axis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start = canonical_axis(self, self.axis_param, x.dim(), "flatten_param.axis")
        end = canonical_axis(self, self.end_axis_param, x.dim(), "flatten_param.end_axis")
        if end < start:
            raise self.error(f"flatten_param.end_axis ({end}) comes before flatten_param.axis ({start})")
        s = tuple(x.shape)
        return (x.reshape(s[:start] + (math.prod(s[start : end + 1]),) + s[end + 1 :]),)


@register_layer("Reshape")
class ReshapeLayer(Layer):
    """Change the shape, keeping the data (aliases the bottom, as Caffe shares it).

    Parameters (``reshape_param``): ``shape`` (the new dims: ``0`` copies the bottom's dim at
    the same position counted from ``axis``, one ``-1`` is inferred), ``axis`` (0) and
    ``num_axes`` (-1 = to the end): the range of bottom axes that ``shape`` replaces
    (negative ``axis`` counts from the end, -1 meaning after the last axis).
    Bottom: any shape. Top: the new shape, same count.
    """

    moves_data_only = True

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.copy_axes = [i for i, d in enumerate(self.dims) if d == 0]
        inferred = [i for i, d in enumerate(self.dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(
                "reshape_param.shape contains multiple -1 dims; at most a single (1) value of -1 may be specified"
            )
        bad = [d for d in self.dims if d < -1]
        if bad:
            raise self.error(f"reshape_param.shape has invalid dims {bad}: use positive sizes, 0 or -1")
        self.inferred_axis = inferred[0] if inferred else -1
        self.constant_count = math.prod(d for d in self.dims if d > 0)
        self.axis_param = int(p.axis)
        self.num_axes_param = int(p.num_axes)
        if self.num_axes_param < -1:
            raise self.error("reshape_param.num_axes must be >= 0, or -1 for all")

    def _top_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        n = len(shape)
        a = self.axis_param
        start = a if a >= 0 else n + a + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {a} out of range for {n}-D input blob")
        end = n if self.num_axes_param == -1 else start + self.num_axes_param
        if end > n:
            raise self.error(f"end_axis = axis + num_axes = {end} is out of range for {n}-D input blob")
        top = list(shape[:start]) + list(self.dims) + list(shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(
                    f"reshape_param.shape contains a 0 at index {i}, but there was no corresponding "
                    f"bottom axis to copy (bottom {_shape_str(shape)})"
                )
            top[start + i] = shape[start + i]
        count = math.prod(shape)
        if self.inferred_axis >= 0:
            explicit = self.constant_count * math.prod(shape[:start]) * math.prod(shape[end:])
            for i in self.copy_axes:
                explicit *= top[start + i]
            if explicit == 0 or count % explicit:
                raise self.error(
                    f"bottom count ({count}) must be divisible by the product of the specified "
                    f"dimensions ({explicit}); bottom {_shape_str(shape)}, shape {self.dims}"
                )
            top[start + self.inferred_axis] = count // explicit
        if math.prod(top) != count:
            raise self.error(
                f"output count must match input count: bottom {_shape_str(shape)} ({count}) cannot "
                f"become {_shape_str(top)} ({math.prod(top)})"
            )
        return tuple(top)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.reshape(self._top_shape(tuple(x.shape))),)


@register_layer("Crop")
class CropLayer(Layer):
    """Crop bottom 0 to the size of bottom 1 from ``axis`` on.

    Parameters (``crop_param``): ``axis`` (2; negative from the end), ``offset``: none (all 0),
    one value for every cropped axis, or one per axis from ``axis`` to the last.
    For each axis ``i >= axis``: ``top.shape[i] = bottom1.shape[i]`` starting at the offset;
    earlier axes keep bottom 0's size. Like Caffe, every axis must satisfy
    ``bottom0.shape[i] - offset_i >= bottom1.shape[i]``.

    Bottoms: data and size reference, same number of axes. Top: the crop (a copy).
    Gradient: to bottom 0 only (zeros outside the crop); bottom 1 gets none.
    """

    moves_data_only = True

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.crop_param
        self.axis_param = int(p.axis)
        self.offsets = [int(o) for o in p.offset]

    def _crop(self, s0: tuple[int, ...], s1: tuple[int, ...]) -> list[tuple[int, int]]:
        if len(s0) != len(s1):
            raise self.error(
                f"bottom 0 {_shape_str(s0)} and bottom 1 {_shape_str(s1)} must have the same number of axes"
            )
        n = len(s0)
        axis = canonical_axis(self, self.axis_param, n, "crop_param.axis")
        if len(self.offsets) > 1 and axis + len(self.offsets) != n:
            raise self.error(
                f"number of crop_param.offset values ({len(self.offsets)}) must be equal to the number "
                f"of dimensions following axis ({n - axis}), or give one value for all"
            )
        out = []
        for i in range(n):
            off, size = 0, s0[i]
            if i >= axis and self.offsets:
                off = self.offsets[0] if len(self.offsets) == 1 else self.offsets[i - axis]
                size = s1[i]
            elif i >= axis:
                size = s1[i]
            if s0[i] - off < s1[i]:
                raise self.error(
                    f"invalid crop parameters in dimension {i}: bottom 0 size {s0[i]} minus offset "
                    f"{off} is smaller than bottom 1 size {s1[i]} (bottom 0 {_shape_str(s0)}, "
                    f"bottom 1 {_shape_str(s1)})"
                )
            out.append((off, size))
        return out

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = x
        for i, (off, size) in enumerate(self._crop(tuple(x.shape), tuple(ref.shape))):
            if off != 0 or size != x.shape[i]:
                y = y.narrow(i, off, size)
        return (y.clone(),)


@register_layer("Tile")
class TileLayer(Layer):
    """Repeat the bottom ``tiles`` times along ``axis``: the block ``shape[axis:]`` is copied whole.

    Parameters (``tile_param``): ``axis`` (1), ``tiles`` (required, > 0).
    Bottom: any shape. Top: ``shape[axis] * tiles`` along ``axis``. Gradient: the sum of the copies.
    """

    moves_data_only = True

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.tile_param
        if not p.HasField("tiles") or p.tiles <= 0:
            raise self.error("tile_param.tiles must be set to a positive number")
        self.tiles = int(p.tiles)
        self.axis_param = int(p.axis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        axis = canonical_axis(self, self.axis_param, x.dim(), "tile_param.axis")
        reps = [1] * x.dim()
        reps[axis] = self.tiles
        return (x.repeat(*reps),)


@register_layer("Silence")
class SilenceLayer(Layer):
    """Consume bottoms, produce nothing (their gradient is zero).

    Bottoms: >= 1, any shapes. Tops: none.
    """

    moves_data_only = True

    min_bottom = 1
    exact_num_top = 0

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ()


# ---------------------------------------------------------------------------------------------
# Scale / Bias


def _broadcast_axis(layer: Layer, x: torch.Tensor, s: torch.Tensor, axis_param: int, what: str) -> torch.Tensor:
    """``s`` shaped to multiply/add into ``x`` from axis ``axis_param`` on (Scale/Bias's Reshape)."""
    axis = 0 if s.dim() == 0 else canonical_axis(layer, axis_param, x.dim(), f"{what}.axis")
    if x.dim() < axis + s.dim():
        raise layer.error(
            f"{what} blob's shape {_shape_str(s.shape)} extends past bottom[0]'s shape "
            f"{_shape_str(x.shape)} when applied starting with bottom[0] axis = {axis}"
        )
    for i in range(s.dim()):
        if x.shape[axis + i] != s.shape[i]:
            raise layer.error(
                f"dimension mismatch between bottom[0]->shape({axis + i}) = {x.shape[axis + i]} "
                f"and {what.split('_')[0]}->shape({i}) = {s.shape[i]} (bottom[0] {_shape_str(x.shape)}, "
                f"{what.split('_')[0]} {_shape_str(s.shape)})"
            )
    return s.reshape(tuple(s.shape) + (1,) * (x.dim() - axis - s.dim()))


def _learned_shape(layer: Layer, shape: tuple[int, ...], axis_param: int, num_axes: int, what: str) -> tuple[int, ...]:
    axis = canonical_axis(layer, axis_param, len(shape), f"{what}.axis")
    if num_axes < -1:
        raise layer.error(f"{what}.num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
    if num_axes >= 0 and len(shape) < axis + num_axes:
        raise layer.error(
            f"{what} blob's shape extends past bottom[0]'s shape {_shape_str(shape)} when applied "
            f"starting with bottom[0] axis = {axis} with num_axes = {num_axes}"
        )
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis : axis + num_axes])


@register_layer("Scale")
class ScaleLayer(Layer):
    """``y = x * gamma (+ beta)``, gamma broadcast along ``x``'s axes ``axis`` .. ``axis + gamma.ndim - 1``.

    Parameters (``scale_param``): ``axis`` (1), ``num_axes`` (1; -1 = to the end) for a learned
    gamma, ``filler`` (unset: constant 1), ``bias_term`` (false), ``bias_filler`` (constant 0).

    Bottoms: ``x``, and optionally gamma itself (then not a blob; it gets a gradient).
    Blobs: ``[gamma]`` of shape ``x.shape[axis:axis+num_axes]`` (one bottom only), then
    ``[beta]`` shaped like gamma when ``bias_term``. A 0-d gamma scales everything.
    Top: shaped like ``x``.
    """

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``count``, plus ``count`` for the bias."""
        return sum(math.prod(s) for s in top_shapes) * (2 if self.bias_term else 1)

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.scale_param
        self.axis_param = int(p.axis)
        shape = bottom_shapes[0]
        self.channel_axis = self.axis_param + len(shape) if self.axis_param < 0 else self.axis_param
        self.learned_scale = len(bottom_shapes) == 1
        # (``Layer.accepts_channels_last``) a scale from a second bottom is viewed as its shape
        self.accepts_channels_last = self.learned_scale
        if self.learned_scale:
            sshape = _learned_shape(self, shape, self.axis_param, int(p.num_axes), "scale_param")
            if p.HasField("filler"):
                self.add_blob(sshape, p.filler)
            else:
                self.add_blob(sshape, value=1.0)
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            # Caffe builds an inner Bias layer: num_axes from bottom 1's axes, or scale_param's.
            num_axes = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else int(p.num_axes)
            bshape = _learned_shape(self, shape, self.axis_param, num_axes, "scale_param")
            self.add_blob(bshape, p.bias_filler)

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``channel_params`` as fixed float64 values: ``(gamma, beta)``, beta 0 without a bias."""
        params = self.channel_params()
        if params is None:
            return None
        gamma = params[0].detach().double()
        return gamma, params[1].detach().double() if params[1] is not None else torch.zeros_like(gamma)

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The learned per-channel gamma (and beta) when they apply along axis 1."""
        if not self.learned_scale or self.blobs[0].dim() != 1 or self.channel_axis != 1:
            return None
        return self.blobs[0], (self.blobs[1] if self.bias_term else None)

    def forward(self, x: torch.Tensor, *scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = scale[0] if scale else self.blobs[0]
        y = x * _broadcast_axis(self, x, s, self.axis_param, "scale_param")
        if self.bias_term:
            y = y + _broadcast_axis(self, x, self.blobs[-1], self.axis_param, "bias_param")
        return (y,)


@register_layer("Bias")
class BiasLayer(Layer):
    """``y = x + b``, b broadcast along ``x``'s axes ``axis`` .. ``axis + b.ndim - 1``.

    Parameters (``bias_param``): ``axis`` (1), ``num_axes`` (1; -1 = to the end) for a learned
    b, ``filler`` (unset: constant 0).

    Bottoms: ``x``, and optionally b itself (then not a blob; it gets a gradient).
    Blobs: ``[b]`` of shape ``x.shape[axis:axis+num_axes]`` (one bottom only). Top: like ``x``.
    """

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.bias_param
        self.axis_param = int(p.axis)
        if len(bottom_shapes) == 1:
            shape = _learned_shape(self, bottom_shapes[0], self.axis_param, int(p.num_axes), "bias_param")
            self.add_blob(shape, p.filler)

    def forward(self, x: torch.Tensor, *bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = bias[0] if bias else self.blobs[0]
        return (x + _broadcast_axis(self, x, b, self.axis_param, "bias_param"),)


# ---------------------------------------------------------------------------------------------
# Reductions


@register_layer("Reduction")
class ReductionLayer(Layer):
    """Reduce all axes from ``axis`` on to one number, times ``coeff``.

    Parameters (``reduction_param``): ``operation`` (SUM): SUM ``sum x``, ASUM ``sum |x|``,
    SUMSQ ``sum x^2``, MEAN ``sum x / n``; ``axis`` (0), ``coeff`` (1).
    Bottom: any shape. Top: ``shape[:axis]`` (``()`` for axis 0).
    Gradient: ``coeff * dy`` times 1, sign(x) (0 at 0), 2x, 1/n.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.reduction_param
        R = caffe_pb2.ReductionParameter
        if p.operation not in (R.SUM, R.ASUM, R.SUMSQ, R.MEAN):
            raise self.error(f"reduction_param.operation {p.operation} is not one of SUM, ASUM, SUMSQ, MEAN")
        self.op = p.operation
        self.axis_param = int(p.axis)
        self.coeff = float(p.coeff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        R = caffe_pb2.ReductionParameter
        axis = canonical_axis(self, self.axis_param, x.dim(), "reduction_param.axis")
        lead = tuple(x.shape[:axis])
        flat = x.reshape(lead + (math.prod(x.shape[axis:]),))
        if self.op == R.ASUM:
            flat = torch.abs(flat)
        elif self.op == R.SUMSQ:
            flat = flat * flat
        y = flat.sum(dim=-1)
        coeff = self.coeff
        if self.op == R.MEAN:
            coeff = coeff / max(flat.shape[-1], 1)
        if coeff != 1:
            y = y * coeff
        return (y,)


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and optionally values) of the ``top_k`` largest values.

    Parameters (``argmax_param``): ``out_max_val`` (false), ``top_k`` (1), ``axis`` (unset).

    - ``axis`` unset: over each item's ``count(1:)`` values. Top ``(N, 1, top_k)`` (indices)
      or ``(N, 2, top_k)`` (indices then values), padded with trailing 1s to the bottom's rank.
    - ``axis`` set: along that axis; top is the bottom's shape with ``top_k`` at ``axis``,
      holding values if ``out_max_val`` else indices.

    Ties are ordered as Caffe's ``std::greater`` on (value, index) pairs: the larger index
    first. Indices are floats, like every Caffe blob. No backward (the top has no gradient).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        if self.top_k < 1:
            raise self.error("argmax_param.top_k must not be less than 1")
        self.has_axis = p.HasField("axis")
        self.axis_param = int(p.axis)
        self._check(bottom_shapes[0])

    def _check(self, shape: tuple[int, ...]) -> int | None:
        if self.has_axis:
            axis = canonical_axis(self, self.axis_param, len(shape), "argmax_param.axis")
            if self.top_k > shape[axis]:
                raise self.error(
                    f"argmax_param.top_k ({self.top_k}) must be less than or equal to the dimension "
                    f"of the axis ({shape[axis]})"
                )
            return axis
        if self.top_k > math.prod(shape[1:]):
            raise self.error(
                f"argmax_param.top_k ({self.top_k}) must be less than or equal to the dimension of the "
                f"flattened bottom blob per instance ({math.prod(shape[1:])})"
            )
        return None

    @staticmethod
    def _topk(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k along the last dim, ties to the larger index (stable sort of the reversed row)."""
        n = v.shape[-1]
        vals, idx = torch.sort(v.flip(-1), dim=-1, descending=True, stable=True)
        return vals[..., :k], (n - 1 - idx[..., :k])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        axis = self._check(tuple(x.shape))
        x = x.detach()
        if axis is not None:
            vals, idx = self._topk(x.movedim(axis, -1), self.top_k)
            out = vals if self.out_max_val else idx.to(x.dtype)
            return (out.movedim(-1, axis).contiguous(),)
        n = x.shape[0]
        vals, idx = self._topk(x.reshape(n, -1), self.top_k)
        rank = max(x.dim(), 3)
        shape = [1] * rank
        shape[0], shape[2] = n, self.top_k
        if self.out_max_val:
            shape[1] = 2
            out = torch.cat([idx.to(x.dtype), vals], dim=1)
        else:
            out = idx.to(x.dtype)
        return (out.reshape(shape),)


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    """``y = exp(x - max) / sum exp(x - max)`` along ``axis``.

    Parameters (``softmax_param``): ``axis`` (1); ``engine`` ignored.
    Gradient ``(dy - sum(dy * y)) * y``. Bottom: any shape. Top: same shape.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def flops(self, bottom_shapes, top_shapes) -> int:
        """``3 · count``: the exponentials, the sums and the divisions."""
        return 3 * sum(math.prod(s) for s in top_shapes)

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.axis_param = int(self.param.softmax_param.axis)
        canonical_axis(self, self.axis_param, len(bottom_shapes[0]), "softmax_param.axis")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        axis = canonical_axis(self, self.axis_param, x.dim(), "softmax_param.axis")
        return (torch.softmax(x, dim=axis),)


# ---------------------------------------------------------------------------------------------
# Embed


@register_layer("Embed")
class EmbedLayer(Layer):
    """Look-up table: ``y[..., :] = W[int(x[...]), :] + b``.

    Parameters (``embed_param``): ``input_dim`` K (required), ``num_output`` N (required),
    ``bias_term`` (true), ``weight_filler`` / ``bias_filler`` (unset: constant 0).

    Blobs: weight ``(K, N)``, then bias ``(N,)``. Bottom: indices stored as floats, any shape;
    each is truncated to an integer and must lie in [0, K). Top: ``bottom.shape + (N,)``.
    Gradient: to W (rows summed per index) and b only. Deliberate difference: Caffe aborts
    ("Can't backpropagate to EmbedLayer input") if asked for the bottom's gradient; here the
    bottom simply gets none. Out-of-range indices raise (Caffe only checks in debug builds).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.embed_param
        self.N = int(p.num_output)
        if self.N <= 0:
            raise self.error("embed_param.num_output must be positive")
        self.K = int(p.input_dim)
        if self.K <= 0:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = bool(p.bias_term)
        self.add_blob((self.K, self.N), p.weight_filler)
        if self.bias_term:
            self.add_blob((self.N,), p.bias_filler)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = self.blobs[0]
        if x.is_meta:
            idx = torch.empty(x.shape, dtype=torch.long, device="meta")
        else:
            idx = x.detach().to(torch.long)  # C++ static_cast<int>: truncation toward zero
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.K):
                bad = x.detach()[(idx < 0) | (idx >= self.K)].flatten()[:5].tolist()
                raise self.error(f"embed input index out of range [0, input_dim = {self.K}): {bad}")
        y = torch.nn.functional.embedding(idx, w)
        if self.bias_term:
            y = y + self.blobs[1]
        return (y,)


# ---------------------------------------------------------------------------------------------
# Blobs without bottoms


def _shape_of(blob_shape) -> tuple[int, ...]:
    return tuple(int(d) for d in blob_shape.dim)


def _check_top_shape(layer: Layer, shape: tuple[int, ...], what: str) -> None:
    """Refuse a top shape Caffe's ``Blob::Reshape`` would refuse (more than 32 axes, a negative
    dimension, more than INT_MAX elements) or one larger than this machine's memory, naming the
    layer and the bytes it would need, before anything is allocated."""
    from caffe_compat.io import MAX_BLOB_AXES, MAX_BLOB_COUNT

    if len(shape) > MAX_BLOB_AXES:
        raise layer.error(f"{what}: shape has {len(shape)} axes; Caffe allows at most {MAX_BLOB_AXES}")
    if any(d < 0 for d in shape):
        raise layer.error(f"{what}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    nbytes = 4 * count
    if count > MAX_BLOB_COUNT:
        raise layer.error(
            f"{what}: shape {list(shape)} has {count} elements ({nbytes} bytes as float32), more than the "
            f"{MAX_BLOB_COUNT} a blob may hold (Caffe's INT_MAX); make it smaller"
        )
    memory = _physical_memory()
    if memory and nbytes > memory:
        raise layer.error(
            f"{what}: shape {list(shape)} needs {nbytes} bytes as float32, more than this machine's "
            f"{memory} bytes of memory; make it smaller"
        )


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


class _SourceLayer(Layer):
    """A layer without bottoms whose tops follow the dtype/device the layer was moved to."""

    exact_num_bottom = 0

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.register_buffer("_like", torch.empty(0), persistent=False)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self._like.dtype, device=self._like.device)


@register_layer("Parameter")
class ParameterLayer(Layer):
    """Expose a learnable blob as a top.

    Parameters (``parameter_param``): ``shape``. Blobs: ``[p]`` of that shape, zeros (Caffe
    fills nothing; its fresh blobs are zero). Bottoms: none. Top: ``p`` (its gradient is ``p``'s).
    """

    moves_data_only = True

    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        self.add_blob(_shape_of(self.param.parameter_param.shape), value=0.0)

    def forward(self) -> tuple[torch.Tensor, ...]:
        p = self.blobs[0]
        return (p.view(p.shape),)


@register_layer("Input")
class InputLayer(_SourceLayer):
    """The net's inputs: tops whose data the caller sets (``net.blobs[name].data[...] = ...``).

    Parameters (``input_param``): ``shape``: once for every top, once per top, or not at all
    (then the tops are empty, shape ``(0,)``, until the caller reshapes them).
    Bottoms: none. Tops: >= 1. ``forward`` gives zeros of those shapes; the net does not run it
    (``is_net_input``), it keeps the caller's data.
    """

    moves_data_only = True

    min_top = 1
    is_net_input = True

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        shapes = [_shape_of(s) for s in self.param.input_param.shape]
        n = len(self.param.top)
        if len(shapes) not in (0, 1, n):
            raise self.error(f"input_param.shape must be given once, or once per top blob ({n}); got {len(shapes)}")
        if not shapes:
            shapes = [(0,)]
        self.shapes = shapes * n if len(shapes) == 1 else shapes
        for top, shape in zip(self.param.top, self.shapes):
            _check_top_shape(self, shape, f"input_param.shape of top {top!r}")

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._zeros(s) for s in self.shapes)


@register_layer("DummyData")
class DummyDataLayer(_SourceLayer):
    """Tops filled by fillers, for tests and placeholders.

    Parameters (``dummy_data_param``): ``shape`` (once, or once per top) or the legacy
    ``num``/``channels``/``height``/``width`` (each once or once per top; not with ``shape``);
    ``data_filler``: none (constant 0), one for every top, or one per top.

    Constant fillers give the same values every forward; other fillers draw anew each forward
    from torch's global RNG (Caffe refills exactly the non-constant ones). Deliberate
    difference: a constant top is rebuilt each forward, so values written into it by the caller
    do not persist as they would in Caffe. Bottoms: none. Tops: >= 1. No gradient.
    """

    moves_data_only = True

    min_top = 1

    def setup(self, bottom_shapes: list[tuple[int, ...]]) -> None:
        p = self.param.dummy_data_param
        n = len(self.param.top)
        nf = len(p.data_filler)
        if nf not in (0, 1, n):
            raise self.error(
                f"Number of data fillers must be 0, 1 or equal to the number of tops: {n}; "
                f"you specified {nf} data fillers"
            )
        legacy = {f: list(getattr(p, f)) for f in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise self.error("dummy_data_param: both shape and legacy num/channels/height/width were specified")
            for f, vals in legacy.items():
                if len(vals) not in (1, n):
                    raise self.error(
                        f"dummy_data_param: must specify '{f}' once, or once per top blob ({n}); specified {len(vals)}"
                    )
            self.shapes = [
                tuple(int(legacy[f][i if len(legacy[f]) > 1 else 0]) for f in ("num", "channels", "height", "width"))
                for i in range(n)
            ]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(
                    f"dummy_data_param: must specify 'shape' once, or once per top blob ({n}); specified {len(p.shape)}"
                )
            self.shapes = [_shape_of(p.shape[i if len(p.shape) > 1 else 0]) for i in range(n)]
        for top, shape in zip(self.param.top, self.shapes):
            _check_top_shape(self, shape, f"dummy_data_param shape of top {top!r}")
        if nf == 0:
            fp = caffe_pb2.FillerParameter(type="constant", value=0.0)
            self.fillers = [fp] * n
        else:
            self.fillers = [p.data_filler[i if nf > 1 else 0] for i in range(n)]

    def top_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        from caffe_compat.fillers import fill

        tops = []
        for shape, fp in zip(self.shapes, self.fillers):
            t = fill(torch.empty(shape, dtype=torch.float32), fp)
            tops.append(t.to(dtype=self._like.dtype, device=self._like.device))
        return tuple(tops)


# ---------------------------------------------------------------------------------------------
# Batch selection


@register_layer("Filter")
class FilterLayer(Layer):
    """Caffe's Filter: keep the items (first-axis entries) whose selector value is non-zero.

    Bottoms: ``K ≥ 1`` data blobs ``(N, ...)`` then the selector ``(N,)`` or ``(N, 1, ..., 1)``
    (every axis after the first must be 1). Tops: ``K``, top ``t`` = bottom ``t``'s selected items
    in increasing item order: ``y_t = x_t[{i : sel[i] ≠ 0}]``, shape ``(S, ...)`` with ``S`` the
    number of selected items (``(0, ...)`` when none is). No parameters.

    Backward: each selected item gets its top's gradient, every other item 0; the selector gets
    no gradient.

    Shapes: ``S`` depends on the selector's values, so ``top_shapes`` (the net's set-up and
    ``reshape``) gives Caffe's first-reshape shape, all ``N`` items; each forward gives the
    tops their real ``(S, ...)`` shapes (Caffe reshapes from the selector's data each forward).

    Differences from Caffe: where Caffe aborts, the selector is simply given no gradient (a net
    whose backward reaches the selector) and a backward with no item selected gives zeros (Caffe
    divides by the top's zero item count).
    """

    moves_data_only = True

    min_bottom = 2
    min_top = 1

    def setup(self, bottom_shapes):
        if len(self.param.top) != len(bottom_shapes) - 1:
            raise self.error(
                f"needs one top per data bottom (the bottoms but the last, the selector): "
                f"{len(bottom_shapes)} bottoms, so {len(bottom_shapes) - 1} tops; got {len(self.param.top)}"
            )
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes) -> None:
        sel = tuple(shapes[-1])
        si = len(shapes) - 1
        if not sel or any(d != 1 for d in sel[1:]):
            raise self.error(
                f"the selector (bottom {si}) must have shape (N,) or (N, 1, ..., 1), one value per item; "
                f"got {_shape_str(sel)}"
            )
        for i, s in enumerate(shapes[:-1]):
            if not s or s[0] != sel[0]:
                raise self.error(
                    f"bottom {i} has shape {_shape_str(s)}: its first axis must equal the selector's "
                    f"({sel[0]} items, bottom {si})"
                )

    def top_shapes(self, bottom_shapes):
        self._check_shapes(bottom_shapes)
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, *bottoms):
        self._check_shapes([tuple(t.shape) for t in bottoms])
        sel = bottoms[-1].detach()
        keep = (sel.reshape(sel.shape[0]) != 0).nonzero().flatten()
        return tuple(x.index_select(0, keep) for x in bottoms[:-1])


@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    """Caffe's BatchReindex: select, reorder or repeat the items of a batch by index.

    ``y[m] = x[int(permut[m])]`` for ``m < M`` (the index value truncated toward zero, as C's
    cast does). Bottoms: data ``(N, ...)`` and ``permut`` ``(M,)`` (exactly one axis; every
    value in ``[0, N)``, checked each forward). Top: ``(M, ...)``. No parameters.

    Backward: ``dx[n] = Σ_{m : int(permut[m]) = n} dy[m]`` (repeated indices add, items never
    picked get 0); ``permut`` gets no gradient.

    Differences from Caffe: where Caffe aborts because a backward reaches ``permut``, it is simply
    given no gradient.
    """

    moves_data_only = True

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom_shapes):
        self._check_shapes(bottom_shapes)

    def _bottom(self, i: int) -> str:
        return f"bottom {i} ({self.param.bottom[i]!r})" if i < len(self.param.bottom) else f"bottom {i}"

    def _check_shapes(self, shapes) -> None:
        data, perm = tuple(shapes[0]), tuple(shapes[1])
        if len(perm) != 1:
            raise self.error(
                f"{self._bottom(1)}, the indices, must have exactly one axis (M,), got shape {_shape_str(perm)}"
            )
        if not data:
            raise self.error(f"{self._bottom(0)} needs a first axis to index, got a scalar")

    def top_shapes(self, bottom_shapes):
        self._check_shapes(bottom_shapes)
        return [(bottom_shapes[1][0], *bottom_shapes[0][1:])]

    def forward(self, x, permut):
        self._check_shapes([tuple(x.shape), tuple(permut.shape)])
        p = permut.detach()
        n = x.shape[0]
        if p.device.type != "meta" and p.numel():
            ok = (p >= 0) & (p < n)  # false for NaN too, as Caffe's CHECK_GE/CHECK_LT
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0, 0])
                raise self.error(
                    f"{self._bottom(1)} holds index {float(p[j])!r} at position {j}: indices must lie "
                    f"in [0, {n}), the first axis of {self._bottom(0)}"
                )
        return (x.index_select(0, p.long()),)
