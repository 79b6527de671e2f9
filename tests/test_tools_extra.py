"""tools/parse_log.py (Caffe's tools/extra/parse_log.py) and tools/extract_features.py.

parse_log reads real Caffe's log of the cli fixture (glog's yyyymmdd dates) and tools/train.py's
log of the same run (mmdd dates); extract_features writes LMDBs that are read back record by
record against the fixture's HDF5 data and a separate forward of the net.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
import torch

from caffe_compat.cli import extract_features, train
from caffe_compat.cli import parse_log as parse_log_tool
from caffe_compat.net import TEST, Net
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers.log import parse_log

CLI = Path(__file__).parent / "fixtures" / "caffe_reference" / "cli" / "train_test_snapshot"
CAFFE_LOG = CLI / "caffe_train.log"


def test_parse_log_reads_caffes_log():
    train_rows, test_rows = parse_log(str(CAFFE_LOG))
    # the log's 'Train net output' / 'Test net output' lines, by iteration
    assert [r["NumIters"] for r in train_rows] == [0.0, 2.0, 4.0, 6.0]
    assert [r["loss"] for r in train_rows] == [1.38919, 1.16553, 0.940875, 0.878576]
    assert [r["NumIters"] for r in test_rows] == [0.0, 4.0, 8.0]
    assert [r["loss"] for r in test_rows] == [1.87234, 0.984055, 0.886448]
    # lr: the last 'lr = ' printed before the row (Caffe prints it after the outputs); the first
    # row takes the second's
    assert [r["LearningRate"] for r in train_rows] == [0.02, 0.02, 0.02, 0.01]
    assert [r["LearningRate"] for r in test_rows] == [0.02, 0.02, 0.01]
    # seconds since the 'Solving' line (22:35:47.819968): train row 0 at 22:35:47.820338
    assert train_rows[0]["Seconds"] == pytest.approx(0.000370, abs=1e-9)
    assert test_rows[0]["Seconds"] == pytest.approx(0.000280, abs=1e-9)
    assert list(train_rows[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]


def test_parse_log_of_tools_train_matches_caffes(tmp_path, monkeypatch, capsys):
    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    monkeypatch.chdir(d)
    assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel"]) == 0
    log_path = d / "ours.log"
    log_path.write_text(capsys.readouterr().err)
    ours, theirs = parse_log(str(log_path)), parse_log(str(CAFFE_LOG))
    for a_rows, b_rows in zip(ours, theirs):
        assert [r["NumIters"] for r in a_rows] == [r["NumIters"] for r in b_rows]
        assert [r["LearningRate"] for r in a_rows] == [r["LearningRate"] for r in b_rows]
        np.testing.assert_allclose([r["loss"] for r in a_rows], [r["loss"] for r in b_rows], rtol=5e-5, atol=1e-6)
        assert all(0 <= r["Seconds"] < 600 for r in a_rows)


def _glog(month_day: str, clock: str, msg: str) -> str:
    return f"I{month_day} {clock}.000000  1234 solver.cpp:1] {msg}"


def test_parse_log_mmdd_dates_across_new_year_and_nan(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "\n".join(
            [
                _glog("1231", "23:59:50", "Solving net"),
                "a continuation line without a prefix",
                _glog("1231", "23:59:55", "Iteration 0, loss = 2"),
                _glog("1231", "23:59:55", "    Train net output #0: loss = 2 (* 1 = 2 loss)"),
                _glog("1231", "23:59:55", "    Train net output #1: acc = 0.5"),
                _glog("1231", "23:59:56", "Iteration 0, lr = 0.1"),
                _glog("0101", "00:00:05", "Iteration 10, loss = nan"),
                _glog("0101", "00:00:05", "    Train net output #0: loss = nan (* 1 = nan loss)"),
                _glog("0101", "00:00:05", "    Train net output #1: acc = 1e-3"),
            ]
        )
        + "\n"
    )
    rows, test_rows = parse_log(str(log))
    assert test_rows == []
    assert [r["NumIters"] for r in rows] == [0.0, 10.0]
    assert rows[0]["Seconds"] == pytest.approx(5.0) and rows[1]["Seconds"] == pytest.approx(15.0)
    assert np.isnan(rows[1]["loss"]) and rows[1]["acc"] == pytest.approx(1e-3)
    assert rows[0]["LearningRate"] == 0.1  # the second row's (first row printed before any lr)


def test_parse_log_tool_writes_train_and_test_csv(tmp_path):
    out = tmp_path / "csv"
    out.mkdir()
    assert parse_log_tool.main([str(CAFFE_LOG), str(out), "--delimiter", ";"]) == 0
    with open(out / "caffe_train.log.train", newline="") as f:
        table = list(csv.reader(f, delimiter=";"))
    assert table[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert len(table) == 5 and table[1][0] == "0.0" and float(table[2][3]) == 1.16553
    with open(out / "caffe_train.log.test", newline="") as f:
        assert len(list(csv.reader(f, delimiter=";"))) == 4


def test_parse_log_tool_errors(tmp_path, capsys):
    assert parse_log_tool.main([str(tmp_path / "nope.log"), str(tmp_path)]) == 1
    assert "nope.log: no such log file" in capsys.readouterr().err
    assert parse_log_tool.main([str(CAFFE_LOG), str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err


def _records(path: Path) -> list[tuple[bytes, caffe_pb2.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [(k, caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    finally:
        env.close()


def test_extract_features_writes_caffes_datum_records(tmp_path, monkeypatch):
    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    monkeypatch.chdir(d)
    args = ["init.caffemodel", "train.prototxt", "ip2,data,pool1", "f_ip2,f_data,f_pool1", "3", "lmdb"]
    assert extract_features.main(args) == 0
    with h5py.File("data.h5", "r") as f:
        data = np.asarray(f["data"], dtype=np.float32)  # (12, 1, 8, 8): three batches of 4, in order
    # an independent pass over the same batches: ip2 and pool1 of each
    net = Net("train.prototxt", phase=TEST)
    net.copy_from("init.caffemodel")
    ip2, pool1 = [], []
    for _ in range(3):
        net.forward()
        ip2.append(np.array(net.blobs["ip2"].data))
        pool1.append(np.array(net.blobs["pool1"].data))
    ip2, pool1 = np.concatenate(ip2), np.concatenate(pool1)
    for db, expected, chw in (("f_data", data, (1, 8, 8)), ("f_ip2", ip2, (6, 1, 1)), ("f_pool1", pool1, (4, 4, 4))):
        records = _records(d / db)
        assert [k for k, _ in records] == [f"{i:010d}".encode() for i in range(12)]
        for i, (_, datum) in enumerate(records):
            assert (datum.channels, datum.height, datum.width) == chw
            assert datum.data == b"" and not datum.HasField("label")
            np.testing.assert_allclose(
                np.array(datum.float_data, np.float32), expected[i].ravel(), rtol=1e-6, atol=1e-7
            )


@pytest.mark.parametrize(
    "args, message",
    [
        (["ip2,data", "only_one", "1", "lmdb"], "2 blob names but 1 dataset names"),
        (["ip2", "out", "1", "leveldb"], "LevelDB is not supported"),
        (["nope", "out", "1", "lmdb"], "Unknown feature blob name 'nope'"),
        (["ip2", "out", "x", "lmdb"], "num_mini_batches 'x' is not an integer"),
        (["ip2", "existing", "1", "lmdb"], "already exists"),
    ],
)
def test_extract_features_errors(tmp_path, monkeypatch, capsys, args, message):
    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    monkeypatch.chdir(d)
    os.mkdir("existing")
    assert extract_features.main(["init.caffemodel", "train.prototxt", *args]) == 1
    assert message in capsys.readouterr().err


def test_glog_log_dir_files_and_parse_log(tmp_path, monkeypatch, capsys):
    """With GLOG_log_dir, tools/train.py writes glog's per-level files and the caffe.INFO link,
    which parse_log reads like Caffe's own."""
    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    logs = tmp_path / "logs"
    monkeypatch.chdir(d)
    monkeypatch.setenv("GLOG_log_dir", str(logs))
    try:
        assert train.main(["--solver", "solver.prototxt", "--weights", "init.caffemodel"]) == 0
        logging.getLogger("caffe_compat").warning("a warning line")
        logging.getLogger("caffe_compat").error("an error line")
    finally:
        monkeypatch.delenv("GLOG_log_dir")
        from caffe_compat.solvers.log import setup_logging

        setup_logging()  # close the files
    capsys.readouterr()
    info = (logs / "caffe.INFO").resolve()
    assert os.path.islink(logs / "caffe.INFO") and info.name.startswith("caffe.") and ".log.INFO." in info.name
    text = info.read_text()
    assert text.startswith("Log file created at: ") and "Log line format: [IWEF]mmdd" in text
    assert "Solving solver_case" in text and "a warning line" in text and "an error line" in text
    warning = (logs / "caffe.WARNING").read_text()
    assert "a warning line" in warning and "an error line" in warning and "Solving" not in warning
    error = (logs / "caffe.ERROR").read_text()
    assert "an error line" in error and "a warning line" not in error
    train_rows, test_rows = parse_log(str(logs / "caffe.INFO"))
    theirs = parse_log(str(CAFFE_LOG))
    assert [r["NumIters"] for r in train_rows] == [r["NumIters"] for r in theirs[0]]
    assert [r["NumIters"] for r in test_rows] == [r["NumIters"] for r in theirs[1]]


