"""SPP, Im2col, Filter and BatchReindex: forward and backward against NumPy re-writings of Caffe's
loops (spp_layer.cpp, util/im2col.cpp, filter_layer.cpp, batch_reindex_layer.cpp), float64
gradchecks, top shapes by Caffe's rules, the errors, and Filter/BatchReindex/SPP inside a Net."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from tests.test_layers_common import make_layer
from tests.test_layers_pooling import np_caffe_pool

RTOL, ATOL = 1e-12, 1e-12  # float64 layers against float64 NumPy loops: same sums, same order or nearly


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def distinct(shape, seed=0):
    """Well-separated distinct values, so that no MAX window is near a tie (for gradcheck)."""
    n = math.prod(shape)
    return np.random.default_rng(seed).permutation(n).reshape(shape) / n


# -- SPP ----------------------------------------------------------------------------------------


def np_spp(x, top_grad, pyramid_height, pool):
    """Caffe's SPPLayer: per level l, bins = 2^l, kernel = stride = ceil(H / bins),
    pad = (kernel·bins − H + 1) // 2 (same along W); each level pooled (Caffe's loops), flattened
    per item and concatenated, level 0 first. Returns (top, bottom_grad)."""
    n, c, H, W = x.shape
    tops, grad, offset = [], np.zeros_like(x), 0
    for level in range(pyramid_height):
        bins = 2**level
        kh, kw = math.ceil(H / bins), math.ceil(W / bins)
        ph, pw = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
        size = c * bins * bins
        g = top_grad.reshape(n, -1)[:, offset : offset + size].reshape(n, c, bins, bins)
        top, _, gl = np_caffe_pool(x, g, pool, (kh, kw), (kh, kw), (ph, pw))
        assert top.shape == (n, c, bins, bins)  # Caffe's geometry always gives bins × bins
        tops.append(top.reshape(n, -1))
        grad += gl
        offset += size
    top = tops[0].reshape(n, c, 1, 1) if pyramid_height == 1 else np.concatenate(tops, axis=1)
    return top, grad


SPP_CASES = [
    ((2, 3, 9, 8), 3),  # Caffe's test_spp_layer.cpp shape
    ((1, 2, 7, 7), 3),  # 7 not divisible by 2 or 4: pad 1 at 4 bins (pad > kernel / 2)
    ((2, 2, 13, 10), 3),  # 13 at 4 bins: kernel 4, pad 2; 10: kernel 3, pad 1
    ((1, 2, 11, 6), 2),
    ((2, 3, 5, 4), 1),  # one level: a global pooling, top (N, C, 1, 1)
    ((1, 16, 9, 12), 3),  # >= 16 channels: MAX through the Pooling layer's channels_last kernel
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,height", SPP_CASES)
def test_spp_matches_caffe_loops(pool, shape, height):
    layer = make_layer("SPP", [shape], f"spp_param {{ pyramid_height: {height} pool: {pool} }}").double()
    x = t64(rand(shape, 1))
    (y,) = layer(x)
    gy = rand(tuple(y.shape), 2)
    ref, ref_grad = np_spp(x.detach().numpy(), gy, height, pool)
    channels = shape[1] * sum(4**level for level in range(height))
    want = (shape[0], shape[1], 1, 1) if height == 1 else (shape[0], channels)
    assert tuple(y.shape) == ref.shape == want
    assert layer.top_shapes([shape]) == [want]
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=RTOL, atol=RTOL)
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(gy))
    np.testing.assert_allclose(g.numpy(), ref_grad, rtol=RTOL, atol=ATOL)


def test_spp_caffe_setup_shapes():
    # test_spp_layer.cpp: TestSetup, TestEqualOutputDims (1024x765, 5 levels), TestEqualOutputDims2
    for shape, height, channels in (((2, 3, 9, 8), 3, 63), ((4, 3, 1024, 765), 5, 1023), ((10, 3, 7, 7), 3, 63)):
        layer = make_layer("SPP", [shape], f"spp_param {{ pyramid_height: {height} }}")
        assert layer.top_shapes([shape]) == [(shape[0], channels)]


def test_spp_levels_follow_the_bottom_size():
    layer = make_layer("SPP", [(1, 2, 8, 8)], "spp_param { pyramid_height: 3 pool: AVE }").double()
    for shape in ((1, 2, 8, 8), (2, 2, 11, 7), (1, 2, 8, 8), (1, 2, 30, 9)):
        x = rand(shape, 3)
        (y,) = layer(t64(x, grad=False))
        ref, _ = np_spp(x, np.zeros(y.shape), 3, "AVE")
        assert layer.top_shapes([shape]) == [ref.shape]
        np.testing.assert_allclose(y.numpy(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,height", [((1, 2, 7, 6), 3), ((2, 1, 5, 5), 2), ((1, 2, 4, 3), 1)])
def test_spp_gradcheck(pool, shape, height):
    layer = make_layer("SPP", [shape], f"spp_param {{ pyramid_height: {height} pool: {pool} }}").double()
    x = t64(distinct(shape, 4))
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,params,match",
    [
        ((1, 2, 8, 8), "spp_param { }", "pyramid_height is required"),
        ((1, 2, 8, 8), "spp_param { pyramid_height: 2 pool: STOCHASTIC }", "STOCHASTIC is not supported"),
        ((2, 8, 8), "spp_param { pyramid_height: 2 }", "4 axes"),
        # 5 rows at 4 bins: kernel 2, pad 2, which Caffe's Pooling refuses (pad < kernel)
        ((1, 2, 5, 8), "spp_param { pyramid_height: 3 }", r"level 2 \(4×4 bins\) of a 5×8 bottom"),
        ((1, 2, 0, 8), "spp_param { pyramid_height: 1 }", "must be > 0"),
    ],
)
def test_spp_errors(shape, params, match):
    with pytest.raises(LayerError, match=match):
        make_layer("SPP", [shape], params)


def test_spp_error_when_reshaped_too_small():
    layer = make_layer("SPP", [(1, 1, 8, 8)], "spp_param { pyramid_height: 3 }")
    with pytest.raises(LayerError, match="too small for pyramid_height 3"):
        layer(torch.zeros(1, 1, 3, 8))


# -- Im2col -------------------------------------------------------------------------------------


def np_im2col(x, top_grad, axis, kernel, stride, pad, dilation):
    """Caffe's im2col_nd_cpu / col2im_nd_cpu as loops: (top, bottom_grad)."""
    lead, C, sizes = x.shape[:axis], x.shape[axis], x.shape[axis + 1 :]
    out = [int((n + 2 * p - (d * (k - 1) + 1)) / s) + 1 for n, k, s, p, d in zip(sizes, kernel, stride, pad, dilation)]
    K = math.prod(kernel)
    xb = x.reshape(-1, C, *sizes)
    gb = top_grad.reshape(xb.shape[0], C * K, *out)
    top = np.zeros((xb.shape[0], C * K, *out))
    grad = np.zeros_like(xb)
    for b, c in itertools.product(range(xb.shape[0]), range(C)):
        for flat, offs in enumerate(itertools.product(*(range(k) for k in kernel))):
            for o in itertools.product(*(range(m) for m in out)):
                pos = tuple(oi * s - p + ki * d for oi, s, p, ki, d in zip(o, stride, pad, offs, dilation))
                if all(0 <= q < n for q, n in zip(pos, sizes)):
                    top[(b, c * K + flat, *o)] = xb[(b, c, *pos)]
                    grad[(b, c, *pos)] += gb[(b, c * K + flat, *o)]
    return top.reshape(*lead, C * K, *out), grad.reshape(x.shape)


