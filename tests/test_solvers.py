"""Caffe's solvers: closed-form updates against NumPy, trajectories against real Caffe, snapshots.

References: BVLC/caffe src/caffe/test/test_gradient_based_solver.cpp (closed-form checks) and
tests/fixtures/caffe_reference/solvers/ (20 iterations of real Caffe per case; README tolerances:
loss rtol 1e-5, parameters rtol 1e-4 atol 1e-6).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.errors import SolverError
from caffe_compat.io import read_solver_text
from caffe_compat.solvers import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
    lr_policy,
)
from caffe_compat.solvers.state import read_state

CAFFE_REF = Path(__file__).parent / "fixtures" / "caffe_reference"
SOLVER_CASES = sorted(p.name for p in (CAFFE_REF / "solvers").iterdir() if p.is_dir())
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6
# On a machine with CUDA, CAFFE_COMPAT_TEST_GPU=1 replays every trajectory in GPU mode too.
DEVICES = ["cpu", "gpu"] if os.environ.get("CAFFE_COMPAT_TEST_GPU") else ["cpu"]
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# closed form on plain tensors


class QuadraticNet:
    """A stand-in for Net: loss = sum_i c_i/2 * ||W_i - T_k||^2 with a target T_k that cycles
    over three batches, so gradients change from pass to pass like a real data source."""

    name = "quadratic"
    outputs = ["loss"]
    blob_loss_weights = {"loss": 1.0}

    def __init__(self, lrs, decays, seed=0):
        rng = np.random.default_rng(seed)
        shapes = [(3, 4), (4,), (2, 2, 3)]
        self.W0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
        self.targets = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
        self.coefs = [1.0, 0.5, 2.0]
        self.learnable_params = [nn.Parameter(torch.from_numpy(w.copy())) for w in self.W0]
        self.params_lr = list(lrs)
        self.params_weight_decay = list(decays)
        self.calls = 0
        self.layers = []
        self.blobs = {}

    def clear_param_diffs(self):
        for p in self.learnable_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p.data)
            else:
                p.grad.zero_()

    def forward_backward(self):
        t = self.targets[self.calls % 3]
        self.calls += 1
        loss = 0.0
        with torch.no_grad():
            for p, target, c in zip(self.learnable_params, t, self.coefs):
                d = p.data - torch.from_numpy(target)
                loss += 0.5 * c * float((d * d).sum())
                p.grad.add_(c * d)
        return loss


def numpy_caffe(kind, param, net, iters):
    """Caffe's update pipeline written independently in float64 NumPy."""
    W = [w.astype(np.float64) for w in net.W0]
    H = [np.zeros_like(w) for w in W]
    H2 = [np.zeros_like(w) for w in W]
    cs, calls = 0, 0
    m, delta = param.momentum, param.delta
    for it in range(iters):
        G = [np.zeros_like(w) for w in W]
        for _ in range(param.iter_size):
            t = net.targets[calls % 3]
            calls += 1
            for i in range(len(W)):
                G[i] += net.coefs[i] * (W[i] - t[i])
        rate, cs = lr_policy.get_learning_rate(param, it, cs)
        if param.clip_gradients >= 0:
            norm = np.sqrt(sum(float((g * g).sum()) for g in G))
            if norm > param.clip_gradients:
                G = [g * (param.clip_gradients / norm) for g in G]
        for i in range(len(W)):
            g = G[i] / param.iter_size
            decay = param.weight_decay * net.params_weight_decay[i]
            g = g + decay * (W[i] if param.regularization_type == "L2" else np.sign(W[i]))
            lr = rate * net.params_lr[i]
            if kind == "SGD":
                H[i] = m * H[i] + lr * g
                upd = H[i]
            elif kind == "Nesterov":
                old = H[i]
                H[i] = m * H[i] + lr * g
                upd = (1 + m) * H[i] - m * old
            elif kind == "AdaGrad":
                H[i] = H[i] + g * g
                upd = lr * g / (np.sqrt(H[i]) + delta)
            elif kind == "RMSProp":
                rho = param.rms_decay
                H[i] = rho * H[i] + (1 - rho) * g * g
                upd = lr * g / (np.sqrt(H[i]) + delta)
            elif kind == "AdaDelta":
                H[i] = m * H[i] + (1 - m) * g * g
                u = g * np.sqrt((H2[i] + delta) / (H[i] + delta))
                H2[i] = m * H2[i] + (1 - m) * u * u
                upd = lr * u
            elif kind == "Adam":
                t_ = it + 1
                b1, b2 = param.momentum, param.momentum2
                H[i] = b1 * H[i] + (1 - b1) * g
                H2[i] = b2 * H2[i] + (1 - b2) * g * g
                upd = lr * np.sqrt(1 - b2**t_) / (1 - b1**t_) * H[i] / (np.sqrt(H2[i]) + delta)
            W[i] = W[i] - upd
    history = H + (H2 if kind in ("AdaDelta", "Adam") else [])
    return W, history, cs


