"""Tests of caffe_compat.layers.loss: NumPy formulas, float64 gradchecks and real-Caffe fixtures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.layers.base import LabelChecks
from caffe_compat.proto import caffe_pb2

FIXTURES = Path(__file__).parent / "fixtures" / "caffe_reference" / "layers"
FLT_MIN = np.float64(np.finfo(np.float32).tiny)
LOG_THRESHOLD = 1e-20
RTOL, ATOL = 1e-5, 1e-6  # our float64 formulas against float32/float64 layers
FIX_RTOL, FIX_ATOL = 1e-4, 1e-5  # the fixture README's tolerance


def make_layer(type_name: str, bottom_shapes, params: str = "", ntop: int = 1, name: str = "lossy"):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(params, lp)
    lp.name, lp.type = name, type_name
    lp.bottom.extend([f"b{i}" for i in range(len(bottom_shapes))])
    lp.top.extend([f"t{i}" for i in range(ntop)])
    return layer_class(type_name)(lp, [tuple(s) for s in bottom_shapes], caffe_pb2.TEST)


def run(layer, *arrays, grad_index=(0,), dtype=torch.float32):
    """Forward on the arrays; backward with loss weight 1; return (tops, grads by bottom index)."""
    ts = [torch.tensor(np.asarray(a), dtype=dtype) for a in arrays]
    for i in grad_index:
        ts[i].requires_grad_(True)
    tops = layer(*ts)
    grads = {}
    if grad_index:
        tops[0].backward()
        grads = {i: ts[i].grad.numpy() if ts[i].grad is not None else None for i in grad_index}
    return [t.detach().numpy() for t in tops], grads


def rng(seed=0):
    return np.random.default_rng(seed)


# -- NumPy references (loops, float64) ----------------------------------------------------------


def np_softmax_loss(x, label, axis, ignore=None, mode="VALID"):
    x = np.asarray(x, np.float64)
    axis %= x.ndim
    outer, c = math.prod(x.shape[:axis]), x.shape[axis]
    inner = math.prod(x.shape[axis + 1 :])
    x3 = x.reshape(outer, c, inner)
    lab = np.asarray(label).reshape(outer, inner).astype(np.int64)
    e = np.exp(x3 - x3.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    loss, count = 0.0, 0
    grad = p.copy()
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and lab[i, j] == ignore:
                grad[i, :, j] = 0
                continue
            loss -= np.log(max(p[i, lab[i, j], j], FLT_MIN))
            grad[i, lab[i, j], j] -= 1
            count += 1
    norm = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, (grad / norm).reshape(x.shape), p.reshape(x.shape)


def np_sigmoid_ce(x, t, ignore=None, mode="BATCH_SIZE"):
    x, t = np.asarray(x, np.float64).reshape(x.shape[0], -1), np.asarray(t, np.float64).reshape(x.shape[0], -1)
    s = 1 / (1 + np.exp(-x))
    per = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    valid = np.ones_like(x, bool) if ignore is None else t.astype(np.int64) != ignore
    norm = {"FULL": x.size, "VALID": valid.sum(), "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    norm = max(1.0, norm)
    return (per * valid).sum() / norm, (s - t) * valid / norm


def np_hinge(x, label, norm):
    n = x.shape[0]
    x2 = np.asarray(x, np.float64).reshape(n, -1)
    loss, grad = 0.0, np.zeros_like(x2)
    for i in range(n):
        for k in range(x2.shape[1]):
            s = -1.0 if k == int(label[i]) else 1.0
            m = max(0.0, 1 + s * x2[i, k])
            loss += m if norm == "L1" else m * m
            grad[i, k] = (s * (m > 0) if norm == "L1" else 2 * s * m) / n
    return loss / n, grad.reshape(x.shape)


def np_contrastive(a, b, y, margin, legacy):
    n = a.shape[0]
    a, b = np.asarray(a, np.float64).reshape(n, -1), np.asarray(b, np.float64).reshape(n, -1)
    loss, ga = 0.0, np.zeros_like(a)
    for i in range(n):
        d = a[i] - b[i]
        dsq = d @ d
        if int(y[i]):
            loss += dsq
            ga[i] = d / n
        elif legacy:
            loss += max(margin - dsq, 0.0)
            ga[i] = -d / n if margin - dsq > 0 else 0
        else:
            dist = math.sqrt(dsq)
            loss += max(margin - dist, 0.0) ** 2
            ga[i] = -(margin - dist) / (dist + 1e-4) * d / n if margin - dist > 0 else 0
    return loss / n / 2, ga


def np_accuracy(x, label, top_k=1, axis=1, ignore=None):
    axis %= x.ndim
    outer, c = math.prod(x.shape[:axis]), x.shape[axis]
    inner = math.prod(x.shape[axis + 1 :])
    x3, lab = x.reshape(outer, c, inner), label.reshape(outer, inner).astype(np.int64)
    hits, count = 0, 0
    nums, per_hits = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and lab[i, j] == ignore:
                continue
            t = x3[i, lab[i, j], j]
            better = sum(1 for k in range(c) if k != lab[i, j] and x3[i, k, j] >= t)
            nums[lab[i, j]] += 1
            if better < top_k:
                hits += 1
                per_hits[lab[i, j]] += 1
            count += 1
    per = np.where(nums > 0, per_hits / np.maximum(nums, 1), 0)
    return (hits / count if count else 0.0), per


# -- EuclideanLoss ------------------------------------------------------------------------------


def test_euclidean_forward_backward_both_bottoms():
    r = rng(1)
    a, b = r.normal(size=(4, 3, 2)), r.normal(size=(4, 6))
    layer = make_layer("EuclideanLoss", [a.shape, b.shape])
    (loss,), g = run(layer, a, b, grad_index=(0, 1), dtype=torch.float64)
    d = a - b.reshape(a.shape)
    np.testing.assert_allclose(loss, (d**2).sum() / 4 / 2, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g[0], d / 4, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g[1], (-d / 4).reshape(b.shape), rtol=1e-12, atol=1e-15)
    assert layer.allow_force_backward(1) and layer.is_loss
    assert layer.top_shapes([a.shape, b.shape]) == [()]


def test_euclidean_shape_mismatch_names_layer():
    with pytest.raises(LayerError, match="lossy.*same number of values"):
        make_layer("EuclideanLoss", [(4, 3), (4, 5)])
    with pytest.raises(LayerError, match="first"):
        make_layer("EuclideanLoss", [(4, 3), (3, 4)])


# -- SoftmaxWithLoss ----------------------------------------------------------------------------

SOFTMAX_CASES = [
    # (params, numpy mode, ignore)
    ("", "VALID", None),
    ("loss_param { ignore_label: 2 }", "VALID", 2),
    ("loss_param { ignore_label: 2 normalization: FULL }", "FULL", 2),
    ("loss_param { normalization: BATCH_SIZE }", "BATCH_SIZE", None),
    ("loss_param { normalization: NONE ignore_label: 0 }", "NONE", 0),
    ("loss_param { normalize: false }", "BATCH_SIZE", None),
    ("loss_param { normalize: true ignore_label: 1 }", "VALID", 1),
    ("loss_param { normalize: false normalization: FULL }", "FULL", None),
]


@pytest.mark.parametrize("params,mode,ignore", SOFTMAX_CASES)
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_loss_matches_numpy(params, mode, ignore, axis):
    r = rng(2)
    shape = (3, 4, 3, 2) if axis != -1 else (3, 2, 4)
    x = r.normal(size=shape) * 2
    ax = axis % len(shape)
    lshape = shape[:ax] + shape[ax + 1 :]
    label = r.integers(0, shape[ax], size=lshape).astype(np.float32)
    params = params + f" softmax_param {{ axis: {axis} }}"
    layer = make_layer("SoftmaxWithLoss", [shape, lshape], params)
    (loss,), g = run(layer, x, label)
    ref_loss, ref_grad, _ = np_softmax_loss(x.astype(np.float32), label, axis, ignore, mode)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g[0], ref_grad, rtol=RTOL, atol=ATOL)
    assert loss.shape == ()


def test_softmax_loss_second_top_is_probability_without_gradient():
    r = rng(3)
    x, label = r.normal(size=(2, 5)), np.array([4.0, 1.0])
    layer = make_layer("SoftmaxWithLoss", [x.shape, label.shape], ntop=2)
    xt = torch.tensor(x, requires_grad=True)
    loss, prob = layer(xt, torch.tensor(label))
    _, grad, p = np_softmax_loss(x, label, 1)
    np.testing.assert_allclose(prob.detach().numpy(), p, rtol=1e-12, atol=1e-15)
    assert not prob.requires_grad
    loss.backward()
    np.testing.assert_allclose(xt.grad.numpy(), grad, rtol=1e-12, atol=1e-15)
    assert layer.top_shapes([x.shape, label.shape]) == [(), (2, 5)]


def test_softmax_loss_flt_min_clamp_keeps_gradient():
    x = np.array([[200.0, -200.0, 0.0], [0.0, 1.0, 2.0]], np.float32)
    label = np.array([1.0, 2.0], np.float32)
    layer = make_layer("SoftmaxWithLoss", [x.shape, label.shape])
    (loss,), g = run(layer, x, label)
    ref_loss, ref_grad, _ = np_softmax_loss(x, label, 1)
    # The first item's p_label underflows to 0 in float32: clamped to -log(FLT_MIN) = 87.3365.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0)
    assert 87.33 / 2 < loss < 88.5 / 2 + 1
    np.testing.assert_allclose(g[0], ref_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g[0][0], [0.5, -0.5, 0.0], rtol=0, atol=1e-6)


def test_softmax_loss_everything_ignored_gives_zero():
    x = rng(4).normal(size=(2, 3))
    label = np.array([1.0, 1.0])
    layer = make_layer("SoftmaxWithLoss", [x.shape, label.shape], "loss_param { ignore_label: 1 }")
    (loss,), g = run(layer, x, label)
    assert loss == 0.0 and np.all(g[0] == 0)


def test_softmax_loss_bad_labels():
    x = np.zeros((2, 3), np.float32)
    layer = make_layer("SoftmaxWithLoss", [x.shape, (2,)])
    with pytest.raises(LayerError, match=r"'lossy'.*label value 3.*\[0, 3\)"):
        layer(torch.tensor(x), torch.tensor([0.0, 3.0]))
    with pytest.raises(LayerError, match="label value -1"):
        layer(torch.tensor(x), torch.tensor([-1.0, 0.0]))
    ignoring = make_layer("SoftmaxWithLoss", [x.shape, (2,)], "loss_param { ignore_label: 255 }")
    ignoring(torch.tensor(x), torch.tensor([255.0, 0.0]))  # an ignored label may be out of range
    with pytest.raises(LayerError, match="4 labels.*outer\\*inner = 2"):
        make_layer("SoftmaxWithLoss", [(2, 3), (2, 2)])
    with pytest.raises(LayerError, match="softmax_param.axis = 3"):
        make_layer("SoftmaxWithLoss", [(2, 3), (2,)], "softmax_param { axis: 3 }")


# -- SigmoidCrossEntropyLoss --------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,mode,ignore",
    [
        ("", "BATCH_SIZE", None),
        ("loss_param { normalization: VALID }", "VALID", None),
        ("loss_param { normalization: VALID ignore_label: 1 }", "VALID", 1),
        ("loss_param { normalization: FULL ignore_label: 1 }", "FULL", 1),
        ("loss_param { normalize: true }", "VALID", None),
        ("loss_param { normalization: NONE }", "NONE", None),
    ],
)
def test_sigmoid_cross_entropy_matches_numpy(params, mode, ignore):
    r = rng(5)
    x = r.normal(size=(4, 3, 2)) * 3
    t = r.uniform(size=(4, 6))
    if ignore is not None:
        t[0, :3] = ignore
    layer = make_layer("SigmoidCrossEntropyLoss", [x.shape, t.shape], params)
    (loss,), g = run(layer, x, t, dtype=torch.float64)
    ref_loss, ref_grad = np_sigmoid_ce(x, t, ignore, mode)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=0)
    np.testing.assert_allclose(g[0], ref_grad.reshape(x.shape), rtol=1e-10, atol=1e-14)


def test_sigmoid_cross_entropy_stable_for_large_inputs():
    x = np.array([[100.0, -100.0, 0.0]], np.float32)
    t = np.array([[0.0, 1.0, 1.0]], np.float32)
    layer = make_layer("SigmoidCrossEntropyLoss", [x.shape, t.shape])
    (loss,), g = run(layer, x, t)
    np.testing.assert_allclose(loss, 200 + math.log(2), rtol=1e-6, atol=0)
    np.testing.assert_allclose(g[0], [[1.0, -1.0, -0.5]], rtol=0, atol=1e-6)


# -- HingeLoss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_matches_numpy(norm):
    r = rng(6)
    x = r.normal(size=(5, 3, 2))
    label = r.integers(0, 6, size=5).astype(np.float32)
    layer = make_layer("HingeLoss", [x.shape, label.shape], f"hinge_loss_param {{ norm: {norm} }}")
    (loss,), g = run(layer, x, label, dtype=torch.float64)
    ref_loss, ref_grad = np_hinge(x, label, norm)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g[0], ref_grad, rtol=1e-12, atol=1e-15)


def test_hinge_l1_gradient_zero_at_the_kink():
    x = np.array([[1.0, -1.0, 0.5]])  # margins: 1 - 1 = 0 at the label, 1 - 1 = 0, 1.5
    label = np.array([0.0])
    layer = make_layer("HingeLoss", [x.shape, label.shape])
    (loss,), g = run(layer, x, label, dtype=torch.float64)
    np.testing.assert_allclose(loss, 1.5, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g[0], [[0.0, 0.0, 1.0]], rtol=0, atol=1e-15)


# -- InfogainLoss -------------------------------------------------------------------------------


def _write_h(path: Path, h: np.ndarray, legacy: bool) -> None:
    blob = caffe_pb2.BlobProto()
    if legacy:
        blob.num, blob.channels, blob.height, blob.width = 1, 1, *h.shape
    else:
        blob.shape.dim.extend(h.shape)
    blob.data.extend(h.astype(np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def np_infogain(p, label, h):
    n = p.shape[0]
    p2 = np.maximum(np.asarray(p, np.float64).reshape(n, -1), LOG_THRESHOLD)
    rows = h[label.astype(np.int64)]
    return -(rows * np.log(p2)).sum() / n, (-rows / p2 / n).reshape(p.shape)


@pytest.mark.parametrize("legacy", [True, False])
def test_infogain_from_source_relative_to_cwd(tmp_path, monkeypatch, legacy):
    r = rng(7)
    h = r.uniform(size=(4, 4))
    _write_h(tmp_path / "H.binaryproto", h, legacy)
    monkeypatch.chdir(tmp_path)
    p = r.uniform(0.01, 1, size=(3, 4))
    p[0, 1] = 0.0  # clamped to 1e-20 in both directions
    label = np.array([0.0, 3.0, 2.0])
    layer = make_layer("InfogainLoss", [p.shape, label.shape], 'infogain_loss_param { source: "H.binaryproto" }')
    (loss,), g = run(layer, p, label, dtype=torch.float64)
    ref_loss, ref_grad = np_infogain(p, label, h.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
    np.testing.assert_allclose(g[0], ref_grad, rtol=1e-6, atol=1e-12)
    assert not layer.allow_force_backward(1) and not layer.allow_force_backward(2)


def test_infogain_from_third_bottom():
    r = rng(8)
    p, label, h = r.uniform(0.01, 1, size=(3, 2, 2)), np.array([1.0, 0.0, 3.0]), r.uniform(size=(4, 4))
    layer = make_layer("InfogainLoss", [p.shape, label.shape, h.shape])
    (loss,), g = run(layer, p, label, h, grad_index=(0, 2), dtype=torch.float64)
    ref_loss, ref_grad = np_infogain(p, label, h)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g[0], ref_grad, rtol=1e-12, atol=1e-15)
    assert g[2] is None  # H gets no gradient


def test_infogain_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerError, match="'nope.binaryproto' not found"):
        make_layer("InfogainLoss", [(2, 3), (2,)], 'infogain_loss_param { source: "nope.binaryproto" }')
    with pytest.raises(LayerError, match="source must name"):
        make_layer("InfogainLoss", [(2, 3), (2,)])
    with pytest.raises(LayerError, match="axis = 2 is not supported"):
        make_layer("InfogainLoss", [(2, 3), (2,), (3, 3)], "infogain_loss_param { axis: 2 }")
    with pytest.raises(LayerError, match="must be 3 x 3"):
        make_layer("InfogainLoss", [(2, 3), (2,), (2, 2)])


# -- ContrastiveLoss ----------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_matches_caffe_formula(legacy):
    r = rng(9)
    a, b = r.normal(size=(6, 3, 1, 1)) * 0.5, r.normal(size=(6, 3, 1, 1)) * 0.5
    y = np.array([1, 0, 0, 1, 0, 0], np.float32).reshape(6, 1, 1, 1)
    b[2] = a[2] + 2.0  # a dissimilar pair beyond the margin: no gradient
    params = f"contrastive_loss_param {{ margin: 1.5 legacy_version: {str(legacy).lower()} }}"
    layer = make_layer("ContrastiveLoss", [a.shape, b.shape, y.shape], params)
    (loss,), g = run(layer, a, b, y, grad_index=(0, 1), dtype=torch.float64)
    ref_loss, ref_ga = np_contrastive(a, b, y.ravel(), 1.5, legacy)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(g[0].reshape(6, 3), ref_ga, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g[1].reshape(6, 3), -ref_ga, rtol=1e-12, atol=1e-15)
    assert np.all(g[0][2] == 0)
    assert layer.allow_force_backward(1) and not layer.allow_force_backward(2)


# -- MultinomialLogisticLoss --------------------------------------------------------------------


def test_multinomial_logistic_matches_numpy_and_clamps():
    p = np.array([[0.2, 0.5, 0.3], [0.0, 0.9, 0.1]])
    label = np.array([1.0, 0.0])
    layer = make_layer("MultinomialLogisticLoss", [p.shape, label.shape])
    (loss,), g = run(layer, p, label, dtype=torch.float64)
    np.testing.assert_allclose(loss, -(math.log(0.5) + math.log(LOG_THRESHOLD)) / 2, rtol=1e-12, atol=0)
    ref = np.zeros_like(p)
    ref[0, 1], ref[1, 0] = -1 / (2 * 0.5), -1 / (2 * LOG_THRESHOLD)
    np.testing.assert_allclose(g[0], ref, rtol=1e-12, atol=0)
    with pytest.raises(LayerError, match="label value 3"):
        layer(torch.tensor(p), torch.tensor([3.0, 0.0]))


# -- Accuracy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,top_k,axis,ignore",
    [
        ("", 1, 1, None),
        ("accuracy_param { top_k: 2 }", 2, 1, None),
        ("accuracy_param { top_k: 3 ignore_label: 0 }", 3, 1, 0),
        ("accuracy_param { axis: 2 }", 1, 2, None),
        ("accuracy_param { axis: -1 ignore_label: 4 top_k: 2 }", 2, -1, 4),
    ],
)
def test_accuracy_matches_numpy(params, top_k, axis, ignore):
    r = rng(10)
    x = np.round(r.normal(size=(4, 5, 3, 5)), 1)  # rounding creates ties, which count against
    ax = axis % 4
    lshape = x.shape[:ax] + x.shape[ax + 1 :]
    label = r.integers(0, x.shape[ax], size=lshape).astype(np.float32)
    layer = make_layer("Accuracy", [x.shape, lshape], params, ntop=2)
    acc, per = layer(torch.tensor(x), torch.tensor(label))
    ref_acc, ref_per = np_accuracy(x, label, top_k, axis, ignore)
    np.testing.assert_allclose(acc.numpy(), ref_acc, rtol=1e-12, atol=0)
    np.testing.assert_allclose(per.numpy(), ref_per, rtol=1e-12, atol=0)
    assert not layer.is_loss and not acc.requires_grad
    assert layer.top_shapes([x.shape, lshape]) == [(), (x.shape[ax],)]


def test_accuracy_ties_count_against_and_empty_count():
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    layer = make_layer("Accuracy", [(2, 3), (2,)])
    assert float(layer(x, torch.tensor([0.0, 2.0]))[0]) == 0.0
    layer2 = make_layer("Accuracy", [(2, 3), (2,)], "accuracy_param { top_k: 2 }")
    assert float(layer2(x, torch.tensor([0.0, 2.0]))[0]) == 1.0
    ignoring = make_layer("Accuracy", [(2, 3), (2,)], "accuracy_param { ignore_label: 1 }")
    assert float(ignoring(x, torch.tensor([1.0, 1.0]))[0]) == 0.0
    with pytest.raises(LayerError, match="top_k = 4 exceeds"):
        make_layer("Accuracy", [(2, 3), (2,)], "accuracy_param { top_k: 4 }")


# -- gradchecks (float64, where the loss is smooth) ---------------------------------------------


def _gradcheck(layer, inputs, grad_index):
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=i in grad_index) for i, a in enumerate(inputs)]

    def f(*xs):
        args = list(ts)
        for i, x in zip(grad_index, xs):
            args[i] = x
        return layer(*args)[0]

    assert torch.autograd.gradcheck(f, [ts[i] for i in grad_index], eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradchecks():
    r = rng(11)
    x4 = r.normal(size=(2, 3, 2, 2))
    lab = r.integers(0, 3, size=(2, 1, 2, 2)).astype(np.float64)
    lab_ax2 = r.integers(0, 2, size=(2, 3, 2)).astype(np.float64)  # classes along axis 2
    for params, labels in [
        ("", lab),
        ("loss_param { ignore_label: 1 normalization: FULL }", lab),
        ("softmax_param { axis: 2 } loss_param { normalization: BATCH_SIZE }", lab_ax2),
    ]:
        layer = make_layer("SoftmaxWithLoss", [x4.shape, labels.shape], params)
        _gradcheck(layer, [x4, labels], (0,))
    t = r.uniform(size=(2, 3, 2, 2))
    _gradcheck(make_layer("SigmoidCrossEntropyLoss", [x4.shape, t.shape]), [x4, t], (0,))
    b = r.normal(size=(2, 12))
    _gradcheck(make_layer("EuclideanLoss", [x4.shape, b.shape]), [x4, b], (0, 1))
    hl = np.array([3.0, 7.0])
    _gradcheck(make_layer("HingeLoss", [x4.shape, hl.shape], "hinge_loss_param { norm: L2 }"), [x4, hl], (0,))
    _gradcheck(make_layer("HingeLoss", [x4.shape, hl.shape]), [x4 + 0.013, hl], (0,))
    p = r.uniform(0.1, 1.0, size=(3, 4))
    pl = np.array([0.0, 3.0, 1.0])
    _gradcheck(make_layer("MultinomialLogisticLoss", [p.shape, pl.shape]), [p, pl], (0,))
    h = r.uniform(size=(4, 4))
    _gradcheck(make_layer("InfogainLoss", [p.shape, pl.shape, h.shape]), [p, pl, h], (0,))
    a, c = r.normal(size=(4, 3)), r.normal(size=(4, 3))
    y = np.array([1.0, 0.0, 1.0, 0.0])
    legacy = make_layer(
        "ContrastiveLoss", [a.shape, c.shape, y.shape], "contrastive_loss_param { margin: 5 legacy_version: true }"
    )
    _gradcheck(legacy, [a, c, y], (0, 1))


# -- real Caffe's fixtures: each loss-family layer replayed on its own ---------------------------

FAMILY = {
    "EuclideanLoss",
    "SoftmaxWithLoss",
    "SigmoidCrossEntropyLoss",
    "HingeLoss",
    "InfogainLoss",
    "ContrastiveLoss",
    "MultinomialLogisticLoss",
    "Accuracy",
}
CASES = ["losses_classification", "losses_regression", "losses_more", "forward_only_accuracy_argmax"]


def _split_names(net: caffe_pb2.NetParameter) -> dict[tuple[int, int], str]:
    """(layer index, bottom index) -> the blob Caffe's inserted Split feeds that bottom."""
    producer, consumers = {}, {}
    for li, layer in enumerate(net.layer):
        for bi, blob in enumerate(layer.bottom):
            consumers.setdefault(producer[blob], []).append((li, bi))
        for ti, blob in enumerate(layer.top):
            producer[blob] = (blob, layer.name, ti)
    names = {}
    for (blob, lname, ti), uses in consumers.items():
        for k, (li, bi) in enumerate(uses):
            names[(li, bi)] = blob if len(uses) == 1 else f"{blob}_{lname}_{ti}_split_{k}"
    return names


