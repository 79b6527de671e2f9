"""Export a ``Net`` to ONNX, written node by node from the net's layers, and check the export.

The graph is built with ``onnx.helper`` by one converter per Caffe layer type (registered with
``@register_converter("Type")``, as the layers themselves are), not by tracing torch: each
converter emits the ONNX operators that compute exactly what the Caffe layer computes.

- **Pooling**: Caffe's output size (``ceil`` rounding, the "last window starts inside the image"
  rule) is turned into explicit left/right pads of a floor-mode ONNX pool; ONNX's ``ceil_mode``
  is never used. MAX pads that reach the kernel size go through an explicit ``Pad`` with
  −FLT_MAX (an empty window gives −FLT_MAX, as in Caffe). AVE uses ``count_include_pad=1`` when
  the right pad does not exceed the left one (Caffe's divisor is then k×k everywhere),
  ``count_include_pad=0`` when there is no padding (the divisor is the window's real pixels),
  and otherwise ``Pad`` + ``AveragePool`` + a constant ``Mul`` by k×k/divisor, Caffe's divisor
  (padding counted, the overhang past ``H + pad`` not).
- **LRN**: ONNX's ``LRN`` operator (ACROSS_CHANNELS: ``bias = k``); WITHIN_CHANNEL from
  ``Mul``/``AveragePool``/``Pow``.
- **BatchNorm** (global statistics): ``BatchNormalization`` with mean = blob0/s, var = blob1/s
  (0 when the scale factor s is 0), scale 1, bias 0. **Scale**/**Bias**: ``Mul``/``Add`` with
  the blob reshaped to broadcast from the layer's axis.
- **Convolution** (groups, dilation) → ``Conv``; **Deconvolution** → ``ConvTranspose`` (Caffe's
  weight layout is ONNX's); **InnerProduct** → ``Flatten`` + ``Gemm``; **Crop** → ``Slice``.
- **Dropout** (TEST), **Split** and one-top **Concat**/**Slice** produce no node: their tops are
  the bottom's ONNX value.

ONNX values carry Caffe's blob names where they can: the last value written to a blob (an
in-place chain's end) has the blob's name, earlier values ``<blob>/<layer>``. The net's outputs
are the graph's outputs. A layer without a converter, or with options that cannot be exported
(TRAIN-phase Dropout, BatchNorm with batch statistics, Pooling's argmax top...), raises
``OnnxExportError`` naming the layer.

``check_onnx`` runs the model in onnxruntime and compares with the net; ``locate_divergence``
compares every blob to find the first layer that differs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from caffe_compat.errors import CaffeError
from caffe_compat.layers.conv import end_pads
from caffe_compat.layers.pooling import caffe_pooled_size
from caffe_compat.proto import caffe_pb2

log = logging.getLogger("caffe_compat")

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "OnnxExportError",
    "OutputDiff",
    "ONNX_CONVERTERS",
    "register_converter",
    "refuse_export",
    "ONNX_REFUSED",
    "exportable_types",
    "export_onnx",
    "random_inputs",
    "run_onnxruntime",
    "check_onnx",
    "locate_divergence",
    "relative_error",
    "randomize_params",
]

#: The opset written by default, and the lowest one the converters support (Softmax's per-axis
#: semantics, ``Unsqueeze``/``ReduceSum`` axes as inputs).
DEFAULT_OPSET = 13
MIN_OPSET = 13
_FLT_MAX = 3.4028234663852886e38


class OnnxExportError(CaffeError):
    """A layer that cannot be exported to ONNX (the message names the layer, its type and why)."""


#: Caffe type string -> converter ``fn(g, layer, inputs, bottom_shapes, tops) -> [values]``.
ONNX_CONVERTERS: dict[str, Callable] = {}


def register_converter(*type_names: str):
    """Decorator: register an ONNX converter for one or more Caffe layer types."""

    def deco(fn):
        for t in type_names:
            if t in ONNX_CONVERTERS:
                raise ValueError(f"ONNX converter for {t!r} registered twice")
            ONNX_CONVERTERS[t] = fn
        return fn

    return deco


#: Caffe type string -> why it cannot be exported (named in the error instead of "no converter").
ONNX_REFUSED: dict[str, str] = {}


def refuse_export(type_name: str, reason: str) -> None:
    """Record that ``type_name`` cannot be exported and why (the export error names the layer and
    gives ``reason``)."""
    ONNX_REFUSED[type_name] = reason


def exportable_types() -> list[str]:
    """The Caffe layer types that have an ONNX converter."""
    return sorted(ONNX_CONVERTERS)


# ---------------------------------------------------------------------------------------------
# graph builder


class _Graph:
    """What converters use: fresh names, nodes, initializers, the layer being converted."""

    def __init__(self, opset: int, dynamic_batch: bool):
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self._param_names: dict[int, str] = {}
        self._int_consts: dict[tuple, str] = {}
        self.layer_name = ""
        self.layer_type = ""

    def error(self, message: str) -> OnnxExportError:
        return OnnxExportError(f"layer {self.layer_name!r} ({self.layer_type}) cannot be exported to ONNX: {message}")

    def fresh(self, base: str) -> str:
        name = base
        i = 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        """Add one node with one output (named ``out`` or a fresh name); return that name."""
        if out is None:
            out = self.fresh(f"{self.layer_name}/{op}")
        self.nodes.append(
            helper.make_node(op, list(inputs), [out], name=self.fresh(f"{self.layer_name}/{op}#node"), **attrs)
        )
        return out

    def const(self, array, base: str, dtype=np.float32) -> str:
        name = self.fresh(f"{self.layer_name}/{base}")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def ints(self, values) -> str:
        """An int64 1-D initializer (shared between nodes with the same values)."""
        key = tuple(int(v) for v in values)
        if key not in self._int_consts:
            name = self.fresh("const_i64_" + "_".join(str(v).replace("-", "m") for v in key)[:40])
            self.initializers.append(numpy_helper.from_array(np.asarray(key, dtype=np.int64), name))
            self._int_consts[key] = name
        return self._int_consts[key]

    def scalar(self, value: float, base: str = "c") -> str:
        return self.const(np.asarray(value, dtype=np.float32), base)

    def param(self, p: torch.Tensor, base: str, shape: tuple[int, ...] | None = None) -> str:
        """A layer blob as an initializer (one initializer per shared parameter and shape)."""
        key = (id(p), shape)
        if key not in self._param_names:
            arr = p.detach().cpu().numpy().astype(np.float32)
            if shape is not None:
                arr = arr.reshape(shape)
            name = self.fresh(f"{self.layer_name}/{base}")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._param_names[key] = name
        return self._param_names[key]

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int = 1, out: str | None = None) -> str:
        # ReduceSum takes axes as an input from opset 13, the other reductions from opset 18
        if op == "ReduceSum" or self.opset >= 18:
            return self.node(op, [x, self.ints(axes)], out, keepdims=keepdims)
        return self.node(op, [x], out, axes=list(axes), keepdims=keepdims)

    def slice(self, x: str, starts, ends, axes, out: str | None = None) -> str:
        return self.node("Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes)], out)


def _canonical(axis: int, ndim: int, g: _Graph, field: str) -> int:
    if not -ndim <= axis < ndim:
        raise g.error(f"{field} {axis} is out of range for a {ndim}-D bottom")
    return axis + ndim if axis < 0 else axis


# ---------------------------------------------------------------------------------------------
# converters: vision layers


@register_converter("Convolution", "Deconvolution")
def _convolution(g, layer, xs, bshapes, tops):
    if layer.axis != 1:
        raise g.error(f"convolution_param.axis {layer.axis}: only axis 1 (NCHW) can be exported")
    w = g.param(layer.blobs[0], "weight")
    ins = [w] + ([g.param(layer.blobs[1], "bias")] if layer.bias_term else [])
    op = "ConvTranspose" if layer.type == "Deconvolution" else "Conv"
    pads = list(layer.pad) * 2
    if op == "Conv":  # Caffe's truncating output size: extra zeros after an axis the kernel overhangs
        extra = layer.tail_pads(tuple(bshapes[0][2:]))
        pads = list(layer.pad) + [p + e for p, e in zip(layer.pad, extra)]
    outs = []
    for x, top in zip(xs, tops):
        outs.append(
            g.node(
                op,
                [x] + ins,
                top,
                kernel_shape=list(layer.kernel),
                strides=list(layer.stride),
                pads=pads,
                dilations=list(layer.dilation),
                group=layer.group,
            )
        )
    return outs


@register_converter("Pooling")
def _pooling(g, layer, xs, bshapes, tops):
    PP = caffe_pb2.PoolingParameter
    if len(tops) == 2:
        raise g.error("the argmax top (pooling's second top) has no ONNX equivalent here; use one top")
    if layer.pool == PP.STOCHASTIC:
        raise g.error("pool: STOCHASTIC has no converter (its TEST output is sum(x^2) / sum(x) per window)")
    x = xs[0]
    n, c, H, W = bshapes[0]
    is_max = layer.pool == PP.MAX
    if layer.global_pooling:
        return [g.node("GlobalMaxPool" if is_max else "GlobalAveragePool", [x], tops[0])]
    k, s, p = layer.kernel, layer.stride, layer.pad
    any_pad = p != (0, 0)
    sizes = (H, W)
    out = [caffe_pooled_size(sizes[i], k[i], s[i], p[i], layer.ceil, any_pad) for i in range(2)]
    right = [max(0, (out[i] - 1) * s[i] + k[i] - p[i] - sizes[i]) for i in range(2)]
    onnx_out = [(sizes[i] + p[i] + right[i] - k[i]) // s[i] + 1 for i in range(2)]
    crop = onnx_out != out
    last = tops[0] if not crop else None
    pool_attrs = dict(kernel_shape=list(k), strides=list(s))
    if is_max:
        if all(p[i] < k[i] and right[i] < k[i] for i in range(2)):
            y = g.node("MaxPool", [x], last, pads=[p[0], p[1], right[0], right[1]], **pool_attrs)
        else:
            pads = g.ints([0, 0, p[0], p[1], 0, 0, right[0], right[1]])
            xp = g.node("Pad", [x, pads, g.scalar(-_FLT_MAX, "neg_flt_max")], mode="constant")
            y = g.node("MaxPool", [xp], last, **pool_attrs)
    else:
        starts_inside = all((out[i] - 1) * s[i] < sizes[i] for i in range(2))
        if all(right[i] <= p[i] for i in range(2)):
            y = g.node(
                "AveragePool", [x], last, pads=[p[0], p[1], right[0], right[1]], count_include_pad=1, **pool_attrs
            )
        elif not any_pad and starts_inside and all(right[i] < k[i] for i in range(2)):
            y = g.node("AveragePool", [x], last, pads=[0, 0, right[0], right[1]], count_include_pad=0, **pool_attrs)
        else:
            pads = g.ints([0, 0, p[0], p[1], 0, 0, right[0], right[1]])
            xp = g.node("Pad", [x, pads, g.scalar(0.0, "zero")], mode="constant")
            y = g.node("AveragePool", [xp], **pool_attrs)
            if crop:
                y = g.slice(y, [0, 0], out, [2, 3])
                crop = False
            spans = [
                [min(o * s[i] - p[i] + k[i], sizes[i] + p[i]) - (o * s[i] - p[i]) for o in range(out[i])]
                for i in range(2)
            ]
            ratio = (k[0] * k[1]) / (np.asarray(spans[0], np.float64)[:, None] * np.asarray(spans[1], np.float64))
            y = g.node("Mul", [y, g.const(ratio.reshape(1, 1, out[0], out[1]), "caffe_divisor")], tops[0])
    if crop:
        y = g.slice(y, [0, 0], out, [2, 3], tops[0])
    return [y]


@register_converter("SPP")
def _spp(g, layer, xs, bshapes, tops):
    # each pyramid level is one of our Pooling layers: the Pooling converter's exact shapes
    levels = layer.levels_for(tuple(bshapes[0]))
    if layer.pyramid_height == 1:
        return _pooling(g, levels[0], xs, bshapes, tops)
    flat = []
    for i, level in enumerate(levels):
        (y,) = _pooling(g, level, xs, bshapes, [g.fresh(f"{g.layer_name}/level{i}")])
        flat.append(g.node("Flatten", [y], axis=1))
    return [g.node("Concat", flat, tops[0], axis=1)]


@register_converter("BatchReindex")
def _batch_reindex(g, layer, xs, bshapes, tops):
    # top = data[permut]: the indices arrive as floats (a Caffe blob); Caffe truncates them
    idx = g.node("Cast", [xs[1]], to=TensorProto.INT64)
    return [g.node("Gather", [xs[0], idx], tops[0], axis=0)]


@register_converter("Im2col")
def _im2col(g, layer, xs, bshapes, tops):
    # a depthwise convolution with one-hot filters: output channel c·K + k copies tap k of channel
    # c (products by 1 and sums of zeros: exact for finite inputs)
    if layer.axis != 1 or layer.num_spatial != 2:
        raise g.error("only a 2-D Im2col with convolution_param.axis 1 can be exported")
    n, c, H, W = bshapes[0]
    kh, kw = layer.kernel
    ends = end_pads(layer, (H, W), layer._out_sizes(tuple(bshapes[0])))
    weight = np.zeros((c * kh * kw, 1, kh, kw), np.float32)
    for ch in range(c):
        for k in range(kh * kw):
            weight[ch * kh * kw + k, 0, k // kw, k % kw] = 1.0
    return [
        g.node(
            "Conv",
            [xs[0], g.const(weight, "taps")],
            tops[0],
            kernel_shape=[kh, kw],
            strides=list(layer.stride),
            pads=[*layer.pad, *ends],
            dilations=list(layer.dilation),
            group=c,
        )
    ]


@register_converter("Filter")
def _filter(g, layer, xs, bshapes, tops):
    # Caffe keeps the items whose selector is non-zero (NaN included): Compress along axis 0
    sel = g.node("Reshape", [xs[-1], g.ints([-1])])
    keep = g.node("Not", [g.node("Equal", [sel, g.scalar(0.0, "zero")])])
    return [g.node("Compress", [x, keep], top, axis=0) for x, top in zip(xs[:-1], tops)]


def _recurrent_common(g, layer, xs):
    """What RNN and LSTM exports share: the input transform of every timestep at once
    ``(T, N, G)``, the static transform ``(1, N, G)`` or None, ``cont`` as ``(T, N)``, the index of
    the first recurrent blob, and the initial states (the exposed bottoms, or zeros)."""
    T, K, G, H = layer.T, layer.K, layer.blobs[0].shape[0], layer.num_output
    x2 = g.node("Reshape", [xs[0], g.ints([-1, K])])
    xw = g.node("Gemm", [x2, g.param(layer.blobs[0], "W_x"), g.param(layer.blobs[1], "b")], transB=1)
    xw = g.node("Reshape", [xw, g.ints([T, -1, G])])
    k, static = 2, None
    if layer.static_input:
        xs2 = g.node("Reshape", [xs[2], g.ints([-1, layer.K_static])])
        static = g.node("Gemm", [xs2, g.param(layer.blobs[2], "W_x_static")], transB=1)
        static = g.node("Reshape", [static, g.ints([1, -1, G])])
        k = 3
    n_states = len(layer.state_input_names)
    if layer.expose_hidden:
        states = list(xs[-n_states:])
    else:  # Caffe carries the last call's state; the exported model starts every call from zeros
        log.warning(
            "layer %r (%s): the ONNX model starts every call from a zero state, where Caffe carries the "
            "previous call's (the same when each call's cont starts with 0); set expose_hidden to pass the state",
            g.layer_name,
            layer.type,
        )
        n = g.slice(g.node("Shape", [xs[1]]), [1], [2], [0])
        shape = g.node("Concat", [g.ints([1]), n, g.ints([H])], axis=0)
        zero = g.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
        states = [zero] * n_states
    return xw, static, xs[1], k, states


def _step_sum(g, w_rec, h, cont, xw, static, t):
    """Step ``t``'s ``W_rec (cont_t · h) + xw_t [+ static]`` ``(1, N, G)`` (Caffe's order of the
    sums), and ``cont_t`` as ``(1, N, 1)``."""
    x_t = g.node("Gather", [xw, g.ints([t])], axis=0)
    cont_t = g.node("Reshape", [g.node("Gather", [cont, g.ints([t])], axis=0), g.ints([1, -1, 1])])
    total = g.node("Add", [g.node("MatMul", [g.node("Mul", [h, cont_t]), w_rec]), x_t])
    return (total if static is None else g.node("Add", [total, static])), cont_t


def _transposed(g, p, base):
    return g.const(p.detach().cpu().numpy().astype(np.float32).T, base)


@register_converter("LSTM")
def _lstm(g, layer, xs, bshapes, tops):
    # Caffe's unrolled net, step by step; without expose_hidden the model starts from a zero
    # state (Caffe carries the previous call's: equal when each call's cont starts with 0)
    H = layer.num_output
    xw, static, cont, k, (h, c) = _recurrent_common(g, layer, xs)
    w_hc = _transposed(g, layer.blobs[k], "W_hc_T")
    hs = []
    for t in range(layer.T):
        gate, cont_t = _step_sum(g, w_hc, h, cont, xw, static, t)
        i, f, o, gg = (g.slice(gate, [j * H], [(j + 1) * H], [2]) for j in range(4))
        i, o = g.node("Sigmoid", [i]), g.node("Sigmoid", [o])
        f = g.node("Mul", [cont_t, g.node("Sigmoid", [f])])
        c = g.node("Add", [g.node("Mul", [f, c]), g.node("Mul", [i, g.node("Tanh", [gg])])])
        h = g.node("Mul", [o, g.node("Tanh", [c])])
        hs.append(h)
    outs = [g.node("Concat", hs, tops[0], axis=0)]
    if layer.expose_hidden:
        outs += [g.node("Identity", [h], tops[1]), g.node("Identity", [c], tops[2])]
    return outs


@register_converter("RNN")
def _rnn(g, layer, xs, bshapes, tops):
    xw, static, cont, k, (h,) = _recurrent_common(g, layer, xs)
    w_hh = _transposed(g, layer.blobs[k], "W_hh_T")
    hs = []
    for t in range(layer.T):
        h = g.node("Tanh", [_step_sum(g, w_hh, h, cont, xw, static, t)[0]])
        hs.append(h)
    hidden = g.node("Concat", hs, axis=0)
    w_ho = _transposed(g, layer.blobs[k + 1], "W_ho_T")
    o = g.node("Tanh", [g.node("Add", [g.node("MatMul", [hidden, w_ho]), g.param(layer.blobs[k + 2], "b_o")])], tops[0])
    outs = [o]
    if layer.expose_hidden:
        outs.append(g.node("Identity", [h], tops[1]))
    return outs


@register_converter("LRN")
def _lrn(g, layer, xs, bshapes, tops):
    if layer.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        return [g.node("LRN", [xs[0]], tops[0], size=layer.size, alpha=layer.alpha, beta=layer.beta, bias=layer.k)]
    x = xs[0]
    pad = (layer.size - 1) // 2
    sq = g.node("Mul", [x, x])
    mean_sq = g.node(
        "AveragePool", [sq], kernel_shape=[layer.size] * 2, strides=[1, 1], pads=[pad] * 4, count_include_pad=1
    )
    base = g.node("Add", [g.node("Mul", [mean_sq, g.scalar(layer.alpha, "alpha")]), g.scalar(1.0, "one")])
    return [g.node("Mul", [x, g.node("Pow", [base, g.scalar(-layer.beta, "neg_beta")])], tops[0])]


@register_converter("BatchNorm")
def _batch_norm(g, layer, xs, bshapes, tops):
    if not layer.use_global_stats:
        raise g.error(
            "batch statistics (use_global_stats false, the TRAIN default) cannot be exported: "
            "export the TEST-phase net, or set batch_norm_param.use_global_stats: true"
        )
    if len(bshapes[0]) < 2:
        raise g.error(f"a {len(bshapes[0])}-D bottom cannot be exported (ONNX BatchNormalization needs (N, C, ...))")
    mean_acc, var_acc, s = (b.detach().cpu().float() for b in layer.blobs)
    factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    C = layer.channels
    return [
        g.node(
            "BatchNormalization",
            [
                xs[0],
                g.const(np.ones(C), "bn_scale"),
                g.const(np.zeros(C), "bn_bias"),
                g.const((mean_acc * factor).numpy(), "mean"),
                g.const((var_acc * factor).numpy(), "var"),
            ],
            tops[0],
            epsilon=float(layer.eps),
        )
    ]


def _broadcast_param(g, layer, p: torch.Tensor, ndim: int, axis_param: int, base: str) -> str:
    """A Scale/Bias blob shaped to broadcast into an ``ndim``-D bottom from the layer's axis."""
    if p.dim() == 0:
        return g.param(p, base, ())
    axis = _canonical(axis_param, ndim, g, "axis")
    return g.param(p, base, tuple(p.shape) + (1,) * (ndim - axis - p.dim()))


