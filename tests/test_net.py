"""The Net: pycaffe's API, Caffe's wiring rules and the error messages on malformed nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.errors import LayerError, NetError

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.prototxt"
    p.write_text(SMALL)
    return p


def test_pycaffe_constructor_forms(small, tmp_path):
    caffe.set_random_seed(3)
    net = caffe.Net(str(small), caffe.TEST)
    w = tmp_path / "w.caffemodel"
    net.save(str(w))
    for other in (
        caffe.Net(str(small), str(w), caffe.TEST),
        caffe.Net(str(small), weights=str(w), phase=caffe.TEST),
    ):
        for name in net.params:
            for a, b in zip(net.params[name], other.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert net._layer_names == ["data", "conv1", "relu1", "pool1", "ip1", "prob"]
    assert net.top_names["relu1"] == ["conv1"] and net.bottom_names["ip1"] == ["pool1"]
    assert net.layer_dict["conv1"].type == "Convolution"
    assert net.params["conv1"][0].data.shape == (4, 3, 3, 3)
    assert net.params["ip1"][0].data.shape == (5, 4 * 3 * 3)


def test_backward_without_loss_or_force_backward_computes_nothing(small):
    # Caffe prunes layers that feed no loss: a deploy net needs force_backward for diffs
    net = caffe.Net(str(small), caffe.TEST)
    net.forward(data=np.ones((2, 3, 8, 8), np.float32))
    net.blobs["prob"].diff[...] = 1
    net.backward()
    assert not np.any(net.blobs["conv1"].diff) and not np.any(net.params["conv1"][0].diff)


def test_forward_backward_against_torch(small, tmp_path):
    caffe.set_random_seed(5)
    fb = tmp_path / "fb.prototxt"
    fb.write_text("force_backward: true\n" + SMALL)
    net = caffe.Net(str(fb), caffe.TEST)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = net.forward(data=x)
    w1, b1 = (torch.from_numpy(p.data.copy()) for p in net.params["conv1"])
    w2, b2 = (torch.from_numpy(p.data.copy()) for p in net.params["ip1"])
    xt = torch.from_numpy(x).requires_grad_()
    for t in (w1, b1, w2, b2):
        t.requires_grad_()
    c = torch.relu(torch.nn.functional.conv2d(xt, w1, b1))
    c.retain_grad()
    y = torch.softmax(torch.nn.functional.linear(torch.nn.functional.max_pool2d(c, 2, 2).flatten(1), w2, b2), 1)
    np.testing.assert_allclose(out["prob"], y.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    net.blobs["prob"].diff[...] = g
    net.backward()
    y.backward(torch.from_numpy(g))
    # the in-place blob holds the ReLU output and, after backward, the gradient at the conv output
    np.testing.assert_allclose(net.blobs["conv1"].data, c.detach().numpy(), rtol=1e-5, atol=1e-6)
    conv_out_grad = c.grad.numpy() * (c.detach().numpy() > 0)
    np.testing.assert_allclose(net.blobs["conv1"].diff, conv_out_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.params["conv1"][0].diff, w1.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.params["ip1"][1].diff, b2.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["data"].diff, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    # parameter diffs accumulate across backward calls, as in Caffe
    net.backward()
    np.testing.assert_allclose(net.params["ip1"][1].diff, 2 * b2.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_forward_start_end_and_reshape(small):
    net = caffe.Net(str(small), caffe.TEST)
    x = np.ones((2, 3, 8, 8), np.float32)
    out = net.forward(end="pool1", data=x)
    assert list(out) == ["pool1"] and out["pool1"].shape == (2, 4, 3, 3)
    full = net.forward()["prob"].copy()
    net.forward(start="ip1")
    np.testing.assert_allclose(net.blobs["prob"].data, full)
    net.blobs["data"].reshape(5, 3, 8, 8)
    net.reshape()
    assert net.blobs["prob"].data.shape == (5, 5)
    assert net.forward(data=np.zeros((5, 3, 8, 8), np.float32))["prob"].shape == (5, 5)


def test_net_is_a_torch_module(small):
    net = caffe.Net(str(small), caffe.TEST)
    assert isinstance(net, torch.nn.Module)
    assert len(list(net.parameters())) == 4
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = net(data=x)["prob"]
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    net64 = net.double()
    assert net64(data=x.double())["prob"].dtype == torch.float64


def test_param_sharing_and_multipliers(tmp_path):
    p = tmp_path / "shared.prototxt"
    p.write_text("""