@pytest.mark.parametrize("case", CASES)
def test_fixture_layers_replayed_alone(case, monkeypatch):
    folder = FIXTURES / case
    monkeypatch.chdir(folder)  # InfogainLoss reads H.binaryproto from here
    net = caffe_pb2.NetParameter()
    text_format.Parse((folder / "net.prototxt").read_text(), net)
    ref = np.load(folder / "blobs.npz")
    names = _split_names(net)
    replayed = 0
    for li, lp in enumerate(net.layer):
        if lp.type not in FAMILY:
            continue
        bottoms = [names[(li, bi)] for bi in range(len(lp.bottom))]
        arrays = [ref[f"data__{b}"] for b in bottoms]
        layer = layer_class(lp.type)(lp, [a.shape for a in arrays], caffe_pb2.TEST)
        backward = not case.startswith("forward_only") and layer.is_loss
        grad_index = tuple(i for i in range(len(arrays)) if backward and layer.allow_force_backward(i))
        ts = [torch.tensor(a, requires_grad=i in grad_index) for i, a in enumerate(arrays)]
        tops = layer(*ts)
        for top, name in zip(tops, lp.top):
            np.testing.assert_allclose(
                top.detach().numpy(), ref[f"data__{name}"], rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=f"{case}:{name}"
            )
        if not backward:
            continue
        tops[0].backward(torch.tensor(ref[f"diff__{lp.top[0]}"]))  # Caffe's loss diff = loss_weight
        for i, b in enumerate(bottoms):
            expected = ref[f"diff__{b}"]
            got = ts[i].grad.numpy() if ts[i].grad is not None else np.zeros_like(expected)
            np.testing.assert_allclose(got, expected, rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=f"{case}:{lp.name}:{b}")
        replayed += 1
    assert replayed or case.startswith("forward_only")


