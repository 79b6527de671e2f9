"""Caffe's debug_info: per-layer mean |data| after each forward, mean |diff| after each backward and
the norms of all parameters (Net::ForwardDebugInfo, BackwardDebugInfo, Backward), against an
independent computation of the same net in torch; the solver turns it on at display iterations
only, overriding the net's own flag, as Caffe's Step does."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import caffe_compat as caffe
from caffe_compat.proto import caffe_pb2

SOLVERS = Path(__file__).parent / "fixtures" / "caffe_reference" / "solvers"

NET = """
name: "dbg"
debug_info: true
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } shape { dim: 2 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { name: "cw" } param { lr_mult: 0 }
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "constant" value: -0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

LINE = re.compile(r"^    \[(Forward|Backward)\] (.*)$")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


@pytest.fixture
def lines():
    handler = _Lines()
    logger = logging.getLogger("caffe_compat")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _net(tmp_path) -> caffe.Net:
    p = tmp_path / "dbg.prototxt"
    p.write_text(NET)
    caffe.set_random_seed(3)
    net = caffe.Net(str(p), caffe.TRAIN)
    g = torch.Generator().manual_seed(5)
    net.blobs["data"].data[...] = torch.randn(2, 3, 5, 5, generator=g).numpy()
    net.blobs["label"].data[...] = torch.randn(2, 4, generator=g).numpy()
    return net


def _values(records, kind: str) -> list[tuple[str, float]]:
    out = []
    for _, msg in records:
        m = LINE.match(msg)
        if m and m.group(1) == kind and not m.group(2).startswith("All net params"):
            text, value = m.group(2).rsplit(": ", 1)
            out.append((text, float(value)))
    return out


def test_debug_info_logs_caffes_lines_with_the_right_values(tmp_path, lines):
    net = _net(tmp_path)
    x = torch.from_numpy(np.array(net.blobs["data"].data))
    y = torch.from_numpy(np.array(net.blobs["label"].data))
    cw, cb = (torch.from_numpy(np.array(b.data)) for b in net.params["conv1"])
    iw, ib = (torch.from_numpy(np.array(b.data)) for b in net.params["ip1"])
    net.forward_backward()

    # the same net, written out in torch, every intermediate kept for its gradient
    cw.requires_grad_(True)
    cb.requires_grad_(True)
    iw.requires_grad_(True)
    ib.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    conv = F.conv2d(xg, cw, cb)
    conv.retain_grad()
    relu = torch.relu(conv)
    relu.retain_grad()
    ip = F.linear(relu.flatten(1), iw, ib)
    ip.retain_grad()
    loss = ((ip - y) ** 2).sum() / 2 / 2
    loss.backward()

    def m(t) -> float:
        return float(t.detach().abs().mean())

    forward = [
        ("Layer data, top blob data data", m(x)),
        ("Layer data, top blob label data", m(y)),
        ("Layer conv1, top blob conv1 data", m(conv)),
        ("Layer conv1, param blob cw data", m(cw)),  # a named param shows its name
        ("Layer conv1, param blob 1 data", m(cb)),
        ("Layer relu1, top blob conv1 data", m(relu)),  # in place: the value after this layer
        ("Layer ip1, top blob ip1 data", m(ip)),
        ("Layer ip1, param blob 0 data", m(iw)),
        ("Layer ip1, param blob 1 data", m(ib)),
        ("Layer loss, top blob loss data", float(loss.detach())),
    ]
    backward = [
        ("Layer loss, bottom blob ip1 diff", m(ip.grad)),
        # force_backward and EuclideanLoss allows it: the label gets -(ip1 - label) / N
        ("Layer loss, bottom blob label diff", m(ip.grad)),
        ("Layer ip1, bottom blob conv1 diff", m(relu.grad)),
        ("Layer ip1, param blob 0 diff", m(iw.grad)),
        ("Layer ip1, param blob 1 diff", m(ib.grad)),
        ("Layer relu1, bottom blob conv1 diff", m(conv.grad)),  # the same blob, one step down
        ("Layer conv1, bottom blob data diff", m(xg.grad)),  # force_backward
        ("Layer conv1, param blob 0 diff", m(cw.grad)),
        # lr_mult 0, but force_backward makes Caffe propagate to every parameter
        ("Layer conv1, param blob 1 diff", m(cb.grad)),
    ]
    for got, want in ((_values(lines.records, "Forward"), forward), (_values(lines.records, "Backward"), backward)):
        assert [t for t, _ in got] == [t for t, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=2e-5, atol=1e-9)

    # Backward()'s summary, at ERROR level as Caffe's LOG(ERROR), last
    level, msg = lines.records[-1]
    assert level == logging.ERROR
    nums = [float(v) for v in re.findall(r"[-+0-9.e]+(?=[,)])", msg)]
    assert msg.startswith("    [Backward] All net params (data, diff): L1 norm = (")
    params = [cw, cb, iw, ib]
    grads = [cw.grad, cb.grad, iw.grad, ib.grad]
    want = [
        sum(float(p.detach().abs().sum()) for p in params),
        sum(float(g.abs().sum()) for g in grads),
        float(np.sqrt(sum(float((p.detach() ** 2).sum()) for p in params))),
        float(np.sqrt(sum(float((g**2).sum()) for g in grads))),
    ]
    np.testing.assert_allclose(nums, want, rtol=2e-5)


def test_no_lines_without_debug_info(tmp_path, lines):
    net = _net(tmp_path)
    net.set_debug_info(False)
    net.forward_backward()
    net.forward()
    assert not any(LINE.match(msg) for _, msg in lines.records)
    net.set_debug_info(True)
    net.forward()  # pycaffe's forward logs too
    assert len(_values(lines.records, "Forward")) == 10


def test_solver_logs_at_display_iterations_only(tmp_path, monkeypatch, lines):
    d = tmp_path / "case"
    shutil.copytree(SOLVERS / "sgd_fixed", d)
    text = re.sub(r"^display:.*$", "", (d / "solver.prototxt").read_text(), flags=re.M)
    (d / "solver.prototxt").write_text(text + "\ndisplay: 2\ndebug_info: true\n")
    net_text = (d / "train.prototxt").read_text()
    (d / "train.prototxt").write_text("debug_info: false\n" + net_text)
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    per_iter = []
    for _ in range(4):
        before = len(lines.records)
        solver.step(1)
        per_iter.append(sum(1 for _, msg in lines.records[before:] if LINE.match(msg)))
    assert per_iter[1] == per_iter[3] == 0 and per_iter[0] == per_iter[2] > 0
    # the solver's flag wins over the net's: off in the solver, the net's own true is overridden
    sp = caffe_pb2.SolverParameter()
    sp.CopyFrom(solver.param)
    sp.debug_info = False
    (d / "train.prototxt").write_text("debug_info: true\n" + net_text)
    quiet = caffe.get_solver(sp)
    before = len(lines.records)
    quiet.step(2)
    assert not any(LINE.match(msg) for _, msg in lines.records[before:])
