"""``copy.deepcopy(net)`` and pickling a Net (``torch.save(net)``): a second net built from the
same definition with the original's parameters, blobs and options, sharing nothing with it."""

from __future__ import annotations

import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.export import onnx as ox
from tests.test_cuda_graph import NET, ReplayingGraph

HERE = os.path.dirname(os.path.abspath(__file__))
SQUEEZENET = os.path.join(HERE, "fixtures", "caffe_reference", "realworld", "squeezenet11", "deploy.prototxt")

SHARED = """
name: "shared"
layer { name: "a" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "ya"
        param { name: "w" } inner_product_param { num_output: 4 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "b" top: "yb"
        param { name: "w" } inner_product_param { num_output: 4 bias_term: false } }
"""


def _deploy() -> caffe.Net:
    net = caffe.Net(SQUEEZENET, caffe.TEST)
    ox.randomize_params(net, seed=3)
    net.blobs["data"].reshape(1, 3, 67, 67)  # a shape of the user's, not the prototxt's
    net.reshape()
    return net


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_computes_what_the_original_does_and_shares_nothing(how):
    net = _deploy()
    x = np.random.default_rng(0).standard_normal((1, 3, 67, 67)).astype(np.float32)
    out = net.forward(data=x)["prob"].copy()
    if how == "deepcopy":
        other = copy.deepcopy(net)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(net))
    else:
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    assert other is not net and other.source == net.source
    assert other.blobs["data"].shape == (1, 3, 67, 67)
    np.testing.assert_array_equal(other.blobs["prob"].data, out)  # the blobs' data came along
    np.testing.assert_array_equal(other.forward(data=x)["prob"], out)
    for (name, ps), (_, qs) in zip(net.params.items(), other.params.items()):
        for p, q in zip(ps, qs):
            np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    other.params["conv1"][0].data[...] = 0  # nothing shared: the original keeps its weights
    assert not np.array_equal(other.forward(data=x)["prob"], out)
    np.testing.assert_array_equal(net.forward(data=x)["prob"], out)


def test_a_copy_keeps_parameters_shared_within_the_net(tmp_path):
    p = tmp_path / "shared.prototxt"
    p.write_text(SHARED)
    net = caffe.Net(str(p), caffe.TEST)
    other = copy.deepcopy(net)
    wa, wb = (other.layer_dict[n].module.blobs[0] for n in ("ip_a", "ip_b"))
    assert wa is wb
    torch.testing.assert_close(wa.detach(), net.layer_dict["ip_a"].module.blobs[0].detach(), rtol=0, atol=0)


def test_a_copy_keeps_the_runner_options_and_callbacks(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    net = caffe.Net(str(p), caffe.TRAIN).use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
    net.use_inference_program(False).use_channels_last_training(False)
    seen = []
    net.after_forward(seen.append)
    other = copy.deepcopy(net)
    assert other._graphed is not None and other._graphed.warmup == 1
    assert other._graphed.graph_factory is ReplayingGraph
    assert not other._eager.program_enabled and not other._eager.trains_channels_last
    other.forward()
    assert seen == list(range(len(other.layers)))


def test_a_solver_net_can_be_averaged_with_torch_swa_utils(tmp_path):
    """``torch.optim.swa_utils.AveragedModel`` deep-copies the module it averages."""
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    net = caffe.Net(str(p), caffe.TRAIN)
    avg = torch.optim.swa_utils.AveragedModel(net)
    before = [q.detach().clone() for q in avg.module.learnable_params]
    with torch.no_grad():
        for q in net.learnable_params:
            q.add_(1.0)
    avg.update_parameters(net)  # the first update copies, the second averages
    avg.update_parameters(net)
    for b, q, r in zip(before, avg.module.learnable_params, net.learnable_params):
        torch.testing.assert_close(q.detach(), r.detach())
        assert not torch.equal(b, q.detach())


def test_a_copy_of_a_compiled_net_is_compiled_alike(small_net):
    net = small_net.compile(True, backend="aot_eager")
    assert copy.deepcopy(net)._compile_options == {"backend": "aot_eager"}
    assert copy.deepcopy(net.compile(False))._compile_options is None


@pytest.fixture
def small_net(tmp_path):
    p = tmp_path / "shared.prototxt"
    p.write_text(SHARED)
    return caffe.Net(str(p), caffe.TEST)