@pytest.mark.parametrize("case", CASES)
def test_fixture_cases_through_the_net(case, monkeypatch):
    """The whole case through ``caffe_compat.Net`` (splits, Flatten/Softmax/ArgMax, loss weights)."""
    from caffe_compat.net import TEST, Net

    folder = FIXTURES / case
    monkeypatch.chdir(folder)
    ref = np.load(folder / "blobs.npz")
    net = Net("net.prototxt", TEST, weights="weights.caffemodel")
    for name in net.inputs:
        net.blobs[name].data[...] = ref[f"data__{name}"]
    net.forward()
    if not case.startswith("forward_only"):
        for key in ref.files:
            if key.startswith("topdiff__"):
                net.blobs[key[len("topdiff__") :]].diff[...] = ref[key]
        net.backward()
    compared = 0
    for key in ref.files:
        kind, blob = key.split("__", 1)
        if kind not in ("data", "diff"):
            continue
        ours = net.blobs[blob].data if kind == "data" else net.blobs[blob].diff
        np.testing.assert_allclose(ours, ref[key], rtol=FIX_RTOL, atol=FIX_ATOL, err_msg=f"{case}:{key}")
        compared += 1
    assert compared == sum(1 for k in ref.files if k.split("__", 1)[0] in ("data", "diff"))


