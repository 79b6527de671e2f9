"""Channels-last convolutions in CPU training passes (``runners/eager.py``): in a float32
training pass on the CPU the convolutions' 4-D bottoms are handed over in channels-last layout
(``Layer.wants_channels_last``), the layers that take that layout keep it
(``accepts_channels_last``, ``layout_neutral``) and every other layer gets a contiguous copy. A
solver must compute what the contiguous pass computes, to float32 rounding, and pycaffe must
read C-contiguous arrays with the same values.
"""

from __future__ import annotations

import numpy as np
import torch

from caffe_compat.layers.neuron import AbsValLayer
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SGDSolver
from tests.layer_replay import assert_close_scaled as _close

CL = torch.channels_last

# conv -> BatchNorm + Scale -> ReLU -> LRN -> AbsVal (takes no channels-last bottom) -> pooling ->
# conv -> a residual sum -> Flatten -> InnerProduct -> loss
NET = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 } }
layer { name: "abs1" type: "AbsVal" bottom: "norm1" top: "abs1" }
layer { name: "pool1" type: "Pooling" bottom: "abs1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "pool1" top: "sum" }
layer { name: "flat" type: "Flatten" bottom: "sum" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _solver(tmp_path, channels_last: bool) -> SGDSolver:
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    sp = caffe_pb2.SolverParameter(
        net=str(path), base_lr=0.05, lr_policy="fixed", momentum=0.9, weight_decay=1e-3,
        max_iter=100, display=0, random_seed=5,
    )  # fmt: skip
    solver = SGDSolver(sp, source="<test>")
    solver.net.use_channels_last_training(channels_last)
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    solver.net.blobs["label"].data[...] = [0, 3, 1, 4]
    return solver


def test_training_matches_the_contiguous_pass_and_pycaffe_reads_c_arrays(tmp_path, monkeypatch):
    layouts = []
    abs_forward = AbsValLayer.forward

    def absval(self, x):
        layouts.append(x.is_contiguous())
        return abs_forward(self, x)

    monkeypatch.setattr(AbsValLayer, "forward", absval)
    cl, plain = _solver(tmp_path, True), _solver(tmp_path, False)
    for it in range(3):
        cl.step(1)
        conv = cl.net.blobs["conv2"]._data
        assert conv.is_contiguous(memory_format=CL) and not conv.is_contiguous(), "no channels-last pass"
        plain.step(1)
        assert plain.net.blobs["conv2"]._data.is_contiguous()
        assert cl.net.blobs["norm1"]._data.is_contiguous(memory_format=CL)  # LRN kept the layout
        for name in ("conv1", "norm1", "abs1", "pool1", "conv2", "sum", "fc", "loss"):
            a = cl.net.blobs[name].data
            assert a.flags.c_contiguous, name
            _close(a, plain.net.blobs[name].data, f"blob {name}, iteration {it}")
        for name in cl.net.params:
            for i, (a, b) in enumerate(zip(cl.net.params[name], plain.net.params[name])):
                assert a.data.flags.c_contiguous and a.diff.flags.c_contiguous
                _close(a.data, b.data, f"{name}[{i}] data, iteration {it}")
                _close(a.diff, b.diff, f"{name}[{i}] diff, iteration {it}")
    assert layouts and all(layouts)  # AbsVal always got a contiguous bottom


def test_a_pass_after_training_reads_channels_last_blobs(tmp_path):
    """pycaffe's ``forward(start=...)`` after a solver step starts from blobs the step left in
    channels-last layout; the layers that need contiguous bottoms get them."""
    solver = _solver(tmp_path, True)
    solver.step(1)
    net = solver.net
    with torch.no_grad():
        net.forward(start="norm1")
        after = {b: net.blobs[b].data.copy() for b in ("norm1", "sum", "fc")}
        net.use_channels_last_training(False)
        net.blobs["conv1"].data[...] = net.blobs["conv1"].data  # (contiguous now)
        net.forward(start="norm1")
    for b, v in after.items():
        _close(v, net.blobs[b].data, b)
