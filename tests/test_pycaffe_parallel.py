"""pycaffe's multi-process and callback API: ``caffe.NCCL`` with ``set_solver_count`` /
``set_solver_rank`` (Caffe's python/train.py, two gloo processes on the CPU, equal to one process
with ``iter_size: 2``), ``Solver.add_callback``, ``Net.before_forward`` / ``after_forward``
(and the refusal of per-layer backward callbacks), ``caffe.Timer``."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat import mode
from caffe_compat.errors import NetError, SolverError

SOLVERS = Path(__file__).parent / "fixtures" / "caffe_reference" / "solvers"
ITERS = 6
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6  # the solver fixtures' tolerances


def _case(root: Path, name: str, iter_size: int) -> Path:
    d = root / name
    shutil.copytree(SOLVERS / "iter_size", d)
    text = re.sub(r"^(iter_size|snapshot):.*$", "", (d / "solver.prototxt").read_text(), flags=re.M)
    (d / "solver.prototxt").write_text(text + f"\niter_size: {iter_size}\nsnapshot: {ITERS}\n")
    return d


@pytest.fixture(autouse=True)
def _restore_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # _solver changes into the case's folder; undone after each test


def _solver(d: Path):
    os.chdir(d)  # the solver names its net relative to the working directory, as Caffe
    caffe.set_random_seed(7)
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    return solver


def _params(solver) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in solver.net.learnable_params]


def _train_py_worker(rank: int, uid: str, d: str, out: str) -> None:
    """One process of Caffe's python/train.py, written as that script writes it."""
    torch.set_num_threads(1)
    logging.getLogger("caffe_compat").setLevel(logging.WARNING)
    caffe.set_mode_cpu()
    caffe.set_solver_count(2)
    caffe.set_solver_rank(rank)
    caffe.set_multiprocess(True)
    solver = _solver(Path(d))
    nccl = caffe.NCCL(solver, uid)
    nccl.bcast()
    solver.add_callback(nccl)
    if solver.param.layer_wise_reduce:
        solver.net.after_backward(nccl)
    losses = []
    for _ in range(ITERS):
        solver.step(1)
        losses.append(float(solver.smoothed_loss))
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        *_params(solver),
        losses=np.array(losses),
        root=np.array(solver.is_root),
        rank=np.array(solver.rank),
        world=np.array(solver.world_size),
    )
    torch.distributed.destroy_process_group()


def test_nccl_two_processes_train_as_iter_size_2(tmp_path):
    d = _case(tmp_path, "dist", 1)
    uid = caffe.NCCL.new_uid()
    assert uid.startswith("file://") and not os.path.exists(uid[len("file://") :])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_train_py_worker, args=(r, uid, str(d), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]

    single = _solver(_case(tmp_path, "single", 2))
    losses = []
    for _ in range(ITERS):
        single.step(1)
        losses.append(float(single.smoothed_loss))
    expected = _params(single)
    assert [(bool(r["root"]), int(r["rank"]), int(r["world"])) for r in ranks] == [(True, 0, 2), (False, 1, 2)]
    for r in ranks:
        np.testing.assert_allclose(r["losses"], losses, rtol=LOSS_RTOL, atol=LOSS_ATOL)
        assert len([k for k in r.files if k.startswith("arr_")]) == len(expected)
        for i, p in enumerate(expected):
            np.testing.assert_allclose(r[f"arr_{i}"], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=f"param {i}")
    # rank 0 alone snapshots
    assert sorted(p.name for p in d.glob("final_iter_*")) == [
        f"final_iter_{ITERS}.caffemodel",
        f"final_iter_{ITERS}.solverstate",
    ]


def test_nccl_needs_a_solver_count(tmp_path):
    solver = _solver(_case(tmp_path, "one", 1))
    with pytest.raises(SolverError, match="set_solver_count"):
        caffe.NCCL(solver, caffe.NCCL.new_uid())


def test_solver_count_and_rank_setters():
    try:
        caffe.set_solver_count(3)
        caffe.set_solver_rank(2)
        caffe.set_multiprocess(True)
        assert (caffe.solver_count(), caffe.solver_rank(), mode.multiprocess()) == (3, 2, True)
        with pytest.raises(caffe.CaffeError, match="must be >= 1"):
            caffe.set_solver_count(0)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
        caffe.set_multiprocess(False)