layer { name: "a" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "ya"
        param { name: "w" lr_mult: 2 } param { name: "bias" decay_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "b" top: "yb"
        param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 4 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ya" bottom: "yb" top: "loss" }
""")
    net = caffe.Net(str(p), caffe.TRAIN)
    assert net.layer_dict["ip_a"].blobs[0] is net.layer_dict["ip_b"].blobs[0]
    assert len(net.learnable_params) == 2
    assert net.params_lr == [2.0, 1.0] and net.params_weight_decay == [1.0, 0.0]
    rng = np.random.default_rng(0)
    net.blobs["a"].data[...] = rng.standard_normal((2, 3))
    net.blobs["b"].data[...] = rng.standard_normal((2, 3))
    net.clear_param_diffs()
    loss = net.forward_backward()
    a, b = net.blobs["a"].data, net.blobs["b"].data
    w = net.params["ip_a"][0].data
    d = (a - b) @ w.T
    assert loss == pytest.approx(float((d**2).sum() / 4), rel=1e-5)
    # the shared weight's gradient sums both uses: d/dW of sum(((a-b)W^T)^2)/(2N)
    np.testing.assert_allclose(net.params["ip_a"][0].diff, (d.T @ (a - b)) / 2, rtol=1e-4, atol=1e-6)


def test_split_layers_named_as_caffe(tmp_path):
    p = tmp_path / "split.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "r1" type: "ReLU" bottom: "data" top: "r1" }
layer { name: "r2" type: "Sigmoid" bottom: "data" top: "r2" }
""")
    net = caffe.Net(str(p), caffe.TEST)
    assert net._layer_names == ["data", "data_data_0_split", "r1", "r2"]
    assert net.top_names["data_data_0_split"] == ["data_data_0_split_0", "data_data_0_split_1"]
    assert net.bottom_names["r2"] == ["data_data_0_split_1"]


def _write(tmp_path, text):
    p = tmp_path / "bad.prototxt"
    p.write_text(text)
    return str(p)


def test_error_unknown_bottom_names_layer_and_index(tmp_path):
    path = _write(
        tmp_path,
        """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "dat" top: "ip" inner_product_param { num_output: 2 } }
""",
    )
    with pytest.raises(NetError, match=r"bad\.prototxt: Unknown bottom blob 'dat' \(layer 'ip', bottom index 0\)"):
        caffe.Net(path, caffe.TEST)


def test_error_bad_parameter_names_layer_and_field(tmp_path):
    path = _write(
        tmp_path,
        """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param { kernel_size: 3 } }
""",
    )
    with pytest.raises(LayerError) as e:
        caffe.Net(path, caffe.TEST)
    assert "'conv'" in str(e.value) and "num_output" in str(e.value)


def test_error_top_produced_twice(tmp_path):
    path = _write(
        tmp_path,
        """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "a" type: "ReLU" bottom: "data" top: "x" }
layer { name: "b" type: "ReLU" bottom: "data" top: "x" }
""",
    )
    with pytest.raises(NetError, match="Top blob 'x' produced by multiple sources"):
        caffe.Net(path, caffe.TEST)


def test_weight_shape_mismatch_names_layer_blob_and_shapes(small, tmp_path):
    net = caffe.Net(str(small), caffe.TEST)
    w = tmp_path / "w.caffemodel"
    net.save(str(w))
    other = tmp_path / "other.prototxt"
    other.write_text(SMALL.replace("num_output: 5", "num_output: 7"))
    with pytest.raises(NetError) as e:
        caffe.Net(str(other), str(w), caffe.TEST)
    msg = str(e.value)
    assert "param 0" in msg and "'ip1'" in msg and "[5, 36]" in msg and "[7, 36]" in msg and "rename the layer" in msg


def test_phase_and_stage_filtering(tmp_path):
    p = tmp_path / "rules.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "train_only" type: "ReLU" bottom: "data" top: "t" include { phase: TRAIN } }
layer { name: "deploy" type: "ReLU" bottom: "data" top: "d" include { stage: "deploy" } }
layer { name: "not_deploy" type: "ReLU" bottom: "data" top: "n" exclude { stage: "deploy" } }
layer { name: "lvl" type: "ReLU" bottom: "data" top: "l" include { min_level: 2 } }
""")

    def names(**kw):
        return [n for n in caffe.Net(str(p), **kw)._layer_names if "split" not in n]

    assert names(phase=caffe.TRAIN) == ["data", "train_only", "not_deploy"]
    assert names(phase=caffe.TEST, stages=["deploy"]) == ["data", "deploy"]
    assert names(phase=caffe.TEST, level=3) == ["data", "not_deploy", "lvl"]


def test_outputs_as_caffe_lists_them(tmp_path):
    # a net ending in an in-place layer still outputs that blob; outputs come in sorted order
    p = tmp_path / "out.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "z" type: "InnerProduct" bottom: "data" top: "z" inner_product_param { num_output: 2 } }
layer { name: "zr" type: "ReLU" bottom: "z" top: "z" }
layer { name: "a" type: "Sigmoid" bottom: "data" top: "a" }
""")
    net = caffe.Net(str(p), caffe.TEST)
    assert net.outputs == ["a", "z"]


def test_forward_hooks_on_layers_still_fire(small):
    net = caffe.Net(str(small), caffe.TEST)
    seen = []
    handle = net.layer_dict["conv1"].register_forward_hook(lambda m, inp, out: seen.append(m.name))
    net.forward(data=np.zeros((2, 3, 8, 8), np.float32))
    handle.remove()
    net.forward()
    assert seen == ["conv1"]


def test_explicit_to_is_not_undone_by_the_global_mode(small):
    net = caffe.Net(str(small), caffe.TEST)
    net.to(torch.float64)  # a torch user's choice; the global mode (CPU) has not changed
    out = net(data=torch.zeros(2, 3, 8, 8, dtype=torch.float64))["prob"]
    assert out.dtype == torch.float64
    net.forward()
    assert net.modules_by_name["conv1"].blobs[0].dtype == torch.float64
    # a net moved to another device (here "meta", standing in for a GPU) stays there
    net.to("meta")
    out = net(data=torch.empty(2, 3, 8, 8, dtype=torch.float64, device="meta"))["prob"]
    assert out.device.type == "meta" and net.modules_by_name["conv1"].blobs[0].device.type == "meta"


def test_run_leaves_the_callers_tensor_alone(small):
    net = caffe.Net(str(small), caffe.TEST)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    net(data=x)
    net.blobs["data"].data[...] = 0  # pycaffe-style write after a torch-style call
    net.forward()
    assert x.requires_grad and float(x.detach().abs().sum()) > 0
