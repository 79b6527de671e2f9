"""Caffe's fillers: values and statistics against Caffe's formulas and fan rules, Caffe's own
bilinear weights, reproducibility under the seed, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import LayerError
from caffe_compat.fillers import FILLER_TYPES, fans, fill
from caffe_compat.mode import set_random_seed
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF


def fp(text: str = ""):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def filled(shape, text, seed=0):
    torch.manual_seed(seed)
    return fill(torch.empty(shape), fp(text))


def test_default_filler_is_constant_zero():
    t = fill(torch.full((3, 4), 9.0), fp())
    assert float(t.abs().max()) == 0.0


def test_constant_value():
    t = filled((2, 3, 4), 'type: "constant" value: -1.5')
    assert torch.equal(t, torch.full((2, 3, 4), -1.5))


def test_uniform_range_and_moments():
    t = filled((200, 500), 'type: "uniform" min: -2 max: 3')
    assert float(t.min()) >= -2.0 and float(t.max()) < 3.0
    np.testing.assert_allclose(float(t.mean()), 0.5, atol=0.02)
    np.testing.assert_allclose(float(t.var()), 25 / 12, rtol=0.02)
    d = filled((100, 1000), 'type: "uniform"')  # defaults: [0, 1)
    assert float(d.min()) >= 0.0 and float(d.max()) < 1.0
    np.testing.assert_allclose(float(d.mean()), 0.5, atol=0.01)


def test_gaussian_moments():
    t = filled((300, 400), 'type: "gaussian" mean: 1 std: 0.5')
    np.testing.assert_allclose(float(t.mean()), 1.0, atol=0.01)
    np.testing.assert_allclose(float(t.std()), 0.5, rtol=0.01)
    d = filled((300, 400), 'type: "gaussian"')  # defaults N(0, 1)
    np.testing.assert_allclose(float(d.std()), 1.0, rtol=0.01)


def test_gaussian_sparse_keeps_sparse_over_num_outputs():
    # sparse 5 over 20 outputs: each weight non-zero with probability 1/4
    t = filled((20, 5000), 'type: "gaussian" std: 1 sparse: 5')
    np.testing.assert_allclose(float((t != 0).double().mean()), 0.25, atol=0.01)
    kept = t[t != 0]
    np.testing.assert_allclose(float(kept.std()), 1.0, rtol=0.03)
    zero = filled((4, 10), 'type: "gaussian" sparse: 0')
    assert float(zero.abs().max()) == 0.0


@pytest.mark.parametrize(
    "shape,fan_in,fan_out",
    [
        ((8, 3, 5, 5), 75, 200),  # Convolution (O, C/g, kh, kw)
        ((3, 8, 4, 4), 128, 48),  # Deconvolution (C_in, O/g, kh, kw)
        ((10, 300), 300, 10),  # InnerProduct (N, K)
        ((7,), 1, 7),  # 1-D: fan_out = count
    ],
)
def test_fans_follow_caffe(shape, fan_in, fan_out):
    assert fans(shape) == (fan_in, fan_out)


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_xavier_bound_and_variance(norm):
    shape = (64, 32, 3, 3)
    n = {"FAN_IN": 32 * 9, "FAN_OUT": 64 * 9, "AVERAGE": (32 * 9 + 64 * 9) / 2}[norm]
    t = filled(shape, f'type: "xavier" variance_norm: {norm}')
    bound = math.sqrt(3 / n)
    assert float(t.abs().max()) <= bound
    assert float(t.abs().max()) > 0.99 * bound
    np.testing.assert_allclose(float(t.var()), 1 / n, rtol=0.03)


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_msra_std(norm):
    shape = (64, 48, 3, 3)
    n = {"FAN_IN": 48 * 9, "FAN_OUT": 64 * 9, "AVERAGE": (48 * 9 + 64 * 9) / 2}[norm]
    t = filled(shape, f'type: "msra" variance_norm: {norm}')
    np.testing.assert_allclose(float(t.mean()), 0.0, atol=0.003)
    np.testing.assert_allclose(float(t.std()), math.sqrt(2 / n), rtol=0.02)


def test_xavier_default_is_fan_in():
    a = filled((50, 20), 'type: "xavier"', seed=3)
    b = filled((50, 20), 'type: "xavier" variance_norm: FAN_IN', seed=3)
    assert torch.equal(a, b)
    assert float(a.abs().max()) <= math.sqrt(3 / 20)


def np_bilinear(k):
    f = math.ceil(k / 2)
    c = (k - 1) / (2 * f)
    w = np.zeros((k, k))
    for y in range(k):
        for x in range(k):
            w[y, x] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    return w


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_bilinear_formula(k):
    t = filled((3, 2, k, k), 'type: "bilinear"')
    np.testing.assert_allclose(t.numpy(), np.broadcast_to(np_bilinear(k), (3, 2, k, k)), rtol=0, atol=1e-7)


def test_bilinear_equals_caffes_filled_weights():
    ref = np.load(CAFFE_REF / "layers" / "deconv_group_bilinear" / "blobs.npz")["param__up__0"]
    t = filled(ref.shape, 'type: "bilinear"')
    np.testing.assert_allclose(t.numpy(), ref, rtol=0, atol=1e-7)


def test_positive_unitball_rows_sum_to_one():
    t = filled((6, 3, 2, 2), 'type: "positive_unitball"')
    assert float(t.min()) >= 0.0
    np.testing.assert_allclose(t.reshape(6, -1).sum(dim=1).numpy(), np.ones(6), rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(FILLER_TYPES))
def test_reproducible_under_the_seed(kind):
    shape = (4, 3, 4, 4)
    set_random_seed(17)
    a = fill(torch.empty(shape), fp(f'type: "{kind}"'))
    set_random_seed(17)
    b = fill(torch.empty(shape), fp(f'type: "{kind}"'))
    assert torch.equal(a, b)
    if kind in ("uniform", "gaussian", "xavier", "msra", "positive_unitball"):
        c = fill(torch.empty(shape), fp(f'type: "{kind}"'))
        assert not torch.equal(a, c)


def test_fill_returns_the_same_tensor_and_works_on_parameters():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    out = fill(p, fp('type: "constant" value: 2'))
    assert out is p and float(p.detach().min()) == 2.0


def test_layer_blobs_use_the_fillers():
    lp = text_format.Parse(
        'name: "ip" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 64 kernel_size: 3 '
        'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } }',
        caffe_pb2.LayerParameter(),
    )
    from caffe_compat.layers import layer_class

    torch.manual_seed(0)
    layer = layer_class("Convolution")(lp, [(1, 32, 8, 8)], caffe_pb2.TEST)
    w, b = (p.detach() for p in layer.blobs)
    bound = math.sqrt(3 / (32 * 9))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    np.testing.assert_allclose(b.numpy(), np.full(64, 0.1, dtype=np.float32), rtol=0, atol=0)


@pytest.mark.parametrize(
    "text,shape,message",
    [
        (
            'type: "gausian"',
            (2, 2),
            "Unknown filler type 'gausian'.*bilinear, constant, gaussian, msra, positive_unitball, uniform, xavier",
        ),
        ('type: "constant" sparse: 3', (2, 2), "sparse"),
        ('type: "xavier" sparse: 3', (2, 2), "sparse"),
        ('type: "uniform" min: 2 max: 1', (2, 2), "min .* must not exceed max"),
        ('type: "gaussian" std: 0', (2, 2), "std must be > 0"),
        ('type: "gaussian" sparse: 5', (2, 2), "sparse .* exceeds"),
        ('type: "bilinear"', (2, 2, 3), "4-D"),
        ('type: "bilinear"', (1, 1, 3, 4), "square"),
        ('type: "msra"', (), "0-d"),
        ('type: "xavier"', (0, 3), "zero fan"),
    ],
)
def test_errors_name_the_problem(text, shape, message):
    with pytest.raises(LayerError, match=message):
        fill(torch.empty(shape), fp(text))
