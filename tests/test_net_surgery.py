"""pycaffe's "net surgery" example: cast an InnerProduct classifier into a fully convolutional net
by reshaping its weights into a convolution, then run it on a larger input: each output
position must equal the original net's output on the corresponding crop."""

from __future__ import annotations

import numpy as np

import caffe_compat as caffe
from caffe_compat import net_spec

L = net_spec.layers
P = net_spec.params


def _features(n, in_hw: int, batch: int) -> None:
    n.data = L.Input(shape=dict(dim=[batch, 2, in_hw, in_hw]))
    n.conv1 = L.Convolution(
        n.data,
        num_output=3,
        kernel_size=3,
        weight_filler=dict(type="gaussian", std=0.3),
        bias_filler=dict(type="gaussian", std=0.1),
    )
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)


def _ip_net():
    """8x8 input: conv 3x3 -> 6x6, pool 2 -> 3x3, fc (InnerProduct 4), softmax."""
    n = net_spec.NetSpec()
    _features(n, 8, batch=1)
    n.fc = L.InnerProduct(
        n.pool1, num_output=4, weight_filler=dict(type="gaussian", std=0.3), bias_filler=dict(type="gaussian", std=0.1)
    )
    n.prob = L.Softmax(n.fc)
    return n.to_proto()


def _full_conv_net(in_hw: int):
    """The same net with fc as a 3x3 Convolution (named fc-conv, so no weights copy by name)."""
    n = net_spec.NetSpec()
    _features(n, in_hw, batch=1)
    n["fc-conv"] = L.Convolution(n.pool1, num_output=4, kernel_size=3)
    n.prob = L.Softmax(n["fc-conv"])
    return n.to_proto()


def test_fully_convolutional_surgery(tmp_path):
    caffe.set_random_seed(5)
    net = caffe.Net(_ip_net(), caffe.TEST)
    weights = tmp_path / "ip.caffemodel"
    net.save(str(weights))

    # conv layers copy by name from the caffemodel; fc-conv is left to the surgery
    net_full = caffe.Net(_full_conv_net(14), str(weights), caffe.TEST)
    np.testing.assert_array_equal(net_full.params["conv1"][0].data, net.params["conv1"][0].data)
    assert net.params["fc"][0].data.shape == (4, 27)
    assert net_full.params["fc-conv"][0].data.shape == (4, 3, 3, 3)

    # the surgery: flat copies, as in pycaffe's examples/net_surgery.ipynb
    net_full.params["fc-conv"][0].data.flat = net.params["fc"][0].data.flat
    net_full.params["fc-conv"][1].data[...] = net.params["fc"][1].data
    np.testing.assert_array_equal(net_full.params["fc-conv"][0].data, net.params["fc"][0].data.reshape(4, 3, 3, 3))

    rng = np.random.default_rng(0)
    big = rng.standard_normal((1, 2, 14, 14)).astype(np.float32)
    out_full = net_full.forward(data=big)["prob"].copy()
    # 14x14 -> conv 12x12 -> pool 6x6 -> 3x3 conv: 4x4 outputs, one per 8x8 crop at stride 2
    assert out_full.shape == (1, 4, 4, 4)
    for i in range(4):
        for j in range(4):
            crop = big[:, :, 2 * i : 2 * i + 8, 2 * j : 2 * j + 8]
            ref = net.forward(data=crop)["prob"]
            np.testing.assert_allclose(out_full[0, :, i, j], ref[0], rtol=1e-5, atol=1e-6)
    # the maps differ from position to position (the check above is not vacuous)
    assert np.abs(out_full[0, :, 0, 0] - out_full[0, :, 3, 3]).max() > 1e-3


def test_surgery_saved_and_reloaded(tmp_path):
    """The edited fully convolutional net saves and reloads with the surgery in place."""
    caffe.set_random_seed(6)
    net = caffe.Net(_ip_net(), caffe.TEST)
    net_full = caffe.Net(_full_conv_net(8), caffe.TEST)
    for name in ("conv1",):
        for k in range(2):
            net_full.params[name][k].data[...] = net.params[name][k].data
    net_full.params["fc-conv"][0].data[...] = net.params["fc"][0].data.reshape(4, 3, 3, 3)
    net_full.params["fc-conv"][1].data[...] = net.params["fc"][1].data
    path = tmp_path / "full.caffemodel"
    net_full.save(str(path))
    again = caffe.Net(_full_conv_net(8), str(path), caffe.TEST)
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    a = again.forward(data=x)["prob"].reshape(-1)
    b = net.forward(data=x)["prob"].reshape(-1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