def test_infogain_corrupt_source_names_layer_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "H.binaryproto").write_bytes(b"\xff\xff\xff not a blob")
    with pytest.raises(LayerError, match="'lossy'.*infogain matrix.*H.binaryproto"):
        make_layer("InfogainLoss", [(2, 3), (2,)], 'infogain_loss_param { source: "H.binaryproto" }')


CUDA_CASES = [
    ("SoftmaxWithLoss", [(3, 4, 2), (3, 2)], "loss_param { ignore_label: 1 }", 2),
    ("SigmoidCrossEntropyLoss", [(3, 4), (3, 4)], "", 1),
    ("EuclideanLoss", [(3, 4), (3, 4)], "", 1),
    ("HingeLoss", [(3, 4), (3,)], "hinge_loss_param { norm: L2 }", 1),
    ("InfogainLoss", [(3, 4), (3,), (4, 4)], "", 1),
    ("ContrastiveLoss", [(3, 4), (3, 4), (3,)], "", 1),
    ("MultinomialLogisticLoss", [(3, 4), (3,)], "", 1),
    ("Accuracy", [(3, 4, 2), (3, 2)], "accuracy_param { top_k: 2 }", 2),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name,shapes,params,ntop", CUDA_CASES)
def test_cuda_matches_cpu(type_name, shapes, params, ntop):
    r = rng(12)
    arrays = [r.uniform(0.05, 1.0, size=shapes[0])]
    for s in shapes[1:]:
        arrays.append(r.integers(0, 2, size=s).astype(np.float32) if len(s) < 2 or s[-1] != 4 else r.uniform(size=s))
    layer = make_layer(type_name, shapes, params, ntop=ntop)
    results = []
    for device in ("cpu", "cuda"):
        layer.to(device)
        ts = [torch.tensor(a, dtype=torch.float32, device=device) for a in arrays]
        ts[0].requires_grad_(True)
        tops = layer(*ts)
        assert all(t.device.type == device for t in tops)
        if tops[0].requires_grad:
            tops[0].backward()
        grad = ts[0].grad.cpu().numpy() if ts[0].grad is not None else None
        results.append(([t.detach().cpu().numpy() for t in tops], grad))
    (cpu_tops, cpu_grad), (gpu_tops, gpu_grad) = results
    for a, b in zip(cpu_tops, gpu_tops):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert (cpu_grad is None) == (gpu_grad is None) == (type_name == "Accuracy")
    if cpu_grad is not None:
        np.testing.assert_allclose(gpu_grad, cpu_grad, rtol=1e-5, atol=1e-6)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),  # autocast on the CPU is bf16
        pytest.param("cuda", torch.bfloat16, marks=_CUDA),
        pytest.param("cuda", torch.float16, marks=_CUDA),
    ],
)
def test_softmax_loss_backward_under_autocast(device, dtype):
    """Scores in bf16/fp16 under autocast (log_softmax runs in float32): the gradient comes back
    in the scores' dtype and matches the float32 gradient to the dtype's precision (on CUDA the
    bf16 case failed before session 10: the fused backward takes no bfloat16 input dtype)."""
    layer = make_layer("SoftmaxWithLoss", [(4, 5), (4,)], "", ntop=1)
    layer.to(device)
    r = rng(3)
    x32 = torch.tensor(r.normal(size=(4, 5)), dtype=torch.float32, device=device, requires_grad=True)
    label = torch.tensor([0, 3, 1, 4], dtype=torch.float32, device=device)
    layer(x32, label)[0].backward()
    x = x32.detach().to(dtype).requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        loss = layer(x, label)[0]
    loss.backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)


