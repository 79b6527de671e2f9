"""Reliability (issue 23): nothing that only looks writes, no hang or unbounded read, messages
that name their file, nothing left behind, lists read as bytes. Every bad input is built for real
(files on disk, a FIFO, a NaN)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.errors import CaffeError, DataError, FormatError, LayerError, NetError, PrototxtError

REPO = Path(__file__).resolve().parents[1]


def _hdf5_output_net(tmp_path: Path, out: Path) -> Path:
    proto = tmp_path / "net.prototxt"
    proto.write_text(
        'name: "saver"\n'
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 2 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 2 } }\n'
        f'layer {{ name: "save" type: "HDF5Output" bottom: "ip" bottom: "y" hdf5_output_param {{ file_name: "{out}" }} }}\n'
    )
    return proto


def _existing_h5(path: Path) -> tuple[bytes, int]:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(12, dtype=np.float32).reshape(3, 4))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return path.read_bytes(), path.stat().st_mtime_ns


# -- item 1: nothing that only looks writes -----------------------------------------------------


def test_summary_subprocess_leaves_an_hdf5output_file_alone(tmp_path):
    out = tmp_path / "results.h5"
    before, mtime = _existing_h5(out)
    proto = _hdf5_output_net(tmp_path, out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-m", "caffe_compat", "summary", str(proto), "--batch", "2", "--draw", str(tmp_path / "n.dot")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "save" in res.stdout and "HDF5Output" in res.stdout
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime


def test_summary_does_not_create_the_file(tmp_path):
    from caffe_compat.__main__ import main

    out = tmp_path / "never.h5"
    proto = _hdf5_output_net(tmp_path, out)
    assert main(["summary", str(proto)]) == 0
    assert not out.exists()


def test_draw_net_and_inspection_leave_the_file_alone(tmp_path, monkeypatch):
    from caffe_compat import draw
    from tools import draw_net

    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    out = tmp_path / "results.h5"
    before, mtime = _existing_h5(out)
    proto = _hdf5_output_net(tmp_path, out)
    assert draw_net.main([str(proto), str(tmp_path / "n.dot")]) == 0
    for phase in (caffe.TEST, caffe.TRAIN):
        net = caffe.Net(str(proto), phase)
        net.reshape()
        draw.draw_net_to_file(net, str(tmp_path / "m.dot"))
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime


def test_hdf5output_opens_on_first_forward_and_not_when_disabled(tmp_path):
    from caffe_compat.layers.data import output_files_disabled

    out = tmp_path / "results.h5"
    before, mtime = _existing_h5(out)
    proto = _hdf5_output_net(tmp_path, out)
    net = caffe.Net(str(proto), caffe.TEST)
    with output_files_disabled():  # what `caffe time` runs its passes in
        net.forward()
        net.backward()
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    net.blobs["y"].data[...] = [3.0, 4.0]
    net.forward()  # first real forward: the file is truncated, then this batch is written
    net.forward()
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["data", "label"]
        assert f["data"].shape == (4, 2, 1, 1)
        np.testing.assert_array_equal(f["label"][:].ravel(), [3, 4, 3, 4])


# -- item 8: nothing left behind ------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_snapshot_temporaries_are_removed_live_ones_kept(tmp_path):
    from caffe_compat import io as cio
    from caffe_compat.solvers import state

    dead = _dead_pid()
    stale = [
        tmp_path / f".net_iter_100.caffemodel.{dead}.k2j_8x.tmp",
        tmp_path / f".net_iter_100.solverstate.h5.{dead}.abcdef.tmp",
    ]
    live = tmp_path / f".net_iter_200.caffemodel.{os.getppid()}.zz9_01.tmp"  # our parent: alive
    other = [tmp_path / ".notes.tmp", tmp_path / "net_iter_100.caffemodel", tmp_path / f".x.{dead}.tmp"]
    for p in stale + [live] + other:
        p.write_bytes(b"partial")
    state.write_state(state.SolverStateData(iter=3, history=[np.ones(2, np.float32)]), tmp_path / "s.solverstate.h5", hdf5=True)
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.exists() for p in other)
    # what a write leaves: the file itself, and no temporary of its own
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == sorted(p.name for p in [live] + [other[0], other[2]])
    assert cio.remove_stale_temporaries(tmp_path) == []


def test_a_killed_write_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    script = (
        "import os, sys\n"
        "from caffe_compat import io as cio\n"
        "def write(tmp):\n"
        "    open(tmp, 'wb').write(b'half a snapshot')\n"
        "    os._exit(9)\n"  # dies mid-write, as kill -9 would
        f"cio.atomic_write({str(tmp_path / 'w.caffemodel')!r}, write)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert res.returncode == 9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".w.caffemodel.")]
    assert len(left) == 1 and not (tmp_path / "w.caffemodel").exists()
    from caffe_compat import io as cio

    cio._SWEPT.discard(os.path.realpath(tmp_path))
    cio.write_caffemodel(caffe.proto.caffe_pb2.NetParameter(name="n", layer=[{"name": "a", "type": "ReLU"}]), tmp_path / "b.caffemodel")
    assert not left[0].exists() and (tmp_path / "b.caffemodel").exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_snapshot_files_get_the_umask_permissions(tmp_path, mask, mode):
    from caffe_compat import io as cio
    from caffe_compat.solvers import state

    old = os.umask(mask)
    try:
        cio.write_caffemodel(caffe.proto.caffe_pb2.NetParameter(name="n", layer=[{"name": "a", "type": "ReLU"}]), tmp_path / "a.caffemodel")
        state.write_state(state.SolverStateData(iter=1), tmp_path / "a.solverstate")
        state.write_state(state.SolverStateData(iter=1), tmp_path / "a.solverstate.h5", hdf5=True)
    finally:
        os.umask(old)
    for name in ("a.caffemodel", "a.solverstate", "a.solverstate.h5"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
