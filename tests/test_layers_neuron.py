"""Tests of caffe_compat.layers.neuron: NumPy formulas, Caffe's exact backward at the kinks,
float64 gradchecks, and the real-Caffe ``neurons`` / ``forward_only_threshold_dummy`` fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.layer_replay import replay_layer

RTOL, ATOL = 1e-5, 1e-6  # float64 NumPy formulas against float32 layers


def make_layer(type_name: str, shape=(2, 3, 4, 5), params: str = "", phase=caffe_pb2.TEST):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(params, lp)
    lp.name, lp.type = "n", type_name
    lp.bottom.append("x")
    lp.top.append("y")
    return layer_class(type_name)(lp, [tuple(shape)], phase)


def sample(shape=(2, 3, 4, 5), seed=0, away_from_zero=0.0):
    x = np.random.default_rng(seed).uniform(-2, 2, size=shape)
    if away_from_zero:
        x = np.where(np.abs(x) < away_from_zero, away_from_zero * np.sign(x + 1e-12), x)
    return x


def fwd(layer, x, dtype=torch.float32):
    return layer(torch.tensor(x, dtype=dtype))[0].detach().numpy()


def grad_of(layer, x, dy=None, dtype=torch.float32):
    t = torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype, requires_grad=True)
    y = layer(t)[0]
    y.backward(torch.ones_like(y) if dy is None else torch.tensor(dy, dtype=dtype))
    return t.grad.numpy()


# -- forward against NumPy ---------------------------------------------------------------------


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


FORMULAS = [
    ("ReLU", "", lambda x: np.maximum(x, 0)),
    ("ReLU", "relu_param { negative_slope: 0.1 }", lambda x: np.maximum(x, 0) + 0.1 * np.minimum(x, 0)),
    ("Sigmoid", "", _np_sigmoid),
    ("TanH", "", np.tanh),
    ("ELU", "", lambda x: np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1)),
    ("ELU", "elu_param { alpha: 0.5 }", lambda x: np.where(x > 0, x, 0.5 * (np.exp(np.minimum(x, 0)) - 1))),
    ("AbsVal", "", np.abs),
    ("BNLL", "", lambda x: np.log1p(np.exp(x))),
    ("Power", "", lambda x: x),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", lambda x: (1 + 0.5 * x) ** 2),
    ("Power", "power_param { power: 3 scale: -1.5 }", lambda x: (-1.5 * x) ** 3),
    ("Power", "power_param { power: 0.5 scale: 0.25 shift: 1 }", lambda x: np.sqrt(1 + 0.25 * x)),
    ("Power", "power_param { power: 0 scale: 3 shift: 2 }", lambda x: np.ones_like(x)),
    ("Power", "power_param { power: 2 scale: 0 shift: 3 }", lambda x: np.full_like(x, 9.0)),
    ("Exp", "", np.exp),
    ("Exp", "exp_param { base: 2 scale: 0.7 shift: 0.1 }", lambda x: 2.0 ** (0.1 + 0.7 * x)),
    ("Threshold", "", lambda x: (x > 0).astype(np.float64)),
    ("Threshold", "threshold_param { threshold: 0.2 }", lambda x: (x > 0.2).astype(np.float64)),
    ("Dropout", "", lambda x: x),
    ("Clip", "clip_param { min: -0.5 max: 1.0 }", lambda x: np.clip(x, -0.5, 1.0)),
    ("Swish", "", lambda x: x * _np_sigmoid(x)),
    ("Swish", "swish_param { beta: 1.5 }", lambda x: x * _np_sigmoid(1.5 * x)),
]


@pytest.mark.parametrize("type_name,params,formula", FORMULAS, ids=[f"{t}:{p}" for t, p, _ in FORMULAS])
def test_forward_matches_numpy(type_name, params, formula):
    x = sample()
    y = fwd(make_layer(type_name, params=params), x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, formula(x.astype(np.float32).astype(np.float64)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "params,formula",
    [
        ("", np.log),
        ("log_param { base: 10 scale: 2 shift: 0.5 }", lambda x: np.log10(0.5 + 2 * x)),
        ("log_param { base: 2 }", np.log2),
    ],
)
def test_log_forward(params, formula):
    x = np.abs(sample()) + 0.1
    np.testing.assert_allclose(fwd(make_layer("Log", params=params), x), formula(x), rtol=RTOL, atol=ATOL)


def test_prelu_forward_per_channel_and_shared():
    x = sample()
    layer = make_layer("PReLU")
    assert tuple(layer.blobs[0].shape) == (3,)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), 0.25, rtol=0, atol=0)
    a = np.array([0.1, -0.2, 0.3], np.float32)
    layer.blobs[0].data.copy_(torch.tensor(a))
    ref = np.where(x > 0, x, x * a.reshape(1, 3, 1, 1))
    np.testing.assert_allclose(fwd(layer, x), ref, rtol=RTOL, atol=ATOL)

    shared = make_layer("PReLU", params="prelu_param { channel_shared: true filler { type: 'constant' value: 0.3 } }")
    assert tuple(shared.blobs[0].shape) == ()  # Caffe's channel-shared slope is a 0-d blob
    np.testing.assert_allclose(fwd(shared, x), np.where(x > 0, x, 0.3 * x), rtol=RTOL, atol=ATOL)


# -- Caffe's backward at the special points ------------------------------------------------------


def test_relu_gradient_at_zero_is_the_slope():
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(grad_of(make_layer("ReLU", (3,)), x), [0, 0, 1], rtol=0, atol=0)
    g = grad_of(make_layer("ReLU", (3,), "relu_param { negative_slope: 0.1 }"), x)
    np.testing.assert_allclose(g, [0.1, 0.1, 1], rtol=1e-6, atol=0)


def test_prelu_gradients_at_zero():
    layer = make_layer("PReLU", (1, 2, 3))
    layer.blobs[0].data.copy_(torch.tensor([0.5, -0.25]))
    x = torch.tensor([[[-1.0, 0.0, 2.0], [0.0, -3.0, 1.0]]], requires_grad=True)
    layer(x)[0].backward(torch.ones(1, 2, 3))
    np.testing.assert_allclose(x.grad.numpy(), [[[0.5, 0.5, 1], [-0.25, -0.25, 1]]], rtol=0, atol=0)
    # slope gradient: sum of x over x <= 0 per channel
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), [-1.0, -3.0], rtol=0, atol=0)


def test_elu_gradient_at_zero_is_alpha_and_no_overflow():
    layer = make_layer("ELU", (3,), "elu_param { alpha: 0.5 }")
    np.testing.assert_allclose(grad_of(layer, [0.0, -1.0, 1000.0]), [0.5, 0.5 * np.exp(-1), 1.0], rtol=1e-6, atol=0)


def test_absval_gradient_sign_zero():
    np.testing.assert_allclose(grad_of(make_layer("AbsVal", (3,)), [-2.0, 0.0, 3.0]), [-1, 0, 1], rtol=0, atol=0)


def test_bnll_stable_and_gradient():
    layer = make_layer("BNLL", (5,))
    x = np.array([-200.0, -1.0, 0.0, 1.0, 200.0])
    y = fwd(layer, x, torch.float64)
    np.testing.assert_allclose(y, np.logaddexp(0, x), rtol=1e-12, atol=1e-300)
    g = grad_of(layer, x, dtype=torch.float64)
    # Caffe: e / (e + 1) with e = exp(min(x, 50)); 0.5 at 0, never NaN
    e = np.exp(np.minimum(x, 50.0))
    np.testing.assert_allclose(g, e / (e + 1), rtol=1e-12, atol=0)
    assert g[2] == 0.5


def test_power_gradient_special_cases_match_caffe():
    x = np.array([-1.0, 0.0, 0.5, 2.0])
    # power 2: 2 * scale * (shift + scale * x)
    g = grad_of(make_layer("Power", (4,), "power_param { power: 2 scale: 0.5 shift: 1 }"), x, dtype=torch.float64)
    np.testing.assert_allclose(g, 2 * 0.5 * (1 + 0.5 * x), rtol=1e-12, atol=0)
    # power 1: scale everywhere
    g = grad_of(make_layer("Power", (4,), "power_param { scale: -3 shift: 1 }"), x, dtype=torch.float64)
    np.testing.assert_allclose(g, -3.0, rtol=0, atol=0)
    # power * scale == 0: zero gradient, constant top
    g = grad_of(make_layer("Power", (4,), "power_param { power: 2 scale: 0 shift: 1.5 }"), x, dtype=torch.float64)
    np.testing.assert_allclose(g, 0.0, rtol=0, atol=0)
    # general power, shift 0: power * y / x, NaN at x == 0 as in Caffe (autograd would say 0)
    g = grad_of(make_layer("Power", (4,), "power_param { power: 3 }"), x, dtype=torch.float64)
    assert np.isnan(g[1])
    np.testing.assert_allclose(g[[0, 2, 3]], 3 * x[[0, 2, 3]] ** 2, rtol=1e-12, atol=0)
    # general power with shift: diff_scale * y / base, NaN where the base is 0 (x = -1 here)
    g = grad_of(make_layer("Power", (4,), "power_param { power: 3 shift: 1 }"), x, dtype=torch.float64)
    assert np.isnan(g[0])
    np.testing.assert_allclose(g[1:], 3 * (1 + x[1:]) ** 2, rtol=1e-12, atol=0)


def test_threshold_has_no_gradient():
    t = torch.tensor(sample((2, 3)), dtype=torch.float32, requires_grad=True)
    y = make_layer("Threshold", (2, 3))(t)[0]
    assert not y.requires_grad


def test_clip_gradient_inclusive_bounds():
    layer = make_layer("Clip", (5,), "clip_param { min: -1 max: 1 }")
    np.testing.assert_allclose(grad_of(layer, [-2.0, -1.0, 0.0, 1.0, 2.0]), [0, 1, 1, 1, 0], rtol=0, atol=0)


# -- gradcheck in float64 -----------------------------------------------------------------------

GRADCHECK = [
    ("ReLU", "relu_param { negative_slope: 0.1 }", 0.1),
    ("PReLU", "prelu_param { filler { type: 'gaussian' std: 0.3 } }", 0.1),
    ("PReLU", "prelu_param { channel_shared: true }", 0.1),
    ("Sigmoid", "", 0),
    ("TanH", "", 0),
    ("ELU", "elu_param { alpha: 0.5 }", 0.1),
    ("AbsVal", "", 0.1),
    ("BNLL", "", 0),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", 0),
    ("Power", "power_param { power: 3 scale: 0.5 }", 0.1),
    ("Power", "power_param { power: 0.5 scale: 0.25 shift: 1 }", 0),
    ("Power", "power_param { power: -1.5 scale: 0.2 shift: 1 }", 0),
    ("Exp", "exp_param { base: 2 scale: 0.7 shift: 0.1 }", 0),
    ("Log", "log_param { base: 10 scale: 0.2 shift: 1 }", 0),
    ("Clip", "clip_param { min: -0.5 max: 1.0 }", 0.1),
    ("Swish", "swish_param { beta: 1.5 }", 0),
]


@pytest.mark.parametrize("type_name,params,gap", GRADCHECK, ids=[f"{t}:{p}" for t, p, _ in GRADCHECK])
def test_gradcheck(type_name, params, gap):
    torch.manual_seed(0)
    layer = make_layer(type_name, (2, 3, 2), params).double()
    x = sample((2, 3, 2), seed=1, away_from_zero=gap)
    if type_name == "Clip":  # keep away from the bounds too
        x = np.where(np.abs(x - 1.0) < 0.1, 1.2, np.where(np.abs(x + 0.5) < 0.1, -0.7, x))
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    params_ = [p for p in layer.blobs]
    assert torch.autograd.gradcheck(lambda a, *ps: layer(a)[0], (t, *params_), eps=1e-6, atol=1e-6, rtol=1e-5)


# -- Dropout ------------------------------------------------------------------------------------


DROPOUT_CASES = [("cpu", 0.3), ("cpu", 0.5)] + (
    [("cuda", 0.3), ("cuda", 0.5)] if torch.cuda.is_available() else []
)  # on CUDA, 0.5 takes torch's fused kernel, 0.3 Caffe's mask-and-scale


@pytest.mark.parametrize("device,ratio", DROPOUT_CASES)
def test_dropout_train_mask_and_gradient(device, ratio):
    torch.manual_seed(0)
    layer = make_layer("Dropout", (50, 40), f"dropout_param {{ dropout_ratio: {ratio} }}", phase=caffe_pb2.TRAIN)
    assert layer._fused_ok == (ratio == 0.5)
    x = torch.rand(50, 40, device=device) + 0.5  # never zero, so the mask is visible in the top
    x.requires_grad_(True)
    y = layer(x)[0]
    kept = (y != 0).detach()
    scale = np.float32(1.0 / (1.0 - float(np.float32(ratio))))  # Caffe: in double, stored as float
    want = x.detach().cpu().numpy() * scale
    np.testing.assert_array_equal(y.detach().cpu().numpy()[kept.cpu().numpy()], want[kept.cpu().numpy()])
    assert abs(kept.float().mean().item() - (1 - ratio)) < 0.05
    y.backward(torch.full_like(y, 3.0))
    np.testing.assert_array_equal(x.grad.cpu().numpy(), kept.cpu().numpy() * (np.float32(3.0) * scale))
    # a new mask each forward
    assert not torch.equal(layer(x)[0] != 0, kept)


def test_dropout_test_phase_in_place_is_the_bottom_itself():
    lp = caffe_pb2.LayerParameter(name="d", type="Dropout", bottom=["x"], top=["x"])
    layer = layer_class("Dropout")(lp, [(2, 3)], caffe_pb2.TEST)
    x = torch.rand(2, 3, requires_grad=True)
    y = layer(x)[0]
    assert y is x  # Caffe's copy onto the same memory: nothing to do
    assert make_layer("Dropout")(x)[0] is not x


def test_dropout_test_phase_is_identity_copy_and_top_shapes_draw_nothing():
    x = torch.tensor(sample(), dtype=torch.float32)
    layer = make_layer("Dropout")
    y = layer(x)[0]
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    train = make_layer("Dropout", phase=caffe_pb2.TRAIN)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert train.top_shapes([(2, 3, 4, 5)]) == [(2, 3, 4, 5)]
    assert torch.equal(torch.get_rng_state(), state)


# -- top shapes and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_name", ["ReLU", "PReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "BNLL", "Power", "Exp", "Threshold", "Swish"]
)
def test_top_shape_is_bottom_shape(type_name):
    assert make_layer(type_name, (2, 3, 7)).top_shapes([(2, 3, 7)]) == [(2, 3, 7)]


@pytest.mark.parametrize(
    "type_name,shape,params,match",
    [
        ("Exp", (3,), "exp_param { base: 0 }", "base must be strictly positive"),
        ("Exp", (3,), "exp_param { base: -2 }", "base must be strictly positive"),
        ("Log", (3,), "log_param { base: 1 }", "base 1"),
        ("Dropout", (3,), "dropout_param { dropout_ratio: 1 }", "dropout_ratio"),
        ("PReLU", (3,), "", "at least 2 axes"),
        ("Clip", (3,), "clip_param { min: 2 max: 1 }", "greater than"),
    ],
)
def test_bad_parameters_raise(type_name, shape, params, match):
    with pytest.raises(LayerError, match=match):
        make_layer(type_name, shape, params)


def test_prelu_channel_change_raises():
    layer = make_layer("PReLU", (2, 3, 4))
    with pytest.raises(LayerError, match="channels"):
        layer(torch.zeros(2, 4, 4))


def test_neuron_layers_take_one_bottom():
    lp = caffe_pb2.LayerParameter(name="r", type="ReLU", bottom=["a", "b"], top=["y"])
    with pytest.raises(LayerError, match="exactly 1 bottom"):
        layer_class("ReLU")(lp, [(2,), (2,)], caffe_pb2.TEST)


# -- real-Caffe fixtures, one layer at a time ---------------------------------------------------


NEURON_LAYERS = [
    "relu",
    "prelu",
    "prelu_shared",
    "sigmoid",
    "tanh",
    "elu",
    "absval",
    "bnll",
    "power",
    "exp",
    "pos",
    "log",
    "drop",
]


@pytest.mark.parametrize("layer_name", NEURON_LAYERS)
def test_caffe_fixture_neurons(layer_name):
    replay_layer("neurons", layer_name)


def test_caffe_fixture_threshold_forward():
    replay_layer("forward_only_threshold_dummy", "thr", backward=False)