# -- label checks deferred to the end of forward_backward (the GPU path, forced on the CPU) ------

DEFER_NET = """
name: "defer"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 3 dim: 5 }} }} }}
layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: 3 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" {acc} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" {loss} }}
"""


def _defer_net(tmp_path, labels, ignore: bool):
    import caffe_compat as caffe

    extra = "loss_param { ignore_label: 255 }" if ignore else ""
    p = tmp_path / "defer.prototxt"
    p.write_text(DEFER_NET.format(acc=extra.replace("loss_param", "accuracy_param"), loss=extra))
    caffe.set_random_seed(5)
    net = caffe.Net(str(p), caffe.TRAIN)
    net.blobs["data"].data[...] = rng(3).standard_normal((3, 5))
    net.blobs["label"].data[...] = labels
    return net


def _assert_no_label_checks_left(net):
    """After a pass the label-checking layers are back to their default and hold no record."""
    layers = [m for m in net.modules_by_name.values() if m.checks_labels]
    assert layers
    for layer in layers:
        assert layer.label_checks is LabelChecks.NOW and layer.label_record is None
        assert "label_checks" not in vars(layer) and "label_record" not in vars(layer)


@pytest.fixture(params=["raw", "range"])
def defer_on_cpu(monkeypatch, request):
    """Take the GPU's deferred label checks on CPU tensors, checking copies of the labels (small
    label bottoms) or their [min, max] (large ones)."""
    from caffe_compat.layers import loss as loss_mod

    monkeypatch.setattr(loss_mod, "_defers", lambda layer, labels: layer.label_checks is LabelChecks.DEFER)
    if request.param == "range":
        monkeypatch.setattr(loss_mod, "_RAW_LABEL_CHECK", 0)
    return loss_mod