# (bottom shape, convolution_param, axis, kernel, stride, pad, dilation)
IM2COL_CASES = [
    ((2, 3, 6, 5), "kernel_size: 3 stride: 2", 1, (3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 3, 10, 9), "kernel_size: 3 stride: 2 dilation: 3", 1, (3, 3), (2, 2), (0, 0), (3, 3)),
    ((2, 3, 6, 5), "kernel_h: 5 kernel_w: 3 stride: 2", 1, (5, 3), (2, 2), (0, 0), (1, 1)),
    (
        (1, 2, 7, 6),
        "kernel_size: 3 kernel_size: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 dilation: 1 dilation: 2",
        1,
        (3, 2),
        (2, 1),
        (1, 2),
        (1, 2),
    ),
    ((2, 3, 6, 5), "kernel_size: 3 stride: 2 pad: 1 force_nd_im2col: true", 1, (3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 3, 7), "kernel_size: 3 pad: 1", 1, (3,), (1,), (1,), (1,)),  # 1-D
    (
        (1, 2, 4, 5, 6),
        "kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 stride: 2 pad: 1 pad: 0 pad: 1 "
        "dilation: 1 dilation: 1 dilation: 2",
        1,
        (2, 3, 2),
        (1, 2, 2),
        (1, 0, 1),
        (1, 1, 2),
    ),
    ((1, 2, 3, 3, 2, 4), "kernel_size: 2", 1, (2, 2, 2, 2), (1, 1, 1, 1), (0, 0, 0, 0), (1, 1, 1, 1)),  # 4-D
    ((2, 2, 3, 6, 5), "kernel_size: 2 stride: 2 axis: 2", 2, (2, 2), (2, 2), (0, 0), (1, 1)),  # batch axes
    ((3, 6, 5), "kernel_size: 3 axis: -3", 0, (3, 3), (1, 1), (0, 0), (1, 1)),  # no batch axis
    # (2 + 0 − 3) / 2 truncates to 0 in C: one window, overhanging the bottom (zeros there)
    ((1, 2, 2, 5), "kernel_size: 3 stride: 2", 1, (3, 3), (2, 2), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("shape,params,axis,k,s,p,d", IM2COL_CASES)
def test_im2col_matches_caffe_loops(shape, params, axis, k, s, p, d):
    layer = make_layer("Im2col", [shape], f"convolution_param {{ {params} }}")
    x = t64(rand(shape, 5))
    (y,) = layer(x)
    gy = rand(tuple(y.shape), 6)
    ref, ref_grad = np_im2col(x.detach().numpy(), gy, axis, k, s, p, d)
    assert tuple(y.shape) == ref.shape
    assert layer.top_shapes([shape]) == [ref.shape]
    np.testing.assert_array_equal(y.detach().numpy(), ref)  # a pure copy
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(gy))
    np.testing.assert_allclose(g.numpy(), ref_grad, rtol=RTOL, atol=ATOL)


def test_im2col_caffe_examples():
    # test_im2col_layer.cpp TestSetup: (2, 3, 10, 11), kernel 3, stride 2, dilation 3 -> (2, 27, 2, 3)
    layer = make_layer("Im2col", [(2, 3, 10, 11)], "convolution_param { kernel_size: 3 stride: 2 dilation: 3 }")
    assert layer.top_shapes([(2, 3, 10, 11)]) == [(2, 27, 2, 3)]
    # TestForward / TestRect: the top-left column is the bottom's top-left window, channel slowest
    x = torch.from_numpy(rand((2, 3, 6, 5), 7))
    for params, (kh, kw) in (("kernel_size: 3 stride: 2", (3, 3)), ("kernel_h: 5 kernel_w: 3 stride: 2", (5, 3))):
        (y,) = make_layer("Im2col", [(2, 3, 6, 5)], f"convolution_param {{ {params} }}")(x)
        for c in range(3 * kh * kw):
            assert y[0, c, 0, 0] == x[0, c // (kh * kw), (c // kw) % kh, c % kw]
    # 2-D without the truncation quirk: torch's unfold lays the columns out the same way
    (y,) = make_layer("Im2col", [(2, 3, 6, 5)], "convolution_param { kernel_size: 2 pad: 1 stride: 2 dilation: 2 }")(x)
    ref = torch.nn.functional.unfold(x, 2, dilation=2, padding=1, stride=2)
    torch.testing.assert_close(y.reshape(ref.shape), ref, rtol=0, atol=0)


def test_im2col_follows_the_bottom_size():
    layer = make_layer("Im2col", [(1, 2, 6, 6)], "convolution_param { kernel_size: 3 stride: 2 }")
    x = rand((3, 4, 9, 7), 8)
    (y,) = layer(t64(x, grad=False))
    ref, _ = np_im2col(x, np.zeros(y.shape), 1, (3, 3), (2, 2), (0, 0), (1, 1))
    assert layer.top_shapes([x.shape]) == [ref.shape]
    np.testing.assert_array_equal(y.numpy(), ref)


@pytest.mark.parametrize(
    "shape,params",
    [
        ((2, 2, 5, 6), "kernel_size: 3 stride: 2 dilation: 2 pad: 1"),
        ((1, 2, 4, 3, 4), "kernel_size: 2 stride: 1 stride: 2 stride: 1 pad: 1"),
        ((1, 2, 2, 5), "kernel_size: 3 stride: 2"),
    ],
)
def test_im2col_gradcheck(shape, params):
    layer = make_layer("Im2col", [shape], f"convolution_param {{ {params} }}")
    x = t64(rand(shape, 9))
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,params,match",
    [
        ((1, 2, 5, 5), "stride: 2", "kernel_size .* is required"),
        ((1, 2, 5, 5), "kernel_size: 3 kernel_size: 3 kernel_size: 3", "once per spatial axis"),
        ((1, 2, 5, 5, 5), "kernel_h: 3 kernel_w: 3", "only be used for 2-D"),
        ((1, 2, 5, 5), "kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
        ((1, 2, 5, 5), "kernel_size: 3 stride_h: 2", "stride_h and stride_w"),
        ((1, 2, 5, 5), "kernel_size: 3 dilation: 0", "dilation must be > 0"),
        ((1, 2, 5, 5), "kernel_size: 0", "kernel_size must be > 0"),
        ((1, 2, 5, 5), "kernel_size: 3 axis: 4", "axis 4 is out of range"),
        ((1, 2, 5, 5), "kernel_size: 3 axis: 3", "no spatial axis"),
        ((1, 2, 1, 5), "kernel_size: 5", "output of size -3"),
    ],
)
def test_im2col_errors(shape, params, match):
    with pytest.raises(LayerError, match=match):
        make_layer("Im2col", [shape], f"convolution_param {{ {params} }}")


# -- Filter -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes,selector",
    [
        # test_filter_layer.cpp: data, labels, selector (4, 1, 1, 1) = 0 1 1 0
        ([(4, 3, 2, 2), (4, 1, 1, 1)], [0, 1, 1, 0]),
        ([(5, 2), (5,)], [-0.5, 0, 2.0, float("nan"), 0]),  # any non-zero value, NaN too, selects
        ([(3, 2, 2)], [1, 1, 1]),
        ([(3, 2), (3, 4, 1)], [0, 0, 0]),  # nothing selected: tops (0, ...)
    ],
)
def test_filter_forward_backward(shapes, selector):
    n = len(selector)
    sel_shape = (n, 1, 1, 1) if len(shapes[0]) == 4 else (n,)
    layer = make_layer("Filter", [*shapes, sel_shape], ntop=len(shapes))
    xs = [t64(rand(s, 10 + i)) for i, s in enumerate(shapes)]
    sel = t64(np.reshape(selector, sel_shape))
    tops = layer(*xs, sel)
    keep = [i for i, v in enumerate(selector) if v != 0]  # NaN != 0
    assert layer.top_shapes([*shapes, sel_shape]) == [tuple(s) for s in shapes]  # Caffe's first reshape
    gys = []
    for t, x, s in zip(tops, xs, shapes):
        assert tuple(t.shape) == (len(keep), *s[1:])
        np.testing.assert_array_equal(t.detach().numpy(), x.detach().numpy()[keep])
        gys.append(torch.from_numpy(rand(tuple(t.shape), 20)))
    grads = torch.autograd.grad(tops, [*xs, sel], gys, allow_unused=True)
    for g, gy, x in zip(grads, gys, xs):
        ref = np.zeros(x.shape)
        ref[keep] = gy.numpy()
        np.testing.assert_array_equal(g.numpy(), ref)
    assert grads[-1] is None  # the selector gets no gradient


def test_filter_gradcheck():
    layer = make_layer("Filter", [(4, 3), (4, 2, 2), (4, 1)], ntop=2)
    sel = torch.tensor([[1.0], [0.0], [3.0], [1.0]], dtype=torch.float64)
    xs = (t64(rand((4, 3), 30)), t64(rand((4, 2, 2), 31)))
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, sel), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "shapes,ntop,match",
    [
        ([(4, 3), (4, 2)], 1, r"must have shape \(N,\) or \(N, 1, ..., 1\)"),
        ([(4, 3), ()], 1, r"must have shape \(N,\)"),
        ([(4, 3), (5, 2), (4,)], 2, r"bottom 1 has shape \(5, 2\): its first axis must equal the selector's"),
        ([(4, 3), (4, 2), (4,)], 1, "needs one top per data bottom"),
    ],
)
def test_filter_errors(shapes, ntop, match):
    with pytest.raises(LayerError, match=match):
        make_layer("Filter", shapes, ntop=ntop)