def _broadcast_input(g, x: str, xshape, ndim: int, axis_param: int) -> str:
    if len(xshape) == 0:
        return x
    axis = _canonical(axis_param, ndim, g, "axis")
    extra = ndim - axis - len(xshape)
    if extra <= 0:
        return x
    return g.node("Unsqueeze", [x, g.ints(range(len(xshape), len(xshape) + extra))])


@register_converter("Scale")
def _scale(g, layer, xs, bshapes, tops):
    nd = len(bshapes[0])
    if layer.learned_scale:
        gamma = _broadcast_param(g, layer, layer.blobs[0], nd, layer.axis_param, "gamma")
    else:
        gamma = _broadcast_input(g, xs[1], bshapes[1], nd, layer.axis_param)
    if not layer.bias_term:
        return [g.node("Mul", [xs[0], gamma], tops[0])]
    y = g.node("Mul", [xs[0], gamma])
    beta = _broadcast_param(g, layer, layer.blobs[-1], nd, layer.axis_param, "beta")
    return [g.node("Add", [y, beta], tops[0])]


@register_converter("Bias")
def _bias(g, layer, xs, bshapes, tops):
    nd = len(bshapes[0])
    if len(xs) == 1:
        b = _broadcast_param(g, layer, layer.blobs[0], nd, layer.axis_param, "bias")
    else:
        b = _broadcast_input(g, xs[1], bshapes[1], nd, layer.axis_param)
    return [g.node("Add", [xs[0], b], tops[0])]


