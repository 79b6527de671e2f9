"""The gradient witnesses of the training passes (``caffe_compat.runners.grad_witness``): the bounds
an eager pass records for the InnerProduct weights against the same products computed by hand in
PyTorch, and the cases where the net must give no certificate (the diff changed since, a pass of
another kind, a hook that cannot fire)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.net import Net
from caffe_compat.runners.grad_witness import Certificate
from tests.test_cuda_graph import ReplayingGraph

# ip1 -> ReLU written in place over ip1's top -> ip2 -> loss: the shape of AlexNet's fc6-relu6-fc7
MLP = """name: "mlp"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "t" top: "loss" }
"""


def _mlp(tmp_path, text: str = MLP) -> Net:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    caffe.set_random_seed(3)
    net = Net(str(path), caffe.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal(net.blobs["x"].shape).astype(np.float32)
    net.blobs["t"].data[...] = rng.standard_normal(net.blobs["t"].shape).astype(np.float32)
    return net


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def test_bounds_of_an_inner_product_under_an_inplace_relu(tmp_path):
    """ip1's max|D| is the gradient of ip1's own output (before the in-place ReLU), not of the
    ReLU's: unit 0 of ip1 is always negative and feeds ip2 with large weights, so the ReLU's
    gradient is largest where ip1's is 0."""
    net = _mlp(tmp_path)
    net.params["ip1"][1].data[0] = -50.0
    net.params["ip2"][0].data[:, 0] = 20.0
    net.clear_param_diffs()
    net.forward_backward()
    certs = net.gradient_witness()
    # learnable order: ip1 weight, ip1 bias, ip2 weight, ip2 bias; biases have no witness
    assert [type(c) for c in certs] == [Certificate, type(None), Certificate, type(None)]

    # the same pass by hand
    x, t = _tensor(net.blobs["x"].data), _tensor(net.blobs["t"].data)
    w1, b1, w2, b2 = (_tensor(net.params[n][k].data) for n in ("ip1", "ip2") for k in (0, 1))
    y1 = (x @ w1.T + b1).requires_grad_()
    r = torch.relu(y1)
    r.retain_grad()
    y2 = r @ w2.T + b2
    y2.retain_grad()
    (((y2 - t) ** 2).sum() / (2 * x.shape[0])).backward()
    assert y1.grad.abs().max() < r.grad.abs().max()  # what makes the test tell the two apart

    expected = {0: (y1.grad, x), 2: (y2.grad, r.detach())}
    for i, (d, bottom) in expected.items():
        (rows, max_d, max_x, largest) = certs[i].terms[0]
        assert len(certs[i].terms) == 1
        assert rows == 4
        assert largest == torch.finfo(torch.float32).max
        torch.testing.assert_close(max_d, d.abs().max(), rtol=1e-6, atol=0)
        torch.testing.assert_close(max_x, bottom.abs().max(), rtol=1e-6, atol=0)


def test_passes_without_a_clear_add_terms_and_a_clear_starts_again(tmp_path):
    net = _mlp(tmp_path)
    net.clear_param_diffs()
    net.forward_backward()
    net.forward_backward()  # iter_size 2: the diffs add up, so do the bounds
    assert [len(net.gradient_witness()[i].terms) for i in (0, 2)] == [2, 2]
    net.clear_param_diffs()
    net.forward_backward()
    assert [len(net.gradient_witness()[i].terms) for i in (0, 2)] == [1, 1]


def test_a_shared_weight_has_a_term_per_layer(tmp_path):
    text = """name: "shared"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" } inner_product_param { num_output: 4 bias_term: false weight_filler { type: "gaussian" std: 1 } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
  param { name: "w" } inner_product_param { num_output: 4 bias_term: false } }
layer { name: "loss" type: "EuclideanLoss" bottom: "b" bottom: "x" top: "loss" }
"""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = Net(str(path), caffe.TRAIN)
    net.blobs["x"].data[...] = np.arange(8, dtype=np.float32).reshape(2, 4)
    net.clear_param_diffs()
    net.forward_backward()
    (cert,) = net.gradient_witness()
    assert len(cert.terms) == 2
    torch.testing.assert_close(cert.terms[0][2], torch.tensor(7.0))  # max|x|, a's bottom
    torch.testing.assert_close(cert.terms[1][2], torch.tensor(float(np.abs(net.blobs["a"].data).max())))


@pytest.mark.parametrize("write", ["numpy view", "in place", "replaced"])
def test_a_diff_written_after_the_pass_has_no_certificate(tmp_path, write):
    net = _mlp(tmp_path)
    net.clear_param_diffs()
    net.forward_backward()
    p = net.learnable_params[0]
    if write == "numpy view":
        net.params["ip1"][0].diff[0, 0] = np.inf
    elif write == "in place":
        with torch.no_grad():
            p.grad.mul_(2)
    else:
        p.grad = p.grad.clone()
    certs = net.gradient_witness()
    assert certs[0] is None
    assert certs[2] is not None


def test_a_numpy_view_of_the_diff_keeps_it_unwitnessed_after_a_clear(tmp_path):
    """A diff whose view was handed out is zeroed in place by a clear and added into by the pass:
    what the view wrote in between would count, so no certificate."""
    net = _mlp(tmp_path)
    net.params["ip1"][0].diff  # noqa: B018  (hands out the view)
    net.clear_param_diffs()
    net.forward_backward()
    assert net.gradient_witness()[0] is None
    assert net.gradient_witness()[2] is not None


def test_a_hook_that_cannot_fire_leaves_no_certificate(tmp_path):
    """InnerProduct with axis 2 returns a view of its output; a ReLU written in place over the
    view moves autograd's path off the view's node, so its hook never sees the gradient."""
    text = """name: "view"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 5 axis: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "t" top: "loss" }
"""
    net = _mlp(tmp_path, text)
    net.clear_param_diffs()
    net.forward_backward()
    assert net.learnable_params[0].grad.abs().sum() > 0
    assert net.gradient_witness()[0] is None


def test_a_replayed_pass_has_no_certificate(tmp_path):
    net = _mlp(tmp_path).use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
    net.clear_param_diffs()
    net.forward_backward()  # the eager warm-up pass: witnessed
    assert net.gradient_witness()[0] is not None
    for _ in range(2):  # the capture, then a replay
        net.clear_param_diffs()
        net.forward_backward()
        assert net.gradient_witness() == [None] * 4
