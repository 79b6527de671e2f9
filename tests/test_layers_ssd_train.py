"""SSD's and py-faster-rcnn's training layers: SmoothL1Loss (both forms) and MultiBoxLoss.

References: real Caffe's arrays for SSD's two-bottom SmoothL1Loss (tests/fixtures/caffe_reference/
forks/smooth_l1_loss, from /work/shared/conformance/forks), NumPy transcriptions of the forks'
formulas written here (weiliu89/caffe ssd 4817bf8b smooth_L1_loss_layer.cpp, multibox_loss_layer.cpp,
bbox_util.cpp; rbgirshick/caffe-fast-rcnn 0dcd397b smooth_L1_loss_layer.cu), and gradchecks in
float64 where the forward's choices (matching, mining) are fixed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from caffe_compat.layers import layer_class
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF

RTOL, ATOL = 1e-4, 1e-5  # the conformance README's tolerance
FORKS = CAFFE_REF / "forks"


def _layer(text: str, shapes):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    if not lp.top:
        lp.top.append("loss")
    return layer_class(lp.type)(lp, shapes, caffe_pb2.TRAIN)


# -- SmoothL1Loss: real Caffe (SSD's two-bottom form) ---------------------------------------------


def test_smooth_l1_ssd_matches_caffe_fixture():
    """The whole net (Input, Input, SmoothL1Loss with loss_weight 0.5, force_backward) replayed on
    Caffe's inputs: the loss and the diffs of both bottoms (SSD's AllowForceBackward reaches the
    target too)."""
    d = FORKS / "smooth_l1_loss"
    ref = np.load(d / "blobs.npz")
    old = os.getcwd()
    os.chdir(d)
    try:
        net = caffe.Net("net.prototxt", "weights.caffemodel", caffe.TEST)
        for b in net.inputs:
            net.blobs[b].data[...] = ref["data__" + b]
        net.forward()
        net.backward()
    finally:
        os.chdir(old)
    checked = 0
    for k in ref.files:
        kind, _, blob = k.partition("__")
        if kind in ("data", "diff"):
            ours = getattr(net.blobs[blob], kind)
            assert ours.shape == ref[k].shape, k
            np.testing.assert_allclose(ours, ref[k], rtol=RTOL, atol=ATOL, err_msg=k)
            checked += 1
    assert checked == 6


# -- SmoothL1Loss: both forks' formulas in NumPy --------------------------------------------------


def _np_smooth_l1(pred, target, w_in=None, w_out=None, sigma=1.0, ssd=False):
    """Loss and gradients to (pred, target) as each fork's kernels compute them."""
    s2 = np.float64(np.float32(sigma)) ** 2
    d = pred - target
    if w_in is not None:
        d = w_in * d
    e = np.where(np.abs(d) < 1 / s2, 0.5 * d * d * s2, np.abs(d) - 0.5 / s2)
    if w_out is not None:
        e = w_out * e
    num = pred.shape[0]
    loss = e.sum() / num
    f1 = np.where(np.abs(d) < 1 / s2, s2 * d, np.sign(d))
    if not ssd:  # py-faster-rcnn multiplies by both weights; SSD by neither
        if w_in is not None:
            f1 = f1 * w_in
        if w_out is not None:
            f1 = f1 * w_out
    return loss, f1 / num, -f1 / num


def _run(layer, arrays, loss_weight=1.0):
    ts = [torch.tensor(a, requires_grad=(i < 2)) for i, a in enumerate(arrays)]
    (loss,) = layer(*ts)
    (loss * loss_weight).backward()
    return loss.item(), ts[0].grad.numpy(), ts[1].grad.numpy()


@pytest.mark.parametrize(
    "form, text, nb, sigma",
    [
        ("ssd", "", 2, 1.0),
        ("ssd", "", 3, 1.0),
        ("frcnn", "smooth_l1_loss_param { sigma: 3 }", 2, 3.0),
        ("frcnn", "smooth_l1_loss_param { sigma: 3 }", 4, 3.0),
        ("frcnn", "", 4, 1.0),  # four bottoms are py-faster-rcnn's even without the param
    ],
)
def test_smooth_l1_forms_match_forks(form, text, nb, sigma):
    rng = np.random.default_rng(3)
    shape = (3, 8, 2, 1)
    arrays = [rng.normal(0, 1.2, shape), rng.normal(0, 1.2, shape)]
    arrays += [rng.uniform(-0.5, 2, shape) for _ in range(nb - 2)]
    layer = _layer(f'name: "l" type: "SmoothL1Loss" {text}', [shape] * nb)
    assert layer.faster_rcnn == (form == "frcnn")
    loss, g0, g1 = _run(layer, arrays, loss_weight=0.7)
    w_in = arrays[2] if nb > 2 else None
    w_out = arrays[3] if nb > 3 else None
    ref_loss, r0, r1 = _np_smooth_l1(*arrays[:2], w_in, w_out, sigma=sigma, ssd=form == "ssd")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g0, 0.7 * r0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g1, 0.7 * r1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("text, nb", [("", 2), ("smooth_l1_loss_param { sigma: 2 }", 2), ("", 4)])
def test_smooth_l1_gradcheck(text, nb):
    """Where the fork's gradient is the derivative of its loss (both forms without weights,
    py-faster-rcnn's with weights), torch's gradcheck agrees with it in float64."""
    rng = np.random.default_rng(4)
    shape = (2, 3, 2, 2)
    pred = torch.tensor(rng.normal(0, 1, shape), requires_grad=True)
    # keep |d| away from the kink at 1/sigma^2, where the numeric derivative is undefined
    target = torch.tensor(pred.detach().numpy() + rng.choice([-2.1, -0.3, 0.2, 1.7], shape), requires_grad=True)
    ws = [torch.tensor(rng.uniform(0.5, 1.5, shape)) for _ in range(nb - 2)]
    layer = _layer(f'name: "l" type: "SmoothL1Loss" {text}', [shape] * nb)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, *ws)[0], (pred, target), eps=1e-6, atol=1e-7)


def test_smooth_l1_ssd_weights_gradient_is_not_the_derivative():
    """SSD's 3-bottom backward leaves out the weight: twice the weight gives the same gradient
    where |w d| stays beyond 1, while the loss changes."""
    layer = _layer('name: "l" type: "SmoothL1Loss"', [(1, 2)] * 3)
    pred, target = np.array([[3.0, -4.0]]), np.zeros((1, 2))
    l1, g1, _ = _run(layer, [pred, target, np.full((1, 2), 1.0)])
    l2, g2, _ = _run(layer, [pred, target, np.full((1, 2), 2.0)])
    assert l2 > l1
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(g1, [[1.0, -1.0]])


def test_smooth_l1_refusals():
    with pytest.raises(LayerError, match="2 bottoms or 4"):
        _layer('name: "l" type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 2 }', [(2, 4)] * 3)
    with pytest.raises(LayerError, match="channels/height/width"):
        _layer('name: "l" type: "SmoothL1Loss"', [(2, 4), (2, 5)])
    with pytest.raises(LayerError, match="at most 4"):
        _layer('name: "l" type: "SmoothL1Loss"', [(2, 4)] * 5)


def test_smooth_l1_param_parses_with_fork_field_number():
    """py-faster-rcnn's smooth_l1_loss_param is field 8266712 of LayerParameter, as in its fork."""
    field = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["smooth_l1_loss_param"]
    assert field.number == 8266712
    assert caffe_pb2.SmoothL1LossParameter().sigma == 1.0