@register_converter("InnerProduct")
def _inner_product(g, layer, xs, bshapes, tops):
    shape = bshapes[0]
    axis = _canonical(layer.axis_param, len(shape), g, "inner_product_param.axis")
    w, x = layer.blobs[0], xs[0]
    if axis == 1:
        if len(shape) != 2:
            x = g.node("Flatten", [x], axis=1)
        ins = [x, g.param(w, "weight")]
        if layer.bias_term:
            ins.append(g.param(layer.blobs[1], "bias"))
        return [g.node("Gemm", ins, tops[0], transB=0 if layer.transpose else 1)]
    x = g.node("Reshape", [x, g.ints([0] * axis + [layer.K])])
    wt = g.param(w, "weight_t", None) if layer.transpose else g.const(w.detach().cpu().numpy().T, "weight_t")
    if not layer.bias_term:
        return [g.node("MatMul", [x, wt], tops[0])]
    return [g.node("Add", [g.node("MatMul", [x, wt]), g.param(layer.blobs[1], "bias")], tops[0])]


# ---------------------------------------------------------------------------------------------
# converters: plumbing


@register_converter("Split")
def _split(g, layer, xs, bshapes, tops):
    return [xs[0]] * len(tops)


@register_converter("Dropout")
def _dropout(g, layer, xs, bshapes, tops):
    if layer.train_phase:
        raise g.error("a TRAIN-phase Dropout draws random masks; export the TEST-phase net (phase TEST)")
    return [xs[0]]


