"""tools/train.py, tools/test.py, tools/time.py against `caffe train` on the cli fixture.

tests/fixtures/caffe_reference/cli/train_test_snapshot: `caffe train -solver solver.prototxt
-weights init.caffemodel` printed caffe_train.log and wrote snap_iter_4.* and snap_iter_8.*.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat import io as cio
from caffe_compat.cli import test as test_tool
from caffe_compat.cli import time as time_tool
from caffe_compat.cli import train
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import SignalHandler, get_solver
from caffe_compat.solvers.state import read_state

CLI = Path(__file__).parent / "fixtures" / "caffe_reference" / "cli" / "train_test_snapshot"
GLOG = re.compile(r"^[IWEF]\d{4,8} \d\d:\d\d:\d\d\.\d{6}\s+\d+ [^\]\s]+:\d+\] (.*)$")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?")
RTOL, ATOL = 1e-4, 1e-6  # README: parameters; printed numbers have 6 digits


@pytest.fixture
def cli_dir(tmp_path, monkeypatch):
    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    for f in d.glob("snap_iter_*"):
        f.rename(d / ("ref_" + f.name))
    monkeypatch.chdir(d)
    return d


def messages(text: str) -> list[str]:
    """The messages of glog-formatted lines (continuation lines are dropped)."""
    out = []
    for line in text.splitlines():
        m = GLOG.match(line)
        if m:
            out.append(m.group(1))
    return out


def same_line(ours: str, ref: str) -> bool:
    if NUMBER.sub("#", ours) != NUMBER.sub("#", ref):
        return False
    a = [float(x) for x in NUMBER.findall(ours)]
    b = [float(x) for x in NUMBER.findall(ref)]
    return np.allclose(a, b, rtol=5e-5, atol=1e-6)


def assert_caffemodels_close(ours, ref):
    a, b = cio.read_caffemodel(ours), cio.read_caffemodel(ref)
    assert [layer.name for layer in a.layer] == [layer.name for layer in b.layer]
    for la, lb in zip(a.layer, b.layer):
        assert len(la.blobs) == len(lb.blobs)
        for x, y in zip(la.blobs, lb.blobs):
            np.testing.assert_allclose(
                cio.blob_to_array(x), cio.blob_to_array(y), rtol=RTOL, atol=ATOL, err_msg=la.name
            )


def assert_states_close(ours, ref):
    a, b = read_state(ours), read_state(ref)
    assert (a.iter, a.learned_net, a.current_step) == (b.iter, b.learned_net, b.current_step)
    assert len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def test_train_prints_caffes_log_and_writes_its_snapshots(cli_dir, capsys):
    assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel"]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    ours = messages(err)
    assert all(GLOG.match(line) or not line.startswith(("I", "W", "E")) or ":" not in line[:30] for line in lines)
    ref = messages((CLI / "caffe_train.log").read_text())
    start_ref, start_ours = ref.index("Starting Optimization"), ours.index("Starting Optimization")
    ref_tail, ours_tail = ref[start_ref:], ours[start_ours:]
    assert len(ours_tail) == len(ref_tail), "\n".join(ours_tail)
    for o, r in zip(ours_tail, ref_tail):
        assert same_line(o, r), f"ours: {o!r}\ncaffe: {r!r}"
    for needed in (
        "Creating training net from net file: train.prototxt",
        "Creating test net (#0) specified by test_net file: train.prototxt",
        "Solver scaffolding done.",
        "Initializing solver from parameters: ",
    ):
        assert needed in ours
    for n in (4, 8):
        assert_caffemodels_close(f"snap_iter_{n}.caffemodel", f"ref_snap_iter_{n}.caffemodel")
        assert_states_close(f"snap_iter_{n}.solverstate", f"ref_snap_iter_{n}.solverstate")
    assert not list(cli_dir.glob(".*.tmp")), "temporary snapshot files left behind"


def test_train_with_cuda_graph_prints_caffes_log_and_snapshots(cli_dir, capsys, monkeypatch):
    """``--cuda_graph``, here through the CPU stand-in for a CUDA graph (tests/test_cuda_graph.py):
    the HDF5 batches produced eagerly each pass, the rest replayed; Caffe's log and snapshots."""
    from tests.test_cuda_graph import stand_in_graphs

    graphed = stand_in_graphs(monkeypatch)
    assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel", "--cuda_graph"]) == 0
    ours = messages(capsys.readouterr().err)
    note = "Training passes replayed from a CUDA graph (captured after 2 eager passes)"
    assert note in ours
    assert len(graphed) == 2  # the train net and the test net
    assert graphed[0]._graphed.captures == 1  # training passes
    assert graphed[1]._graphed.captures == 1  # the test net's forward passes (3 per test, 3 tests)
    ours = [m for m in ours if m != note]
    ref = messages((CLI / "caffe_train.log").read_text())
    ref_tail, ours_tail = ref[ref.index("Starting Optimization") :], ours[ours.index("Starting Optimization") :]
    assert len(ours_tail) == len(ref_tail), "\n".join(ours_tail)
    for o, r in zip(ours_tail, ref_tail):
        assert same_line(o, r), f"ours: {o!r}\ncaffe: {r!r}"
    for n in (4, 8):
        assert_caffemodels_close(f"snap_iter_{n}.caffemodel", f"ref_snap_iter_{n}.caffemodel")
        assert_states_close(f"snap_iter_{n}.solverstate", f"ref_snap_iter_{n}.solverstate")


