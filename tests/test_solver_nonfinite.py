"""Issue 23 item 3: a NaN/Inf loss or gradient stops training, names the iteration and the layer,
and leaves the last good snapshot the newest (``nan_policy``; ``--nan_policy continue`` is
Caffe's carry-on behaviour). Every case builds the bad input for real: an HDF5 file holding a
NaN, a net whose backward divides by zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat import io as cio
from caffe_compat import mode
from caffe_compat.solvers import get_solver
from caffe_compat.solvers.nonfinite import NonFiniteError
from tools import train

# EuclideanLoss on an InnerProduct of HDF5 records (batch 1): record k is read by iteration k
HDF5_NET = """name: "h"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "list.txt" batch_size: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

# forward finite, backward not: d sqrt(x)/dx at x = 0 (ip1's weights start at 0)
SQRT_NET = """name: "g"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 }
    data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 4 weight_filler { type: "constant" value: 0 } } }
layer { name: "sqrt" type: "Power" bottom: "ip1" top: "sqrt" power_param { power: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "sqrt" top: "ip2"
  inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _hdf5_case(d: Path, nan_record: int, records: int = 8) -> None:
    import h5py

    rng = np.random.default_rng(0)
    data = rng.standard_normal((records, 3)).astype(np.float32)
    data[nan_record, 1] = np.nan
    with h5py.File(d / "d.h5", "w") as f:
        f["data"] = data
        f["label"] = rng.standard_normal((records, 1)).astype(np.float32)
    (d / "list.txt").write_text("d.h5\n")
    (d / "net.prototxt").write_text(HDF5_NET)
    (d / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 max_iter: 6 '
        'snapshot: 1 snapshot_prefix: "snap" random_seed: 1'
    )


def _train(capsys, *flags) -> tuple[int, str]:
    status = train.main(["--solver", "solver.prototxt", *flags])
    return status, capsys.readouterr().err


def test_nan_in_the_data_stops_before_the_update(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hdf5_case(tmp_path, nan_record=3)
    status, err = _train(capsys)
    assert status == 1
    line = [x for x in err.splitlines() if x.startswith("train.py: error:")]
    assert len(line) == 1
    assert "solver.prototxt: iteration 3: the loss is nan" in line[0]
    assert "layer 'data' (HDF5Data): top 'data' holds nan" in line[0]
    assert "the last snapshot: snap_iter_3.solverstate" in line[0]
    # snapshots of iterations 1-3 (taken after the updates of iterations 0-2); none after
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*.caffemodel")) == [
        f"snap_iter_{k}.caffemodel" for k in (1, 2, 3)
    ]
    weights = cio.read_caffemodel("snap_iter_3.caffemodel")
    for layer in weights.layer:
        for blob in layer.blobs:
            assert np.isfinite(np.asarray(blob.data)).all()


def test_nan_policy_continue_is_caffes_behaviour(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hdf5_case(tmp_path, nan_record=3)
    status, err = _train(capsys, "--nan_policy", "continue")
    assert status == 0, err
    # Caffe trains on: from the update of iteration 3 on, the weights are NaN, and so is every snapshot
    ip = [layer for layer in cio.read_caffemodel("snap_iter_6.caffemodel").layer if layer.name == "ip"][0]
    assert np.isnan(np.asarray(ip.blobs[0].data)).all()
    ip = [layer for layer in cio.read_caffemodel("snap_iter_3.caffemodel").layer if layer.name == "ip"][0]
    assert np.isfinite(np.asarray(ip.blobs[0].data)).all()


def test_non_finite_gradient_stops_before_its_update(tmp_path, monkeypatch, capsys):
    """A finite loss with an infinite gradient (ip1's and its top's): the check before the
    update of iteration 0 stops the run, naming ip1, before anything is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(SQRT_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 5 snapshot: 2 snapshot_prefix: "snap"'
    )
    status, err = _train(capsys)
    assert status == 1
    assert "solver.prototxt: iteration 0: the gradients are non-finite" in err
    assert "layer 'ip1' (InnerProduct): the gradient of parameter 0 holds" in err
    assert not list(tmp_path.glob("snap_iter_*"))


def _sqrt_solver(tmp_path, extra: str = ""):
    (tmp_path / "net.prototxt").write_text(SQRT_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 5 momentum: 0.9 {extra}'
    )
    return get_solver(str(tmp_path / "solver.prototxt"))


