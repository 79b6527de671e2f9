"""ONNX converters for the inference layers of SSD's fork (weiliu89/caffe ssd@4817bf8b), registered
in ``caffe_compat.export.onnx``'s table as the BVLC layers' converters are.

- **Normalize** → ``Mul``/``ReduceSum``/``Add`` eps/``Sqrt``/``Div``, then ``Mul`` by the scale
  blob (one value, or one per channel broadcast from axis 1): SSD's forward.
- **Permute** → ``Transpose`` with the layer's full order (no node for the identity order).
- **PriorBox** → a constant initializer: its top depends only on the bottoms' shapes, which are
  fixed when the graph is written (``dynamic_batch`` changes only the batch axis, which the priors
  do not depend on).
- **DetectionOutput** is refused by name: per-class NMS and keep_top_k give a data-dependent
  number of rows in SSD's order, which ONNX's ``NonMaxSuppression`` does not reproduce (no eta,
  no per-image keep_top_k across classes, other output layout). Export the net up to its
  bottoms (``mbox_loc``, ``mbox_conf_flatten``, ``mbox_priorbox``) and run the layer on them.
"""

from __future__ import annotations

import numpy as np

from caffe_compat.export.onnx import refuse_export, register_converter

__all__: list[str] = []


@register_converter("Normalize")
def _normalize(g, layer, xs, bshapes, tops):
    x = xs[0]
    ndim = len(bshapes[0])
    axes = list(range(1, ndim)) if layer.across_spatial else [1]
    sq = g.reduce("ReduceSum", g.node("Mul", [x, x]), axes, keepdims=1)
    norm = g.node("Sqrt", [g.node("Add", [sq, g.scalar(layer.eps, "eps")])])
    unit = g.node("Div", [x, norm])
    scale = layer.blobs[0]
    if layer.channel_shared:
        s = g.param(scale, "scale", shape=())
    else:
        s = g.param(scale, "scale", shape=(1, int(scale.numel())) + (1,) * (ndim - 2))
    return [g.node("Mul", [unit, s], tops[0])]


@register_converter("Permute")
def _permute(g, layer, xs, bshapes, tops):
    if not layer.need_permute:
        return [xs[0]]
    return [g.node("Transpose", [xs[0]], tops[0], perm=list(layer.order))]


@register_converter("PriorBox")
def _prior_box(g, layer, xs, bshapes, tops):
    priors = layer.priors(bshapes[0], bshapes[1])
    name = g.const(np.asarray(priors, np.float32), "priors")
    return [g.node("Identity", [name], tops[0])]


refuse_export(
    "DetectionOutput",
    "its per-class NMS and keep_top_k give a data-dependent number of rows, in SSD's order, that "
    "ONNX's NonMaxSuppression does not reproduce; export the net up to its bottoms (e.g. mbox_loc, "
    "mbox_conf_flatten, mbox_priorbox: remove the layer) and run DetectionOutput on the outputs",
)
