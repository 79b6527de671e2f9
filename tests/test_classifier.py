"""pycaffe's Classifier, Detector and forward_all on a tiny net, against NumPy written here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import net_spec
from caffe_compat import pycaffe_io as cio
from caffe_compat.classifier import Classifier
from caffe_compat.detector import Detector
from caffe_compat.errors import CaffeError
from caffe_compat.io import write_net

L = net_spec.layers

MEAN = np.array([100.0, 120.0, 110.0])
SCALE = 0.01


@pytest.fixture
def tiny_model(tmp_path):
    """Input (3, 3, 6, 6) -> InnerProduct(4) -> Softmax, with random weights saved to a caffemodel."""
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[3, 3, 6, 6]))
    n.ip = L.InnerProduct(
        n.data, num_output=4, weight_filler=dict(type="gaussian", std=0.5), bias_filler=dict(type="gaussian", std=0.5)
    )
    n.prob = L.Softmax(n.ip)
    proto = n.to_proto()
    model = tmp_path / "tiny.prototxt"
    write_net(proto, model)
    caffe.set_random_seed(11)
    net = caffe.Net(str(model), caffe.TEST)
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    W = net.params["ip"][0].data.astype(np.float64).copy()
    b = net.params["ip"][1].data.astype(np.float64).copy()
    return str(model), str(weights), W, b


def _prob(crop_hwc: np.ndarray, W, b) -> np.ndarray:
    x = (crop_hwc.transpose(2, 0, 1)[::-1].astype(np.float64) * 255.0 - MEAN[:, None, None]) * SCALE
    z = W @ x.ravel() + b
    e = np.exp(z - z.max())
    return e / e.sum()


def _classifier(model, weights, **kw):
    return Classifier(model, weights, mean=MEAN, raw_scale=255.0, input_scale=SCALE, channel_swap=(2, 1, 0), **kw)


def test_classifier_predict_oversample_and_center(tiny_model):
    model, weights, W, b = tiny_model
    rng = np.random.default_rng(0)
    images = [rng.random((8, 8, 3)).astype(np.float32) for _ in range(2)]
    clf = _classifier(model, weights, image_dims=(8, 8))
    assert isinstance(clf, caffe.Net) and clf.phase == caffe.TEST
    np.testing.assert_allclose(clf.params["ip"][0].data, W, rtol=0, atol=0)

    pred = clf.predict(images)  # oversample=True: 10 crops each, 20 inputs in batches of 3
    assert pred.shape == (2, 4)
    for k, im in enumerate(images):
        crops = [im[0:6, 0:6], im[0:6, 2:8], im[2:8, 0:6], im[2:8, 2:8], im[1:7, 1:7]]
        crops += [c[:, ::-1] for c in crops]
        expect = np.mean([_prob(c, W, b) for c in crops], axis=0)
        np.testing.assert_allclose(pred[k], expect, rtol=1e-4, atol=1e-6)

    pred = clf.predict(images, oversample=False)
    assert pred.shape == (2, 4)
    for k, im in enumerate(images):
        np.testing.assert_allclose(pred[k], _prob(im[1:7, 1:7], W, b), rtol=1e-4, atol=1e-6)


def test_classifier_default_dims_resize_whole_image(tiny_model):
    model, weights, W, b = tiny_model
    rng = np.random.default_rng(1)
    im = rng.random((9, 7, 3)).astype(np.float32)
    clf = _classifier(model, weights)  # image_dims default: the input's 6 x 6, so no crop
    np.testing.assert_array_equal(clf.image_dims, [6, 6])
    resized = cio.resize_image(im, (6, 6))
    pred = clf.predict([im], oversample=False)
    np.testing.assert_allclose(pred[0], _prob(resized, W, b), rtol=1e-4, atol=1e-6)
    # the 10 crops of a 6x6 image in a 6x6 input are the image and its mirror
    pred = clf.predict([im], oversample=True)
    expect = (_prob(resized, W, b) + _prob(resized[:, ::-1], W, b)) / 2
    np.testing.assert_allclose(pred[0], expect, rtol=1e-4, atol=1e-6)


def test_forward_all_batches_and_drops_padding(tiny_model):
    model, weights, W, b = tiny_model
    net = caffe.Net(model, weights, caffe.TEST)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 6, 6)).astype(np.float32)  # 3 batches of 3, 2 padded
    out = net.forward_all(blobs=["ip"], data=x)
    assert set(out) == {"prob", "ip"}
    assert out["prob"].shape == (7, 4) and out["ip"].shape == (7, 4)
    expect_ip = x.reshape(7, -1).astype(np.float64) @ W.T + b
    np.testing.assert_allclose(out["ip"], expect_ip, rtol=1e-4, atol=1e-4)
    e = np.exp(expect_ip - expect_ip.max(1, keepdims=True))
    np.testing.assert_allclose(out["prob"], e / e.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_detector_windows(tiny_model, tmp_path):
    model, weights, W, b = tiny_model
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path = str(tmp_path / "im.png")
    cv2.imwrite(path, rgb[:, :, ::-1])
    im = rgb.astype(np.float32) / 255.0
    det = Detector(model, weights, mean=MEAN, raw_scale=255.0, input_scale=SCALE, channel_swap=(2, 1, 0))
    np.testing.assert_array_equal(det.crop_dims, [6, 6, 3])
    windows = [(0, 0, 6, 6), (2, 3, 8, 9), (1, 1, 10, 5)]  # the last is warped to 6 x 6
    dets = det.detect_windows([(path, windows)])
    assert [d["filename"] for d in dets] == [path] * 3
    assert [tuple(d["window"]) for d in dets] == windows
    expect = [
        _prob(im[0:6, 0:6], W, b),
        _prob(im[2:8, 3:9], W, b),
        _prob(cio.resize_image(im[1:10, 1:5], (6, 6)), W, b),
    ]
    for d, e in zip(dets, expect):
        np.testing.assert_allclose(d["prediction"], e, rtol=1e-4, atol=1e-6)


def test_detector_context_pad_and_selective_search(tiny_model):
    model, weights, _, _ = tiny_model
    det = Detector(model, weights, mean=MEAN, raw_scale=255.0, channel_swap=(2, 1, 0), context_pad=1)
    # the padding mean is in image space: RGB order, divided by raw_scale
    np.testing.assert_allclose(det.crop_mean.reshape(3), MEAN[::-1] / 255.0, rtol=1e-6, atol=0)
    im = np.random.default_rng(4).random((12, 12, 3)).astype(np.float32)
    crop = det.crop(im, np.array([0, 0, 4, 4]))  # near the corner: the context is padded with the mean
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0, 0], MEAN[::-1] / 255.0, rtol=1e-6, atol=0)
    with pytest.raises(CaffeError, match="detect_windows"):
        det.detect_selective_search(["x.jpg"])


def test_forward_backward_all_batches_inputs_and_diffs(tiny_model, tmp_path):
    model, weights, W, b = tiny_model
    fb = tmp_path / "fb.prototxt"
    fb.write_text("force_backward: true\n" + open(model).read())
    net = caffe.Net(str(fb), weights, caffe.TEST)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 6, 6)).astype(np.float32)
    g = rng.standard_normal((5, 4)).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=x, prob=g)
    assert outs["prob"].shape == (5, 4) and diffs["data"].shape == (5, 3, 6, 6)
    ip = x.reshape(5, -1).astype(np.float64) @ W.T + b
    p = np.exp(ip - ip.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dip = p * (g - (g * p).sum(1, keepdims=True))  # softmax's backward
    np.testing.assert_allclose(diffs["data"].reshape(5, -1), dip @ W, rtol=1e-4, atol=1e-5)