@register_converter("Silence")
def _silence(g, layer, xs, bshapes, tops):
    return []


@register_converter("Concat")
def _concat(g, layer, xs, bshapes, tops):
    if len(xs) == 1:
        return [xs[0]]
    return [g.node("Concat", xs, tops[0], axis=layer.axis)]


@register_converter("Slice")
def _slice(g, layer, xs, bshapes, tops):
    if len(tops) == 1:
        return [xs[0]]
    sizes = layer._sizes(bshapes[0][layer.axis])
    outs, start = [], 0
    for size, top in zip(sizes, tops):
        outs.append(g.slice(xs[0], [start], [start + size], [layer.axis], top))
        start += size
    return outs


@register_converter("Flatten")
def _flatten(g, layer, xs, bshapes, tops):
    shape = bshapes[0]
    start = _canonical(layer.axis_param, len(shape), g, "flatten_param.axis")
    end = _canonical(layer.end_axis_param, len(shape), g, "flatten_param.end_axis")
    target = [0] * start + [-1] + list(shape[end + 1 :])
    return [g.node("Reshape", [xs[0], g.ints(target)], tops[0])]


@register_converter("Reshape")
def _reshape(g, layer, xs, bshapes, tops):
    shape = bshapes[0]
    n = len(shape)
    a = layer.axis_param
    start = a if a >= 0 else n + a + 1
    end = n if layer.num_axes_param == -1 else start + layer.num_axes_param
    # ONNX's 0 copies the input dim at the same index, as Caffe's does inside the replaced range;
    # dims after the range are written out (their index may move).
    trailing = list(shape[end:])
    if g.dynamic_batch and start == 0 and end == 0 and trailing:
        raise g.error("reshape_param with num_axes 0 at axis 0 moves the batch axis; export without --dynamic-batch")
    target = [0] * start + list(layer.dims) + trailing
    return [g.node("Reshape", [xs[0], g.ints(target)], tops[0])]