def test_resume_from_caffes_snapshot_ends_at_caffes_iteration_8(cli_dir, capsys):
    for suffix in ("caffemodel", "solverstate"):
        shutil.copy(f"ref_snap_iter_4.{suffix}", f"snap_iter_4.{suffix}")
    assert train.main(["--solver", "solver.prototxt", "--snapshot", "snap_iter_4.solverstate"]) == 0
    ours = messages(capsys.readouterr().err)
    assert "Resuming from snap_iter_4.solverstate" in ours
    assert "Iteration 0, Testing net (#0)" not in ours and "Iteration 4, Testing net (#0)" in ours
    assert_caffemodels_close("snap_iter_8.caffemodel", "ref_snap_iter_8.caffemodel")
    assert_states_close("snap_iter_8.solverstate", "ref_snap_iter_8.solverstate")


@pytest.mark.parametrize(
    "drop, extra, needle",
    [
        ("lr_policy", 'lr_policy: "linear"', "lr_policy"),
        ("lr_policy", "", "'lr_policy' is missing"),
        ("type", 'type: "AdaGrad"', "Momentum cannot be used with AdaGrad"),
        ("test_iter", "", "test_iter"),
        ("stepsize", "", "stepsize"),
        ("net", "", "train net"),
        ("regularization_type", 'regularization_type: "L0"', "regularization_type"),
    ],
)
def test_bad_solver_file_stops_before_training(cli_dir, capsys, drop, extra, needle):
    text = (cli_dir / "solver.prototxt").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith(drop + ":"))
    Path("bad.prototxt").write_text(text + "\n" + extra + "\n")
    assert train.main(["--solver", "bad.prototxt", "--weights", "init.caffemodel"]) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], err
    assert "Traceback" not in err
    assert "Iteration" not in err and not list(cli_dir.glob("snap_iter_*"))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--solver", "solver.prototxt", "--weights", "init.caffemodel", "--snapshot", "x.solverstate"], "not both"),
        ([], "Need a solver"),
        (["--solver", "missing.prototxt"], "missing.prototxt"),
        (["--solver", "solver.prototxt", "--sigint_effect", "explode"], "sigint_effect"),
    ],
)
def test_bad_command_line(cli_dir, capsys, argv, needle):
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpu_without_cuda_is_a_clear_error(cli_dir, capsys):
    assert train.main(["--solver", "solver.prototxt", "--gpu", "0"]) == 1
    assert test_tool.main(["--model", "train.prototxt", "--weights", "init.caffemodel", "--gpu", "all"]) == 1
    err = capsys.readouterr().err
    assert err.count("no CUDA device is available") == 2


