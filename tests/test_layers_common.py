"""Tests of caffe_compat.layers.common: NumPy formulas, Caffe's gradient rules (Eltwise MAX ties,
Embed), float64 gradchecks, top shapes, shape-check errors, and real-Caffe fixtures replayed one
layer at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.layer_replay import FIX_ATOL, FIX_RTOL, load_case, replay_layer

RTOL, ATOL = 1e-5, 1e-6  # float64 NumPy formulas against float32 layers


def make_layer(type_name: str, bottom_shapes, params: str = "", ntop: int = 1, phase=caffe_pb2.TEST):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(params, lp)
    lp.name, lp.type = "c", type_name
    lp.bottom.extend([f"b{i}" for i in range(len(bottom_shapes))])
    lp.top.extend([f"t{i}" for i in range(ntop)])
    return layer_class(type_name)(lp, [tuple(s) for s in bottom_shapes], phase)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def t32(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def t64(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)


def close(a, b, rtol=RTOL, atol=ATOL):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def gradcheck(layer, *arrays, with_blobs=True):
    layer = layer.double()
    xs = [t64(a) for a in arrays]
    ps = list(layer.blobs) if with_blobs else []

    def f(*args):
        return layer(*args[: len(xs)])

    assert torch.autograd.gradcheck(f, (*xs, *ps), eps=1e-6, atol=1e-6, rtol=1e-5)


# -- InnerProduct -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,params,top",
    [
        ((2, 3, 2, 2), "num_output: 5", (2, 5)),
        ((2, 3, 4, 5), "num_output: 6 axis: 2", (2, 3, 6)),
        ((3, 7), "num_output: 4 transpose: true", (3, 4)),
        ((2, 3, 4), "num_output: 2 axis: -1 bias_term: false", (2, 3, 2)),
    ],
)
def test_inner_product_forward_shapes_and_gradcheck(shape, params, top):
    layer = make_layer(
        "InnerProduct",
        [shape],
        f"inner_product_param {{ {params} weight_filler {{ type: 'gaussian' std: 0.3 }} bias_filler {{ type: 'gaussian' }} }}",
    )
    p = layer.param.inner_product_param
    axis = p.axis % len(shape)
    k = int(np.prod(shape[axis:]))
    assert tuple(layer.blobs[0].shape) == ((k, p.num_output) if p.transpose else (p.num_output, k))
    assert len(layer.blobs) == (2 if p.bias_term else 1)
    x = rand(shape)
    w = layer.blobs[0].detach().numpy().astype(np.float64)
    w = w.T if p.transpose else w
    ref = x.reshape(shape[:axis] + (k,)) @ w.T
    if p.bias_term:
        ref = ref + layer.blobs[1].detach().numpy()
    y = layer(t32(x))[0]
    assert tuple(y.shape) == top and layer.top_shapes([shape]) == [top]
    close(y, ref)
    gradcheck(layer, rand(shape, 1))


def test_inner_product_default_fillers_are_zero_and_k_mismatch_raises():
    layer = make_layer("InnerProduct", [(2, 3, 4)], "inner_product_param { num_output: 3 }")
    assert not layer.blobs[0].detach().any() and not layer.blobs[1].detach().any()
    with pytest.raises(LayerError, match="K = 15.*K = 12"):
        layer.top_shapes([(2, 3, 5)])
    with pytest.raises(LayerError, match="num_output"):
        make_layer("InnerProduct", [(2, 3)], "")


# -- Eltwise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4, 10])
@pytest.mark.parametrize("transpose,bias", [(False, True), (True, True), (False, False)])
def test_inner_product_onednn_path_matches_float64(batch, transpose, bias):
    """float32 on the CPU runs through oneDNN's inner product (forward, dx, dW, db): same values
    as the float64 product within float32 rounding, and diffs accumulate across two backwards."""
    import platform

    from caffe_compat.layers import common

    if platform.machine() in ("x86_64", "AMD64"):
        assert common._onednn_linear_available()  # x86 torch wheels ship oneDNN: the path must run
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 37, generator=gen).requires_grad_(True)
    w = torch.randn(*((37, 23) if transpose else (23, 37)), generator=gen).requires_grad_(True)
    b = torch.randn(23, generator=gen).requires_grad_(True) if bias else None
    weff = w.t() if transpose else w
    y = common.linear(x, weff, b)
    if common._onednn_linear_available():
        assert type(y.grad_fn).__name__ == "_OneDnnLinearBackward"
    dy = torch.randn(batch, 23, generator=gen)
    y.backward(dy)
    y2 = common.linear(x, weff, b)
    y2.backward(dy)  # accumulates: every grad is twice the single-pass one
    xd, wd, dyd = x.detach().double(), weff.detach().double(), dy.double()
    ref = xd @ wd.t() + (b.detach().double() if bias else 0)
    np.testing.assert_allclose(y.detach().double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.double().numpy(), (2 * dyd @ wd).numpy(), rtol=1e-5, atol=1e-5)
    gw = 2 * dyd.t() @ xd
    np.testing.assert_allclose(w.grad.double().numpy(), (gw.t() if transpose else gw).numpy(), rtol=1e-5, atol=1e-5)
    if bias:
        np.testing.assert_allclose(b.grad.double().numpy(), (2 * dyd.sum(0)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_inner_product_onednn_swapped_forward_for_batches_of_rows(monkeypatch, bias):
    """From 8 rows on, the forward runs as (W x^T)^T (oneDNN streams W): the same values as the
    usual orientation (equal bits here; float32 rounding asserted), the bias added once."""
    from caffe_compat.layers import common

    if not common._onednn_linear_available():
        pytest.skip("this torch has no oneDNN inner product")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 500, generator=gen)
    w = torch.randn(300, 500, generator=gen)
    b = torch.randn(300, generator=gen) if bias else None
    calls = []
    real = common._ONEDNN_LINEAR

    def spy(a, weight, *rest):
        calls.append(tuple(a.shape))
        return real(a, weight, *rest)

    monkeypatch.setattr(common, "_ONEDNN_LINEAR", spy)
    y = common.linear(x, w, b)
    assert calls == [(300, 500)]  # W was oneDNN's input
    assert y.shape == (16, 300) and y.is_contiguous()
    usual = real(x, w, b, "none", [], "")
    torch.testing.assert_close(y, usual, rtol=1e-6, atol=1e-6)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    calls.clear()
    common.linear(x[:4], w, b)  # a few rows: the usual orientation
    assert calls == [(4, 500)]


def test_inner_product_onednn_backward_of_an_expanded_gradient():
    """``y.sum()`` hands the backward a stride-0 gradient: oneDNN must read it as ones."""
    from caffe_compat.layers import common

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 37, generator=gen).requires_grad_(True)
    w = torch.randn(23, 37, generator=gen).requires_grad_(True)
    b = torch.randn(23, generator=gen).requires_grad_(True)
    common.linear(x, w, b).sum().backward()
    ones = torch.ones(10, 23, dtype=torch.float64)
    np.testing.assert_allclose(x.grad.numpy(), (ones @ w.detach().double()).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.grad.numpy(), (ones.t() @ x.detach().double()).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), np.full(23, 10.0), rtol=0, atol=0)


def test_inner_product_onednn_off_uses_f_linear():
    from caffe_compat.layers import common

    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    torch.backends.mkldnn.enabled = False  # what torch.backends.mkldnn.flags(enabled=False) sets
    try:
        y = common.linear(x, w, None)
    finally:
        torch.backends.mkldnn.enabled = True
    assert type(y.grad_fn).__name__ != "_OneDnnLinearBackward"
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=0, atol=0)


def test_eltwise_forward_ops():
    a, b, c = rand((2, 3, 4), 0), rand((2, 3, 4), 1), rand((2, 3, 4), 2)
    shapes = [(2, 3, 4)] * 3
    close(make_layer("Eltwise", shapes[:2], "eltwise_param { coeff: 1 coeff: -0.5 }")(t32(a), t32(b))[0], a - 0.5 * b)
    close(make_layer("Eltwise", shapes)(t32(a), t32(b), t32(c))[0], a + b + c)
    close(make_layer("Eltwise", shapes, "eltwise_param { operation: PROD }")(t32(a), t32(b), t32(c))[0], a * b * c)
    close(
        make_layer("Eltwise", shapes, "eltwise_param { operation: MAX }")(t32(a), t32(b), t32(c))[0],
        np.maximum(np.maximum(a, b), c),
    )


def test_eltwise_max_tie_rule():
    # ties between bottom 0 and 1 go to bottom 1; later bottoms win only when strictly greater
    layer = make_layer("Eltwise", [(4,)] * 3, "eltwise_param { operation: MAX }")
    a = t32([1.0, 2.0, 5.0, 0.0], True)
    b = t32([1.0, 1.0, 5.0, 0.0], True)
    c = t32([0.0, 2.0, 5.0, 1.0], True)
    layer(a, b, c)[0].backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    close(a.grad, [0, 2, 0, 0], 0, 0)
    close(b.grad, [1, 0, 3, 0], 0, 0)
    close(c.grad, [0, 0, 0, 4], 0, 0)


def test_eltwise_prod_gradient_stable_and_naive():
    x0, x1 = t32([0.0, 2.0], True), t32([3.0, 4.0], True)
    make_layer("Eltwise", [(2,)] * 2, "eltwise_param { operation: PROD }")(x0, x1)[0].sum().backward()
    close(x0.grad, [3, 4], 0, 0)
    close(x1.grad, [0, 2], 0, 0)
    x0, x1 = t32([0.0, 2.0], True), t32([3.0, 4.0], True)
    make_layer("Eltwise", [(2,)] * 2, "eltwise_param { operation: PROD stable_prod_grad: false }")(x0, x1)[
        0
    ].sum().backward()
    # Caffe's dy * top / x: 0/0 at the zero input
    assert np.isnan(x0.grad[0].item())
    close(x0.grad[1:], [4], 0, 0)
    close(x1.grad, [0, 2], 0, 0)


@pytest.mark.parametrize(
    "params",
    [
        "eltwise_param { coeff: 2 coeff: -1 coeff: 0.5 }",
        "eltwise_param { operation: PROD }",
        "eltwise_param { operation: MAX }",
    ],
)
def test_eltwise_gradcheck(params):
    shapes = [(2, 3)] * 3
    gradcheck(make_layer("Eltwise", shapes, params), rand(shapes[0], 0), rand(shapes[0], 1), rand(shapes[0], 2))


def test_eltwise_errors():
    with pytest.raises(LayerError, match="bottom 1 has shape \\(2, 4\\)"):
        make_layer("Eltwise", [(2, 3), (2, 4)]).top_shapes([(2, 3), (2, 4)])
    with pytest.raises(LayerError, match="once per bottom"):
        make_layer("Eltwise", [(2,), (2,)], "eltwise_param { coeff: 1 }")
    with pytest.raises(LayerError, match="only for operation SUM"):
        make_layer("Eltwise", [(2,), (2,)], "eltwise_param { operation: PROD coeff: 1 coeff: 1 }")
    with pytest.raises(LayerError, match="at least 2 bottom"):
        make_layer("Eltwise", [(2,)])


# -- Concat / Slice / Split / Flatten / Reshape / Crop / Tile -------------------------------------


@pytest.mark.parametrize(
    "shapes,params,axis",
    [
        ([(2, 3, 4), (2, 1, 4)], "", 1),
        ([(2, 3, 4), (2, 3, 2), (2, 3, 1)], "concat_param { axis: -1 }", 2),
        ([(2, 3), (5, 3)], "concat_param { concat_dim: 0 }", 0),
    ],
)
def test_concat(shapes, params, axis):
    layer = make_layer("Concat", shapes, params)
    xs = [rand(s, i) for i, s in enumerate(shapes)]
    ref = np.concatenate(xs, axis=axis)
    close(layer(*map(t32, xs))[0], ref)
    assert layer.top_shapes(shapes) == [ref.shape]
    gradcheck(layer, *xs)


def test_concat_errors():
    with pytest.raises(LayerError, match="bottom 1 is \\(2, 3, 5\\).*axis 2 differs"):
        make_layer("Concat", [(2, 3, 4), (2, 3, 5)]).top_shapes([(2, 3, 4), (2, 3, 5)])
    with pytest.raises(LayerError, match="same #axes: bottom 1"):
        make_layer("Concat", [(2, 3), (2, 3, 1)]).top_shapes([(2, 3), (2, 3, 1)])
    with pytest.raises(LayerError, match="not both"):
        make_layer("Concat", [(2, 3)] * 2, "concat_param { axis: 1 concat_dim: 1 }")


def test_concat_one_bottom_aliases():
    x = t32(rand((2, 3)))
    y = make_layer("Concat", [(2, 3)])(x)[0]
    assert y is not x and y.data_ptr() == x.data_ptr()


@pytest.mark.parametrize(
    "params,ntop,sizes,axis",
    [
        ("slice_param { axis: 1 slice_point: 1 slice_point: 4 }", 3, [1, 3, 2], 1),
        ("", 3, [2, 2, 2], 1),
        ("slice_param { slice_dim: 2 }", 2, [2, 2], 2),
        ("slice_param { axis: -1 slice_point: 3 }", 2, [3, 1], 2),
    ],
)
def test_slice(params, ntop, sizes, axis):
    shape = (2, 6, 4)
    layer = make_layer("Slice", [shape], params, ntop=ntop)
    x = rand(shape)
    tops = layer(t32(x))
    refs = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    assert len(tops) == ntop
    for t, r in zip(tops, refs):
        close(t, r)
    assert layer.top_shapes([shape]) == [r.shape for r in refs]
    layer = layer.double()
    xt = t64(rand(shape, 1))
    assert torch.autograd.gradcheck(lambda a: layer(a), (xt,), eps=1e-6, atol=1e-6)


def test_slice_errors():
    with pytest.raises(LayerError, match="evenly divide"):
        make_layer("Slice", [(2, 5)], "", ntop=2).top_shapes([(2, 5)])
    with pytest.raises(LayerError, match="len\\(top\\) - 1 = 2"):
        make_layer("Slice", [(2, 5)], "slice_param { slice_point: 1 }", ntop=3)
    with pytest.raises(LayerError, match="strictly increasing"):
        make_layer("Slice", [(2, 5)], "slice_param { slice_point: 3 slice_point: 2 }", ntop=3)
    with pytest.raises(LayerError, match="inside the bottom"):
        make_layer("Slice", [(2, 5)], "slice_param { slice_point: 5 }", ntop=2).top_shapes([(2, 5)])


def test_split_tops_are_distinct_aliases_and_gradients_sum():
    layer = make_layer("Split", [(2, 3)], ntop=3)
    x = t32(rand((2, 3)), True)
    tops = layer(x)
    assert len(tops) == 3 and len({id(t) for t in tops}) == 3
    assert all(t.data_ptr() == x.data_ptr() for t in tops)
    torch.autograd.backward(list(tops), [torch.full((2, 3), float(k + 1)) for k in range(3)])
    close(x.grad, np.full((2, 3), 6.0), 0, 0)


@pytest.mark.parametrize(
    "params,top",
    [
        ("", (2, 60)),
        ("flatten_param { axis: 2 }", (2, 3, 20)),
        ("flatten_param { axis: 0 end_axis: 1 }", (6, 4, 5)),
        ("flatten_param { end_axis: -2 }", (2, 12, 5)),
    ],
)
def test_flatten(params, top):
    layer = make_layer("Flatten", [(2, 3, 4, 5)], params)
    x = rand((2, 3, 4, 5)).astype(np.float32)
    close(layer(t32(x))[0], x.reshape(top), 0, 0)
    assert layer.top_shapes([(2, 3, 4, 5)]) == [top]


@pytest.mark.parametrize(
    "shape_params,top",
    [
        ("shape { dim: 0 dim: -1 dim: 2 }", (2, 30, 2)),
        ("shape { dim: -1 }", (120,)),
        ("shape { dim: 0 dim: 0 dim: 20 }", (2, 3, 20)),
        ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 4, 5)),
        ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1)),
        ("shape { dim: -1 dim: 5 } axis: -2", (2, 3, 4, 1, 5)),  # -2: the last axis is replaced
        ("shape { dim: 12 } axis: 1 num_axes: 2", (2, 12, 5)),
        ("shape { dim: 0 dim: 2 dim: -1 } axis: 1", (2, 3, 2, 10)),
    ],
)
def test_reshape(shape_params, top):
    layer = make_layer("Reshape", [(2, 3, 4, 5)], f"reshape_param {{ {shape_params} }}")
    x = rand((2, 3, 4, 5)).astype(np.float32)
    y = layer(t32(x))[0]
    assert tuple(y.shape) == top and layer.top_shapes([(2, 3, 4, 5)]) == [top]
    close(y, x.reshape(top), 0, 0)


@pytest.mark.parametrize(
    "shape_params,match",
    [
        ("shape { dim: -1 dim: -1 }", "multiple -1"),
        ("shape { dim: 7 dim: -1 }", "divisible"),
        ("shape { dim: 3 dim: 5 }", "output count must match"),
        ("shape { dim: 0 dim: 0 } axis: 3", "no corresponding bottom axis"),
        ("shape { dim: 2 } axis: 5", "out of range"),
        ("shape { dim: 2 } axis: 2 num_axes: 3", "end_axis"),
    ],
)
def test_reshape_errors(shape_params, match):
    with pytest.raises(LayerError, match=match):
        make_layer("Reshape", [(2, 3, 4, 5)], f"reshape_param {{ {shape_params} }}").top_shapes([(2, 3, 4, 5)])


@pytest.mark.parametrize(
    "params,sl",
    [
        ("crop_param { axis: 2 offset: 2 offset: 3 }", np.s_[:, :, 2:7, 3:7]),
        ("crop_param { offset: 1 }", np.s_[:, :, 1:6, 1:5]),
        ("", np.s_[:, :, 0:5, 0:4]),
        ("crop_param { axis: 1 offset: 0 offset: 4 offset: 2 }", np.s_[:, 0:2, 4:9, 2:6]),
    ],
)
def test_crop(params, sl):
    big, small = (1, 3, 9, 8), (1, 2, 5, 4)
    layer = make_layer("Crop", [big, small], params)
    x = rand(big).astype(np.float32)
    xt, rt = t32(x, True), t32(np.zeros(small), True)
    y = layer(xt, rt)[0]
    ref = x[sl]
    close(y, ref, 0, 0)
    assert layer.top_shapes([big, small]) == [ref.shape]
    y.backward(torch.ones_like(y))
    mask = np.zeros(big)
    mask[sl] = 1
    close(xt.grad, mask, 0, 0)
    assert rt.grad is None  # the size reference gets no gradient


def test_crop_errors():
    with pytest.raises(LayerError, match="invalid crop parameters in dimension 3"):
        make_layer("Crop", [(1, 2, 9, 8), (1, 2, 5, 4)], "crop_param { offset: 2 offset: 5 }").top_shapes(
            [(1, 2, 9, 8), (1, 2, 5, 4)]
        )
    with pytest.raises(LayerError, match="invalid crop parameters in dimension 1"):
        make_layer("Crop", [(1, 2, 9, 8), (1, 3, 5, 4)]).top_shapes([(1, 2, 9, 8), (1, 3, 5, 4)])
    with pytest.raises(LayerError, match="number of crop_param.offset values"):
        make_layer("Crop", [(1, 2, 9, 8), (1, 2, 5, 4)], "crop_param { offset: 1 offset: 1 offset: 1 }").top_shapes(
            [(1, 2, 9, 8), (1, 2, 5, 4)]
        )


@pytest.mark.parametrize("axis,tiles", [(1, 2), (0, 3), (-1, 2)])
def test_tile(axis, tiles):
    shape = (2, 3, 2)
    layer = make_layer("Tile", [shape], f"tile_param {{ axis: {axis} tiles: {tiles} }}")
    x = rand(shape).astype(np.float32)
    reps = [1, 1, 1]
    reps[axis] = tiles
    close(layer(t32(x))[0], np.tile(x, reps), 0, 0)
    gradcheck(layer, x)
    with pytest.raises(LayerError, match="tiles"):
        make_layer("Tile", [shape], "tile_param { axis: 1 }")


# -- Scale / Bias -------------------------------------------------------------------------------


def test_scale_learned_default_one_and_shapes():
    layer = make_layer("Scale", [(2, 3, 4, 5)])
    assert tuple(layer.blobs[0].shape) == (3,)
    close(layer.blobs[0], np.ones(3), 0, 0)
    layer = make_layer(
        "Scale",
        [(2, 3, 4, 5)],
        "scale_param { axis: 1 num_axes: 2 bias_term: true filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
    )
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4), (3, 4)]
    x = rand((2, 3, 4, 5))
    g, b = (layer.blobs[i].detach().numpy().astype(np.float64) for i in (0, 1))
    close(layer(t32(x))[0], x * g[None, :, :, None] + b[None, :, :, None])
    gradcheck(layer, x)
    layer = make_layer("Scale", [(2, 3, 4)], "scale_param { axis: 0 num_axes: -1 }")
    assert tuple(layer.blobs[0].shape) == (2, 3, 4)
    layer = make_layer("Scale", [(2, 3, 4)], "scale_param { num_axes: 0 bias_term: true }")
    assert [tuple(b.shape) for b in layer.blobs] == [(), ()]
    layer.blobs[0].data.fill_(3.0)
    layer.blobs[1].data.fill_(-1.0)
    x = rand((2, 3, 4))
    close(layer(t32(x))[0], 3 * x - 1)


def test_scale_two_bottoms_gradcheck_and_bias():
    layer = make_layer("Scale", [(2, 3, 4), (3,)], "scale_param { bias_term: true bias_filler { type: 'gaussian' } }")
    assert [tuple(b.shape) for b in layer.blobs] == [(3,)]  # only the bias is a blob
    x, s = rand((2, 3, 4)), rand((3,), 1)
    b = layer.blobs[0].detach().numpy().astype(np.float64)
    close(layer(t32(x), t32(s))[0], x * s[None, :, None] + b[None, :, None])
    gradcheck(layer, x, s)
    layer = make_layer("Scale", [(2, 3, 4), (2, 3)], "scale_param { axis: 0 }")
    gradcheck(layer, x, rand((2, 3), 2))


def test_scale_bias_dimension_mismatch():
    with pytest.raises(
        LayerError, match="dimension mismatch between bottom\\[0\\]->shape\\(1\\) = 3 and scale->shape\\(0\\) = 4"
    ):
        make_layer("Scale", [(2, 3, 4), (4,)]).top_shapes([(2, 3, 4), (4,)])
    with pytest.raises(LayerError, match="extends past"):
        make_layer("Bias", [(2, 3, 4), (3, 4, 5)]).top_shapes([(2, 3, 4), (3, 4, 5)])
    with pytest.raises(LayerError, match="extends past"):
        make_layer("Scale", [(2, 3)], "scale_param { num_axes: 2 }")


def test_bias():
    layer = make_layer("Bias", [(2, 3, 4)], "bias_param { filler { type: 'gaussian' } }")
    assert tuple(layer.blobs[0].shape) == (3,)
    x = rand((2, 3, 4))
    b = layer.blobs[0].detach().numpy().astype(np.float64)
    close(layer(t32(x))[0], x + b[None, :, None])
    gradcheck(layer, x)
    assert not make_layer("Bias", [(2, 3)]).blobs[0].detach().any()  # default filler: 0
    two = make_layer("Bias", [(2, 3, 4), (3, 4)])
    assert len(two.blobs) == 0
    gradcheck(two, x, rand((3, 4), 1))


# -- Reduction / ArgMax / Softmax ---------------------------------------------------------------


@pytest.mark.parametrize(
    "params,fn",
    [
        ("", lambda x: x.sum()),
        ("reduction_param { operation: SUM axis: 1 }", lambda x: x.reshape(2, -1).sum(1)),
        ("reduction_param { operation: ASUM axis: 2 }", lambda x: np.abs(x).reshape(2, 3, -1).sum(2)),
        ("reduction_param { operation: SUMSQ axis: 0 coeff: 0.5 }", lambda x: 0.5 * (x * x).sum()),
        ("reduction_param { operation: MEAN axis: -1 coeff: 2 }", lambda x: 2 * x.mean(-1)),
    ],
)
def test_reduction(params, fn):
    shape = (2, 3, 4, 2)
    layer = make_layer("Reduction", [shape], params)
    x = rand(shape)
    ref = fn(x)
    y = layer(t32(x))[0]
    assert tuple(y.shape) == np.shape(ref) and layer.top_shapes([shape]) == [np.shape(ref)]
    close(y, ref)
    gradcheck(layer, rand(shape, 1))


def _np_argmax(row, k):
    # Caffe: std::greater on (value, index) pairs, so ties go to the larger index first
    order = sorted(range(len(row)), key=lambda i: (row[i], i), reverse=True)
    return order[:k]


def test_argmax_flat_and_axis_with_ties():
    x = np.array([[1.0, 3.0, 3.0, 0.0, 2.0, 3.0], [5.0, 4.0, 5.0, -1.0, 0.0, 1.0]], np.float32)
    layer = make_layer("ArgMax", [(2, 6)], "argmax_param { top_k: 2 out_max_val: true }")
    y = layer(t32(x))[0].numpy()
    assert y.shape == (2, 2, 2) and layer.top_shapes([(2, 6)]) == [(2, 2, 2)]
    for n in range(2):
        idx = _np_argmax(list(x[n]), 2)
        close(y[n, 0], idx, 0, 0)
        close(y[n, 1], x[n, idx], 0, 0)
    np.testing.assert_array_equal(y[0, 0], [5, 2])  # the three 3.0s: highest indices first

    x4 = rand((3, 5, 2, 3)).astype(np.float32)
    y = make_layer("ArgMax", [x4.shape])(t32(x4))[0].numpy()
    assert y.shape == (3, 1, 1, 1)
    close(y.reshape(3), x4.reshape(3, -1).argmax(1), 0, 0)

    layer = make_layer("ArgMax", [x4.shape], "argmax_param { axis: 1 top_k: 2 }")
    y = layer(t32(x4))[0].numpy()
    assert y.shape == (3, 2, 2, 3)
    ref = np.argsort(-x4, axis=1, kind="stable")[:, :2]
    close(y, ref, 0, 0)
    vals = make_layer("ArgMax", [x4.shape], "argmax_param { axis: 1 top_k: 2 out_max_val: true }")(t32(x4))[0].numpy()
    close(vals, np.take_along_axis(x4, ref, axis=1), 0, 0)
    with pytest.raises(LayerError, match="top_k"):
        make_layer("ArgMax", [(2, 3)], "argmax_param { axis: 1 top_k: 4 }")
    t = t32(x4, True)
    assert not make_layer("ArgMax", [x4.shape])(t)[0].requires_grad


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax(axis):
    shape = (2, 3, 4)
    x = rand(shape) * 5
    layer = make_layer("Softmax", [shape], f"softmax_param {{ axis: {axis} }}")
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    close(layer(t32(x))[0], e / e.sum(axis=axis, keepdims=True))
    gradcheck(layer, x)


# -- Embed / Silence / Parameter / Input / DummyData --------------------------------------------


def test_embed_forward_and_weight_gradient():
    layer = make_layer(
        "Embed",
        [(3, 2)],
        "embed_param { num_output: 4 input_dim: 10 weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
    )
    assert [tuple(b.shape) for b in layer.blobs] == [(10, 4), (4,)]
    idx = np.array([[3, 6], [0, 3], [9, 0.7]], np.float32)  # 0.7 truncates to 0
    x = t32(idx, True)
    y = layer(x)[0]
    w, b = (p.detach().numpy() for p in layer.blobs)
    close(y, w[idx.astype(int)] + b, 1e-6, 0)
    assert layer.top_shapes([(3, 2)]) == [(3, 2, 4)]
    dy = rand((3, 2, 4))
    y.backward(t32(dy))
    ref = np.zeros((10, 4))
    np.add.at(ref, idx.astype(int).ravel(), dy.reshape(6, 4))
    close(layer.blobs[0].grad, ref)
    close(layer.blobs[1].grad, dy.reshape(6, 4).sum(0))
    assert x.grad is None
    with pytest.raises(LayerError, match="out of range"):
        layer(t32([[10.0, 0.0]]))
    with pytest.raises(LayerError, match="input_dim"):
        make_layer("Embed", [(3,)], "embed_param { num_output: 4 }")


def test_embed_gradcheck_params():
    layer = make_layer(
        "Embed", [(4,)], "embed_param { num_output: 3 input_dim: 5 weight_filler { type: 'gaussian' } }"
    ).double()
    idx = torch.tensor([1.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    w, b = layer.blobs
    assert torch.autograd.gradcheck(lambda *_: layer(idx)[0], (w, b), eps=1e-6, atol=1e-6)


def test_silence_and_parameter():
    layer = make_layer("Silence", [(2, 3), (4,)], ntop=0)
    assert layer(t32(rand((2, 3))), t32(rand(4))) == ()
    p = make_layer("Parameter", [], "parameter_param { shape { dim: 2 dim: 3 } }")
    assert tuple(p.blobs[0].shape) == (2, 3) and not p.blobs[0].detach().any()
    assert p.top_shapes([]) == [(2, 3)]
    top = p()[0]
    assert top is not p.blobs[0] and top.data_ptr() == p.blobs[0].data_ptr()
    top.backward(t32(np.full((2, 3), 2.0)))
    close(p.blobs[0].grad, np.full((2, 3), 2.0), 0, 0)


def test_input_shapes():
    layer = make_layer("Input", [], "input_param { shape { dim: 2 dim: 3 } }", ntop=2)
    assert layer.top_shapes([]) == [(2, 3), (2, 3)] and layer.is_net_input
    layer = make_layer("Input", [], "input_param { shape { dim: 2 } shape { dim: 4 dim: 1 } }", ntop=2)
    assert layer.top_shapes([]) == [(2,), (4, 1)]
    assert [tuple(t.shape) for t in layer()] == [(2,), (4, 1)]
    with pytest.raises(LayerError, match="once per top"):
        make_layer("Input", [], "input_param { shape { dim: 2 } shape { dim: 2 } }", ntop=3)
    with pytest.raises(LayerError, match="exactly 0 bottom"):
        make_layer("Input", [(2,)], "input_param { shape { dim: 2 } }")


def test_dummy_data():
    layer = make_layer(
        "DummyData", [], "dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: 'constant' value: 0.5 } }"
    )
    close(layer()[0], np.full((2, 3), 0.5), 0, 0)
    layer = make_layer("DummyData", [], "dummy_data_param { num: 2 channels: 3 height: 1 width: 4 num: 5 }", ntop=2)
    tops = layer()
    assert [tuple(t.shape) for t in tops] == [(2, 3, 1, 4), (5, 3, 1, 4)]
    assert all(float(t.abs().sum()) == 0 for t in tops)  # no filler: constant 0
    layer = make_layer(
        "DummyData",
        [],
        "dummy_data_param { shape { dim: 100 } data_filler { type: 'constant' value: 2 } data_filler { type: 'gaussian' std: 1 } }",
        ntop=2,
    )
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert layer.top_shapes([]) == [(100,), (100,)]
    assert torch.equal(torch.get_rng_state(), state)  # shape inference draws nothing
    a, g1 = layer()
    _, g2 = layer()
    close(a, np.full(100, 2.0), 0, 0)
    assert not torch.equal(g1, g2) and 0.5 < float(g1.std()) < 1.5  # refilled each forward
    assert layer.double()()[0].dtype == torch.float64


def test_dummy_data_errors():
    with pytest.raises(LayerError, match="data fillers"):
        make_layer("DummyData", [], "dummy_data_param { shape { dim: 2 } data_filler { } data_filler { } }", ntop=3)
    with pytest.raises(LayerError, match="both shape and legacy"):
        make_layer("DummyData", [], "dummy_data_param { shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1 }")
    with pytest.raises(LayerError, match="'shape' once"):
        make_layer("DummyData", [], "dummy_data_param { }")


# -- real-Caffe fixtures, one layer at a time ---------------------------------------------------


REPLAYS = [
    ("inner_product", "ip", True),
    ("inner_product_axis2", "ip", True),
    ("inner_product_transpose", "ip", True),
    ("crop_offsets", "crop", True),
    ("scale_two_bottoms", "scale", True),
    ("neurons", "softmax", True),
    ("neurons", "softmax_ax2", True),
    *[("reductions", n, True) for n in ("r_sum", "r_asum", "r_sumsq", "r_mean")],
    *[
        ("structure", n, True)
        for n in ("sum", "prod", "max", "cat1", "cat2", "slice", "flat", "flat2", "reshape", "crop", "crop2", "tile")
    ],
    ("forward_only_accuracy_argmax", "flat_score", False),
    ("forward_only_accuracy_argmax", "argmax", False),
    ("forward_only_accuracy_argmax", "argmax_ax", False),
    ("forward_only_threshold_dummy", "dummy", False),
    # no force_backward and no loss: Caffe runs no backward there (the net's business)
    ("noforce_embed_parameter_silence", "embed", False),
    ("noforce_embed_parameter_silence", "param", False),
    ("noforce_embed_parameter_silence", "sum", False),
]


@pytest.mark.parametrize("case,layer_name,backward", REPLAYS, ids=[f"{c}:{n}" for c, n, _ in REPLAYS])
def test_caffe_fixture(case, layer_name, backward):
    replay_layer(case, layer_name, backward)


def test_caffe_fixture_embed_backward_rule():
    """With a gradient on its top, Embed's weight gradient is the rows of dy summed per index."""
    net, weights, blobs = load_case("noforce_embed_parameter_silence")
    lp = next(lp for lp in net.layer if lp.name == "embed")
    layer = layer_class("Embed")(lp, [(3, 2)], caffe_pb2.TEST)
    for p, bp in zip(layer.blobs, weights["embed"].blobs):
        p.data.copy_(torch.tensor(np.array(bp.data, np.float32).reshape(tuple(bp.shape.dim))))
    dy = blobs["topdiff__embed"]
    layer(torch.tensor(blobs["data__idx"]))[0].backward(torch.tensor(dy))
    ref = np.zeros((10, 4))
    np.add.at(ref, blobs["data__idx"].astype(int).ravel(), dy.reshape(-1, 4))
    close(layer.blobs[0].grad, ref, FIX_RTOL, FIX_ATOL)