CLOSED_FORM = {
    "SGD": (SGDSolver, 'momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 3'),
    "SGD_L1_clip": (
        SGDSolver,
        'momentum: 0.8 weight_decay: 0.05 regularization_type: "L1" clip_gradients: 1.5 lr_policy: "fixed"',
    ),
    "SGD_iter_size": (
        SGDSolver,
        'momentum: 0.9 weight_decay: 0.01 iter_size: 3 lr_policy: "multistep" gamma: 0.3 stepvalue: 2 stepvalue: 5',
    ),
    "Nesterov": (NesterovSolver, 'momentum: 0.9 weight_decay: 0.01 lr_policy: "inv" gamma: 0.1 power: 0.75'),
    "AdaGrad": (AdaGradSolver, 'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed"'),
    "RMSProp": (RMSPropSolver, 'rms_decay: 0.9 delta: 1e-6 weight_decay: 0.01 lr_policy: "exp" gamma: 0.9'),
    "AdaDelta": (AdaDeltaSolver, 'momentum: 0.95 delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed"'),
    "Adam": (AdamSolver, 'momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01 lr_policy: "poly" power: 1'),
}


@pytest.mark.parametrize("case", sorted(CLOSED_FORM))
def test_update_closed_form(case):
    cls, text = CLOSED_FORM[case]
    kind = cls.type_name
    base_lr = {"AdaDelta": 1.0, "Adam": 0.05}.get(kind, 0.1)
    param = read_solver_text(f"base_lr: {base_lr} max_iter: 30 {text}")
    net = QuadraticNet(lrs=[1.0, 2.0, 0.5], decays=[1.0, 0.0, 2.0], seed=3)
    solver = cls(param, net=net)
    solver.step(12)
    W, history, cs = numpy_caffe(kind, param, QuadraticNet([1.0, 2.0, 0.5], [1.0, 0.0, 2.0], seed=3), 12)
    assert solver.iter == 12
    assert solver.current_step == cs
    for p, w in zip(net.learnable_params, W):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    assert len(solver.history) == len(history)  # Caffe's layout: AdaDelta/Adam append a second set
    for h, ref in zip(solver.state().history, history):
        np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-7)