@register_converter("Crop")
def _crop(g, layer, xs, bshapes, tops):
    s0, s1 = bshapes
    n = len(s0)
    axis = _canonical(layer.axis_param, n, g, "crop_param.axis")
    starts, ends, axes = [], [], []
    for i in range(axis, n):
        off = 0
        if layer.offsets:
            off = layer.offsets[0] if len(layer.offsets) == 1 else layer.offsets[i - axis]
        if off != 0 or s1[i] != s0[i]:
            if i == 0 and g.dynamic_batch:
                raise g.error("crop_param.axis 0 crops the batch axis; export without --dynamic-batch")
            starts.append(off)
            ends.append(off + s1[i])
            axes.append(i)
    if not axes:
        return [xs[0]]
    return [g.slice(xs[0], starts, ends, axes, tops[0])]


@register_converter("Tile")
def _tile(g, layer, xs, bshapes, tops):
    nd = len(bshapes[0])
    axis = _canonical(layer.axis_param, nd, g, "tile_param.axis")
    reps = [1] * nd
    reps[axis] = layer.tiles
    return [g.node("Tile", [xs[0], g.ints(reps)], tops[0])]


@register_converter("Eltwise")
def _eltwise(g, layer, xs, bshapes, tops):
    E = caffe_pb2.EltwiseParameter
    if layer.op == E.MAX:
        return [g.node("Max", xs, tops[0])]
    if layer.op == E.PROD:
        y = xs[0]
        for i, x in enumerate(xs[1:], 1):
            y = g.node("Mul", [y, x], tops[0] if i == len(xs) - 1 else None)
        return [y]
    terms = [x if c == 1 else g.node("Mul", [x, g.scalar(c, "coeff")]) for c, x in zip(layer.coeff, xs)]
    y = terms[0]
    for i, t in enumerate(terms[1:], 1):
        y = g.node("Add", [y, t], tops[0] if i == len(terms) - 1 else None)
    return [y]


@register_converter("Softmax")
def _softmax(g, layer, xs, bshapes, tops):
    axis = _canonical(layer.axis_param, len(bshapes[0]), g, "softmax_param.axis")
    return [g.node("Softmax", [xs[0]], tops[0], axis=axis)]


