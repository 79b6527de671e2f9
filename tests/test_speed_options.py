"""Speed options keep Caffe's numbers: in-place ReLU, the fused LRN, lazy diff clearing, tune_cpu.

Correctness only; timings live in benchmarks/bench_alexnet.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.errors import NetError
from caffe_compat.layers.norm import lrn_across_channels
from caffe_compat.mode import physical_cores, tune_cpu

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _net(tmp_path, seed=3):
    p = tmp_path / "small.prototxt"
    p.write_text(NET)
    caffe.set_random_seed(seed)
    net = caffe.Net(str(p), caffe.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal((2, 3, 9, 9))
    net.blobs["label"].data[...] = [1, 3]
    return net


def test_forward_backward_with_inplace_relu_matches_plain_autograd(tmp_path):
    net = _net(tmp_path)
    net.clear_param_diffs()
    loss = net.forward_backward()
    assert net._overwritten  # the ReLUs ran in place on the conv / inner-product tops
    # the same net through pycaffe's forward + backward (no in-place): same loss and diffs
    ref = _net(tmp_path)
    ref.clear_param_diffs()
    out = ref.forward()
    ref.backward()
    assert loss == pytest.approx(float(out["loss"]), rel=1e-6)
    for name in ("conv1", "ip1", "ip2"):
        for a, b in zip(net.params[name], ref.params[name]):
            np.testing.assert_allclose(a.diff, b.diff, rtol=1e-5, atol=1e-7, err_msg=name)
    # the in-place blob holds the ReLU output, as in Caffe
    np.testing.assert_allclose(net.blobs["conv1"].data, ref.blobs["conv1"].data, rtol=1e-6, atol=0)
    assert (net.blobs["conv1"].data >= 0).all()


def test_backward_after_forward_backward_asks_for_forward(tmp_path):
    net = _net(tmp_path)
    net.forward_backward()
    with pytest.raises(NetError, match="call forward"):
        net.backward()
    net.forward()
    net.backward()  # fine again


def test_no_grad_forward_runs_inplace_and_matches(tmp_path):
    net = _net(tmp_path)
    ref = net.forward()["loss"].copy()
    conv_ref = net.blobs["conv1"].data.copy()
    with torch.no_grad():
        out = net.forward()["loss"]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(net.blobs["conv1"].data, conv_ref, rtol=1e-6, atol=0)


def test_clear_param_diffs_reads_as_zeros_and_accumulates(tmp_path):
    net = _net(tmp_path)
    net.clear_param_diffs()
    assert all(float(np.abs(p.diff).sum()) == 0.0 for ps in net.params.values() for p in ps)
    net.clear_param_diffs()
    net.forward_backward()
    once = [p.diff.copy() for ps in net.params.values() for p in ps]
    assert all(p.grad is not None for p in net.learnable_params)
    net.forward_backward()  # no clear: Caffe accumulates
    twice = [p.diff for ps in net.params.values() for p in ps]
    for a, b in zip(once, twice):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])
def test_lrn_fast_powers_match_formula(beta):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    size, alpha, k = 5, 0.3, 1.5
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 2, 2))
    win = sum(sq[:, i : i + 7] for i in range(size))
    ref = x * (k + alpha / size * win) ** -beta
    y = lrn_across_channels(x, size, alpha, beta, k)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lrn_across_channels(t, size, alpha, beta, k), (xg,), eps=1e-6, atol=1e-7)


def test_lrn_float32_fast_path_close_to_pow():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5, 5) * 10
    y = lrn_across_channels(x, 5, 1e-4, 0.75, 1.0)
    ref = lrn_across_channels(x.double(), 5, 1e-4, 0.75, 1.0)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_tune_cpu_sets_threads():
    before = torch.get_num_threads()
    try:
        applied = tune_cpu(threads=1, cache_allocations=True)
        assert applied["threads"] == 1 and torch.get_num_threads() == 1
        assert isinstance(applied["cache_allocations"], bool)
        assert 1 <= physical_cores() <= (torch.get_num_interop_threads() + 10**6)
    finally:
        torch.set_num_threads(before)