@pytest.mark.parametrize("how", ["default", "nan_check_gradients", "clip_gradients"])
def test_gradient_check_stops_before_the_update(tmp_path, monkeypatch, how):
    """By default (InnerProduct weights through their witnesses), reading every gradient
    (``nan_check_gradients``), or through clipping's sum of squares, a non-finite gradient stops
    iteration 0 before its update: the weights are the initial ones."""
    monkeypatch.chdir(tmp_path)
    solver = _sqrt_solver(tmp_path, "clip_gradients: 10" if how == "clip_gradients" else "")
    solver.nan_check_gradients = how == "nan_check_gradients"
    before = [p.detach().clone() for p in solver.net.learnable_params]
    with pytest.raises(NonFiniteError, match=r"iteration 0: the gradients are non-finite") as e:
        solver.step(2)
    # the first layer in net order whose gradient is non-finite: ip1 (its top is finite: 0)
    assert "layer 'ip1' (InnerProduct): the gradient of parameter 0 holds" in str(e.value)
    assert solver.iter == 0
    for p, w in zip(solver.net.learnable_params, before):
        assert torch.equal(p.detach(), w)


def test_pycaffe_nan_policy_continue_trains_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver = _sqrt_solver(tmp_path)
    solver.nan_policy = "continue"
    solver.step(3)
    assert solver.iter == 3
    assert not np.isfinite(float(solver.smoothed_loss))