def test_caffe_command_line_dispatches_like_the_caffe_binary(tmp_path, monkeypatch, capsys):
    from caffe_compat.cli import caffe_cli

    d = tmp_path / "cli"
    shutil.copytree(CLI, d)
    monkeypatch.chdir(d)
    # gflags' one-dash flags, as in shell scripts written for Caffe
    assert caffe_cli.main(["train", "-solver", "solver.prototxt", "-weights", "init.caffemodel"]) == 0
    err = capsys.readouterr().err
    assert "Solving solver_case" in err and "Optimization Done." in err
    assert (d / "snap_iter_8.caffemodel").is_file()
    assert (
        caffe_cli.main(["test", "-model", "train.prototxt", "-weights", "snap_iter_8.caffemodel", "-iterations", "2"])
        == 0
    )
    assert "Loss: " in capsys.readouterr().err
    assert caffe_cli.main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert "unknown action: frobnicate" in err and "device_query" in err
    assert caffe_cli.main([]) == 1 and "usage: caffe <command> <args>" in capsys.readouterr().err
    status = caffe_cli.main(["device_query"])
    assert status == 1 and "Need a device ID" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert caffe_cli.main(["device_query", "-gpu", "0"]) == 1
        assert "no CUDA device" in capsys.readouterr().err