def test_iterations_and_model_flags(cli_dir, capsys):
    assert (
        train.main(
            [
                "--solver",
                "solver.prototxt",
                "--weights",
                "init.caffemodel",
                "--iterations",
                "2",
                "--model",
                "train.prototxt",
            ]
        )
        == 0
    )
    ours = messages(capsys.readouterr().err)
    assert "Snapshotting to binary proto file snap_iter_2.caffemodel" in ours  # snapshot_after_train
    assert ours[-1] == "Optimization Done."


def test_signal_effects(cli_dir):
    solver = get_solver("solver.prototxt")
    solver.set_action_function(lambda: "stop" if solver.iter == 2 else "none")
    solver.solve()
    assert solver.iter == 2 and solver.requested_early_exit
    assert Path("snap_iter_2.caffemodel").exists()  # snapshot_after_train still runs

    # a stop asked during a test (checked before each test batch) interrupts it
    calls = {"n": 0}

    def stop_on_third_call():
        calls["n"] += 1
        return "stop" if calls["n"] == 3 else "none"

    solver = get_solver("solver.prototxt")
    solver.set_action_function(stop_on_third_call)
    assert solver.test(0) == [] and solver.requested_early_exit

    solver = get_solver("solver.prototxt")
    solver.set_action_function(lambda: "snapshot" if solver.iter == 1 else "none")
    solver.step(2)
    assert Path("snap_iter_1.solverstate").exists() and read_state("snap_iter_1.solverstate").iter == 1

    import os
    import signal

    with SignalHandler("snapshot", "stop") as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.action() == "snapshot"
        assert handler.action() == "none"
        os.kill(os.getpid(), signal.SIGHUP)
        assert handler.action() == "stop"


def test_test_tool_scores_like_caffe(cli_dir, capsys):
    assert (
        test_tool.main(["--model", "train.prototxt", "--weights", "ref_snap_iter_8.caffemodel", "--iterations", "3"])
        == 0
    )
    ours = messages(capsys.readouterr().err)
    assert [m.split(",")[0] for m in ours if m.startswith("Batch")] == ["Batch 0", "Batch 1", "Batch 2"]
    # Caffe's final test of the same weights on the same three batches: 0.886448
    assert same_line([m for m in ours if m.startswith("Loss:")][0], "Loss: 0.886448")
    assert same_line(ours[-1], "loss = 0.886448 (* 1 = 0.886448 loss)")
    assert test_tool.main(["--model", "train.prototxt"]) == 1


def test_test_tool_with_cuda_graph_scores_the_same(cli_dir, capsys, monkeypatch):
    """``--cuda_graph`` (through the CPU stand-in for CUDA graphs): the same batch lines and means
    as the eager run; without ``--gpu`` it is refused."""
    from tests.test_cuda_graph import stand_in_graphs

    args = ["--model", "train.prototxt", "--weights", "ref_snap_iter_8.caffemodel", "--iterations", "5"]
    assert test_tool.main(args) == 0
    eager = [m for m in messages(capsys.readouterr().err) if m.startswith(("Batch", "Loss", "loss"))]
    assert test_tool.main([*args, "--cuda_graph"]) == 1
    assert "--cuda_graph needs --gpu" in capsys.readouterr().err
    graphed = stand_in_graphs(monkeypatch)
    monkeypatch.setattr(test_tool, "parse_gpus", lambda flag: [0])
    monkeypatch.setattr(test_tool, "select_device", lambda gpus, log: None)  # stays on the CPU
    assert test_tool.main([*args, "--gpu", "0", "--cuda_graph"]) == 0
    ours = [m for m in messages(capsys.readouterr().err) if m.startswith(("Batch", "Loss", "loss"))]
    assert ours == eager and len(ours) == 7
    assert graphed[0]._graphed.captures == 1  # batches 2-4 from the graph


