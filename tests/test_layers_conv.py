"""Convolution / Deconvolution: real-Caffe fixture replays of the single layer, an independent NumPy
formula, float64 gradchecks, Caffe's shape rules and parameter validation.

Also holds the small helpers (``layer_from_text``, ``fixture_layer``, ``replay``) the other
per-layer test files import.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF

RTOL, ATOL = 1e-4, 1e-5  # the fixtures' tolerance (tests/fixtures/caffe_reference/README.md)


# -- helpers shared by the per-layer test files -------------------------------------------------


def layer_from_text(text: str, bottom_shapes, phase=caffe_pb2.TEST):
    """Build a layer from the text of one ``LayerParameter``."""
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(lp.type, lp.name)(lp, [tuple(s) for s in bottom_shapes], phase)


def fixture_layer(case: str, name: str, bottoms: list[str], phase=caffe_pb2.TEST):
    """Layer ``name`` of fixture ``case``, its blobs loaded from the case's caffemodel.

    ``bottoms`` are the blob names as the fixture stores them (a split's top where Caffe split).
    Returns ``(layer, ref)`` with ``ref`` the case's ``blobs.npz``.
    """
    d = CAFFE_REF / "layers" / case
    net = text_format.Parse((d / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    lp = next(lay for lay in net.layer if lay.name == name)
    ref = np.load(d / "blobs.npz")
    layer = layer_class(lp.type, name)(lp, [ref["data__" + b].shape for b in bottoms], phase)
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((d / "weights.caffemodel").read_bytes())
    saved = [lay for lay in weights.layer if lay.name == name]
    if saved:
        assert len(saved[0].blobs) == len(layer.blobs), f"{case}/{name}: blob count"
        for p, bp in zip(layer.blobs, saved[0].blobs):
            # Caffe's blob layout must be ours exactly, or caffemodels would not load
            assert tuple(bp.shape.dim) == tuple(p.shape), f"{case}/{name}: {tuple(bp.shape.dim)} vs {tuple(p.shape)}"
            p.data.copy_(torch.tensor(np.array(bp.data, dtype=np.float32).reshape(p.shape)))
    return layer, ref


def replay(case, name, bottoms, top, phase=caffe_pb2.TEST, post=None, top_diff=None, bottom_diffs=None):
    """Forward + backward of one fixture layer, compared with real Caffe's arrays.

    ``post`` is applied to the layer's top before comparing (an in-place ReLU that followed it in
    the net). The top's gradient is ``top_diff`` (default ``diff__<top>``); bottom gradients are
    compared with ``bottom_diffs`` (default ``diff__<bottom>``), parameter gradients with
    ``pdiff__<name>__<i>``. Returns the layer.
    """
    layer, ref = fixture_layer(case, name, bottoms, phase)
    xs = [torch.tensor(ref["data__" + b], requires_grad=True) for b in bottoms]
    y = layer(*xs)[0]
    if post is not None:
        y = post(y)
    assert tuple(y.shape) == ref["data__" + top].shape
    np.testing.assert_allclose(y.detach().numpy(), ref["data__" + top], rtol=RTOL, atol=ATOL)
    learn = [p for p in layer.blobs if p.requires_grad]
    g = torch.tensor(ref["diff__" + top] if top_diff is None else top_diff)
    grads = torch.autograd.grad(y, xs + learn, g)
    want = bottom_diffs or [ref["diff__" + b] for b in bottoms]
    for got, w in zip(grads, want):
        assert tuple(got.shape) == w.shape
        np.testing.assert_allclose(got.numpy(), w, rtol=RTOL, atol=ATOL)
    for i, got in enumerate(grads[len(xs) :]):
        np.testing.assert_allclose(got.numpy(), ref[f"pdiff__{name}__{i}"], rtol=RTOL, atol=ATOL)
    return layer


# -- NumPy references ---------------------------------------------------------------------------


def np_conv2d(x, w, b, stride, pad, dil, group):
    """Direct cross-correlation, Caffe's definition, written from the formula."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = stride
    ph, pw = pad
    dh, dw = dil
    # Caffe's int arithmetic: the division truncates toward zero (a kernel overhanging the padded
    # input by less than a stride still gives one output, reading zeros)
    ho = int((h + 2 * ph - (dh * (kh - 1) + 1)) / sh) + 1
    wo = int((wd + 2 * pw - (dw * (kw - 1) + 1)) / sw) + 1
    xp = np.zeros(
        (n, c, max(h + 2 * ph, (ho - 1) * sh + dh * (kh - 1) + 1), max(wd + 2 * pw, (wo - 1) * sw + dw * (kw - 1) + 1))
    )
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    y = np.zeros((n, o, ho, wo))
    og = o // group
    for oc in range(o):
        g = oc // og
        for i in range(ho):
            for j in range(wo):
                patch = xp[
                    :,
                    g * cg : (g + 1) * cg,
                    i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                    j * sw : j * sw + dw * (kw - 1) + 1 : dw,
                ]
                y[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3))
        if b is not None:
            y[:, oc] += b[oc]
    return y