def test_loss_scaling_leaves_non_finite_gradients_to_the_scaler(tmp_path, monkeypatch):
    """Under fp16 loss scaling inf gradients skip the update (GradScaler's rule), not the run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(SQRT_NET)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 3')
    mode.set_precision("fp16")
    try:
        solver = get_solver("solver.prototxt")
        solver.step(2)
    finally:
        mode.set_precision("fp32")
    assert solver.loss_scaler.skipped == 2
    assert all(torch.isfinite(p).all() for p in solver.net.learnable_params)


# ---------------------------------------------------------------------------------------------
# a gradient that overflows while the loss and every top stay finite: an input of ~1e38 in a
# column whose weights are still 0 (that column is 0 in every earlier record), times a top diff
# of (y - label) ~ -label. Only the layer's weight gradient can show it.

LAYER = {
    "InnerProduct": 'type: "InnerProduct" inner_product_param { num_output: 1',
    "Convolution": 'type: "Convolution" convolution_param { num_output: 1 kernel_size: 1',
}


def _huge_case(d: Path, kind: str, value: float, label: float, columns: tuple, at: int = 3, extra: str = "") -> None:
    """Records of 2 channels, 0 in ``columns`` but ``value`` at record ``at``; labels ``label``."""
    import h5py

    rng = np.random.default_rng(0)
    data = rng.standard_normal((8, 2, 1, 1)).astype(np.float32)
    for c in columns:
        data[:, c] = 0
        data[at, c] = value
    with h5py.File(d / "d.h5", "w") as f:
        f["data"] = data
        f["label"] = np.full((8, 1, 1, 1), label, dtype=np.float32)
    (d / "list.txt").write_text("d.h5\n")
    (d / "net.prototxt").write_text(
        'name: "huge"\n'
        'layer { name: "data" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param { source: "list.txt" batch_size: 1 } }\n'
        f'layer {{ name: "fc" bottom: "data" top: "fc" {LAYER[kind]} weight_filler {{ type: "constant" value: 0 }} }} }}\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "loss" }\n'
    )
    (d / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 max_iter: 6 '
        f'snapshot: 1 snapshot_prefix: "snap" random_seed: 1 {extra}'
    )


def test_overflowing_inner_product_gradient_stops_that_iteration(tmp_path, monkeypatch, capsys):
    """tools/train.py: iteration 3's InnerProduct weight gradient is -inf, its loss finite: exit
    status 1 naming iteration 3 and the layer, the snapshots of iterations 1-3 only."""
    monkeypatch.chdir(tmp_path)
    _huge_case(tmp_path, "InnerProduct", 3e38, 10.0, columns=(1,))
    status, err = _train(capsys)
    assert status == 1
    line = [x for x in err.splitlines() if x.startswith("train.py: error:")]
    assert len(line) == 1
    assert "solver.prototxt: iteration 3: the gradients are non-finite" in line[0]
    assert "layer 'fc' (InnerProduct): the gradient of parameter 0 holds inf" in line[0]
    assert "the last snapshot: snap_iter_3.solverstate" in line[0]
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*.caffemodel")) == [
        f"snap_iter_{k}.caffemodel" for k in (1, 2, 3)
    ]


@pytest.mark.parametrize("kind", ["InnerProduct", "Convolution"])
@pytest.mark.parametrize("runner", ["eager", "cuda_graph"])
def test_overflowing_gradient_stops_before_its_update(tmp_path, monkeypatch, kind, runner):
    """The InnerProduct's gradient through its witness, the convolution's read itself; a
    training pass replayed from a (stand-in) CUDA graph leaves no witness: read itself too."""
    from tests.test_cuda_graph import ReplayingGraph

    monkeypatch.chdir(tmp_path)
    _huge_case(tmp_path, kind, 3e38, 10.0, columns=(1,))
    solver = get_solver("solver.prototxt")
    if runner == "cuda_graph":
        solver.net.use_cuda_graph(True, warmup=1, graph_factory=ReplayingGraph)
    witnessed, witness = [], solver.net.gradient_witness
    monkeypatch.setattr(solver.net, "gradient_witness", lambda: witnessed.append(witness()[0] is not None) or witness())
    solver.step(3)
    before = [p.detach().clone() for p in solver.net.learnable_params]
    with pytest.raises(NonFiniteError, match="iteration 3: the gradients are non-finite") as e:
        solver.step(1)
    # the weight's certificate at each iteration's check (the graph's: the eager warm-up pass only)
    assert witnessed == [kind == "InnerProduct" and (runner == "eager" or k == 0) for k in range(4)]
    assert f"layer 'fc' ({kind}): the gradient of parameter 0 holds inf" in str(e.value)
    assert solver.iter == 3
    for p, w in zip(solver.net.learnable_params, before):
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("kind", ["InnerProduct", "Convolution"])
def test_a_bound_or_sum_that_overflows_with_finite_gradients_trains_on(tmp_path, monkeypatch, kind):
    """Record 3 is 2e38 in both channels and the top diff about -1: the InnerProduct's bound
    (about 2e38) fails, the convolution's sum of its two gradients (-3.9e38) overflows, yet every
    gradient is finite (-1.9e38): the check reads the diff and training goes on."""
    from caffe_compat.solvers import nonfinite

    monkeypatch.chdir(tmp_path)
    _huge_case(tmp_path, kind, 2e38, 1.0, columns=(0, 1))
    suspected = []
    suspects = nonfinite.GradientCheck.suspects

    def spy(check):
        found = suspects(check)
        suspected.append(found)
        return found

    monkeypatch.setattr(nonfinite.GradientCheck, "suspects", spy)
    solver = get_solver("solver.prototxt")
    solver.step(6)
    assert solver.iter == 6
    assert [k for k, found in enumerate(suspected) if found] == [3]  # the false alarm, cleared
    w = solver.net.learnable_params[0].detach()
    assert torch.isfinite(w).all() and w.abs().max() > 1e36


def test_losses_read_late_stop_at_the_next_read_before_any_snapshot(tmp_path, monkeypatch):
    """A GPU's path (forced on the CPU): the check's values are read with the loss, once the
    update is queued. The run stops before the snapshot after it, naming iteration 3 (whose
    update made the weights non-finite); a bound that fails on finite gradients trains on."""
    from caffe_compat.solvers import base

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "_reads_late", lambda net: True)
    _huge_case(tmp_path, "InnerProduct", 3e38, 10.0, columns=(1,))
    solver = get_solver("solver.prototxt")
    with pytest.raises(NonFiniteError, match="iteration 3: the gradients are non-finite") as e:
        solver.step(6)
    assert "layer 'fc' (InnerProduct): parameter 0 (its data) holds" in str(e.value)
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*.caffemodel")) == [
        f"snap_iter_{k}.caffemodel" for k in (1, 2, 3)
    ]
    (tmp_path / "late").mkdir()
    monkeypatch.chdir(tmp_path / "late")
    _huge_case(tmp_path / "late", "InnerProduct", 2e38, 1.0, columns=(0, 1))
    solver = get_solver("solver.prototxt")
    solver.step(6)
    assert solver.iter == 6


def test_nan_policy_continue_applies_the_overflowing_gradient(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _huge_case(tmp_path, "InnerProduct", 3e38, 10.0, columns=(1,))
    solver = get_solver("solver.prototxt")
    solver.nan_policy = "continue"
    solver.step(4)
    assert solver.iter == 4
    assert not torch.isfinite(solver.net.learnable_params[0].detach()).all()