def test_add_callback_runs_where_caffe_calls_its_callbacks(tmp_path):
    solver = _solver(_case(tmp_path, "cb", 2))
    events = []

    def diffs_zero() -> bool:
        return all(p.grad is None or not p.grad.any() for p in solver.net.learnable_params)

    def on_start():
        events.append(("start", solver.iter, diffs_zero()))

    before = {}

    def on_gradients():
        # the passes' gradients are there, the update is not applied yet
        same = all(np.array_equal(a, b) for a, b in zip(_params(solver), before[solver.iter]))
        events.append(("gradients", solver.iter, not diffs_zero(), same))

    solver.add_callback(on_start, on_gradients)
    for _ in range(3):
        before[solver.iter] = _params(solver)
        solver.step(1)
    assert events == [e for it in range(3) for e in (("start", it, True), ("gradients", it, True, True))]
    with pytest.raises(SolverError, match="two functions"):
        solver.add_callback(on_start)


def test_net_forward_callbacks_and_backward_refusal(tmp_path):
    solver = _solver(_case(tmp_path, "net", 1))
    net = solver.net
    calls = []
    net.before_forward(lambda i: calls.append(("before", i)))
    net.after_forward(lambda i: calls.append(("after", i)))
    net.forward()
    n = len(net.layers)
    assert calls == [(w, i) for i in range(n) for w in ("before", "after")]
    calls.clear()
    solver.step(1)  # the solver's passes call them too
    assert calls == [(w, i) for i in range(n) for w in ("before", "after")]
    with pytest.raises(NetError, match="after_backward.*not supported"):
        net.after_backward(lambda i: None)
    with pytest.raises(NetError, match="before_backward.*not supported"):
        net.before_backward(lambda i: None)
    with pytest.raises(NetError, match="function of the layer index"):
        net.before_forward(3)


def test_timer_measures_milliseconds():
    t = caffe.Timer()
    assert t.ms == 0.0
    t.start()
    time.sleep(0.02)
    t.stop()
    assert 15.0 <= t.ms < 2000.0
    first = t.ms
    assert t.ms == first  # stopped: reading does not change it
    t.start()
    time.sleep(0.01)
    assert t.ms >= 5.0 and not t.running  # reading a running timer stops it


def test_pycaffe_index_internals_share_with_and_load_hdf5(tmp_path):
    solver = _solver(_case(tmp_path, "internals", 1))
    net = solver.net
    names = net._blob_names
    assert names == list(net.blobs)
    assert [names[i] for i in net._outputs] == list(net.outputs)
    assert [names[i] for i in net._inputs] == list(net.inputs)
    for i in range(len(net.layers)):
        assert [names[j] for j in net._bottom_ids(i)] == net.bottom_names[net._layer_names[i]]
        assert [names[j] for j in net._top_ids(i)] == net.top_names[net._layer_names[i]]
    assert net._blob_loss_weights == [net.blob_loss_weights[b] for b in names]
    # _forward over every layer: the loss the net reports; _backward fills the parameter diffs
    loss = net._forward(0, len(net.layers) - 1)
    assert loss == pytest.approx(float(net.blobs["loss"].data), rel=1e-6)
    net._backward(len(net.layers) - 1, 0)
    assert any(np.abs(p.diff).sum() > 0 for ps in net.params.values() for p in ps)

    # a second net sharing the solver's weights sees its updates (Solver.share_weights)
    other = caffe.Net("train.prototxt", caffe.TEST)
    solver.share_weights(other)
    solver.step(2)
    for name, ps in net.params.items():
        for a, b in zip(ps, other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    # load_hdf5 reads save_hdf5's file whatever its extension; a non-HDF5 file is a clear error
    net.save_hdf5(str(tmp_path / "w.weights"))
    fresh = caffe.Net("train.prototxt", caffe.TEST)
    fresh.load_hdf5(str(tmp_path / "w.weights"))
    for name, ps in net.params.items():
        for a, b in zip(ps, fresh.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(caffe.errors.CaffeError, match="cannot be read as Caffe HDF5"):
        fresh.load_hdf5(str(tmp_path / "junk.h5"))
    other.share_with(fresh)  # pycaffe's name for share_trained_layers_with: the same storage
    first = next(iter(fresh.params))
    fresh.params[first][0].data[...] = 7.0
    assert np.all(other.params[first][0].data == 7.0)