def test_parse_log_plots_caffes_curves(tmp_path, capsys):
    """--plot draws real Caffe's logged values (the numbers of its 'Train/Test net output' and
    'lr = ' lines) against the iteration, train and test, and writes a PNG."""
    pytest.importorskip("matplotlib", reason="--plot needs the [paper] extra")
    import matplotlib.pyplot as plt

    png = tmp_path / "curves.png"
    assert parse_log_tool.main([str(CAFFE_LOG), "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    train_rows, test_rows = parse_log(str(CAFFE_LOG))
    fig = parse_log_tool.draw_curves(train_rows, test_rows)
    loss, acc, lr = fig.axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in loss.lines}
    assert lines["train loss"] == ([0.0, 2.0, 4.0, 6.0], [1.38919, 1.16553, 0.940875, 0.878576])
    assert lines["test loss"] == ([0.0, 4.0, 8.0], [1.87234, 0.984055, 0.886448])
    assert not acc.lines  # the fixture's net has no Accuracy layer: said in the panel
    assert any("no accuracy output" in t.get_text() for t in acc.texts)
    assert list(lr.lines[0].get_ydata()) == [0.02, 0.02, 0.02, 0.01]
    plt.close(fig)
    assert parse_log_tool.main([str(CAFFE_LOG)]) == 1
    assert "give an OUTPUT_DIR for the CSV files, --plot curves.png, or both" in capsys.readouterr().err
