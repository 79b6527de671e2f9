"""``Layer.flops``, declared by each layer class (issue 21), gives the numbers the summary's former
table keyed by type string gave.

The reference below is that table's formulas, written out once here (not its results): for
representative nets covering every type whose class overrides ``flops``, each layer's FLOPs
must equal it. The one deliberate difference: the forks' depthwise convolutions
(``ConvolutionDepthwise``, ``DepthwiseConvolution``) count as Convolution (the table counted
them one FLOP per top value, as an unknown type).
"""

from __future__ import annotations

import math

import pytest

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat import summary
from caffe_compat.layers.base import LAYER_REGISTRY, Layer
from caffe_compat.proto import caffe_pb2

# the former summary._NEURONS and _FREE, and the copies the table counted as 0
_OLD_NEURONS = {
    "ReLU", "PReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold",
    "Clip", "Swish", "Bias",
}  # fmt: skip
_OLD_FREE = {
    "Input", "Split", "Concat", "Slice", "Reshape", "Flatten", "Crop", "Silence", "Parameter",
    "DummyData", "Tile",
}  # fmt: skip
_OLD_COPIES = {"Im2col", "Filter", "BatchReindex"}
_DEPTHWISE = {"ConvolutionDepthwise", "DepthwiseConvolution"}


def _count(shape) -> int:
    return math.prod(shape)


