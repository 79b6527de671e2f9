"""LRN, BatchNorm, MVN: NumPy formulas, real-Caffe fixture replays, float64 gradchecks, shapes,
BatchNorm's statistics bookkeeping and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.errors import LayerError
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF
from tests.test_layers_conv import ATOL, RTOL, fixture_layer, layer_from_text, replay


def f32(v: float) -> float:
    """A value as the proto stores it (float fields are float32)."""
    return float(np.float32(v))


def _x(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# -- LRN ----------------------------------------------------------------------------------------


def np_lrn_across(x, n, alpha, beta, k):
    C = x.shape[1]
    y = np.empty_like(x)
    half = (n - 1) // 2
    for c in range(C):
        lo, hi = max(0, c - half), min(C, c + half + 1)
        scale = k + alpha / n * (x[:, lo:hi] ** 2).sum(axis=1)
        y[:, c] = x[:, c] * scale**-beta
    return y


def np_lrn_within(x, n, alpha, beta):
    N, C, H, W = x.shape
    half = (n - 1) // 2
    sq = np.zeros((N, C, H + 2 * half, W + 2 * half))
    sq[:, :, half : half + H, half : half + W] = x**2
    acc = np.zeros_like(x)
    for u in range(n):
        for v in range(n):
            acc += sq[:, :, u : u + H, v : v + W]
    return x * (1 + alpha / n**2 * acc) ** -beta


def _lrn_text(lp):
    return f'name: "lrn" type: "LRN" bottom: "x" top: "y" lrn_param {{ {lp} }}'


@pytest.mark.parametrize(
    "lp,n,alpha,beta,k,shape",
    [
        ("", 5, 1.0, 0.75, 1.0, (2, 7, 3, 4)),
        ("local_size: 3 alpha: 0.5 beta: 0.6 k: 2", 3, 0.5, 0.6, 2.0, (1, 6, 2, 3)),
        ("local_size: 7 alpha: 2 beta: 1.5 k: 0.5", 7, 2.0, 1.5, 0.5, (2, 3, 2, 2)),  # window wider than C
        ("local_size: 1 alpha: 0.3", 1, 0.3, 0.75, 1.0, (1, 4, 3, 3)),
    ],
)
def test_lrn_across_channels_formula_and_gradient(lp, n, alpha, beta, k, shape):
    layer = layer_from_text(_lrn_text(lp), [shape])
    x = _x(shape, 0, 2.0).requires_grad_(True)
    y = layer(x)[0]
    np.testing.assert_allclose(
        y.detach().numpy(), np_lrn_across(x.detach().numpy(), n, f32(alpha), f32(beta), f32(k)), rtol=1e-12, atol=1e-12
    )
    assert layer.top_shapes([shape]) == [shape]
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-7)


def test_lrn_across_fused_backward_equals_autograd_of_the_formula():
    layer = layer_from_text(_lrn_text("local_size: 5 alpha: 0.01 beta: 0.75 k: 2"), [(3, 16, 5, 6)])
    x = _x((3, 16, 5, 6), 1, 10.0).requires_grad_(True)
    g = _x((3, 16, 5, 6), 2)
    (ours,) = torch.autograd.grad(layer(x)[0], x, g)
    xx = x.detach().clone().requires_grad_(True)
    sq = torch.nn.functional.pad(xx * xx, (0, 0, 0, 0, 2, 2))
    scale = 2 + f32(0.01) / 5 * sum(sq[:, i : i + 16] for i in range(5))
    (ref,) = torch.autograd.grad(xx * scale**-0.75, xx, g)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 300, 1 << 30])  # per image pieces, several images, whole batch
def test_lrn_chunked_chain_equals_whole_batch(monkeypatch, chunk):
    from caffe_compat.layers import norm

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, 4, 3, generator=gen)
    g = torch.randn(5, 7, 4, 3, generator=gen)
    results = []
    for values in (1 << 30, chunk):
        monkeypatch.setattr(norm, "_LRN_CHUNK_VALUES", values)
        xr = x.clone().requires_grad_(True)
        y = norm.lrn_across_channels(xr, 5, 0.3, 0.75, 2.0)
        (dx,) = torch.autograd.grad(y, xr, g)
        results.append((y.detach(), dx))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("size,shape", [(5, (3, 16, 5, 6)), (7, (2, 3, 4, 4)), (3, (1, 6, 2, 3)), (1, (2, 4, 3, 3))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_window_sum_by_reduction_equals_shifted_slices(monkeypatch, size, shape, channels_last):
    """The window sum as one reduction over an unfolded view (the default off the CPU) gives the
    same bits as the sum of shifted slices (the CPU's default), forward and backward; in
    channels_last the window is contiguous in memory and the reduction vectorizes across it, in
    another order: equal to float32 rounding."""
    from caffe_compat.layers import norm

    gen = torch.Generator().manual_seed(size)
    x, g = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    results = []
    for by_reduction in (False, True):
        monkeypatch.setattr(norm, "WINDOW_BY_REDUCTION", by_reduction)
        xr = x.clone().requires_grad_(True)
        y = norm.lrn_across_channels(xr, size, 0.3, 0.75, 2.0)
        (dx,) = torch.autograd.grad(y, xr, g)
        with torch.no_grad():
            y_inference = norm.lrn_across_channels(x, size, 0.3, 0.75, 2.0)
        results.append((y.detach(), dx, y_inference))
    for a, b in zip(*results):
        if channels_last:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "n,alpha,beta,shape", [(3, 0.5, 0.75, (2, 2, 4, 3)), (5, 2.0, 0.6, (1, 2, 4, 5)), (1, 1.0, 0.5, (1, 1, 3, 3))]
)
def test_lrn_within_channel_formula_gradient_and_k_ignored(n, alpha, beta, shape):
    layer = layer_from_text(
        _lrn_text(f"local_size: {n} alpha: {alpha} beta: {beta} norm_region: WITHIN_CHANNEL k: 7"), [shape]
    )
    x = _x(shape, 3, 2.0).requires_grad_(True)
    y = layer(x)[0]
    # Caffe fixes the Power layer's shift to 1: k (here 7) plays no part
    np.testing.assert_allclose(
        y.detach().numpy(), np_lrn_within(x.detach().numpy(), n, f32(alpha), f32(beta)), rtol=1e-12, atol=1e-12
    )
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("window_by_reduction", [None, True])  # as on the CPU; as on a GPU
@pytest.mark.parametrize("case", ["lrn_across", "lrn_within"])
def test_lrn_matches_caffe_fixture(monkeypatch, case, window_by_reduction):
    from caffe_compat.layers import norm

    monkeypatch.setattr(norm, "WINDOW_BY_REDUCTION", window_by_reduction)
    replay(case, "lrn", ["big"], "lrn")


@pytest.mark.parametrize("window_by_reduction", [None, True])
def test_alexnet_norm1_matches_caffe_fixture(monkeypatch, window_by_reduction):
    from caffe_compat.layers import norm

    monkeypatch.setattr(norm, "WINDOW_BY_REDUCTION", window_by_reduction)
    layer, ref = fixture_layer("conv_alexnet_conv1_224", "norm1", ["conv1"])
    x = torch.tensor(ref["data__conv1"], requires_grad=True)
    y = layer(x)[0]
    np.testing.assert_allclose(y.detach().numpy(), ref["data__norm1"], rtol=RTOL, atol=ATOL)
    (g,) = torch.autograd.grad(y, x, torch.tensor(ref["diff__norm1"]))
    # the stored diff of the in-place conv1/relu1 blob is after relu1's backward
    np.testing.assert_allclose((g * (x > 0)).detach().numpy(), ref["diff__conv1"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "lp,shape,message", [("local_size: 4", (1, 3, 4, 4), "local_size must be odd"), ("", (2, 3, 4), "4 axes")]
)
def test_lrn_invalid(lp, shape, message):
    with pytest.raises(LayerError, match=message):
        layer_from_text(_lrn_text(lp), [shape])


# -- BatchNorm ----------------------------------------------------------------------------------


def _bn_text(bp="", extra=""):
    return f'name: "bn" type: "BatchNorm" bottom: "x" top: "y" {extra} batch_norm_param {{ {bp} }}'


def np_bn_batch(x, eps):
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps), mu.reshape(-1), var.reshape(-1)


def test_batchnorm_global_matches_caffe_fixture():
    layer = replay("batchnorm_scale_global", "bn", ["data"], "bn")
    assert layer.use_global_stats


def test_batchnorm_train_matches_caffe_fixture_including_updated_statistics():
    layer = replay("batchnorm_train", "bn", ["data"], "bn", phase=caffe_pb2.TRAIN)
    ref = np.load(CAFFE_REF / "layers" / "batchnorm_train" / "blobs.npz")
    for i, p in enumerate(layer.blobs):
        np.testing.assert_allclose(p.detach().numpy(), ref[f"param__bn__{i}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (5, 2), (3, 2, 2, 2, 2)])
def test_batchnorm_training_statistics_and_global_use(shape):
    lam, eps = 0.9, 1e-3
    layer = layer_from_text(_bn_text(f"moving_average_fraction: {lam} eps: {eps}"), [shape], caffe_pb2.TRAIN)
    assert not layer.use_global_stats
    assert all(not p.requires_grad for p in layer.blobs)
    C = shape[1]
    m = np.prod(shape) // C
    acc_mu, acc_var, s = np.zeros(C), np.zeros(C), 0.0
    for seed in (4, 5):
        x = _x(shape, seed, 3.0) + 1.5
        y = layer(x)[0]
        ref, mu, var = np_bn_batch(x.numpy(), f32(eps))
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-10)
        s = f32(lam) * s + 1
        acc_mu = f32(lam) * acc_mu + mu
        acc_var = f32(lam) * acc_var + m / (m - 1) * var
        np.testing.assert_allclose(layer.blobs[0].detach().numpy(), acc_mu, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer.blobs[1].detach().numpy(), acc_var, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(layer.blobs[2].detach().numpy(), [s], rtol=1e-6, atol=0)
    # a TEST layer with those blobs uses acc / s
    test = layer_from_text(_bn_text(f"eps: {eps}"), [shape], caffe_pb2.TEST)
    assert test.use_global_stats
    for p, q in zip(test.blobs, layer.blobs):
        p.data.copy_(q.data)
    x = _x(shape, 6)
    shape_c = [1, C] + [1] * (len(shape) - 2)
    mu = (acc_mu / s).reshape(shape_c)
    var = (acc_var / s).reshape(shape_c)
    np.testing.assert_allclose(test(x)[0].numpy(), (x.numpy() - mu) / np.sqrt(var + f32(eps)), rtol=1e-5, atol=1e-5)
    before = [p.detach().clone() for p in test.blobs]
    test(x)
    assert all(torch.equal(a, b) for a, b in zip(before, test.blobs))  # global stats: no update


def test_batchnorm_zero_scale_factor_gives_x_over_sqrt_eps():
    layer = layer_from_text(_bn_text("use_global_stats: true eps: 0.01"), [(2, 3, 2, 2)], caffe_pb2.TRAIN)
    layer.blobs[0].data.fill_(5.0)  # ignored while s == 0
    layer.blobs[1].data.fill_(7.0)
    x = _x((2, 3, 2, 2), 7)
    np.testing.assert_allclose(layer(x)[0].numpy(), x.numpy() / np.sqrt(f32(0.01)), rtol=1e-6, atol=1e-6)


def test_batchnorm_top_shapes_does_not_touch_statistics():
    layer = layer_from_text(_bn_text(), [(4, 3, 2, 2)], caffe_pb2.TRAIN)
    assert layer.top_shapes([(4, 3, 2, 2)]) == [(4, 3, 2, 2)]
    assert all(float(p.detach().abs().sum()) == 0 for p in layer.blobs)


def test_batchnorm_single_value_per_channel():
    layer = layer_from_text(_bn_text("moving_average_fraction: 0.5"), [(1, 3)], caffe_pb2.TRAIN)
    x = _x((1, 3), 8)
    np.testing.assert_allclose(layer(x)[0].numpy(), np.zeros((1, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), x.numpy()[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(), np.zeros(3), rtol=0, atol=0)


@pytest.mark.parametrize("global_stats", [False, True])
def test_batchnorm_gradcheck(global_stats):
    layer = layer_from_text(_bn_text(f"use_global_stats: {str(global_stats).lower()}"), [(3, 2, 2, 3)], caffe_pb2.TRAIN)
    if global_stats:
        layer.blobs[0].data.copy_(torch.tensor([0.4, -1.0]))
        layer.blobs[1].data.copy_(torch.tensor([2.0, 0.5]))
        layer.blobs[2].data.fill_(2.0)
    x = _x((3, 2, 2, 3), 9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6)


def test_batchnorm_param_specs():
    with pytest.raises(LayerError, match="lr_mult"):
        layer_from_text(_bn_text(extra="param { lr_mult: 1 }"), [(2, 3)])
    lp_text = _bn_text(extra="param { lr_mult: 0 }")
    layer = layer_from_text(lp_text, [(2, 3)])
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    assert [tuple(p.shape) for p in layer.blobs] == [(3,), (3,), (1,)]
    with pytest.raises(LayerError, match="at least one axis"):
        layer_from_text(_bn_text(), [()])


# -- MVN ----------------------------------------------------------------------------------------


def np_mvn(x, normalize_variance, across_channels, eps):
    rows = x.shape[0] if across_channels else x.shape[0] * x.shape[1]
    x2 = x.reshape(rows, -1)
    d = x2 - x2.mean(axis=1, keepdims=True)
    if normalize_variance:
        d = d / (np.sqrt((d**2).mean(axis=1, keepdims=True)) + eps)
    return d.reshape(x.shape)


@pytest.mark.parametrize("nv", [True, False])
@pytest.mark.parametrize("ac", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (3, 5)])
def test_mvn_formula_and_gradient(nv, ac, shape):
    eps = 0.25  # large: eps is added to the standard deviation, not to the variance
    layer = layer_from_text(
        f'name: "mvn" type: "MVN" bottom: "x" top: "y" mvn_param {{ normalize_variance: {str(nv).lower()} across_channels: {str(ac).lower()} eps: {eps} }}',
        [shape],
    )
    x = _x(shape, 10, 2.0).requires_grad_(True)
    y = layer(x)[0]
    np.testing.assert_allclose(y.detach().numpy(), np_mvn(x.detach().numpy(), nv, ac, eps), rtol=1e-12, atol=1e-12)
    assert layer.top_shapes([shape]) == [shape]
    # gradient check with the default eps (Caffe's backward is exact up to eps/std)
    layer.eps = 1e-9
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6)


def test_mvn_constant_input_has_finite_gradient():
    layer = layer_from_text('name: "mvn" type: "MVN" bottom: "x" top: "y"', [(1, 2, 3, 3)])
    x = torch.ones(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)[0]
    assert float(y.detach().abs().max()) == 0.0
    (g,) = torch.autograd.grad(y, x, _x((1, 2, 3, 3), 11))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name,split", [("mvn", 4), ("mvn_ac", 5), ("mvn_mean", 6)])
def test_mvn_matches_caffe_fixture(name, split):
    # the net's input feeds seven layers: MVN reads Caffe's split top
    replay("reductions", name, [f"data_data_0_split_{split}"], name)