@register_converter("Reduction")
def _reduction(g, layer, xs, bshapes, tops):
    R = caffe_pb2.ReductionParameter
    shape = bshapes[0]
    axis = _canonical(layer.axis_param, len(shape), g, "reduction_param.axis")
    x = g.node("Reshape", [xs[0], g.ints([0] * axis + [-1])])
    if layer.op == R.ASUM:
        x = g.node("Abs", [x])
    elif layer.op == R.SUMSQ:
        x = g.node("Mul", [x, x])
    coeff = layer.coeff
    if layer.op == R.MEAN:
        coeff /= max(math.prod(shape[axis:]), 1)
    y = g.reduce("ReduceSum", x, [axis], keepdims=0, out=None if coeff != 1 else tops[0])
    if coeff != 1:
        y = g.node("Mul", [y, g.scalar(coeff, "coeff")], tops[0])
    return [y]


@register_converter("ArgMax")
def _argmax(g, layer, xs, bshapes, tops):
    if layer.top_k != 1:
        raise g.error(f"argmax_param.top_k {layer.top_k}: only top_k 1 can be exported (ties order)")
    shape = bshapes[0]
    x = xs[0]
    if layer.has_axis:
        axis = _canonical(layer.axis_param, len(shape), g, "argmax_param.axis")
        if layer.out_max_val:
            return [g.reduce("ReduceMax", x, [axis], keepdims=1, out=tops[0])]
        idx = g.node("ArgMax", [x], axis=axis, keepdims=1, select_last_index=1)
        return [g.node("Cast", [idx], tops[0], to=TensorProto.FLOAT)]
    flat = g.node("Flatten", [x], axis=1)
    idx = g.node("Cast", [g.node("ArgMax", [flat], axis=1, keepdims=1, select_last_index=1)], to=TensorProto.FLOAT)
    rank = max(len(shape), 3)
    if layer.out_max_val:
        val = g.reduce("ReduceMax", flat, [1], keepdims=1)
        idx = g.node("Concat", [idx, val], axis=1)
        target = [0, 2] + [1] * (rank - 2)
    else:
        target = [0, 1] + [1] * (rank - 2)
    return [g.node("Reshape", [idx, g.ints(target)], tops[0])]


@register_converter("MVN")
def _mvn(g, layer, xs, bshapes, tops):
    shape = bshapes[0]
    x = xs[0]
    lead = [0] if layer.across_channels or len(shape) < 2 else [0, 0]
    x2 = g.node("Reshape", [x, g.ints(lead + [-1])])
    ax = len(lead)
    d = g.node("Sub", [x2, g.reduce("ReduceMean", x2, [ax], keepdims=1)])
    if layer.normalize_variance:
        var = g.reduce("ReduceMean", g.node("Mul", [d, d]), [ax], keepdims=1)
        sd = g.node("Add", [g.node("Sqrt", [var]), g.scalar(layer.eps, "eps")])
        d = g.node("Div", [d, sd])
    return [g.node("Reshape", [d, g.node("Shape", [x])], tops[0])]


@register_converter("Embed")
def _embed(g, layer, xs, bshapes, tops):
    idx = g.node("Cast", [xs[0]], to=TensorProto.INT64)
    y = g.node("Gather", [g.param(layer.blobs[0], "weight"), idx], None if layer.bias_term else tops[0], axis=0)
    if layer.bias_term:
        y = g.node("Add", [y, g.param(layer.blobs[1], "bias")], tops[0])
    return [y]


@register_converter("Parameter")
def _parameter(g, layer, xs, bshapes, tops):
    return [g.node("Identity", [g.param(layer.blobs[0], "value")], tops[0])]


@register_converter("DummyData")
def _dummy_data(g, layer, xs, bshapes, tops):
    outs = []
    for shape, fp, top in zip(layer.shapes, layer.fillers, tops):
        if fp.type != "constant":
            raise g.error(f"a {fp.type!r} data_filler draws new values each forward; only constant fillers export")
        outs.append(g.node("Identity", [g.const(np.full(shape, fp.value), "value")], top))
    return outs


# ---------------------------------------------------------------------------------------------
# converters: neurons


@register_converter("ReLU")
def _relu(g, layer, xs, bshapes, tops):
    if layer.negative_slope == 0:
        return [g.node("Relu", xs, tops[0])]
    return [g.node("LeakyRelu", xs, tops[0], alpha=layer.negative_slope)]


@register_converter("PReLU")
def _prelu(g, layer, xs, bshapes, tops):
    a = layer.blobs[0]
    shape = (1,) if layer.channel_shared else (a.shape[0],) + (1,) * (len(bshapes[0]) - 2)
    return [g.node("PRelu", [xs[0], g.param(a, "slope", shape)], tops[0])]


def _simple(op: str, **attrs_of):
    def conv(g, layer, xs, bshapes, tops):
        return [g.node(op, xs, tops[0], **{k: f(layer) for k, f in attrs_of.items()})]

    return conv


register_converter("Sigmoid")(_simple("Sigmoid"))
register_converter("TanH")(_simple("Tanh"))
register_converter("AbsVal")(_simple("Abs"))
register_converter("BNLL")(_simple("Softplus"))
register_converter("ELU")(_simple("Elu", alpha=lambda layer: layer.alpha))


@register_converter("Power")
def _power(g, layer, xs, bshapes, tops):
    x = xs[0]
    if layer.power * layer.scale == 0:
        value = 1.0 if layer.power == 0 else float(np.float32(layer.shift) ** np.float32(layer.power))
        return [
            g.node(
                "ConstantOfShape",
                [g.node("Shape", [x])],
                tops[0],
                value=numpy_helper.from_array(np.asarray([value], np.float32)),
            )
        ]
    steps = []
    if layer.scale != 1:
        steps.append(("Mul", layer.scale))
    if layer.shift != 0:
        steps.append(("Add", layer.shift))
    if layer.power != 1:
        steps.append(("Pow", layer.power))
    if not steps:
        return [g.node("Identity", [x], tops[0])]
    for i, (op, v) in enumerate(steps):
        x = g.node(op, [x, g.scalar(v, op.lower())], tops[0] if i == len(steps) - 1 else None)
    return [x]