def _old_table(layer, bshapes, tshapes) -> int:
    """The former ``summary._flops``, formula by formula."""
    t = layer.type
    top = sum(_count(s) for s in tshapes)
    bottom = _count(bshapes[0]) if bshapes else 0
    if t == "Convolution" or t in _DEPTHWISE:  # the depthwise ones: the deliberate difference
        return 2 * top * (layer.channels // layer.group) * math.prod(layer.kernel)
    if t == "Deconvolution":
        return 2 * sum(_count(s) for s in bshapes) * (layer.num_output // layer.group) * math.prod(layer.kernel)
    if t == "InnerProduct":
        return 2 * (bottom // layer.K) * layer.K * layer.num_output
    if t == "Pooling":
        return bottom if layer.global_pooling else _count(tshapes[0]) * math.prod(layer.kernel)
    if t == "LRN":
        if layer.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            return bottom * (layer.size + 3)
        return bottom * (layer.size * layer.size + 3)
    if t == "BatchNorm":
        return 2 * bottom
    if t == "Scale":
        return top * (2 if layer.bias_term else 1)
    if t == "Eltwise":
        return (len(bshapes) - 1 + sum(1 for c in layer.coeff if c != 1)) * top
    if t in ("LSTM", "RNN"):
        T, n, H = bshapes[0][0], bshapes[0][1], layer.num_output
        G = layer.blobs[0].shape[0]
        per_row = 2 * layer.K * G + 2 * H * G + (10 * H if t == "LSTM" else H + 2 * H * H + H)
        return T * n * per_row + (2 * layer.K_static * G * n if layer.static_input else 0)
    if t == "LSTMUnit":
        return 10 * _count(tshapes[0])
    if t == "SPP":
        return len(layer.levels_for(tuple(bshapes[0]))) * bottom
    if t in _OLD_COPIES:
        return 0
    if t == "Softmax":
        return 3 * top
    if t == "Dropout":
        return top if layer.train_phase else 0
    if t in _OLD_NEURONS:
        return top
    if t in _OLD_FREE:
        return 0
    return top


VISION = """
name: "flops_vision"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "gconv" type: "Convolution" bottom: "conv" top: "gconv"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 group: 2 dilation: 1 } }
layer { name: "deconv" type: "Deconvolution" bottom: "gconv" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "conv" top: "dw"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "dw2" type: "DepthwiseConvolution" bottom: "conv" top: "dw2"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 6 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "gpool" type: "Pooling" bottom: "conv" top: "gpool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "spp" type: "SPP" bottom: "conv" top: "spp" spp_param { pyramid_height: 2 } }
layer { name: "lrn" type: "LRN" bottom: "conv" top: "lrn" lrn_param { local_size: 5 } }
layer { name: "lrnw" type: "LRN" bottom: "conv" top: "lrnw" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" }
layer { name: "scale" type: "Scale" bottom: "bn" top: "scale" scale_param { bias_term: true } }
layer { name: "scale2" type: "Scale" bottom: "bn" top: "scale2" }
layer { name: "sum" type: "Eltwise" bottom: "scale" bottom: "scale2" bottom: "bn" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: -1 coeff: 0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "scale" bottom: "scale2" top: "prod" eltwise_param { operation: PROD } }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "relu" }
layer { name: "prelu" type: "PReLU" bottom: "sum" top: "prelu" }
layer { name: "sig" type: "Sigmoid" bottom: "sum" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "sum" top: "tanh" }
layer { name: "elu" type: "ELU" bottom: "sum" top: "elu" }
layer { name: "abs" type: "AbsVal" bottom: "sum" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "sum" top: "bnll" }
layer { name: "pow" type: "Power" bottom: "abs" top: "pow" }
layer { name: "exp" type: "Exp" bottom: "sum" top: "exp" }
layer { name: "log" type: "Log" bottom: "exp" top: "log" }
layer { name: "thr" type: "Threshold" bottom: "sum" top: "thr" }
layer { name: "clip" type: "Clip" bottom: "sum" top: "clip" clip_param { min: -1 max: 1 } }
layer { name: "swish" type: "Swish" bottom: "sum" top: "swish" }
layer { name: "bias" type: "Bias" bottom: "sum" top: "bias" }
layer { name: "relu6" type: "ReLU6" bottom: "sum" top: "relu6" }
layer { name: "mvn" type: "MVN" bottom: "sum" top: "mvn" }
layer { name: "drop" type: "Dropout" bottom: "relu" top: "drop" }
layer { name: "im2col" type: "Im2col" bottom: "conv" top: "im2col" convolution_param { kernel_size: 3 } }
layer { name: "concat" type: "Concat" bottom: "relu" bottom: "sig" top: "concat" }
layer { name: "slice" type: "Slice" bottom: "concat" top: "s1" top: "s2" }
layer { name: "crop" type: "Crop" bottom: "relu" bottom: "pool" top: "crop" }
layer { name: "tile" type: "Tile" bottom: "pool" top: "tile" tile_param { tiles: 2 } }
layer { name: "flat" type: "Flatten" bottom: "tanh" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "elu" top: "reshape" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "drop" top: "ip" inner_product_param { num_output: 7 } }
layer { name: "softmax" type: "Softmax" bottom: "ip" top: "softmax" }
layer { name: "argmax" type: "ArgMax" bottom: "softmax" top: "argmax" }
layer { name: "reduce" type: "Reduction" bottom: "ip" top: "reduce" }
layer { name: "silence" type: "Silence" bottom: "s1" bottom: "s2" }
layer { name: "dummy" type: "DummyData" top: "dummy" dummy_data_param { shape { dim: 2 dim: 3 } } }
layer { name: "param" type: "Parameter" top: "param" parameter_param { shape { dim: 3 dim: 2 } } }
"""

RECURRENT = """
name: "flops_recurrent"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 2 dim: 4 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 3 dim: 2 } } }
layer { name: "static" type: "Input" top: "static" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "lstm" recurrent_param { num_output: 5 } }
layer { name: "lstms" type: "LSTM" bottom: "x" bottom: "cont" bottom: "static" top: "lstms"
  recurrent_param { num_output: 3 } }
layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "rnn" recurrent_param { num_output: 6 } }
layer { name: "c0" type: "Input" top: "c0" input_param { shape { dim: 1 dim: 2 dim: 5 } } }
layer { name: "gates" type: "Input" top: "gates" input_param { shape { dim: 1 dim: 2 dim: 20 } } }
layer { name: "cont1" type: "Input" top: "cont1" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "unit" type: "LSTMUnit" bottom: "c0" bottom: "gates" bottom: "cont1" top: "c1" top: "h1" }
"""


def _net(text: str, phase: int) -> caffe.Net:
    return caffe.Net(cio.read_net_text(text, "<flops net>"), phase)


@pytest.fixture(scope="module")
def nets():
    return [_net(VISION, caffe.TRAIN), _net(VISION, caffe.TEST), _net(RECURRENT, caffe.TEST)]


def _rows_and_layers(net):
    rows = summary.summarize(net, splits=True)
    layers = dict(zip(net._layer_names, net.modules_by_name.values()))
    return [(r, layers[r.name]) for r in rows]


def test_flops_equal_the_former_table(nets):
    checked = 0
    for net in nets:
        for row, layer in _rows_and_layers(net):
            bshapes = [tuple(net.blobs[b].shape) for b in row.bottoms]
            want = _old_table(layer, bshapes, row.top_shapes)
            assert row.flops == want, f"layer {row.name!r} ({row.type}): {row.flops} FLOPs, the table gave {want}"
            checked += 1
    assert checked > 100


def test_the_nets_are_not_trivial(nets):
    # the reference must be exercised where it differs from "one per top value"
    by_name = {r.name: r for net in nets[:1] for r, _ in _rows_and_layers(net)}
    assert by_name["conv"].flops == 2 * (2 * 6 * 12 * 12) * 4 * 9
    assert by_name["drop"].flops == 2 * 6 * 12 * 12  # TRAIN
    test_rows = {r.name: r for r, _ in _rows_and_layers(nets[1])}
    assert test_rows["drop"].flops == 0  # TEST: a copy
    assert test_rows["concat"].flops == 0 and test_rows["relu"].flops == 2 * 6 * 12 * 12


def test_every_registered_type_is_covered(nets):
    """A type whose class overrides ``flops`` is in the nets above; a type with the default counts
    one FLOP per top value, or 0 exactly where the table counted 0 (``moves_data_only``)."""
    exercised = {layer.type for net in nets for _, layer in _rows_and_layers(net)}
    for t, cls in sorted(LAYER_REGISTRY.items()):
        if cls.flops is not Layer.flops:
            assert t in exercised, f"{t}: its class overrides flops; add a layer of it to the nets above"
        else:
            assert cls.moves_data_only == (t in _OLD_FREE | _OLD_COPIES), t
            assert t not in _OLD_NEURONS or not cls.moves_data_only, t