def test_label_checks_follow_each_layers_own_policy(defer_on_cpu):
    """How a layer checks is its own attribute for the pass, not a module's state: a DEFER layer
    clamps and leaves a record while another layer of the same type raises at once."""
    deferring = make_layer("SoftmaxWithLoss", [(3, 4), (3,)], name="deferring")
    checking = make_layer("SoftmaxWithLoss", [(3, 4), (3,)], name="checking")
    deferring.label_checks = LabelChecks.DEFER
    x, y = torch.zeros(3, 4), torch.tensor([0.0, 9.0, 1.0])
    assert torch.isfinite(deferring.forward(x, y)[0])  # labels clamped into range
    values, classes, ignore = deferring.label_record
    assert classes == 4 and ignore is None
    assert values.reshape(-1).tolist() in ([0.0, 9.0, 1.0], [0.0, 9.0])  # the labels or their range
    with pytest.raises(LayerError, match=r"layer 'deferring'.*label value 9 in bottom 'b1' is out of range"):
        defer_on_cpu.verify_deferred([(deferring, values, classes, ignore)])
    with pytest.raises(LayerError, match=r"layer 'checking'.*label value 9 in bottom 'b1' is out of range"):
        checking.forward(x, y)
    assert checking.label_record is None


def test_a_runner_hands_label_checks_for_its_block_and_takes_the_records(tmp_path, defer_on_cpu):
    net = _defer_net(tmp_path, [0, 7, 1], ignore=False)
    runner = net._runner(True)
    layers = runner.label_layers
    assert [layer.name for layer in layers] == ["acc", "loss"]  # the label-checking layers, in order
    with runner.label_checks(LabelChecks.DEFER) as outer:
        with runner.label_checks(LabelChecks.TRACED) as inner:
            assert all(layer.label_checks is LabelChecks.TRACED for layer in layers)
        assert all(layer.label_checks is LabelChecks.DEFER for layer in layers)
        with torch.no_grad():
            runner.run_steps(0, len(net.layers) - 1)
        assert outer == []  # filled when the block ends
    assert inner == [] and [r[0].name for r in outer] == ["acc", "loss"]
    _assert_no_label_checks_left(net)
    with pytest.raises(LayerError, match=r"layer 'acc'.*label value 7"):
        defer_on_cpu.verify_deferred(outer)