def test_sgd_keeps_the_learning_rate_in_the_momentum():
    """Caffe's V = m V + lr g differs from torch's buf = m buf + g at an lr change."""
    param = read_solver_text('base_lr: 1 momentum: 0.5 lr_policy: "step" gamma: 0.1 stepsize: 1')
    net = QuadraticNet([1, 1, 1], [0, 0, 0])
    net.coefs = [0.0, 0.0, 0.0]
    g = [torch.ones_like(p) for p in net.learnable_params]

    def fb():
        for p, gi in zip(net.learnable_params, g):
            p.grad.add_(gi)
        return 0.0

    net.forward_backward = fb
    solver = SGDSolver(param, net=net)
    w0 = net.learnable_params[0].detach().clone()
    solver.step(2)
    # V1 = 1*1 = 1; V2 = 0.5*1 + 0.1*1 = 0.6 -> W = W0 - 1.6 (torch's SGD would give 1.15)
    np.testing.assert_allclose(net.learnable_params[0].detach().numpy(), (w0 - 1.6).numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# real Caffe's trajectories


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    def make(case: str, group: str = "solvers") -> Path:
        d = tmp_path / case
        shutil.copytree(CAFFE_REF / group / case, d)
        monkeypatch.chdir(d)
        return d

    return make


def assert_caffemodels_close(ours: str, ref: str):
    a, b = cio.read_caffemodel(ours), cio.read_caffemodel(ref)
    assert [(layer.name, layer.type) for layer in a.layer] == [(layer.name, layer.type) for layer in b.layer]
    for la, lb in zip(a.layer, b.layer):
        assert len(la.blobs) == len(lb.blobs), la.name
        for x, y in zip(la.blobs, lb.blobs):
            x, y = cio.blob_to_array(x), cio.blob_to_array(y)
            assert x.shape == y.shape, la.name
            np.testing.assert_allclose(x, y, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=la.name)


def assert_states_close(ours: str, ref: str):
    a, b = read_state(ours), read_state(ref)
    assert (a.iter, a.learned_net, a.current_step) == (b.iter, b.learned_net, b.current_step)
    assert len(a.history) == len(b.history)
    for i, (x, y) in enumerate(zip(a.history, b.history)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=f"history {i}")


@pytest.fixture(params=DEVICES)
def solver_mode(request):
    """The mode solvers are built in: CPU, and GPU where CAFFE_COMPAT_TEST_GPU is set."""
    if request.param == "gpu":
        caffe.set_mode_gpu()
    yield request.param
    caffe.set_mode_cpu()


@pytest.mark.parametrize("case", SOLVER_CASES)
def test_trajectory_matches_caffe(case, case_dir, solver_mode):
    case_dir(case)
    ref = np.load("trajectory.npz")
    caffe.set_random_seed(7)
    solver = get_solver("solver.prototxt")
    if solver_mode == "gpu":
        assert solver.net.learnable_params[0].device.type == "cuda"
    solver.net.copy_from("init.caffemodel")
    for it in range(1, 21):
        solver.step(1)
        loss = float(np.asarray(solver.net.blobs["loss"].data))
        np.testing.assert_allclose(loss, ref["loss"][it - 1], rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f"loss@{it}")
        if it in (1, 5, 10, 20):
            for lname, ps in solver.net.params.items():
                for i, p in enumerate(ps):
                    np.testing.assert_allclose(
                        p.data,
                        ref[f"iter{it}__{lname}__{i}"],
                        rtol=PARAM_RTOL,
                        atol=PARAM_ATOL,
                        err_msg=f"{lname}[{i}]@{it}",
                    )
    state_file = solver.snapshot()
    assert state_file == "final_iter_20.solverstate"
    assert_caffemodels_close("final_iter_20.caffemodel", "final.caffemodel")
    assert_states_close("final_iter_20.solverstate", "final.solverstate")


@pytest.mark.parametrize("case, fmt", [("adam", "BINARYPROTO"), ("sgd_multistep", "HDF5"), ("adadelta", "HDF5")])
def test_resume_from_own_snapshot_is_bit_identical(case, fmt, case_dir):
    case_dir(case)
    with open("solver.prototxt", "a") as f:
        f.write(f"\nsnapshot_format: {fmt}\n")

    def fresh():
        s = get_solver("solver.prototxt")
        s.net.copy_from("init.caffemodel")
        return s

    full = fresh()
    full.step(13)
    mid = fresh()
    mid.step(6)
    path = mid.snapshot()
    assert path.endswith(".solverstate.h5" if fmt == "HDF5" else ".solverstate")
    resumed = fresh()  # different starting weights would show if learned_net were not loaded
    with torch.no_grad():
        for p in resumed.net.learnable_params:
            p.zero_()
    resumed.restore(path)
    assert resumed.iter == 6 and resumed.current_step == mid.current_step
    resumed.step(7)
    for a, b in zip(full.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    for a, b in zip(full.history, resumed.history):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(np.asarray(full.net.blobs["loss"].data)) == float(np.asarray(resumed.net.blobs["loss"].data))


def test_restore_rejects_other_solver_type(case_dir):
    case_dir("adam")
    s = get_solver("solver.prototxt")
    s.step(1)
    path = s.snapshot()
    sgd = SGDSolver("solver.prototxt")
    with pytest.raises(SolverError, match="Incorrect length of history blobs"):
        sgd.restore(path)


def test_snapshot_diff_and_prefix(case_dir):
    d = case_dir("sgd_fixed")
    (d / "out").mkdir()
    text = Path("solver.prototxt").read_text().replace('snapshot_prefix: "final"', 'snapshot_prefix: "out/run"')
    Path("solver.prototxt").write_text(text + "\nsnapshot_diff: true\n")
    s = get_solver("solver.prototxt")
    s.step(2)
    s.snapshot()
    model = cio.read_caffemodel("out/run_iter_2.caffemodel")
    conv = [layer for layer in model.layer if layer.name == "conv1"][0]
    diff = cio.blob_to_array(conv.blobs[0], diff=True)
    np.testing.assert_allclose(diff, s.net.params["conv1"][0].diff, rtol=0, atol=0)
    assert read_state("out/run_iter_2.solverstate").learned_net == "out/run_iter_2.caffemodel"


# ---------------------------------------------------------------------------------------------
# a run killed while snapshotting


KILLED_RUN = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import caffe_compat as caffe
    real_replace = os.replace
    def replace(src, dst):
        if "_iter_8." in str(dst):          # the second snapshot: stop just before its rename
            print("WRITING", flush=True)
            time.sleep(60)
        return real_replace(src, dst)
    os.replace = replace
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    solver.solve()
    """
)


def test_sigkill_during_snapshot_keeps_previous_snapshot(case_dir):
    d = case_dir("train_test_snapshot", group="cli")
    for f in d.glob("snap_iter_*"):
        f.rename(d / ("ref_" + f.name))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN.format(repo=str(REPO))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (d / "snap_iter_8.caffemodel").exists()
    assert (d / "snap_iter_4.caffemodel").exists() and (d / "snap_iter_4.solverstate").exists()
    assert_caffemodels_close("snap_iter_4.caffemodel", "ref_snap_iter_4.caffemodel")
    assert_states_close("snap_iter_4.solverstate", "ref_snap_iter_4.solverstate")
    solver = get_solver("solver.prototxt")
    solver.solve(resume_file="snap_iter_4.solverstate")
    assert_caffemodels_close("snap_iter_8.caffemodel", "ref_snap_iter_8.caffemodel")
    assert_states_close("snap_iter_8.solverstate", "ref_snap_iter_8.solverstate")


# ---------------------------------------------------------------------------------------------
# validation before training


BASE = 'net: "train.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 10 '


@pytest.mark.parametrize(
    "text, needle",
    [
        ('base_lr: 0.01 lr_policy: "fixed"', "net, net_param, train_net, train_net_param"),
        ('net: "train.prototxt" base_lr: 0.01', "lr_policy"),
        ('net: "train.prototxt" base_lr: 0.01 lr_policy: "cyclic"', "cyclic"),
        ('net: "train.prototxt" base_lr: 0.01 lr_policy: "step" gamma: 0.1', "stepsize"),
        (BASE + 'type: "AdaGrad" momentum: 0.9', "Momentum cannot be used with AdaGrad"),
        (BASE + 'type: "RMSProp" momentum: 0.9', "Momentum cannot be used with RMSProp"),
        (BASE + 'type: "RMSProp" rms_decay: 1.0', "rms_decay"),
        (BASE + 'type: "LBFGS"', "Unknown solver type"),
        (BASE + 'test_net: "train.prototxt"', "test_iter"),
        (BASE + "test_iter: 2", "test_interval"),
        (BASE + 'regularization_type: "L3"', "regularization_type"),
        (BASE + "average_loss: 0", "average_loss"),
        (BASE + 'snapshot: 5 snapshot_prefix: "no/such/dir/snap"', "snapshot_prefix"),
        (BASE + 'train_net: "train.prototxt"', "more than once"),
    ],
)
def test_bad_solver_stops_before_training(text, needle, case_dir):
    case_dir("sgd_fixed")
    Path("bad_solver.prototxt").write_text(text)
    with pytest.raises(SolverError, match=needle):
        get_solver("bad_solver.prototxt")


# ---------------------------------------------------------------------------------------------
# losses read one iteration late (the GPU's path, forced on the CPU)


def _train_reading(monkeypatch, late: bool, iters: int = 13):
    from caffe_compat.solvers import base

    monkeypatch.setattr(base, "_reads_late", lambda net: late)
    caffe.set_random_seed(7)
    solver = get_solver("solver.prototxt")
    solver.param.display, solver.param.average_loss = 4, 3
    solver.param.snapshot, solver.param.test_interval = 5, 0
    solver.net.copy_from("init.caffemodel")
    seen, at_snapshot = [], []
    solver.loss_observers.append(lambda it, loss: seen.append((it, loss, solver.iter)))
    name = solver._snapshot_filename  # called by snapshot() as it writes

    def spy(ext):
        if ext.startswith(".caffemodel"):
            at_snapshot.append((solver.iter, len(seen), solver._smoothed))
        return name(ext)

    solver._snapshot_filename = spy
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("caffe_compat")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        solver.step(iters)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [r.getMessage() for r in records if "loss" in r.getMessage()]
    return solver, seen, at_snapshot, lines


def test_losses_read_late_train_identically(case_dir, monkeypatch):
    case_dir("sgd_step")
    now, seen_now, snaps_now, lines_now = _train_reading(monkeypatch, late=False)
    late, seen_late, snaps_late, lines_late = _train_reading(monkeypatch, late=True)
    # read late (solver.iter one ahead: the next iteration was queued), but at displays (every 4th)
    assert [it for it, _, at in seen_late if at == it + 1] == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    assert all(at == it for it, _, at in seen_now)
    assert [(it, loss) for it, loss, _ in seen_late] == [(it, loss) for it, loss, _ in seen_now]
    assert [it for it, _, _ in seen_late] == list(range(13))
    # every loss before a snapshot is in (and in the smoothed loss) when it is written
    assert snaps_late == snaps_now == [(5, 5, snaps_now[0][2]), (10, 10, snaps_now[1][2])]
    assert lines_late == lines_now and len(lines_now) >= 4  # the displays: "Iteration 4, loss = ..."
    assert late.smoothed_loss == now.smoothed_loss and late._lagged == []
    for a, b in zip(late.net.learnable_params, now.net.learnable_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_losses_read_late_across_step_calls(case_dir, monkeypatch):
    """pycaffe's ``solver.step(1)`` loop: each call leaves its loss pending for the next one (on
    a GPU), and the smoothed loss a call leaves is still its own iteration's loss."""
    case_dir("sgd_step")
    runs = {}
    for late in (False, True):
        solver, seen, _, _ = _train_reading(monkeypatch, late, iters=1)
        smoothed, pending = [solver.smoothed_loss], []
        for _ in range(5):
            solver.step(1)
            pending.append(len(solver._lagged))
            smoothed.append(solver.smoothed_loss)  # reading it reads the pending loss
        runs[late] = seen, smoothed, pending
    pairs = {late: [(it, loss) for it, loss, _ in runs[late][0]] for late in runs}
    assert pairs[True] == pairs[False] and [it for it, _ in pairs[True]] == list(range(6))
    assert runs[True][1] == runs[False][1]
    assert [loss for _, loss, _ in runs[True][0]] == [float(v) for v in runs[True][1]]
    # iterations 1-5 pending after their call, but iteration 4 (a display, then a snapshot)
    assert runs[True][2] == [1, 1, 1, 0, 1] and runs[False][2] == [0] * 5