def np_deconv2d(x, w, b, stride, pad, dil, group):
    """Transposed convolution by scattering each input pixel (Caffe's col2im view)."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    sh, sw = stride
    ph, pw = pad
    dh, dw = dil
    full_h = sh * (h - 1) + dh * (kh - 1) + 1
    full_w = sw * (wd - 1) + dw * (kw - 1) + 1
    y = np.zeros((n, og * group, full_h, full_w))
    cg = c // group
    for ic in range(c):
        g = ic // cg
        for i in range(h):
            for j in range(wd):
                for u in range(kh):
                    for v in range(kw):
                        y[:, g * og : (g + 1) * og, i * sh + u * dh, j * sw + v * dw] += (
                            x[:, ic, i, j, None] * w[ic, :, u, v]
                        )
    y = y[:, :, ph : full_h - ph, pw : full_w - pw]
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def _conv_text(kind, cp, name="c"):
    return f'name: "{name}" type: "{kind}" bottom: "x" top: "y" convolution_param {{ {cp} }}'


def _randomize(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in layer.blobs:
        p.data.copy_(torch.randn(p.shape, generator=gen))


# -- fixture replays ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["conv_basic", "conv_rect", "conv_group_dilation_nobias"])
def test_convolution_matches_caffe_fixture(case):
    replay(case, "conv", ["data"], "conv")


@pytest.mark.parametrize("case,name", [("deconv", "deconv"), ("deconv_group_bilinear", "up")])
def test_deconvolution_matches_caffe_fixture(case, name):
    replay(case, name, ["data"], name)


def test_alexnet_conv1_matches_caffe_fixture():
    # conv1 is followed by an in-place ReLU: the stored blob is relu(conv1) and its diff is the
    # gradient at the convolution's output (after the ReLU's backward)
    replay("conv_alexnet_conv1_224", "conv1", ["data"], "conv1", post=torch.relu)


def test_inplace_chain_conv_matches_caffe_fixture():
    replay("inplace_chain", "conv", ["data"], "conv", post=torch.relu)


def test_bilinear_filler_made_caffes_weights():
    layer, ref = fixture_layer("deconv_group_bilinear", "up", ["data"])
    lp = layer.param
    fresh = layer_class("Deconvolution")(lp, [ref["data__data"].shape], caffe_pb2.TEST)
    np.testing.assert_allclose(fresh.blobs[0].detach().numpy(), ref["param__up__0"], rtol=0, atol=1e-7)


# -- NumPy formula ------------------------------------------------------------------------------

CONV_CASES = [
    # (bottom shape, convolution_param text, stride, pad, dilation, group)
    ((2, 4, 7, 8), "num_output: 6 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ((1, 4, 9, 7), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    (
        (2, 3, 8, 9),
        "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
        (1, 2),
        (0, 1),
        (1, 1),
        1,
    ),
    ((1, 2, 9, 9), "num_output: 4 kernel_size: 3 dilation: 2 pad: 1 stride: 2", (2, 2), (1, 1), (2, 2), 1),
    (
        (1, 2, 9, 10),
        "num_output: 3 kernel_size: 3 kernel_size: 2 stride: 1 stride: 3 pad: 2 pad: 0 dilation: 1 dilation: 2",
        (1, 3),
        (2, 0),
        (1, 2),
        1,
    ),
    ((1, 6, 5, 5), "num_output: 3 kernel_size: 3 group: 3 bias_term: false", (1, 1), (0, 0), (1, 1), 3),
    # the kernel overhangs the input by less than a stride: Caffe still gives one output per axis
    ((2, 3, 3, 8), "num_output: 2 kernel_size: 5 stride: 4", (4, 4), (0, 0), (1, 1), 1),
    ((1, 3, 8, 8), "num_output: 4 kernel_size: 11 stride: 4 pad: 1", (4, 4), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("shape,cp,stride,pad,dil,group", CONV_CASES)
def test_convolution_matches_numpy_formula(shape, cp, stride, pad, dil, group):
    layer = layer_from_text(_conv_text("Convolution", cp), [shape])
    _randomize(layer, 0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y = layer(x)[0]
    w = layer.blobs[0].detach().double().numpy()
    b = layer.blobs[1].detach().double().numpy() if len(layer.blobs) > 1 else None
    ref = np_conv2d(x.double().numpy(), w, b, stride, pad, dil, group)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert layer.top_shapes([shape]) == [ref.shape]


DECONV_CASES = [
    ((2, 4, 5, 5), "num_output: 3 kernel_size: 4 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 1),
    ((1, 4, 3, 4), "num_output: 6 kernel_size: 3 group: 2", (1, 1), (0, 0), (1, 1), 2),
    (
        (1, 2, 4, 3),
        "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
        (2, 3),
        (1, 0),
        (1, 1),
        1,
    ),
    (
        (1, 2, 4, 4),
        "num_output: 3 kernel_size: 3 dilation: 2 stride: 2 pad: 2 bias_term: false",
        (2, 2),
        (2, 2),
        (2, 2),
        1,
    ),
]


@pytest.mark.parametrize("shape,cp,stride,pad,dil,group", DECONV_CASES)
def test_deconvolution_matches_numpy_formula(shape, cp, stride, pad, dil, group):
    layer = layer_from_text(_conv_text("Deconvolution", cp), [shape])
    _randomize(layer, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    y = layer(x)[0]
    w = layer.blobs[0].detach().double().numpy()
    b = layer.blobs[1].detach().double().numpy() if len(layer.blobs) > 1 else None
    ref = np_deconv2d(x.double().numpy(), w, b, stride, pad, dil, group)
    # Caffe's size rule: s(H - 1) + d(k - 1) + 1 - 2p
    kh, kw = w.shape[2:]
    assert ref.shape[2:] == tuple(
        stride[i] * (shape[2 + i] - 1) + dil[i] * ((kh, kw)[i] - 1) + 1 - 2 * pad[i] for i in range(2)
    )
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert layer.top_shapes([shape]) == [ref.shape]


def test_convolution_axis_2_treats_leading_axes_as_batch():
    shape = (2, 3, 4, 6, 7)
    layer = layer_from_text(_conv_text("Convolution", "num_output: 5 kernel_size: 3 axis: 2"), [shape])
    _randomize(layer, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    y = layer(x)[0]
    assert tuple(y.shape) == (2, 3, 5, 4, 5)
    w, b = (p.detach().double().numpy() for p in layer.blobs)
    ref = np_conv2d(x.double().numpy().reshape(6, 4, 6, 7), w, b, (1, 1), (0, 0), (1, 1), 1).reshape(2, 3, 5, 4, 5)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_convolution_3d_and_1d_match_torch_reference_and_shapes():
    layer = layer_from_text(
        _conv_text("Convolution", "num_output: 2 kernel_size: 3 kernel_size: 2 kernel_size: 2 pad: 1 stride: 2"),
        [(1, 3, 5, 6, 7)],
    )
    assert tuple(layer.blobs[0].shape) == (2, 3, 3, 2, 2)
    assert layer.top_shapes([(1, 3, 5, 6, 7)]) == [(1, 2, 3, 4, 4)]  # floor((n + 2 - k)/2) + 1
    layer1 = layer_from_text(_conv_text("Convolution", "num_output: 2 kernel_size: 3 dilation: 2"), [(2, 3, 9)])
    assert layer1.top_shapes([(2, 3, 9)]) == [(2, 2, 5)]
    _randomize(layer1, 6)
    x = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(7))
    w, b = (p.detach().double().numpy() for p in layer1.blobs)
    ref = np_conv2d(x.double().numpy()[:, :, None, :], w[:, :, None, :], b, (1, 1), (0, 0), (1, 2), 1)[:, :, 0]
    np.testing.assert_allclose(layer1(x)[0].detach().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_several_bottoms_share_the_weights():
    lp = 'name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" convolution_param { num_output: 2 kernel_size: 2 }'
    layer = layer_from_text(lp, [(1, 3, 4, 4), (1, 3, 4, 4)])
    _randomize(layer, 8)
    a, b = torch.randn(2, 1, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    ya, yb = layer(a, b)
    np.testing.assert_allclose(ya.detach().numpy(), layer(a, a)[1].detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(yb.detach().numpy(), layer(b, b)[0].detach().numpy(), rtol=0, atol=0)
    with pytest.raises(LayerError, match="same shape"):
        layer_from_text(lp, [(1, 3, 4, 4), (1, 3, 5, 4)])


# -- gradients ----------------------------------------------------------------------------------

GRAD_CASES = [
    ("Convolution", (1, 4, 5, 5), "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 dilation: 1"),
    ("Convolution", (1, 2, 7, 7), "num_output: 3 kernel_h: 3 kernel_w: 2 dilation: 2 stride_h: 2 stride_w: 1"),
    ("Convolution", (1, 2, 3, 4, 4), "num_output: 2 kernel_size: 2 pad: 1 stride: 2"),
    ("Convolution", (1, 2, 3, 6), "num_output: 2 kernel_size: 5 stride: 3"),  # overhang: tail zeros
    ("Deconvolution", (1, 4, 3, 3), "num_output: 2 kernel_size: 4 stride: 2 pad: 1 group: 2"),
    ("Deconvolution", (1, 2, 2, 3), "num_output: 2 kernel_size: 3 dilation: 2 stride: 3"),
]


@pytest.mark.parametrize("kind,shape,cp", GRAD_CASES)
def test_gradcheck(kind, shape, cp):
    layer = layer_from_text(_conv_text(kind, cp), [shape])
    _randomize(layer, 10)
    layer.double()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    params = list(layer.blobs)

    # gradcheck perturbs its inputs: pass the parameters in as explicit inputs
    def g(x, *ps):
        return torch.func.functional_call(layer, {f"blobs.{i}": v for i, v in enumerate(ps)}, (x,))[0]

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# -- blobs, defaults, validation ------------------------------------------------------------------


def test_blob_layout_and_default_fillers():
    conv = layer_from_text(_conv_text("Convolution", "num_output: 6 kernel_h: 3 kernel_w: 2 group: 2"), [(1, 4, 8, 8)])
    assert [tuple(p.shape) for p in conv.blobs] == [(6, 2, 3, 2), (6,)]
    # unset weight_filler / bias_filler: Caffe's default FillerParameter, constant 0
    assert all(float(p.detach().abs().max()) == 0.0 for p in conv.blobs)
    deconv = layer_from_text(
        _conv_text("Deconvolution", "num_output: 6 kernel_size: 3 group: 2 bias_term: false"), [(1, 4, 8, 8)]
    )
    assert [tuple(p.shape) for p in deconv.blobs] == [(4, 3, 3, 3)]
    filled = layer_from_text(
        _conv_text(
            "Convolution",
            'num_output: 3 kernel_size: 1 weight_filler { type: "constant" value: 0.5 } bias_filler { type: "constant" value: -2 }',
        ),
        [(1, 2, 3, 3)],
    )
    assert float(filled.blobs[0].detach().min()) == 0.5 and float(filled.blobs[1].detach().max()) == -2.0


@pytest.mark.parametrize(
    "cp,shape,message",
    [
        ("kernel_size: 3", (1, 2, 5, 5), "num_output"),
        ("num_output: 4 kernel_size: 3 group: 3", (1, 6, 5, 5), "num_output .* multiple of .*group"),
        ("num_output: 4 kernel_size: 3 group: 4", (1, 6, 5, 5), "not divisible by convolution_param.group"),
        ("num_output: 4", (1, 2, 5, 5), "kernel_size"),
        ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), "kernel_size or kernel_h"),
        ("num_output: 4 kernel_h: 3", (1, 2, 5, 5), "kernel_h and kernel_w are required"),
        ("num_output: 4 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5, 5), "2-D"),
        ("num_output: 4 kernel_size: 3 kernel_size: 3", (1, 2, 5, 5, 5), "once per spatial axis"),
        ("num_output: 4 kernel_size: 3 stride: 0", (1, 2, 5, 5), "stride must be > 0"),
        ("num_output: 4 kernel_size: 0", (1, 2, 5, 5), "kernel_size must be > 0"),
        ("num_output: 4 kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", (1, 2, 5, 5), "dilation"),
        ("num_output: 4 kernel_size: 7", (1, 2, 5, 5), "output of size"),
        ("num_output: 4 kernel_size: 1", (1, 2, 2, 2, 2, 2), "spatial axes"),
        ("num_output: 4 kernel_size: 1 axis: 4", (1, 2, 5, 5), "axis"),
    ],
)
def test_invalid_parameters_name_the_field(cp, shape, message):
    with pytest.raises(LayerError, match=message) as err:
        layer_from_text(_conv_text("Convolution", cp, name="conv9"), [shape])
    assert "conv9" in str(err.value)


def test_deconvolution_validates_like_convolution():
    with pytest.raises(LayerError, match="num_output"):
        layer_from_text(_conv_text("Deconvolution", "kernel_size: 2"), [(1, 2, 3, 3)])


# -- Deconvolution by phases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,c,h,w,og,k,s,p,g,bias",
    [
        (2, 4, 5, 5, 3, (4, 4), (2, 2), (1, 1), 1, True),  # the conformance case's geometry
        (2, 6, 7, 5, 2, (12, 12), (4, 4), (0, 0), 1, True),  # an auto-encoder's reconstruction
        (1, 4, 6, 6, 1, (4, 4), (2, 2), (1, 1), 4, False),  # depthwise bilinear upsampling
        (1, 3, 4, 5, 3, (16, 16), (8, 8), (4, 4), 1, False),  # FCN-style
        (2, 4, 5, 6, 2, (6, 4), (3, 2), (2, 1), 2, True),  # non-square, grouped, padded
        (2, 3, 4, 4, 2, (5, 3), (2, 2), (1, 0), 1, True),  # kernels not a multiple of the stride
        (1, 2, 3, 3, 1, (3, 3), (1, 1), (1, 1), 1, True),  # stride 1
    ],
)
def test_deconv_by_phases_equals_conv_transpose(n, c, h, w, og, k, s, p, g, bias):
    from caffe_compat.layers.conv import deconv2d_by_phases

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(c, og, *k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(og * g, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv_transpose2d(x, wt, b, s, p, 0, g)
    got = deconv2d_by_phases(x, wt, b, s, p, (1, 1), g)
    assert got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad(ref, [x, wt] + ([b] if bias else []), gy)
    grads = torch.autograd.grad(got, [x, wt] + ([b] if bias else []), gy)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def _deconv_layer_takes_phases(conv_param: str, shape) -> bool:
    layer = layer_from_text(
        f'name: "up" type: "Deconvolution" bottom: "x" top: "up" convolution_param {{ {conv_param} }}', [shape]
    )
    return layer._by_phases(torch.empty(shape))


@pytest.mark.parametrize(
    "conv_param,shape,expected",
    [
        ("num_output: 3 kernel_size: 12 stride: 4", (16, 48, 30, 30), True),  # the CAE's last layer
        ("num_output: 21 kernel_size: 64 stride: 32 bias_term: false", (1, 21, 16, 16), True),  # FCN-32s
        ("num_output: 64 kernel_size: 4 stride: 2", (16, 64, 32, 32), False),  # many outputs: oneDNN's is faster
        ("num_output: 3 kernel_size: 3 stride: 2", (16, 48, 30, 30), False),  # 3 % 2: zero taps
        ("num_output: 3 kernel_size: 4 stride: 2 dilation: 2", (16, 48, 30, 30), False),
        ("num_output: 3 kernel_size: 4 stride: 2", (1, 4, 5, 5), False),  # too small to pay
        ("num_output: 3 kernel_size: 3 stride: 1 pad: 1", (16, 48, 30, 30), False),
        ("num_output: 64 group: 64 kernel_size: 4 stride: 2 pad: 1", (8, 64, 32, 32), False),  # depthwise x2
        ("num_output: 21 group: 21 kernel_size: 16 stride: 8", (1, 21, 70, 70), True),  # depthwise x8 (FCN)
    ],
)
def test_deconv_layer_runs_by_phases_where_it_pays(conv_param, shape, expected):
    assert _deconv_layer_takes_phases(conv_param, shape) is expected


def test_deconv_layer_by_phases_matches_transposed_conv(monkeypatch):
    """The layer through the phase path against the same layer through conv_transpose2d."""
    from caffe_compat.layers import conv

    text = (
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 16 dim: 8 dim: 17 dim: 17 } } }\n'
        'layer { name: "up" type: "Deconvolution" bottom: "x" top: "up" convolution_param { num_output: 3 '
        'kernel_size: 8 stride: 4 pad: 2 weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" } } }'
    )
    caffe.set_random_seed(0)
    net = caffe.Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe.TEST)
    net.blobs["x"].data[...] = np.random.default_rng(0).standard_normal((16, 8, 17, 17))
    assert net.layers[1]._by_phases(net.blobs["x"].tensor)
    a = net.forward()["up"].copy()
    monkeypatch.setattr(conv, "PHASES_MIN_TOP", 1 << 40)  # now through torch's transposed convolution
    b = net.forward()["up"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # other summation order: not equal bits
