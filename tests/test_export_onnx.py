"""ONNX export: every layer converter, the shipped and reference deploy nets, and the tool.

Each exported graph is run in onnxruntime on seeded random inputs (with seeded random weights)
and every blob of the net is compared with the ONNX value that holds it (``locate_divergence``),
not only the outputs: a converter that is wrong in a way later layers hide still fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.export import onnx as ox
from tests.conftest import CAFFE_REF

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def _net(text: str, phase=caffe.TEST):
    return caffe.Net(cio.read_net_text(text, "<test net>"), phase)


def _assert_exports(net, *, opset=ox.DEFAULT_OPSET, seed=0, inputs=None, dynamic_batch=False, outputs_too=True):
    """Export, check the model (onnx.checker below 20M parameters: it serializes the model),
    compare every blob with onnxruntime, and the outputs through ``check_onnx``."""
    n_params = sum(p.count for layer in net.layers for p in layer.blobs)
    model = ox.export_onnx(net, opset=opset, dynamic_batch=dynamic_batch, check=n_params < 20_000_000)
    assert [o.name for o in model.graph.output] == list(net.outputs)
    if inputs is None:
        inputs = ox.random_inputs(net, seed)
    where = ox.locate_divergence(net, model, inputs, tol=TOL)
    assert where is None, f"first differing layer/top/diff: {where}"
    if outputs_too:
        diffs = ox.check_onnx(net, model, inputs)
        assert [d.name for d in diffs] == list(net.outputs)
        for d in diffs:
            assert d.relative <= TOL, d
    return model


def _input(name="data", shape=(2, 4, 9, 8)):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def _one_layer(body: str, shape=(2, 4, 9, 8), extra_inputs: str = "") -> str:
    return _input("data", shape) + extra_inputs + body


# ---------------------------------------------------------------------------------------------
# Pooling: Caffe's output-size rule, every path of the converter


POOL_CASES = [
    # (pool, kernel_size or (kh, kw), stride or (sh, sw), pad or (ph, pw), H, W, round_mode)
    ("MAX", 3, 2, 0, 112, 112, "CEIL"),  # ResNet pool1: right pad 1 on a ceil window
    ("MAX", 3, 2, 1, 8, 8, "CEIL"),  # right pad 2 > left pad 1
    ("MAX", 1, 3, 0, 5, 7, "CEIL"),  # k < s: the last window starts past the image (-FLT_MAX)
    ("MAX", 2, 2, 1, 5, 5, "CEIL"),  # Caffe drops the window starting in the right padding
    ("MAX", 2, 2, 1, 7, 6, "FLOOR"),
    ("MAX", 3, 2, 0, 13, 13, "CEIL"),  # AlexNet pool5
    ("AVE", 3, 2, 0, 16, 16, "CEIL"),  # cifar10_quick pool2: overhang, no padding
    ("AVE", 3, 2, 1, 8, 8, "CEIL"),  # overhang past H + pad: Caffe's divisor by Mul
    ("AVE", 3, 2, 1, 7, 9, "CEIL"),  # right pad <= left pad: count_include_pad
    ("AVE", 2, 2, 1, 5, 5, "CEIL"),
    ("AVE", 3, 3, 1, 10, 11, "FLOOR"),
    ("AVE", (3, 2), (2, 1), (1, 0), 9, 6, "CEIL"),
    ("MAX", (3, 2), (2, 1), (1, 0), 9, 6, "CEIL"),
    ("AVE", 7, 1, 0, 7, 7, "CEIL"),  # ResNet pool5
]


def _pool_param(pool, k, s, p, mode):
    def pair(name, v):
        if isinstance(v, tuple):
            return f"{name}_h: {v[0]} {name}_w: {v[1]}"
        return f"{name}: {v}" if v else ""

    kname = "kernel"
    kp = f"kernel_h: {k[0]} kernel_w: {k[1]}" if isinstance(k, tuple) else f"{kname}_size: {k}"
    return f"pool: {pool} {kp} {pair('stride', s)} {pair('pad', p)} round_mode: {mode}"


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(str(v) for v in c).replace(" ", ""))
def test_pooling_exports_caffe_shapes_and_values(case):
    pool, k, s, p, H, W, mode = case
    net = _net(
        _one_layer(
            f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
            f"pooling_param {{ {_pool_param(pool, k, s, p, mode)} }} }}",
            (2, 3, H, W),
        )
    )
    model = _assert_exports(net, seed=3)
    # the graph's declared output shape is Caffe's
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in out] == list(net.blobs["pool"].shape)


def test_pooling_empty_window_is_minus_flt_max():
    net = _net(
        _one_layer(
            'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
            "pooling_param { pool: MAX kernel_size: 1 stride: 3 } }",
            (1, 1, 5, 5),
        )
    )
    model = ox.export_onnx(net)
    x = ox.random_inputs(net, 0)
    y = ox.run_onnxruntime(model, x)["pool"]
    assert y.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(y[0, 0, 2, :], np.float32(-3.4028234663852886e38))
    np.testing.assert_allclose(y[0, 0, :2, :2], x["data"][0, 0, ::3, ::3], rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_global_pooling(pool):
    net = _net(
        _one_layer(
            f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
            f"pooling_param {{ pool: {pool} global_pooling: true }} }}"
        )
    )
    _assert_exports(net)


def test_pooling_argmax_top_is_refused_naming_the_layer():
    net = _net(
        _one_layer(
            'layer { name: "pool_with_mask" type: "Pooling" bottom: "data" top: "pool" top: "mask" '
            "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }"
        )
    )
    with pytest.raises(ox.OnnxExportError, match="pool_with_mask.*Pooling"):
        ox.export_onnx(net)


# ---------------------------------------------------------------------------------------------
# the other layers


LAYER_CASES = {
    "lrn_across": 'layer { name: "l" type: "LRN" bottom: "data" top: "l" '
    "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }",
    "lrn_across_alexnet": 'layer { name: "l" type: "LRN" bottom: "data" top: "l" '
    "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }",
    "lrn_within": 'layer { name: "l" type: "LRN" bottom: "data" top: "l" '
    "lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 norm_region: WITHIN_CHANNEL } }",
    "conv_group_dilation": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
    "convolution_param { num_output: 6 kernel_size: 3 group: 2 dilation: 2 pad: 1 stride: 2 } }",
    "conv_rect_nobias": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
    "convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 "
    "bias_term: false } }",
    "conv_depthwise": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
    "convolution_param { num_output: 4 kernel_size: 3 group: 4 pad: 1 } }",
    # W: (8 + 2 - 11) / 4 truncates to 0 -> one output, the kernel overhanging by one zero column
    "conv_kernel_overhang": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
    "convolution_param { num_output: 3 kernel_size: 11 stride: 4 pad: 1 } }",
    "spp_max": 'layer { name: "s" type: "SPP" bottom: "data" top: "s" spp_param { pyramid_height: 3 } }',
    "spp_ave_one_level": 'layer { name: "s" type: "SPP" bottom: "data" top: "s" '
    "spp_param { pyramid_height: 1 pool: AVE } }",
    "spp_ave": 'layer { name: "s" type: "SPP" bottom: "data" top: "s" spp_param { pyramid_height: 2 pool: AVE } }',
    "deconv_group_stride": 'layer { name: "d" type: "Deconvolution" bottom: "data" top: "d" '
    "convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 4 } }",
    "deconv_dense": 'layer { name: "d" type: "Deconvolution" bottom: "data" top: "d" '
    "convolution_param { num_output: 3 kernel_size: 3 stride: 3 } }",
    "batchnorm_scale": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }\n'
    'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }\n'
    'layer { name: "sc" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }\n'
    'layer { name: "out" type: "Power" bottom: "c" top: "out" }',
    "batchnorm_eps": 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.1 } }',
    "scale_no_bias_axis0": 'layer { name: "sc" type: "Scale" bottom: "data" top: "sc" scale_param { axis: 0 num_axes: 2 } }',
    "scale_two_bottoms": 'layer { name: "r" type: "Reduction" bottom: "data" top: "r" reduction_param { axis: 2 } }\n'
    'layer { name: "sc" type: "Scale" bottom: "data" bottom: "r" top: "sc" scale_param { axis: 0 } }',
    "bias": 'layer { name: "b" type: "Bias" bottom: "data" top: "b" }',
    "ip_axis1": 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 } }',
    "ip_axis2_transpose": 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
    "inner_product_param { num_output: 5 axis: 2 transpose: true } }",
    "ip_axis2_nobias": 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
    "inner_product_param { num_output: 5 axis: 2 bias_term: false } }",
    "eltwise": 'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 kernel_size: 1 } }\n'
    'layer { name: "s" type: "Eltwise" bottom: "data" bottom: "c1" top: "s" eltwise_param { coeff: 0.5 coeff: -2 } }\n'
    'layer { name: "p" type: "Eltwise" bottom: "data" bottom: "c1" bottom: "s" top: "p" eltwise_param { operation: PROD } }\n'
    'layer { name: "m" type: "Eltwise" bottom: "p" bottom: "c1" top: "m" eltwise_param { operation: MAX } }',
    "concat_slice": 'layer { name: "sl" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 3 } }\n'
    'layer { name: "cat" type: "Concat" bottom: "c" bottom: "a" top: "cat" }\n'
    'layer { name: "sl2" type: "Slice" bottom: "b" top: "b1" top: "b2" slice_param { axis: 3 } }',
    "flatten_reshape": 'layer { name: "f" type: "Flatten" bottom: "data" top: "f" flatten_param { axis: 1 end_axis: 2 } }\n'
    'layer { name: "r" type: "Reshape" bottom: "f" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 4 } } }\n'
    'layer { name: "r2" type: "Reshape" bottom: "r" top: "r2" reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 0 dim: -1 } } }',
    "softmax_axis": 'layer { name: "s1" type: "Softmax" bottom: "data" top: "s1" }\n'
    'layer { name: "s2" type: "Softmax" bottom: "data" top: "s2" softmax_param { axis: -1 } }',
    "neurons": 'layer { name: "relu" type: "ReLU" bottom: "data" top: "a" relu_param { negative_slope: 0.1 } }\n'
    'layer { name: "prelu" type: "PReLU" bottom: "data" top: "b" }\n'
    'layer { name: "prelu_shared" type: "PReLU" bottom: "data" top: "b2" prelu_param { channel_shared: true } }\n'
    'layer { name: "sig" type: "Sigmoid" bottom: "data" top: "c" }\n'
    'layer { name: "tanh" type: "TanH" bottom: "data" top: "d" }\n'
    'layer { name: "elu" type: "ELU" bottom: "data" top: "e" elu_param { alpha: 0.7 } }\n'
    'layer { name: "abs" type: "AbsVal" bottom: "data" top: "f" }\n'
    'layer { name: "bnll" type: "BNLL" bottom: "data" top: "g" }\n'
    'layer { name: "pow" type: "Power" bottom: "f" top: "h" power_param { power: 1.5 scale: 2 shift: 0.5 } }\n'
    'layer { name: "pow0" type: "Power" bottom: "data" top: "h0" power_param { power: 2 scale: 0 shift: 3 } }\n'
    'layer { name: "exp" type: "Exp" bottom: "data" top: "i" exp_param { base: 2 scale: 0.5 shift: 1 } }\n'
    'layer { name: "log" type: "Log" bottom: "f" top: "j" log_param { base: 10 scale: 3 shift: 1 } }\n'
    'layer { name: "thr" type: "Threshold" bottom: "data" top: "k" threshold_param { threshold: 0.2 } }\n'
    'layer { name: "clip" type: "Clip" bottom: "data" top: "l" clip_param { min: -0.5 max: 0.7 } }\n'
    'layer { name: "swish" type: "Swish" bottom: "data" top: "m" swish_param { beta: 1.5 } }\n'
    'layer { name: "drop" type: "Dropout" bottom: "m" top: "m" }',
    "tile_reduction": 'layer { name: "t" type: "Tile" bottom: "data" top: "t" tile_param { axis: 2 tiles: 3 } }\n'
    'layer { name: "r1" type: "Reduction" bottom: "t" top: "r1" reduction_param { operation: ASUM axis: 1 coeff: 2 } }\n'
    'layer { name: "r2" type: "Reduction" bottom: "data" top: "r2" reduction_param { operation: SUMSQ axis: -1 } }\n'
    'layer { name: "r3" type: "Reduction" bottom: "data" top: "r3" reduction_param { operation: MEAN axis: 2 } }',
    "mvn": 'layer { name: "m1" type: "MVN" bottom: "data" top: "m1" }\n'
    'layer { name: "m2" type: "MVN" bottom: "data" top: "m2" mvn_param { across_channels: true } }\n'
    'layer { name: "m3" type: "MVN" bottom: "data" top: "m3" mvn_param { normalize_variance: false } }',
    "argmax": 'layer { name: "a1" type: "ArgMax" bottom: "data" top: "a1" }\n'
    'layer { name: "a2" type: "ArgMax" bottom: "data" top: "a2" argmax_param { out_max_val: true } }\n'
    'layer { name: "a3" type: "ArgMax" bottom: "data" top: "a3" argmax_param { axis: 1 } }\n'
    'layer { name: "a4" type: "ArgMax" bottom: "data" top: "a4" argmax_param { axis: 2 out_max_val: true } }',
    "split_inplace_chain": 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }\n'
    'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }\n'
    'layer { name: "p1" type: "Pooling" bottom: "c" top: "p1" pooling_param { kernel_size: 2 stride: 2 } }\n'
    'layer { name: "p2" type: "Pooling" bottom: "c" top: "p2" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }',
    "parameter_dummy": 'layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 4 } } }\n'
    'layer { name: "dd" type: "DummyData" top: "dd" dummy_data_param { shape { dim: 2 dim: 4 dim: 9 dim: 8 } '
    "data_filler { type: 'constant' value: 0.5 } } }\n"
    'layer { name: "b" type: "Bias" bottom: "data" bottom: "p" top: "b" }\n'
    'layer { name: "s" type: "Eltwise" bottom: "b" bottom: "dd" top: "s" }',
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_exports_match(case):
    net = _net(_one_layer(LAYER_CASES[case]))
    ox.randomize_params(net, seed=1)
    _assert_exports(net, seed=2)


@pytest.mark.parametrize("opset", [13, 18])
def test_reductions_at_both_axis_conventions(opset):
    net = _net(_one_layer(LAYER_CASES["mvn"] + "\n" + LAYER_CASES["argmax"]))
    model = _assert_exports(net, opset=opset)
    assert model.opset_import[0].version == opset


def test_batchnorm_with_zero_scale_factor_divides_by_sqrt_eps():
    net = _net(_one_layer('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }'))
    ox.randomize_params(net, seed=0)
    net.params["bn"][2].data[...] = 0.0  # Caffe: mean = var = 0, y = x / sqrt(eps)
    _assert_exports(net)
    x = ox.random_inputs(net)
    y = ox.run_onnxruntime(ox.export_onnx(net), x)["bn"]
    np.testing.assert_allclose(y, x["data"] / math.sqrt(1e-5), rtol=1e-5, atol=0)


def test_deconvolution_and_crop_fcn_style():
    text = (
        _input("data", (1, 3, 7, 7)) + 'layer { name: "score" type: "Convolution" bottom: "data" top: "score" '
        "convolution_param { num_output: 5 kernel_size: 1 } }\n"
        'layer { name: "up" type: "Deconvolution" bottom: "score" top: "up" '
        "convolution_param { num_output: 5 kernel_size: 8 stride: 4 group: 5 bias_term: false "
        "weight_filler { type: 'bilinear' } } }\n"
        'layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 5 } }\n'
        'layer { name: "crop2" type: "Crop" bottom: "up" bottom: "data" top: "crop2" '
        "crop_param { axis: 1 offset: 1 offset: 2 offset: 7 } }"
    )
    net = _net(text)
    bilinear = net.params["up"][0].data.copy()
    ox.randomize_params(net, seed=4)
    net.params["up"][0].data[...] = bilinear
    assert net.blobs["crop"].shape == (1, 5, 7, 7)
    _assert_exports(net)


def test_batch_reindex_is_a_gather():
    net = _net(
        _input("data", (3, 4, 5, 2))
        + _input("permut", (5,))
        + 'layer { name: "r" type: "BatchReindex" bottom: "data" bottom: "permut" top: "r" }'
    )
    inputs = ox.random_inputs(net, 0)
    inputs["permut"] = np.array([2, 0, 0, 1, 2], np.float32)  # repeated and out of order
    _assert_exports(net, inputs=inputs)


def test_stochastic_pooling_is_refused_naming_the_layer():
    net = _net(
        _one_layer(
            'layer { name: "sto" type: "Pooling" bottom: "data" top: "p" '
            "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }"
        )
    )
    with pytest.raises(ox.OnnxExportError, match="'sto'.*STOCHASTIC"):
        ox.export_onnx(net)


@pytest.mark.parametrize(
    "cp",
    [
        "kernel_size: 3 stride: 2 pad: 1",
        "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1 dilation: 2",
        "kernel_size: 11 stride: 4 pad: 1",  # Caffe's truncating size: the window overhangs by one
    ],
)
def test_im2col_is_a_one_hot_depthwise_conv(cp):
    net = _net(
        _one_layer(f'layer {{ name: "col" type: "Im2col" bottom: "data" top: "col" convolution_param {{ {cp} }} }}')
    )
    _assert_exports(net, seed=3)


def test_filter_is_a_compress():
    net = _net(
        _input("data", (4, 3, 2, 2))
        + _input("sel", (4, 1))
        + 'layer { name: "f" type: "Filter" bottom: "data" bottom: "sel" top: "f" }'
    )
    inputs = ox.random_inputs(net, 0)
    inputs["sel"] = np.array([[1.0], [0.0], [float("nan")], [-2.0]], np.float32)  # non-zero selects
    _assert_exports(net, inputs=inputs)


def _recurrent_net(kind: str, static: bool, expose: bool) -> str:
    text = _input("x", (3, 2, 4)) + _input("cont", (3, 2))
    bottoms = ' bottom: "x" bottom: "cont"'
    if static:
        text += _input("xs", (2, 5))
        bottoms += ' bottom: "xs"'
    states = ("h_0", "c_0") if kind == "LSTM" else ("h_0",)
    tops = ' top: "out"'
    if expose:
        for st in states:
            text += _input(st, (1, 2, 6))
            bottoms += f' bottom: "{st}"'
        tops += "".join(f' top: "{st[0]}_T"' for st in states)
    param = "recurrent_param { num_output: 6 weight_filler { type: 'gaussian' std: 0.4 } "
    param += "bias_filler { type: 'constant' value: 0.1 } " + ("expose_hidden: true " if expose else "") + "}"
    return text + f'layer {{ name: "rec" type: "{kind}"{bottoms}{tops} {param} }}'


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
@pytest.mark.parametrize("static,expose", [(False, False), (True, False), (False, True), (True, True)])
def test_recurrent_layers_export_unrolled(kind, static, expose):
    net = _net(_recurrent_net(kind, static, expose))
    ox.randomize_params(net, seed=1)
    inputs = ox.random_inputs(net, 2)
    # a new sequence in every stream at step 0 and in stream 1 at step 2: without expose_hidden the
    # exported model starts from zeros, which Caffe's carried state equals after cont = 0
    inputs["cont"] = np.array([[0, 0], [1, 1], [1, 0]], np.float32)
    _assert_exports(net, inputs=inputs)


def test_shared_parameters_become_one_initializer():
    text = _one_layer(
        'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" param { name: "w" } param { name: "b" } '
        "convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n"
        'layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" param { name: "w" } param { name: "b" } '
        "convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }"
    )
    net = _net(text)
    ox.randomize_params(net, seed=5)
    model = _assert_exports(net)
    assert len(model.graph.initializer) == 2


def test_value_names_are_caffe_blob_names():
    net = _net(_one_layer(LAYER_CASES["split_inplace_chain"]))
    model = ox.export_onnx(net)
    produced = {o for n in model.graph.node for o in n.output}
    assert {"c", "p1", "p2"} <= produced  # "c" is the in-place chain's last value (after ReLU)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    assert relu.output == ["c"]
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["p1", "p2"]


def test_lrn_is_onnx_lrn_operator_not_an_if():
    net = _net(_one_layer(LAYER_CASES["lrn_across"]))
    ops = [n.op_type for n in ox.export_onnx(net).graph.node]
    assert ops == ["LRN"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ox.export_onnx(net).graph.node[0].attribute}
    assert attrs["size"] == 3 and attrs["bias"] == pytest.approx(2.0) and attrs["alpha"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# refusals


def test_unknown_layer_type_names_the_layer():
    text = (
        _input("data", (2, 5))
        + _input("label", (2,))
        + 'layer { name: "the_loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }'
    )
    net = _net(text)
    with pytest.raises(ox.OnnxExportError, match=r"'the_loss'.*'SoftmaxWithLoss'.*no converter"):
        ox.export_onnx(net)


def test_train_phase_dropout_and_batchnorm_are_refused():
    net = _net(_one_layer('layer { name: "drop7" type: "Dropout" bottom: "data" top: "data" }'), caffe.TRAIN)
    with pytest.raises(ox.OnnxExportError, match="drop7.*TEST"):
        ox.export_onnx(net)
    net = _net(_one_layer('layer { name: "bn1" type: "BatchNorm" bottom: "data" top: "data" }'), caffe.TRAIN)
    with pytest.raises(ox.OnnxExportError, match="bn1.*use_global_stats"):
        ox.export_onnx(net)


def test_bad_opset_is_refused():
    net = _net(_one_layer(LAYER_CASES["bias"]))
    with pytest.raises(ox.OnnxExportError, match="opset 9"):
        ox.export_onnx(net, opset=9)


# ---------------------------------------------------------------------------------------------
# whole nets: the reference deploy nets and the ones the project ships


def _deploy_nets():
    nets = sorted(CAFFE_REF.glob("zoo/*/deploy.prototxt")) + sorted(CAFFE_REF.glob("realworld/*/deploy.prototxt"))
    nets += sorted((ROOT / "prototxt").glob("*deploy*.prototxt"))
    return [str(p.relative_to(ROOT)) for p in nets]


DEPLOY_NETS = _deploy_nets()


def test_every_reference_deploy_net_is_collected():
    # realworld/fcn32s has no deploy net upstream (train/val start with a Python data layer)
    assert len([n for n in DEPLOY_NETS if "/zoo/" in n]) == 3
    assert len([n for n in DEPLOY_NETS if "/realworld/" in n]) == 7


@pytest.mark.parametrize("path", DEPLOY_NETS)
def test_deploy_net_exports_and_matches(path, tmp_path):
    net = caffe.Net(str(ROOT / path), caffe.TEST)
    for b in net.inputs:  # batch 1 keeps AlexNet-size nets fast
        net.blobs[b].reshape(1, *net.blobs[b].shape[1:])
    net.reshape()
    ox.randomize_params(net, seed=7)
    # every top, outputs included, is compared by locate_divergence
    _assert_exports(net, seed=8, outputs_too=False)


def test_tool_exports_squeezenet_with_a_caffemodel(tmp_path, capsys):
    from caffe_compat.cli import export_onnx as tool

    proto = CAFFE_REF / "realworld" / "squeezenet11" / "deploy.prototxt"
    net = caffe.Net(str(proto), caffe.TEST)
    ox.randomize_params(net, seed=11)
    weights = tmp_path / "squeezenet.caffemodel"
    net.save(str(weights))
    out = tmp_path / "squeezenet.onnx"
    rc = tool.main(["--model", str(proto), "--weights", str(weights), "--out", str(out), "--batch", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "onnx.checker: ok" in text and "output 'prob'" in text
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    # the ONNX weights are the caffemodel's
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(init["conv1/weight"], net.params["conv1"][0].data)


def test_tool_dynamic_batch_checks_two_batch_sizes(tmp_path, capsys):
    from caffe_compat.cli import export_onnx as tool

    proto = CAFFE_REF / "realworld" / "cifar10_quick" / "deploy.prototxt"
    net = caffe.Net(str(proto), caffe.TEST)
    ox.randomize_params(net, seed=12)
    weights = tmp_path / "c.caffemodel"
    net.save(str(weights))
    out = tmp_path / "c.onnx"
    rc = tool.main(
        ["--model", str(proto), "--weights", str(weights), "--out", str(out), "--dynamic-batch", "--opset", "17"]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "batch 1," in text and "batch 2," in text
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    y = ox.run_onnxruntime(model, {"data": x})["prob"]
    assert y.shape == (5, 10)
    ours = ox.check_onnx(net, model, {"data": x})
    assert ours[0].relative <= TOL


def test_tool_fails_on_a_wrong_converter_naming_the_layer(tmp_path, capsys, monkeypatch):
    from caffe_compat.cli import export_onnx as tool

    def wrong_relu(g, layer, xs, bshapes, tops):
        return [g.node("Abs", xs, tops[0])]

    monkeypatch.setitem(ox.ONNX_CONVERTERS, "ReLU", wrong_relu)
    proto = CAFFE_REF / "realworld" / "lenet" / "deploy.prototxt"
    rc = tool.main(["--model", str(proto), "--out", str(tmp_path / "l.onnx"), "--batch", "2", "--seed", "1"])
    # lenet's fillers are xavier: the weights are random, so Abs differs from ReLU
    err = capsys.readouterr().err
    assert rc == 1
    assert "first differing layer 'relu1' (ReLU)" in err


def test_tool_fails_on_an_unexportable_layer(tmp_path, capsys):
    from caffe_compat.cli import export_onnx as tool

    proto = tmp_path / "loss.prototxt"
    proto.write_text(
        _input("data", (2, 5))
        + _input("label", (2,))
        + 'layer { name: "the_loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }'
    )
    rc = tool.main(["--model", str(proto), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "the_loss" in err and "SoftmaxWithLoss" in err
    assert not (tmp_path / "x.onnx").exists()


def test_embed_exports_with_index_inputs():
    text = (
        _input("idx", (2, 3))
        + 'layer { name: "emb" type: "Embed" bottom: "idx" top: "emb" embed_param { num_output: 4 input_dim: 7 } }'
    )
    net = _net(text)
    ox.randomize_params(net, seed=9)
    idx = np.array([[0, 6, 3.7], [2, 2, 5]], np.float32)  # 3.7 truncates to 3, as C++'s cast
    _assert_exports(net, inputs={"idx": idx})
