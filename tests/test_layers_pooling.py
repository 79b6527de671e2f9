"""Pooling: Caffe's loops re-written in NumPy (sizes, values, argmax mask, backward), real-Caffe
fixture replays, float64 gradchecks, validation; and a check of how far torch's own
``ceil_mode=True, count_include_pad=True`` pooling agrees with Caffe (CAFFE_SEMANTICS.md §2.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_compat.errors import LayerError
from tests.conftest import CAFFE_REF
from tests.test_layers_conv import layer_from_text, replay

FLT_MAX = float(np.finfo(np.float32).max)


def np_caffe_pool(x, top_grad, pool, k, s, p, ceil=True, global_pooling=False):
    """Caffe's PoolingLayer Forward_cpu / Backward_cpu as plain loops: (top, mask, bottom_grad)."""
    n_, c_, H, W = x.shape
    kh, kw = (H, W) if global_pooling else k
    (sh, sw), (ph, pw) = s, p

    def size(n, kk, ss, pp):
        q = (n + 2 * pp - kk) / ss
        o = (math.ceil(q) if ceil else math.floor(q)) + 1
        if (ph or pw) and (o - 1) * ss >= n + pp:
            o -= 1
        return o

    Ho, Wo = size(H, kh, sh, ph), size(W, kw, sw, pw)
    top = np.zeros((n_, c_, Ho, Wo))
    mask = -np.ones((n_, c_, Ho, Wo))
    grad = np.zeros_like(x, dtype=np.float64)
    for n in range(n_):
        for c in range(c_):
            for i in range(Ho):
                for j in range(Wo):
                    hs, ws = i * sh - ph, j * sw - pw
                    if pool == "MAX":
                        he, we = min(hs + kh, H), min(ws + kw, W)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, arg = -FLT_MAX, -1
                        for h in range(hs, he):
                            for w in range(ws, we):
                                if x[n, c, h, w] > best:
                                    best, arg = x[n, c, h, w], h * W + w
                        top[n, c, i, j], mask[n, c, i, j] = best, arg
                        if arg >= 0:
                            grad[n, c, arg // W, arg % W] += top_grad[n, c, i, j]
                    else:
                        he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                        pool_size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                        with np.errstate(divide="ignore", invalid="ignore"):
                            top[n, c, i, j] = x[n, c, hs:he, ws:we].sum() / pool_size
                        grad[n, c, hs:he, ws:we] += top_grad[n, c, i, j] / pool_size
    return top, mask, grad


def _pool_text(pp, tops=1):
    t = "".join(f' top: "t{i}"' for i in range(tops))
    return f'name: "pool" type: "Pooling" bottom: "x"{t} pooling_param {{ {pp} }}'


# (bottom shape, pooling_param without `pool`, k, s, p, ceil, global)
CASES = [
    ((2, 2, 10, 10), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, False),  # ceil overhang
    ((1, 2, 7, 7), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True, False),
    ((1, 2, 5, 5), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True, False),  # last window dropped
    ((1, 1, 5, 6), "kernel_size: 3 stride: 1 pad: 2", (3, 3), (1, 1), (2, 2), True, False),  # pad > k/2
    ((1, 2, 8, 7), "kernel_size: 4 stride: 3 pad: 3", (4, 4), (3, 3), (3, 3), True, False),  # pad > k/2, ceil
    ((1, 2, 5, 5), "kernel_size: 1 stride: 3", (1, 1), (3, 3), (0, 0), True, False),  # k < s: empty windows
    (
        (1, 2, 7, 6),
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
        (3, 2),
        (2, 1),
        (1, 0),
        True,
        False,
    ),
    # pad only along H, yet Caffe's "last window" rule then also applies along W
    (
        (1, 1, 5, 5),
        "kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 3 pad_h: 1 pad_w: 0",
        (3, 1),
        (1, 3),
        (1, 0),
        True,
        False,
    ),
    ((1, 2, 8, 8), "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), False, False),
    ((1, 2, 9, 9), "kernel_size: 2 stride: 3 round_mode: FLOOR", (2, 2), (3, 3), (0, 0), False, False),
    ((2, 3, 5, 6), "global_pooling: true", None, (1, 1), (0, 0), True, True),
    ((1, 1, 2, 2), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, False),  # kernel > image
    # >= 16 channels: MAX runs through torch's channels_last kernel on the CPU (_MaxPoolChannelsLast)
    ((2, 16, 9, 9), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, False),
    ((1, 24, 7, 8), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True, False),
    ((1, 16, 8, 7), "kernel_size: 4 stride: 3 pad: 3", (4, 4), (3, 3), (3, 3), True, False),  # explicit padding
]


def _inputs(shape, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # many equal values: the first maximum in row-major order must win
        return torch.randint(0, 3, shape, generator=gen).double()
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,pp,k,s,p,ceil,glob", CASES)
def test_matches_caffe_loops(pool, shape, pp, k, s, p, ceil, glob):
    tops = 2 if pool == "MAX" else 1
    layer = layer_from_text(_pool_text(f"pool: {pool} {pp}", tops), [shape])
    for ties in (False, True) if pool == "MAX" else (False,):
        x = _inputs(shape, 0, ties).requires_grad_(True)
        out = layer(x)
        gtop = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_top, ref_mask, ref_grad = np_caffe_pool(x.detach().numpy(), gtop.numpy(), pool, k, s, p, ceil, glob)
        assert tuple(out[0].shape) == ref_top.shape
        assert layer.top_shapes([shape]) == [ref_top.shape] * tops
        np.testing.assert_allclose(out[0].detach().numpy(), ref_top, rtol=1e-12, atol=1e-12)
        if pool == "MAX":
            np.testing.assert_array_equal(out[1].numpy(), ref_mask)
        (grad,) = torch.autograd.grad(out[0], x, gtop)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,pp,k,s,p,ceil,glob", CASES)
def test_gradcheck(pool, shape, pp, k, s, p, ceil, glob):
    layer = layer_from_text(_pool_text(f"pool: {pool} {pp}"), [shape])
    # distinct, well-separated values so that no MAX window is near a tie
    n = math.prod(shape)
    x = (torch.randperm(n, generator=torch.Generator().manual_seed(2)).double() / n).reshape(shape)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6)


def test_channels_last_max_pool_is_used_and_equal():
    from caffe_compat.layers import pooling

    x = _inputs((2, 16, 11, 11), 3, ties=True).float().requires_grad_(True)
    y, idx = pooling._max_pool(x, (3, 3), (2, 2), (0, 0), True, True)
    assert y.grad_fn is not None and "MaxPoolChannelsLast" in type(y.grad_fn).__name__
    ry, ridx = F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    assert y.is_contiguous() and idx.is_contiguous()
    assert torch.equal(y, ry) and torch.equal(idx, ridx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ry, x, g)[0])


def test_torch_ceil_mode_claim():
    """CAFFE_SEMANTICS.md §2.1 says torch's ceil_mode + count_include_pad reproduce Caffe exactly.

    True whenever torch accepts the parameters and a last window cannot start past the image;
    false in two cases, which the layer handles itself (see the cases above): pad > kernel/2
    (torch refuses) and, without padding, kernel < stride (torch drops a last window that starts
    past the image, Caffe keeps it empty).
    """
    for shape, _, k, s, p, ceil, glob in CASES:
        if glob or 2 * max(p) > min(k) or (p == (0, 0) and min(k) < max(s)):
            continue
        x = _inputs(shape, 3)
        for pool in ("MAX", "AVE"):
            ref = np_caffe_pool(x.numpy(), np.zeros((shape[0], shape[1], 64, 64)), pool, k, s, p, ceil)[0]
            if pool == "MAX":
                got = F.max_pool2d(x, k, s, p, ceil_mode=ceil)
            else:
                got = F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=True)
            assert got.shape == ref.shape, (shape, k, s, p)
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    # where it fails: kernel 1 stride 3 on 5 pixels; Caffe keeps 3 windows, torch 2
    x = _inputs((1, 1, 5, 5), 4)
    assert F.max_pool2d(x, 1, 3, 0, ceil_mode=True).shape[-1] == 2
    assert np_caffe_pool(x.numpy(), np.zeros((1, 1, 3, 3)), "MAX", (1, 1), (3, 3), (0, 0))[0].shape[-1] == 3
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, 3, 1, 2, ceil_mode=True)


