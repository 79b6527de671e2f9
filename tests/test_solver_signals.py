"""Issue 23 item 7: SIGTERM (a cluster's pre-emption) snapshots and stops by default
(``--sigterm_effect``), and Ctrl-C while the nets are built ends with one line, not a
``KeyboardInterrupt`` traceback. Each case runs ``tools/train.py`` in a real process and sends
it a real signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffe_compat.solvers.state import read_state

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")

NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 8 } shape { dim: 4 dim: 1 }
    data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

# start-up takes seconds: a 40 M-parameter InnerProduct filled from a Gaussian
SLOW_NET = NET.replace(
    "dim: 4 dim: 8 } shape { dim: 4 dim: 1 }", "dim: 1 dim: 20000 } shape { dim: 1 dim: 1 }"
).replace("num_output: 1 weight", "num_output: 2000 weight")

TIMEOUT = 120


def _start(d: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("GLOG_minloglevel", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", "solver.prototxt", *flags],
        cwd=d,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, pattern: str) -> list[str]:
    """stderr lines up to the first matching ``pattern`` (the process keeps running)."""
    seen = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    proc.kill()
    raise AssertionError(f"{pattern!r} never appeared; stderr:\n{''.join(seen)}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def _case(tmp_path: Path, net: str = NET, extra: str = "") -> Path:
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.001 lr_policy: "fixed" momentum: 0.9 max_iter: 100000000 display: 1 '
        f'snapshot_prefix: "snap" {extra}'
    )
    return tmp_path


def test_sigterm_snapshots_and_stops(tmp_path):
    d = _case(tmp_path)
    proc = _start(d)
    _wait_for(proc, r"\] Iteration 3, loss = ")
    proc.send_signal(signal.SIGTERM)
    status, err = _finish(proc)
    assert status == 0, err
    assert "Optimization stopped early." in err
    assert "Traceback" not in err
    states = sorted(d.glob("snap_iter_*.solverstate"), key=lambda p: int(re.search(r"_(\d+)\.", p.name).group(1)))
    assert len(states) == 1  # the final snapshot, at the iteration the signal stopped
    it = int(re.search(r"snap_iter_(\d+)\.solverstate", states[0].name).group(1))
    assert it >= 4
    assert (d / f"snap_iter_{it}.caffemodel").is_file()
    assert read_state(str(states[0])).iter == it
    assert f"Snapshotting to binary proto file snap_iter_{it}.caffemodel" in err


def test_sigterm_effect_snapshot_then_sigint_stops(tmp_path):
    """``--sigterm_effect snapshot``: SIGTERM snapshots and training goes on (until SIGINT)."""
    d = _case(tmp_path, extra="snapshot_after_train: false")
    proc = _start(d, "--sigterm_effect", "snapshot")
    _wait_for(proc, r"\] Iteration 3, loss = ")
    proc.send_signal(signal.SIGTERM)
    seen = _wait_for(proc, r"Snapshotting solver state to binary proto file snap_iter_(\d+)\.solverstate")
    it = int(re.search(r"snap_iter_(\d+)\.solverstate", seen[-1]).group(1))
    _wait_for(proc, rf"\] Iteration {it + 2}, loss = ")  # it trained on
    proc.send_signal(signal.SIGINT)
    status, err = _finish(proc)
    assert status == 0, err
    assert "Optimization stopped early." in err
    assert [p.name for p in d.glob("snap_iter_*.solverstate")] == [f"snap_iter_{it}.solverstate"]


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    d = _case(tmp_path, net=SLOW_NET, extra="snapshot: 1")
    proc = _start(d)
    _wait_for(proc, r"Creating training net from net file")  # logged as the net's build starts
    proc.send_signal(signal.SIGINT)
    status, err = _finish(proc)
    assert status == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == (
        "train.py: interrupted (SIGINT) during start-up, before the first iteration; nothing was written"
    )
    assert not list(d.glob("snap_iter_*"))