def test_time_tool_reports_every_layer(cli_dir, capsys):
    assert time_tool.main(["--model", "train.prototxt", "--iterations", "2"]) == 0
    ours = messages(capsys.readouterr().err)
    for name in ("data", "conv1", "relu1", "pool1", "ip1", "relu2", "ip2", "loss"):
        fw = [m for m in ours if m.strip().startswith(name + "\tforward:")]
        bw = [m for m in ours if m.strip().startswith(name + "\tbackward:")]
        assert len(fw) == 1 and len(bw) == 1
    assert float(re.search(r"ip1\tbackward: (\S+) ms", "\n".join(ours)).group(1)) > 0
    assert any(m.startswith("Total Time:") for m in ours) and ours[-1] == "*** Benchmark ends ***"


def test_paper_solver_without_prepared_data_says_how_to_prepare(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from caffe_compat.cli import train

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "solvers").mkdir()
    (tmp_path / "prototxt").mkdir()
    for f in ("solvers/landmark_solver.prototxt", "prototxt/dental_landmarks_train_val.prototxt"):
        (tmp_path / f).write_text((root / f).read_text())
    monkeypatch.chdir(tmp_path)
    assert train.main(["--solver", "solvers/landmark_solver.prototxt", "--iterations", "1"]) == 1
    err = capsys.readouterr().err
    assert "data/dental" in err and "python tools/prepare_dental.py" in err


def test_single_dash_flags_as_the_caffe_binary(cli_dir, capsys):
    from caffe_compat.cli import train

    assert train.main(["-solver", "solver.prototxt", "-weights", "init.caffemodel", "-iterations", "1"]) == 0
    assert "Optimization Done." in capsys.readouterr().err


def test_checkout_tools_run_their_own_library(tmp_path):
    """`python tools/x.py` from a source checkout imports that checkout's caffe_compat even when
    another copy comes earlier on the path (e.g. an editable install of a second clone)."""
    import os
    import subprocess
    import sys

    shadow = tmp_path / "shadow"
    (shadow / "caffe_compat").mkdir(parents=True)
    (shadow / "caffe_compat" / "__init__.py").write_text('raise ImportError("the shadow copy was imported")\n')
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    for tool in ("train.py", "summary.py"):
        r = subprocess.run(
            [sys.executable, str(root / "tools" / tool), "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert r.returncode == 0, (tool, r.stderr[-500:])


def test_channels_last_flag_trains_to_caffes_snapshots_and_resumes(cli_dir, capsys):
    """--channels_last (a speed opt-in) keeps the result within real Caffe's tolerance, and a run
    resumed with it from Caffe's own snapshot ends at Caffe's iteration 8."""
    assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel", "--channels_last"]) == 0
    assert "Nets in channels_last memory format (--channels_last)" in messages(capsys.readouterr().err)
    for n in (4, 8):
        assert_caffemodels_close(f"snap_iter_{n}.caffemodel", f"ref_snap_iter_{n}.caffemodel")
        assert_states_close(f"snap_iter_{n}.solverstate", f"ref_snap_iter_{n}.solverstate")
    for suffix in ("caffemodel", "solverstate"):
        shutil.copy(f"ref_snap_iter_4.{suffix}", f"snap_iter_4.{suffix}")
    assert train.main(["--solver", "solver.prototxt", "--snapshot", "snap_iter_4.solverstate", "--channels_last"]) == 0
    assert_caffemodels_close("snap_iter_8.caffemodel", "ref_snap_iter_8.caffemodel")
    assert_states_close("snap_iter_8.solverstate", "ref_snap_iter_8.solverstate")


def test_compile_flag_compiles_every_net_and_is_restored(cli_dir, monkeypatch):
    from caffe_compat import mode
    from caffe_compat.net import Net

    compiled = []
    monkeypatch.setattr(Net, "compile", lambda self, enable=True, **options: compiled.append(self.phase) or self)
    assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel", "--compile"]) == 0
    assert sorted(compiled) == sorted([caffe_pb2.TRAIN, caffe_pb2.TEST])  # the train net and the test net
    assert mode.compile_enabled() == (False, {})