@pytest.mark.parametrize(
    "case",
    [
        "pool_ave_ceil",
        "pool_ave_global",
        "pool_ave_pad3",
        "pool_ave_pad_clip",
        "pool_max_ceil",
        "pool_max_global",
        "pool_max_pad3",
        "pool_max_pad_clip",
    ],
)
def test_matches_caffe_fixture(case):
    layer = replay(case, "pool", ["data"], "pool")
    ref = np.load(CAFFE_REF / "layers" / case / "blobs.npz")
    assert layer.top_shapes([ref["data__data"].shape]) == [ref["data__pool"].shape]


def test_alexnet_pool1_matches_caffe_fixture():
    replay("conv_alexnet_conv1_224", "pool1", ["norm1"], "pool1")


def test_empty_window_values_are_caffes():
    # kernel 1, stride 3 on a 5x5 image: windows starting at row/column 6 hold no pixel
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    y, mask = layer_from_text(_pool_text("pool: MAX kernel_size: 1 stride: 3", 2), [(1, 1, 5, 5)])(x)
    assert tuple(y.shape) == (1, 1, 3, 3)
    assert float(y[0, 0, 2, 2]) == -FLT_MAX and float(mask[0, 0, 2, 2]) == -1
    assert float(y[0, 0, 1, 1]) == 18.0 and float(mask[0, 0, 1, 1]) == 18
    ave = layer_from_text(_pool_text("pool: AVE kernel_size: 1 stride: 3"), [(1, 1, 5, 5)])(x)[0]
    # Caffe divides the empty sum by (5 - 6)·1 = -1 or (5 - 6)·(5 - 6) = 1
    assert float(ave[0, 0, 2, 0]) == 0.0 and float(ave[0, 0, 1, 1]) == 18.0


