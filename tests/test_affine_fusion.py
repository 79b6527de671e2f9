"""BatchNorm + in-place Scale as one op (``Layer.forward_with_affine``, ``runners/eager.py``):
in passes that need no blob diffs the eager runner has a BatchNorm apply the learned per-channel
scale and shift of the Scale working in place on its top, one ``batch_norm`` instead of three
passes over the data. What a solver computes, and what pycaffe reads and differentiates after
such a pass, must be what the layer-by-layer pass gives, to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.layers.common import ScaleLayer
from caffe_compat.proto import caffe_pb2
from caffe_compat.runners.eager import affine_partners
from caffe_compat.solvers import SGDSolver
from tests.layer_replay import assert_close_scaled as _close

# conv -> BatchNorm (in place) -> Scale with bias (in place) -> ReLU (in place), then a BatchNorm
# with its own top and a Scale without bias in place on it, a residual sum, a classifier
NET = """
name: "bn_scale"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "bn2" type: "BatchNorm" bottom: "conv1" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2"
        scale_param { filler { type: "uniform" min: -1.5 max: 1.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "bn2" bottom: "conv1" top: "sum" }
layer { name: "fc" type: "InnerProduct" bottom: "sum" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _solver(tmp_path, fused: bool, text: str = NET) -> SGDSolver:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    sp = caffe_pb2.SolverParameter(
        net=str(path), base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=1e-3,
        max_iter=100, display=0, random_seed=3,
    )  # fmt: skip
    solver = SGDSolver(sp, source="<test>")
    solver.net._eager.fuses_affine = fused
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    solver.net.blobs["label"].data[...] = [0, 3, 1, 4]
    return solver


def _share_weights(nets) -> None:
    """The first net's parameters (and BatchNorm statistics) into the others."""
    for net in nets[1:]:
        for name in net.params:
            for i, p in enumerate(net.params[name]):
                p.data[...] = nets[0].params[name][i].data


def test_the_partners_are_each_batchnorm_and_the_scale_in_place_after_it(tmp_path):
    net = _solver(tmp_path, True).net
    names = {s.index: s.name for s in net.plan.steps}
    pairs = {names[a]: names[b] for a, b in affine_partners(net.plan).items()}
    assert pairs == {"bn1": "scale1", "bn2": "scale2"}


# fine-tuning with frozen statistics: BatchNorm on its accumulators in TRAIN, Scale still learned
FROZEN = NET.replace(
    'name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }',
    'name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }',
)


@pytest.mark.parametrize("text", [NET, FROZEN], ids=["batch_statistics", "frozen_statistics"])
def test_solver_steps_match_the_layer_by_layer_pass(tmp_path, monkeypatch, text):
    calls = []
    forward = ScaleLayer.forward
    monkeypatch.setattr(ScaleLayer, "forward", lambda self, *a: calls.append(self.name) or forward(self, *a))
    fused, plain = _solver(tmp_path, True, text), _solver(tmp_path, False, text)
    if text is FROZEN:  # accumulators that normalise to something else than the batch's
        assert "use_global_stats: true" in text
        for solver in (fused, plain):
            bn = solver.net.params["bn1"]
            bn[0].data[...] = np.linspace(-0.5, 0.5, 6)
            bn[1].data[...] = np.linspace(0.5, 2.0, 6)
            bn[2].data[...] = 1.0
    for it in range(4):
        calls.clear()
        fused.step(1)
        assert calls == [], "a fused pass ran the Scale layers"
        plain.step(1)
        assert calls == ["scale1", "scale2"]
        _close(fused.net.blobs["loss"].data, plain.net.blobs["loss"].data, f"loss, iteration {it}")
        for name in fused.net.params:
            for i, (a, b) in enumerate(zip(fused.net.params[name], plain.net.params[name])):
                _close(a.data, b.data, f"{name}[{i}] data, iteration {it}")  # BatchNorm's statistics too
                _close(a.diff, b.diff, f"{name}[{i}] diff, iteration {it}")
        for name in ("conv1", "bn2", "sum", "fc"):
            _close(fused.net.blobs[name].data, plain.net.blobs[name].data, f"blob {name}, iteration {it}")


def test_a_layerwise_backward_after_a_fused_pass_reads_what_each_layer_read(tmp_path):
    """pycaffe's ``net.backward()`` after a solver pass: each layer differentiated from the blobs
    and what the in-place layers kept; the fused Scale's input, the BatchNorm output the pass
    never made, is recomputed."""
    fused, plain = _solver(tmp_path, True), _solver(tmp_path, False)
    diffs = []
    for solver in (fused, plain):
        solver.step(1)
        net = solver.net
        net.blobs["loss"].diff[...] = 1.0
        net.backward()
        diffs.append({b: net.blobs[b].diff.copy() for b in ("conv1", "bn2", "sum", "fc")})
        diffs[-1].update({f"{n}[{i}]": p.diff.copy() for n in net.params for i, p in enumerate(net.params[n])})
    assert np.abs(diffs[1]["conv1"]).max() > 0 and np.abs(diffs[1]["conv1[0]"]).max() > 0
    for key in diffs[1]:
        _close(diffs[0][key], diffs[1][key], key)


def test_no_fusion_where_the_scale_is_observed_or_outside_the_pass(tmp_path):
    """A hooked Scale runs as a module; a forward that ends at the BatchNorm leaves its own
    output; a pass with blob diffs (pycaffe's forward under autograd) runs layer by layer."""
    net = _solver(tmp_path, True).net
    seen = []
    handle = net.layer_dict["scale1"].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        net.forward()
    handle.remove()
    assert seen == [1]
    net.forward(end="bn1")
    conv = net.blobs["conv1"].data
    axes = (0, 2, 3)
    _close(conv.mean(axis=axes), np.zeros(6), "normalized mean")  # no scale, no shift applied
    assert np.abs(conv.std(axis=axes) - 1).max() < 1e-3


@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_no_grad_forward_matches(tmp_path, phase):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    nets = [caffe.Net(str(path), phase) for _ in range(2)]
    nets[1]._eager.fuses_affine = False
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    _share_weights(nets)
    for net in nets:
        with torch.no_grad():
            net.forward(data=x, label=np.array([0, 1, 2, 3], np.float32))
    for name in ("conv1", "bn2", "sum", "fc", "loss"):
        _close(nets[0].blobs[name].data, nets[1].blobs[name].data, name)
    for name in ("bn1", "bn2"):  # the statistics the TRAIN forward accumulated
        for i in range(3):
            _close(nets[0].params[name][i].data, nets[1].params[name][i].data, f"{name}[{i}]")


@pytest.mark.parametrize("batch", [1, 3])
def test_after_an_inner_product_one_value_per_channel_included(tmp_path, batch):
    """A 2-D bottom (InnerProduct's top): with one row, batch statistics of one value per channel
    (the layer's own path, the affine applied after it); with three, ``batch_norm``'s."""
    text = f"""
    layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 5 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 1 }} }} }}
    layer {{ name: "bn" type: "BatchNorm" bottom: "ip" top: "ip" }}
    layer {{ name: "scale" type: "Scale" bottom: "ip" top: "ip"
            scale_param {{ bias_term: true filler {{ type: "uniform" min: 0.5 max: 2 }}
                          bias_filler {{ type: "uniform" min: -1 max: 1 }} }} }}
    """
    path = tmp_path / "ip.prototxt"
    path.write_text(text)
    nets = [caffe.Net(str(path), caffe.TRAIN) for _ in range(2)]
    nets[1]._eager.fuses_affine = False
    x = np.random.default_rng(2).standard_normal((batch, 5)).astype(np.float32)
    _share_weights(nets)
    for net in nets:
        with torch.no_grad():
            net.forward(data=x)
    assert np.abs(nets[1].blobs["ip"].data).max() > 0
    _close(nets[0].blobs["ip"].data, nets[1].blobs["ip"].data, "ip")
    for i in range(3):  # the statistics
        _close(nets[0].params["bn"][i].data, nets[1].params["bn"][i].data, f"bn[{i}]")