def test_filter_checks_shapes_each_forward():
    layer = make_layer("Filter", [(4, 3), (4,)])
    with pytest.raises(LayerError, match="first axis must equal"):
        layer(torch.zeros(5, 3), torch.ones(4))


# -- BatchReindex -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,permut",
    [
        ((5, 4, 3, 2), [4, 0, 4, 0, 1, 2]),  # test_batch_reindex_layer.cpp
        ((3, 2), [2.7, 0.2, 1.0, 2.0]),  # C's cast truncates: 2.7 -> 2
        ((4, 3), [3, 2, 1, 0]),
        ((3, 2, 2), []),  # no item: top (0, 2, 2)
    ],
)
def test_batch_reindex_forward_backward(shape, permut):
    layer = make_layer("BatchReindex", [shape, (len(permut),)])
    x = t64(rand(shape, 40))
    p = torch.tensor(permut, dtype=torch.float64, requires_grad=True)
    (y,) = layer(x, p)
    idx = np.array([int(v) for v in permut], dtype=np.int64)
    assert tuple(y.shape) == (len(permut), *shape[1:])
    assert layer.top_shapes([shape, (len(permut),)]) == [(len(permut), *shape[1:])]
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy()[idx])
    gy = rand(tuple(y.shape), 41)
    gx, gp = torch.autograd.grad(y, [x, p], torch.from_numpy(gy), allow_unused=True)
    ref = np.zeros(shape)
    np.add.at(ref, idx, gy)  # repeated indices add
    np.testing.assert_allclose(gx.numpy(), ref, rtol=RTOL, atol=ATOL)
    assert gp is None  # no gradient to the indices