def test_label_checking_layers_read_no_module_state():
    """Requirement (a) of issue 21: no module global or thread-local decides how a layer checks
    its labels; the modules defining label-checking layers declare neither."""
    import ast
    import inspect
    import sys

    from caffe_compat.layers.base import LAYER_REGISTRY

    modules = {cls.__module__ for cls in LAYER_REGISTRY.values() if cls.checks_labels}
    assert "caffe_compat.layers.loss" in modules
    for name in modules:
        tree = ast.parse(inspect.getsource(sys.modules[name]))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"{name}:{node.lineno}: global {node.names}"
            if isinstance(node, ast.Attribute) and node.attr == "local":
                assert ast.unparse(node) != "threading.local", f"{name}:{node.lineno}: threading.local"


@pytest.mark.parametrize("raw_limit", [4096, 0])
@pytest.mark.parametrize("ignore,labels", [(False, [0, 3, 1]), (True, [255, 3, 1])])
def test_deferred_label_check_gives_the_same_pass(tmp_path, monkeypatch, ignore, labels, raw_limit):
    ref = _defer_net(tmp_path, labels, ignore)
    ref.clear_param_diffs()
    ref_loss = ref.forward_backward()
    from caffe_compat.layers import loss as loss_mod

    calls = []
    monkeypatch.setattr(
        loss_mod, "_defers", lambda layer, t: calls.append(1) or layer.label_checks is LabelChecks.DEFER
    )
    monkeypatch.setattr(loss_mod, "_RAW_LABEL_CHECK", raw_limit)
    net = _defer_net(tmp_path, labels, ignore)
    net.clear_param_diffs()
    assert net.forward_backward() == ref_loss
    assert len(calls) == 2  # the Accuracy and the loss layer took the deferred path
    _assert_no_label_checks_left(net)
    for name in ("acc", "loss"):
        np.testing.assert_array_equal(net.blobs[name].data, ref.blobs[name].data)
    for a, b in zip(net.learnable_params, ref.learnable_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ignore,labels,bad",
    [
        (True, [255, 3, 1], None),
        (True, [255, 7, 1], 7),
        (False, [-0.5, 3.9, 1], None),
        (False, [-1.5, 3, 1], -1),
        (False, [0, float("nan"), 1], -(2**63)),  # as the CPU's check: NaN converts to INT64_MIN
    ],
)
def test_deferred_check_truncates_and_skips_ignored_labels(tmp_path, defer_on_cpu, ignore, labels, bad):
    """Labels count as static_cast<int> of their values (toward zero); ignored ones are skipped."""
    net = _defer_net(tmp_path, labels, ignore=ignore)
    net.clear_param_diffs()
    if bad is None:
        assert np.isfinite(net.forward_backward())
    else:
        with pytest.raises(LayerError, match=rf"label value {bad} in bottom 'label' is out of range"):
            net.forward_backward()