@register_converter("Exp")
def _exp(g, layer, xs, bshapes, tops):
    x = xs[0]
    if layer.inner_scale != 1:
        x = g.node("Mul", [x, g.scalar(layer.inner_scale, "scale")])
    if layer.outer_scale == 1:
        return [g.node("Exp", [x], tops[0])]
    return [g.node("Mul", [g.node("Exp", [x]), g.scalar(layer.outer_scale, "outer")], tops[0])]


@register_converter("Log")
def _log(g, layer, xs, bshapes, tops):
    x = xs[0]
    if layer.scale != 1:
        x = g.node("Mul", [x, g.scalar(layer.scale, "scale")])
    if layer.shift != 0:
        x = g.node("Add", [x, g.scalar(layer.shift, "shift")])
    if layer.base_scale == 1:
        return [g.node("Log", [x], tops[0])]
    return [g.node("Mul", [g.node("Log", [x]), g.scalar(layer.base_scale, "base")], tops[0])]


@register_converter("Threshold")
def _threshold(g, layer, xs, bshapes, tops):
    above = g.node("Greater", [xs[0], g.scalar(layer.threshold, "threshold")])
    return [g.node("Cast", [above], tops[0], to=TensorProto.FLOAT)]


@register_converter("Clip")
def _clip(g, layer, xs, bshapes, tops):
    return [g.node("Clip", [xs[0], g.scalar(layer.min, "min"), g.scalar(layer.max, "max")], tops[0])]


@register_converter("Swish")
def _swish(g, layer, xs, bshapes, tops):
    x = xs[0]
    bx = x if layer.beta == 1 else g.node("Mul", [x, g.scalar(layer.beta, "beta")])
    return [g.node("Mul", [x, g.node("Sigmoid", [bx])], tops[0])]


# ---------------------------------------------------------------------------------------------
# the export


def _value_info(name: str, shape, dynamic: bool, batch: int | None):
    if shape is None:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    dims: list = list(shape)
    if dynamic and dims and batch is not None and dims[0] == batch:
        dims[0] = "N"
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def export_onnx(
    net,
    path: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    check: bool = True,
) -> onnx.ModelProto:
    """Convert ``net`` (a TEST-phase ``Net``) to an ONNX model; write it to ``path`` when given.

    Inputs are the net's ``Input`` tops with their current shapes (``dynamic_batch``: axis 0 is
    the symbolic dimension ``N``), outputs are ``net.outputs``, weights are initializers taken
    from the layers' blobs. ``check`` runs ``onnx.checker.check_model`` (full check).
    Raises ``OnnxExportError`` naming the first layer that cannot be exported.
    """
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise OnnxExportError(f"opset {opset} is not supported: use {MIN_OPSET} to {max_opset}")
    g = _Graph(opset, dynamic_batch)
    names = list(net._layer_names)
    tops_of = [list(net.top_names[n]) for n in names]
    bottoms_of = [list(net.bottom_names[n]) for n in names]
    last_writer: dict[str, int] = {}
    for li, ts in enumerate(tops_of):
        for t in ts:
            last_writer[t] = li
    inputs = list(net.inputs)
    g.used.update(inputs)
    for b in last_writer:
        g.used.add(b)
    current: dict[str, str] = {b: b for b in inputs}
    shapes: dict[str, tuple[int, ...]] = {b: tuple(net.blobs[b].shape) for b in inputs}
    batch = shapes[inputs[0]][0] if inputs and shapes[inputs[0]] else None

    for li, (lname, layer) in enumerate(zip(names, net.modules_by_name.values())):
        if layer.is_net_input:
            continue
        g.layer_name, g.layer_type = lname, layer.type
        conv = ONNX_CONVERTERS.get(layer.type)
        if conv is None and layer.type in ONNX_REFUSED:
            raise g.error(ONNX_REFUSED[layer.type])
        if conv is None:
            raise OnnxExportError(
                f"layer {lname!r} of type {layer.type!r} cannot be exported to ONNX: no converter for "
                f"{layer.type!r} (exportable types: {', '.join(exportable_types())})"
            )
        bnames = bottoms_of[li]
        bshapes = [shapes[b] for b in bnames]
        xs = [current[b] for b in bnames]
        wanted = []
        for t in tops_of[li]:
            if last_writer[t] == li and t not in inputs:
                wanted.append(t)
            else:
                wanted.append(g.fresh(f"{t}/{lname}"))
        try:
            outs = conv(g, layer, xs, bshapes, wanted)
            tshapes = layer.top_shapes(bshapes)
        except OnnxExportError:
            raise
        except CaffeError as e:
            raise g.error(str(e)) from e
        if len(outs) != len(wanted):
            raise g.error(f"converter produced {len(outs)} values for {len(wanted)} tops")
        for t, v, shp in zip(tops_of[li], outs, tshapes):
            current[t] = v
            shapes[t] = tuple(shp)

    out_infos = []
    for o in net.outputs:
        v = current[o]
        if v != o and o not in inputs:
            g.nodes.append(helper.make_node("Identity", [v], [o], name=g.fresh(f"{o}/output")))
            current[o] = v = o
        out_infos.append(_value_info(v, shapes[o], dynamic_batch, batch))
    in_infos = [_value_info(b, shapes[b], dynamic_batch, batch) for b in inputs]
    graph = helper.make_graph(g.nodes, net.name or "caffe_net", in_infos, out_infos, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="caffe_compat",
        producer_version=_version(),
    )
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    # the Caffe blob each ONNX value holds, for locate_divergence
    for b, v in current.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"caffe_blob:{b}", v
    if check:
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def _version() -> str:
    from caffe_compat import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# checking against onnxruntime


