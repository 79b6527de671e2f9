"""The update engine (issue 21, solver side): every solver type's update runs through it, and its
speed paths for the momentum-SGD rule compute what the rule written as a plain ``update_rule``
computes, bit for bit (BVLC/caffe sgd_solver.cpp: ``V = momentum * V + local_rate * g;
W -= V`` after clipping, normalization and regularization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat import mode
from caffe_compat.net import Net
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SGDSolver, Solver

NET = """name: "e"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 5 dim: 8 } shape { dim: 5 dim: 37 }
    data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 37 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""


class PlainSGD(Solver):
    """Caffe's SGD rule as a plain hook, with none of the engine's SGD paths."""

    type_name = "PlainSGD"

    def update_rule(self, i, g, hist, local_rate):
        hist[0].mul_(float(self.param.momentum)).add_(g, alpha=local_rate)
        g.copy_(hist[0])


def _run(cls, extra: str, **switches) -> list[torch.Tensor]:
    mode.set_random_seed(3)
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), phase=caffe_pb2.TRAIN)
    sp = text_format.Merge(  # Merge: ``extra`` may override the policy
        f'base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01 {extra}', caffe_pb2.SolverParameter()
    )
    solver = cls(sp, source="<test>", net=net)
    for name, value in switches.items():
        setattr(solver, name, value)
    solver.step(3)
    return [p.detach().clone() for p in solver.net.learnable_params] + [h.clone() for h in solver.history]


@pytest.mark.parametrize("extra", ["", 'iter_size: 2 clip_gradients: 0.5 lr_policy: "step" stepsize: 1 gamma: 0.5'])
@pytest.mark.parametrize(
    "switches",
    [
        {},  # CPU default: torch's fused kernel on the vector part, the operations on the tails
        {"fused_kernel": False},  # chunked operations
        {"fused_update": False},  # whole tensors
        {"fused_update": False, "foreach_update": True},  # multi-tensor operations (the GPU's path)
    ],
    ids=["kernel", "chunked", "whole", "foreach"],
)
def test_sgd_paths_equal_the_plain_rule(extra, switches):
    reference = _run(PlainSGD, extra, fused_update=False)
    ours = _run(SGDSolver, extra, update_chunk=37, **switches)
    assert len(ours) == len(reference) == 4
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    assert any(float(h.abs().sum()) > 0 for h in reference[2:])


def test_sgd_rule_against_numpy():
    """Three iterations of SGD on a fixed gradient: the closed form of Caffe's update."""
    mode.set_random_seed(3)
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), phase=caffe_pb2.TRAIN)
    sp = text_format.Parse('base_lr: 0.05 lr_policy: "fixed" momentum: 0.9', caffe_pb2.SolverParameter())
    solver = SGDSolver(sp, source="<test>", net=net)
    w0 = [p.detach().numpy().astype(np.float64).copy() for p in solver.net.learnable_params]
    g = [np.random.default_rng(k).standard_normal(p.shape) for k, p in enumerate(w0)]
    for _ in range(3):
        solver.net.clear_param_diffs()
        for p, gk in zip(solver.net.learnable_params, g):
            p.grad = torch.from_numpy(gk.astype(np.float32))
        solver.apply_update()
        solver.iter += 1
    lr_mult = [1.0, 2.0]
    for k, p in enumerate(solver.net.learnable_params):
        gk = g[k].astype(np.float32).astype(np.float64)
        rate = 0.05 * lr_mult[k]
        v1 = rate * gk
        v2 = 0.9 * v1 + rate * gk
        v3 = 0.9 * v2 + rate * gk
        np.testing.assert_allclose(p.detach().numpy(), w0[k] - v1 - v2 - v3, rtol=1e-5, atol=1e-6)