def test_batch_reindex_gradcheck():
    layer = make_layer("BatchReindex", [(5, 4, 3), (6,)])
    p = torch.tensor([4.0, 0, 4, 0, 1, 2], dtype=torch.float64)
    x = t64(rand((5, 4, 3), 42))
    assert torch.autograd.gradcheck(lambda t: layer(t, p), (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "permut,match",
    [
        ([0, -1, 2], r"bottom 1 \('b1'\) holds index -1.0 at position 1: indices must lie in \[0, 3\)"),
        ([0, 1, 3], r"holds index 3.0 at position 2: indices must lie in \[0, 3\), the first axis of bottom 0"),
        ([float("nan")], "holds index nan at position 0"),
        ([-0.5], "holds index -0.5"),  # Caffe checks the value before its cast to int
    ],
)
def test_batch_reindex_bad_indices(permut, match):
    layer = make_layer("BatchReindex", [(3, 2), (len(permut),)])
    with pytest.raises(LayerError, match=match):
        layer(torch.zeros(3, 2), torch.tensor(permut))


@pytest.mark.parametrize(
    "shapes,match",
    [
        ([(3, 2), (3, 1)], r"bottom 1 \('b1'\), the indices, must have exactly one axis \(M,\), got shape \(3, 1\)"),
        ([(3, 2), ()], "must have exactly one axis"),
        ([(), (3,)], r"bottom 0 \('b0'\) needs a first axis"),
    ],
)
def test_batch_reindex_shape_errors(shapes, match):
    with pytest.raises(LayerError, match=match):
        make_layer("BatchReindex", shapes)


# -- in a Net -----------------------------------------------------------------------------------

NET = """
name: "select"
layer { name: "in" type: "Input" top: "data" top: "sel" top: "perm"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } shape { dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "filt" type: "Filter" bottom: "ip" bottom: "data" bottom: "sel" top: "ip_f" top: "data_f" }
layer { name: "reidx" type: "BatchReindex" bottom: "ip_f" bottom: "perm" top: "ip_r" }
layer { name: "loss" type: "Reduction" bottom: "ip_r" top: "loss" reduction_param { operation: SUMSQ }
        loss_weight: 1 }
"""


def test_filter_and_batch_reindex_in_a_net(tmp_path):
    path = tmp_path / "select.prototxt"
    path.write_text(NET)
    caffe.set_random_seed(7)
    net = caffe.Net(str(path), caffe.TRAIN)
    # set-up shapes: the Filter's tops get all 4 items (Caffe's first reshape)
    assert net.blobs["ip_f"].data.shape == (4, 2) and net.blobs["data_f"].data.shape == (4, 3)
    assert net.blobs["ip_r"].data.shape == (5, 2)
    W, b = (p.data.astype(np.float64) for p in net.params["ip"])
    x = rand((4, 3), 50).astype(np.float32)
    for sel, perm in (
        ([1, 0, 1, 1], [2, 0, 2, 1, 0]),
        ([0, 1, 0, 0], [0, 0, 0, 0, 0]),
        ([1, 1, 1, 1], [3, 2, 1, 0, 3]),
    ):
        keep = [i for i, v in enumerate(sel) if v]
        rows = np.asarray(keep)[perm]
        out = net.forward(data=x, sel=np.asarray(sel, np.float32), perm=np.asarray(perm, np.float32))
        ip_r = x.astype(np.float64)[rows] @ W.T + b
        assert net.blobs["ip_f"].data.shape == (len(keep), 2) and net.blobs["data_f"].data.shape == (len(keep), 3)
        np.testing.assert_allclose(net.blobs["data_f"].data, x[keep], rtol=0, atol=0)
        np.testing.assert_allclose(out["loss"], (ip_r**2).sum(), rtol=1e-5, atol=1e-6)
        for p in net.params["ip"]:
            p.diff[...] = 0
        net.backward()
        gW = 2 * ip_r.T @ x.astype(np.float64)[rows]
        np.testing.assert_allclose(net.params["ip"][0].diff, gW, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(net.params["ip"][1].diff, 2 * ip_r.sum(0), rtol=1e-4, atol=1e-5)
        ip_grad = np.zeros((4, 2))
        np.add.at(ip_grad, rows, 2 * ip_r)
        np.testing.assert_allclose(net.blobs["ip"].diff, ip_grad, rtol=1e-4, atol=1e-5)
    # nothing selected: the Filter's tops are empty and every permutation index is out of range
    with pytest.raises(LayerError, match=r"bottom 1 \('perm'\) holds index 0.0 at position 0.*\[0, 0\)"):
        net.forward(data=x, sel=np.zeros(4, np.float32), perm=np.zeros(5, np.float32))


def test_spp_in_a_net(tmp_path):
    path = tmp_path / "spp.prototxt"
    path.write_text(
        'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 7 } } }\n'
        'layer { name: "spp" type: "SPP" bottom: "data" top: "spp" spp_param { pyramid_height: 2 pool: AVE } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "spp" top: "ip" inner_product_param { num_output: 4 } }\n'
    )
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["spp"].data.shape == (2, 15) and net.params["ip"][0].data.shape == (4, 15)
    x = rand((2, 3, 9, 7), 60)
    net.forward(data=x.astype(np.float32))
    ref, _ = np_spp(x.astype(np.float32).astype(np.float64), np.zeros((2, 15)), 2, "AVE")
    np.testing.assert_allclose(net.blobs["spp"].data, ref, rtol=1e-5, atol=1e-6)
    # another input size: the pyramid is recomputed, the top keeps its size
    net.blobs["data"].reshape(1, 3, 16, 5)
    net.reshape()
    assert net.blobs["spp"].data.shape == (1, 15)
    x = rand((1, 3, 16, 5), 61)
    net.forward(data=x.astype(np.float32))
    ref, _ = np_spp(x.astype(np.float32).astype(np.float64), np.zeros((1, 15)), 2, "AVE")
    np.testing.assert_allclose(net.blobs["spp"].data, ref, rtol=1e-5, atol=1e-6)