def test_mask_is_a_float_constant():
    layer = layer_from_text(_pool_text("pool: MAX kernel_size: 2 stride: 2", 2), [(1, 1, 4, 4)])
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    y, mask = layer(x)
    assert mask.dtype == x.dtype and not mask.requires_grad
    np.testing.assert_array_equal(
        x.detach().reshape(-1)[mask.long().reshape(-1)].numpy(), y.detach().reshape(-1).numpy()
    )


@pytest.mark.parametrize(
    "pp,tops,shape,message",
    [
        ("pool: STOCHASTIC kernel_size: 2 pad: 1", 1, (1, 1, 4, 4), "STOCHASTIC with pad .* ignore the padding"),
        ("pool: AVE kernel_size: 2", 2, (1, 1, 4, 4), "only produced by pool: MAX"),
        ("global_pooling: true kernel_size: 2", 1, (1, 1, 4, 4), "global_pooling"),
        ("global_pooling: true stride: 2", 1, (1, 1, 4, 4), "pad = 0 and stride = 1"),
        ("kernel_size: 2 pad: 2", 1, (1, 1, 4, 4), "pad .* smaller than kernel"),
        ("stride: 2", 1, (1, 1, 4, 4), "kernel_size"),
        ("kernel_h: 2", 1, (1, 1, 4, 4), "kernel_size"),
        ("kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, (1, 1, 4, 4), "not both"),
        ("kernel_size: 2 pad: 1 pad_h: 1", 1, (1, 1, 4, 4), "pad or both pad_h and pad_w"),
        ("kernel_size: 2 stride_h: 1", 1, (1, 1, 4, 4), "stride or both stride_h and stride_w"),
        ("kernel_size: 0", 1, (1, 1, 4, 4), "kernel dimensions must be > 0"),
        ("kernel_size: 2 stride: 0", 1, (1, 1, 4, 4), "stride must be > 0"),
        ("kernel_size: 2", 1, (1, 4, 4), "4 axes"),
        ("kernel_size: 6 round_mode: FLOOR", 1, (1, 1, 4, 4), "empty output"),
    ],
)
def test_invalid_parameters_name_the_field(pp, tops, shape, message):
    with pytest.raises(LayerError, match=message) as err:
        layer_from_text(_pool_text(pp, tops), [shape])
    assert "'pool'" in str(err.value)


# -- STOCHASTIC (Caffe's GPU kernels StoPoolForwardTrain / StoPoolForwardTest) -------------------


def _np_windows(x, k, s):
    """Caffe's stochastic windows (no padding, clipped at the edge), for each output position."""
    n, c, H, W = x.shape
    Ho = math.ceil((H - k) / s) + 1
    Wo = math.ceil((W - k) / s) + 1
    return (
        Ho,
        Wo,
        [[x[:, :, i * s : min(i * s + k, H), j * s : min(j * s + k, W)] for j in range(Wo)] for i in range(Ho)],
    )


@pytest.mark.parametrize("shape,k,s", [((2, 3, 7, 6), 3, 2), ((1, 2, 5, 5), 2, 2), ((1, 1, 4, 4), 4, 1)])
def test_stochastic_test_phase_is_the_weighted_mean(shape, k, s):
    x = np.random.default_rng(0).uniform(0, 2, size=shape).astype(np.float32)
    x[0, 0, :2, :2] = 0.0  # an all-zero window gives 0 (the sum starts at FLT_MIN)
    layer = layer_from_text(_pool_text(f"pool: STOCHASTIC kernel_size: {k} stride: {s}"), [shape])
    y = layer(torch.from_numpy(x))[0].numpy()
    Ho, Wo, wins = _np_windows(x.astype(np.float64), k, s)
    ref = np.zeros((shape[0], shape[1], Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            w = wins[i][j]
            ref[:, :, i, j] = (w * w).sum(axis=(2, 3)) / (np.finfo(np.float32).tiny + w.sum(axis=(2, 3)))
    assert y.shape == ref.shape == layer.top_shapes([shape])[0]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)


def test_stochastic_train_draws_in_proportion_and_backpropagates_to_the_draw():
    import caffe_compat as caffe
    from caffe_compat.proto import caffe_pb2

    layer = layer_from_text(_pool_text("pool: STOCHASTIC kernel_size: 2 stride: 2"), [(1, 1, 2, 4)], caffe_pb2.TRAIN)
    # window 0: values 1, 2, 3, 4 (p = 0.1, 0.2, 0.3, 0.4); window 1: a single non-zero value
    x = torch.tensor([[[[1.0, 2.0, 0.0, 5.0], [3.0, 4.0, 0.0, 0.0]]]])
    caffe.set_random_seed(1)
    counts = {v: 0 for v in (1.0, 2.0, 3.0, 4.0)}
    draws = 4000
    for _ in range(draws):
        y = layer(x)[0]
        counts[float(y[0, 0, 0, 0])] += 1
        assert float(y[0, 0, 0, 1]) == 5.0  # the only non-zero value is always drawn
    for v, c in counts.items():
        assert abs(c / draws - v / 10.0) < 0.03, counts
    # the gradient goes to the drawn position only; the same seed draws the same
    caffe.set_random_seed(7)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)[0]
    y.sum().backward()
    picked = xg.grad[0, 0]
    assert float(picked.sum()) == 2.0 and float(picked[0, 3]) == 1.0
    assert float((picked[:, :2] * x[0, 0, :, :2]).sum()) == float(y[0, 0, 0, 0].detach())
    caffe.set_random_seed(7)
    assert torch.equal(layer(x)[0], y.detach())