@pytest.mark.parametrize("labels,value", [([0, 4, 1], 4), ([0, -1, 9], -1)])
def test_deferred_label_check_raises_before_the_update(tmp_path, defer_on_cpu, labels, value):
    from caffe_compat.solvers import SGDSolver

    net = _defer_net(tmp_path, labels, ignore=False)
    before = [p.detach().clone() for p in net.learnable_params]
    sp = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=10)
    solver = SGDSolver(sp, source="<test>", net=net, device=torch.device("cpu"))
    with pytest.raises(LayerError, match=rf"layer 'acc'.*label value {value} in bottom 'label' is out of range"):
        solver.step(1)
    _assert_no_label_checks_left(net)
    for p, b in zip(net.learnable_params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert solver.iter == 0


def test_bad_label_read_late_raises_before_the_next_update(tmp_path, defer_on_cpu, monkeypatch):
    """A solver on a GPU reads an iteration's loss (and label checks) once the next iteration is
    queued: the error names the bad iteration and comes before the next update."""
    from caffe_compat.solvers import SGDSolver, base

    monkeypatch.setattr(base, "_reads_late", lambda net: True)
    net = _defer_net(tmp_path, [0, 2, 1], ignore=False)
    sp = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=10)
    solver = SGDSolver(sp, source="<test>", net=net, device=torch.device("cpu"))
    seen = []
    solver.loss_observers.append(lambda it, loss: seen.append(it))
    solver.step(2)
    assert seen == [0] and solver.iter == 2  # iteration 1's loss waits for the next pass
    net.blobs["label"].data[...] = [0, 5, 1]
    updates = []
    apply_update = solver.apply_update
    solver.apply_update = lambda: updates.append(solver.iter) or apply_update()
    with pytest.raises(LayerError, match=r"^iteration 2: .*layer 'acc'.*label value 5 in bottom 'label'"):
        solver.step(3)
    assert updates == [2] and solver.iter == 3  # iteration 2's update only; iteration 3's pass, not its update
    assert seen == [0, 1] and solver._lagged == []  # iteration 1's loss was fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_label_on_the_gpu_is_a_clear_error_not_a_device_assert(tmp_path):
    import caffe_compat as caffe

    caffe.set_mode_gpu()
    try:
        net = _defer_net(tmp_path, [0, 7, 1], ignore=False)
        assert net.learnable_params[0].device.type == "cuda"
        net.clear_param_diffs()
        with pytest.raises(LayerError, match=r"label value 7 in bottom 'label' is out of range"):
            net.forward_backward()
        net.blobs["label"].data[...] = [0, 2, 1]  # the device is still usable
        net.clear_param_diffs()
        assert np.isfinite(net.forward_backward())
    finally:
        caffe.set_mode_cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_label_read_late_on_the_gpu(tmp_path):
    import caffe_compat as caffe
    from caffe_compat.solvers import SGDSolver

    caffe.set_mode_gpu()
    try:
        net = _defer_net(tmp_path, [0, 2, 1], ignore=False)
        sp = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=10)
        solver = SGDSolver(sp, source="<test>", net=net, device=torch.device("cuda"))
        solver.step(2)
        assert len(solver._lagged) == 1  # iteration 1's loss is still on its way
        net.blobs["label"].data[...] = [0, 5, 1]
        with pytest.raises(LayerError, match=r"^iteration 2: .*label value 5 in bottom 'label'"):
            solver.step(3)
        assert solver.iter == 3
        net.blobs["label"].data[...] = [0, 2, 1]  # the device is still usable
        solver.step(2)
        assert np.isfinite(solver.smoothed_loss) and solver._lagged == []
    finally:
        caffe.set_mode_cpu()


def test_label_error_names_the_blob_not_its_split(tmp_path):
    """``label`` feeds Accuracy and the loss, so the net copies it through an inserted Split layer;
    the error names the blob of the prototxt, as the user wrote it."""
    net = _defer_net(tmp_path, [0, 9, 1], ignore=False)
    assert "label_label_0_split_0" in net.blobs  # the copy the layers actually read
    with pytest.raises(LayerError) as err:
        net.forward()
    assert "label value 9 in bottom 'label' is out of range" in str(err.value)
    assert "split" not in str(err.value)


@pytest.mark.parametrize("params", ["", "loss_param { normalization: BATCH_SIZE }", "loss_param { ignore_label: 2 }"])
def test_softmax_loss_follows_a_new_input_shape(params):
    """SoftmaxWithLoss keeps its shape-derived constants (sizes, normalizer) per input shape:
    a new batch size gets its own."""
    layer = make_layer("SoftmaxWithLoss", [(2, 5), (2,)], params)
    fresh = make_layer("SoftmaxWithLoss", [(3, 5), (3,)], params)
    g = torch.Generator().manual_seed(4)
    for n in (2, 3, 2):
        x = torch.randn(n, 5, generator=g)
        y = torch.tensor([0.0, 2.0, 4.0][:n])
        assert torch.equal(layer.forward(x, y)[0], fresh.forward(x, y)[0])
        # Caffe: Σ −log p[label] over counted items / count (VALID; BATCH_SIZE: / n)
        logp = torch.log_softmax(x.double(), 1)[torch.arange(n), y.long()]
        keep = y != 2 if "ignore" in params else torch.ones(n, dtype=torch.bool)
        want = -logp[keep].sum() / (n if "BATCH" in params else keep.sum())
        assert float(layer.forward(x, y)[0]) == pytest.approx(float(want), rel=1e-6)


def test_deferred_check_of_a_net_without_a_loss(tmp_path, defer_on_cpu):
    """A pass with no loss blob still checks the labels its Accuracy layer recorded."""
    import caffe_compat as caffe

    text = DEFER_NET.format(acc="", loss="")
    p = tmp_path / "acc_only.prototxt"
    p.write_text(text[: text.index('layer { name: "loss"')])  # data, label, ip, acc
    net = caffe.Net(str(p), caffe.TRAIN)
    assert "loss" not in net.blobs
    net.blobs["label"].data[...] = [0, 6, 1]
    with pytest.raises(LayerError, match=r"layer 'acc'.*label value 6 in bottom 'label'"):
        net.forward_backward()
