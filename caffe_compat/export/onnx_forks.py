"""ONNX converters for the layers of Caffe's forks (``caffe_compat.layers.forks`` / ``detection``).

- **ReLU6** → ``Clip(0, 6)``.
- **Interp** → ``Slice`` (the crop of a negative ``pad_beg``/``pad_end``) + ``Resize`` with
  ``coordinate_transformation_mode = align_corners`` (the fork's ``(in − 1)/(out − 1)`` ratio):
  ``linear`` for bilinear, ``nearest`` with ``round_prefer_ceil`` (``floor(x + 0.5)``) for
  nearest_neighbor; an output as large as the (cropped) input is the crop itself.
- **Upsample**, nearest form → ``Resize`` ``nearest``/``asymmetric``/``floor`` by the integer
  scale (an exact repetition). SegNet's mask form (an unpooling by indices) is refused.
- **ShuffleChannel** → ``Reshape`` + ``Transpose`` + ``Reshape``.
- **ConvolutionDepthwise** / **DepthwiseConvolution** → ``Conv`` with ``group = channels`` (the
  Convolution converter).
- **Axpy** → ``Mul`` + ``Add``. **BN** (INFERENCE mode) → ``Mul`` + ``Add``; LEARN mode (batch
  statistics at test time) is refused.
- **Proposal**, **ROIPooling**, **PSROIPooling** are refused by name: their outputs depend on
  the data (NMS, per-roi windows with Caffe's rounding) in ways ONNX's ``RoiAlign``/``NonMaxSuppression``
  do not reproduce.
"""

from __future__ import annotations

from caffe_compat.export.onnx import _convolution, register_converter

__all__: list[str] = []

register_converter("ConvolutionDepthwise", "DepthwiseConvolution")(_convolution)


@register_converter("ReLU6")
def _relu6(g, layer, xs, bshapes, tops):
    return [g.node("Clip", [xs[0], g.scalar(0.0, "zero"), g.scalar(6.0, "six")], tops[0])]


def _sizes_nchw(g, x: str, h: int, w: int) -> str:
    """``[N, C, h, w]`` as an int64 tensor, N and C read from ``x`` (a dynamic batch works)."""
    nc = g.slice(g.node("Shape", [x]), [0], [2], [0])
    return g.node("Concat", [nc, g.ints([h, w])], axis=0)


@register_converter("Interp")
def _interp(g, layer, xs, bshapes, tops):
    h_eff, w_eff, h_out, w_out = layer.out_size(bshapes)
    x = xs[0]
    b0 = -layer.p.pad_beg
    if (h_eff, w_eff) != tuple(bshapes[0][2:]):
        x = g.slice(x, [b0, b0], [b0 + h_eff, b0 + w_eff], [2, 3])
    if (h_eff, w_eff) == (h_out, w_out):
        return [g.node("Identity", [x], tops[0])]
    attrs = {"coordinate_transformation_mode": "align_corners"}
    if layer.nearest:
        attrs.update(mode="nearest", nearest_mode="round_prefer_ceil")
    else:
        attrs.update(mode="linear")
    return [g.node("Resize", [x, "", "", _sizes_nchw(g, x, h_out, w_out)], tops[0], **attrs)]


@register_converter("Upsample")
def _upsample(g, layer, xs, bshapes, tops):
    if layer.mask_form:
        raise g.error(
            "SegNet's mask form of Upsample (unpooling to the indices of a pooling mask) has no ONNX "
            "converter here; only the one-bottom nearest form exports"
        )
    s = float(layer.scale)
    return [
        g.node(
            "Resize",
            [xs[0], "", g.const([1.0, 1.0, s, s], "scales")],
            tops[0],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
    ]


@register_converter("ShuffleChannel")
def _shuffle_channel(g, layer, xs, bshapes, tops):
    shape = bshapes[0]
    c = shape[1]
    rest = 1
    for d in shape[2:]:
        rest *= d
    grouped = g.node("Reshape", [xs[0], g.ints([0, layer.group, c // layer.group, rest])])
    swapped = g.node("Transpose", [grouped], perm=[0, 2, 1, 3])
    return [g.node("Reshape", [swapped, g.ints([0, c, *shape[2:]])], tops[0])]


@register_converter("Axpy")
def _axpy(g, layer, xs, bshapes, tops):
    a = g.node("Reshape", [xs[0], g.ints([0, *layer.a_shape[1:]])])
    return [g.node("Add", [g.node("Mul", [a, xs[1]]), xs[2]], tops[0])]


@register_converter("BN")
def _bn(g, layer, xs, bshapes, tops):
    if layer.learn:
        raise g.error(
            "bn_mode LEARN normalizes by the batch's statistics at test time too; export the INFERENCE "
            "net (SegNet's compute_bn_statistics.py folds the statistics into scale and shift)"
        )
    y = g.node("Mul", [xs[0], g.param(layer.blobs[0], "scale")])
    return [g.node("Add", [y, g.param(layer.blobs[1], "shift")], tops[0])]


def _refuse(reason: str):
    def conv(g, layer, xs, bshapes, tops):
        raise g.error(reason)

    return conv


register_converter("Proposal")(
    _refuse("Faster R-CNN's Proposal (anchors, NMS, a data-dependent number of rois) has no ONNX converter")
)
register_converter("ROIPooling")(
    _refuse("ROIPooling (Caffe's rounded roi windows, max per bin) has no ONNX equivalent (RoiAlign/MaxRoiPool differ)")
)
register_converter("PSROIPooling")(
    _refuse("R-FCN's PSROIPooling (position-sensitive average per bin) has no ONNX equivalent")
)
