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


def test_non_finite_gradient_stops_at_the_next_loss_and_names_the_weights(tmp_path, monkeypatch, capsys):
    """A finite loss with an infinite gradient: the update of iteration 0 makes ip1's weights
    NaN; the run stops before anything of them is written, naming iteration 0 and 'ip1'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(SQRT_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 5 snapshot: 2 snapshot_prefix: "snap"'
    )
    status, err = _train(capsys)
    assert status == 1
    assert "solver.prototxt: iteration 0: a non-finite gradient made the weights non-finite" in err
    assert "layer 'ip1' (InnerProduct): parameter 0 (its data) holds nan" in err
    assert not list(tmp_path.glob("snap_iter_*"))


def _sqrt_solver(tmp_path, extra: str = ""):
    (tmp_path / "net.prototxt").write_text(SQRT_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 5 momentum: 0.9 {extra}'
    )
    return get_solver(str(tmp_path / "solver.prototxt"))


@pytest.mark.parametrize("how", ["nan_check_gradients", "clip_gradients"])
def test_gradient_check_stops_before_the_update(tmp_path, monkeypatch, how):
    """With the opt-in per-iteration check, or through clipping's sum of squares, a non-finite
    gradient stops iteration 0 before its update: the weights are the initial ones."""
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