@dataclasses.dataclass
class OutputDiff:
    """How one output (or blob) of the ONNX model differs from the net's."""

    name: str
    max_abs_diff: float
    scale: float  #: max |value| of the net's output

    @property
    def relative(self) -> float:
        return relative_error(self.max_abs_diff, self.scale)


def relative_error(max_abs_diff: float, scale: float) -> float:
    """``max|a − b| / max|b|``; the absolute difference when the reference is all zeros."""
    return max_abs_diff / scale if scale > 0 else max_abs_diff


def randomize_params(net, seed: int = 0) -> None:
    """Fill every parameter blob with seeded random values of a sensible scale (to test exports).

    Weights (2 or more axes) ~ N(0, 1/fan_in) with fan_in = count/shape[0]; Scale's gamma and
    1-D blobs ~ 1 + 0.1·N or 0.1·N; BatchNorm: mean ~ N(0, 1), variance ~ U(0.5, 1.5), both
    times the scale factor s = 2 (so mean = blob0/s, var = blob1/s as Caffe reads them).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for layer in net.modules_by_name.values():
            for k, p in enumerate(layer.blobs):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                r = torch.randn(p.shape, generator=gen)
                if layer.type == "BatchNorm":
                    v = [r * 2.0, (torch.rand(p.shape, generator=gen) + 0.5) * 2.0, torch.full(p.shape, 2.0)][k]
                elif p.dim() >= 2:
                    v = r / math.sqrt(max(1, p.numel() // p.shape[0]))
                elif layer.type == "Scale" and k == 0 and layer.learned_scale:
                    v = 1.0 + 0.1 * r
                elif layer.type == "PReLU":
                    v = 0.25 + 0.1 * r
                else:
                    v = 0.1 * r
                p.copy_(v.to(p.dtype))


def random_inputs(net, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded standard-normal arrays for the net's inputs (axis 0 set to ``batch`` when given)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in net.inputs:
        shape = list(net.blobs[b].shape)
        if batch is not None and shape:
            shape[0] = batch
        out[b] = rng.standard_normal(shape).astype(np.float32)
    return out


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike, inputs: Mapping[str, np.ndarray], outputs=None):
    """Run ``model`` on CPU with onnxruntime; returns ``{value name: array}`` for ``outputs``
    (default: the graph's outputs; inner values are added as graph outputs as needed)."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    declared = {o.name for o in model.graph.output}
    if outputs and any(o not in declared for o in outputs):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for o in dict.fromkeys(outputs):
            if o not in declared:
                probe.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
        model = probe
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = list(outputs or [o.name for o in sess.get_outputs()])
    feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feed)))


def _run_net(net, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    for b, arr in inputs.items():
        if tuple(net.blobs[b].shape) != arr.shape:
            net.blobs[b].reshape(*arr.shape)
    if any(tuple(net.blobs[b].shape) != inputs[b].shape for b in inputs):
        raise OnnxExportError("could not reshape the net's inputs")
    net.reshape()
    with torch.no_grad():
        outs = net.run(**{b: torch.from_numpy(np.ascontiguousarray(a)) for b, a in inputs.items()})
    return {k: v.detach().cpu().numpy() for k, v in outs.items()}


def _diff(name: str, ours: np.ndarray, theirs: np.ndarray) -> OutputDiff:
    if ours.shape != theirs.shape:
        return OutputDiff(name, math.inf, float(np.abs(ours).max()) if ours.size else 0.0)
    if not ours.size:
        return OutputDiff(name, 0.0, 0.0)
    d = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    return OutputDiff(name, float(np.nan_to_num(d, nan=math.inf).max()), float(np.abs(ours).max()))


def check_onnx(
    net, model: onnx.ModelProto | str | os.PathLike, inputs: Mapping[str, np.ndarray] | None = None, *, seed: int = 0
) -> list[OutputDiff]:
    """Run the net and the ONNX model in onnxruntime on the same inputs (seeded random ones by
    default); return one ``OutputDiff`` per net output (infinite when the shapes differ)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    if inputs is None:
        inputs = random_inputs(net, seed)
    ours = _run_net(net, inputs)
    blob_value = _blob_values(model)
    names = [blob_value.get(o, o) for o in net.outputs]
    theirs = run_onnxruntime(model, inputs, names)
    return [_diff(o, ours[o], theirs[v]) for o, v in zip(net.outputs, names)]


def _blob_values(model: onnx.ModelProto) -> dict[str, str]:
    """Caffe blob name -> the ONNX value holding its final value (recorded by ``export_onnx``)."""
    key = "caffe_blob:"
    return {e.key[len(key) :]: e.value for e in model.metadata_props if e.key.startswith(key)}


def locate_divergence(
    net, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray] | None = None, *, seed: int = 0, tol: float = 1e-4
) -> tuple[str, str, OutputDiff] | None:
    """The first layer (in net order) whose top differs in ONNX by more than ``tol`` (relative):
    ``(layer name, blob, diff)``, or None when every blob agrees."""
    if inputs is None:
        inputs = random_inputs(net, seed)
    blob_value = _blob_values(model)
    inputs_set = {i.name for i in model.graph.input}
    wanted = [v for v in dict.fromkeys(blob_value.values()) if v not in inputs_set]
    _run_net(net, inputs)
    theirs = run_onnxruntime(model, inputs, wanted)
    last_writer = {t: lname for lname in net._layer_names for t in net.top_names[lname]}
    for lname in net._layer_names:
        for t in net.top_names[lname]:
            v = blob_value.get(t)
            if last_writer[t] != lname:
                continue
            if v is None or v not in theirs:
                continue
            d = _diff(t, net.blobs[t].data, theirs[v])
            if not d.relative <= tol:
                return lname, t, d
    return None
