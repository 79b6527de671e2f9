"""Reliability (issue 23): nothing that only looks writes, no hang or unbounded read, messages
that name their file, nothing left behind, lists read as bytes. Every bad input is built for real
(files on disk, a FIFO, a NaN)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.errors import DataError, FormatError, LayerError, PrototxtError

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
        [
            sys.executable,
            "-m",
            "caffe_compat",
            "summary",
            str(proto),
            "--batch",
            "2",
            "--draw",
            str(tmp_path / "n.dot"),
        ],
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
    from caffe_compat.cli import draw_net

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


def test_time_tool_leaves_the_file_alone(tmp_path):
    """``caffe time`` runs forward and backward passes only to time them: an HDF5Output layer's
    existing file keeps its bytes."""
    from caffe_compat.cli import time as time_tool

    out = tmp_path / "results.h5"
    before, mtime = _existing_h5(out)
    proto = _hdf5_output_net(tmp_path, out)
    assert time_tool.main(["--model", str(proto), "--iterations", "2"]) == 0
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime


def test_hdf5output_opens_on_first_forward_and_not_when_disabled(tmp_path):
    out = tmp_path / "results.h5"
    before, mtime = _existing_h5(out)
    proto = _hdf5_output_net(tmp_path, out)
    net = caffe.Net(str(proto), caffe.TEST)
    net.disable_output_files()  # what `caffe time` does
    net.forward()
    net.backward()
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    net.disable_output_files(False)
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
    state.write_state(
        state.SolverStateData(iter=3, history=[np.ones(2, np.float32)]), tmp_path / "s.solverstate.h5", hdf5=True
    )
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
    cio.write_caffemodel(
        caffe.proto.caffe_pb2.NetParameter(name="n", layer=[{"name": "a", "type": "ReLU"}]), tmp_path / "b.caffemodel"
    )
    assert not left[0].exists() and (tmp_path / "b.caffemodel").exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_snapshot_files_get_the_umask_permissions(tmp_path, mask, mode):
    from caffe_compat import io as cio
    from caffe_compat.solvers import state

    old = os.umask(mask)
    try:
        cio.write_caffemodel(
            caffe.proto.caffe_pb2.NetParameter(name="n", layer=[{"name": "a", "type": "ReLU"}]),
            tmp_path / "a.caffemodel",
        )
        state.write_state(state.SolverStateData(iter=1), tmp_path / "a.solverstate")
        state.write_state(state.SolverStateData(iter=1), tmp_path / "a.solverstate.h5", hdf5=True)
    finally:
        os.umask(old)
    for name in ("a.caffemodel", "a.solverstate", "a.solverstate.h5"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# -- item 2: no hang, no unbounded read ---------------------------------------------------------


class _NoHang:
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""

    def __init__(self, seconds: int = 20):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fire(signum, frame):
            raise AssertionError(f"blocked for {self.seconds} s: the file was opened and read")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def _lenet_like(tmp_path: Path) -> Path:
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(
        'name: "n"\n'
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 6 } }\n'
    )
    return proto


def _bad_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, the words the refusal must use)."""
    fifo = tmp_path / "pipe.caffemodel"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.caffemodel"
    folder.mkdir()
    return {
        "fifo": (str(fifo), r"is a FIFO \(named pipe\), not a regular file"),
        "device": ("/dev/zero", "is a device, not a regular file"),
        "directory": (str(folder), "is a directory, not a regular file"),
    }


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_weights_that_are_not_regular_files_are_refused_at_once(tmp_path, capsys, kind):
    from caffe_compat.cli import test as test_tool

    path, words = _bad_paths(tmp_path)[kind]
    proto = _lenet_like(tmp_path)
    with _NoHang():
        with pytest.raises(FormatError, match=f"^{path}: {words}"):
            caffe.Net(str(proto), caffe.TEST, weights=path)
        rc = test_tool.main(["--model", str(proto), "--weights", path, "--iterations", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert re.search(f"^test.py: error: {path}: {words}", err, re.M)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_mean_file_solverstate_and_learned_net_not_regular(tmp_path, kind):
    from caffe_compat.data.transformer import load_mean_file
    from caffe_compat.solvers import state

    path, words = _bad_paths(tmp_path)[kind]
    with _NoHang():
        with pytest.raises(DataError, match=f"^{path}: {words} \\(expected a mean_file"):
            load_mean_file(path)
        with pytest.raises(FormatError, match=f"^{path}: {words}"):
            state.read_state(path)
        st = tmp_path / "s.solverstate"
        state.write_state(state.SolverStateData(iter=5, learned_net=path), st)
        with pytest.raises(FormatError, match=f"^{path}: {words} .*learned_net in {st}"):
            state.read_state(st)
        state.write_state(state.SolverStateData(iter=5, learned_net=path), str(st) + ".h5", hdf5=True)
        with pytest.raises(FormatError, match=f"learned_net in {st}.h5"):
            state.read_state(str(st) + ".h5")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_data_sources_and_lists_not_regular(tmp_path, kind):
    path, words = _bad_paths(tmp_path)[kind]
    h5list = tmp_path / "h5list.txt"
    h5list.write_text(path + "\n")
    cases = [
        (f'type: "ImageData" top: "d" top: "l" image_data_param {{ source: "{path}" batch_size: 1 }}', path),
        (f'type: "HDF5Data" top: "d" hdf5_data_param {{ source: "{path}" batch_size: 1 }}', path),
        (f'type: "HDF5Data" top: "d" hdf5_data_param {{ source: "{h5list}" batch_size: 1 }}', path),
    ]
    for body, named in cases:
        proto = tmp_path / "data.prototxt"
        proto.write_text(f'layer {{ name: "src" {body} }}\n')
        with _NoHang(), pytest.raises(DataError, match=f"layer 'src' .*{named}.*{words}"):
            caffe.Net(str(proto), caffe.TRAIN)


def test_prototxt_fifo_and_too_large_text(tmp_path):
    from caffe_compat import io as cio

    fifo = tmp_path / "net.prototxt"
    os.mkfifo(fifo)
    with _NoHang(), pytest.raises(FormatError, match=f"^{fifo}: is a FIFO"):
        caffe.Net(str(fifo), caffe.TEST)
    big = tmp_path / "big.prototxt"
    with open(big, "wb") as f:  # sparse: no 33 MiB written
        f.truncate(cio.MAX_PROTOTXT_BYTES + 1)
    with pytest.raises(FormatError, match=f"^{big}: is {cio.MAX_PROTOTXT_BYTES + 1} bytes, more than"):
        cio.read_net(big)
    text = 'name: "x"\n' + "#" * cio.MAX_PROTOTXT_BYTES
    with pytest.raises(PrototxtError, match=r"^<text>: \d+ characters of text, more than .*160 bytes of memory"):
        cio.read_net_text(text, filename="<text>")


def test_caffemodel_larger_than_protobuf_allows(tmp_path):
    big = tmp_path / "huge.caffemodel"
    with open(big, "wb") as f:
        f.truncate(2**31)  # sparse: nothing is written
    with _NoHang(), pytest.raises(FormatError, match=f"^{big}: is 2147483648 bytes, more than the 2147483647"):
        caffe.Net(str(_lenet_like(tmp_path)), caffe.TEST, weights=str(big))


def _model_with_blob(tmp_path: Path, dims, values=(), double=False, name="w.caffemodel") -> Path:
    from caffe_compat.proto import caffe_pb2

    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="ip", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend(dims)
    (blob.double_data if double else blob.data).extend(values)
    path = tmp_path / name
    path.write_bytes(net.SerializeToString())
    return path


@pytest.mark.parametrize(
    "dims, words",
    [
        ([2**40, 2**40], r"declares 1208925819614629174706176 elements, more than the 2147483647"),
        ([65536, 32768], r"declares 2147483648 elements, more than the 2147483647"),
        ([1] * 33, r"33 axes; Caffe allows at most 32"),
        ([3, -2], r"negative dimension"),
    ],
)
def test_blob_shape_limits_name_file_and_layer(tmp_path, dims, words):
    path = _model_with_blob(tmp_path, dims)
    with pytest.raises(FormatError, match=f"^{path}: layer 'ip' \\(InnerProduct\\) blob 0: .*{words}"):
        caffe.Net(str(_lenet_like(tmp_path)), caffe.TEST, weights=str(path))


def test_input_and_dummydata_absurd_shapes_name_layer_and_bytes(tmp_path, monkeypatch):
    from caffe_compat.layers import common

    proto = tmp_path / "n.prototxt"
    proto.write_text(
        'layer { name: "big_in" type: "Input" top: "x" '
        "input_param { shape { dim: 100000 dim: 100000 dim: 100000 } } }\n"
    )
    with pytest.raises(
        LayerError, match=r"big_in.*\[100000, 100000, 100000\] has 1000000000000000 elements \(4000000000000000 bytes"
    ):
        caffe.Net(str(proto), caffe.TEST)
    proto.write_text(
        'layer { name: "noise" type: "DummyData" top: "x" dummy_data_param { num: 1000 channels: 1000 height: 1000 width: 1000 } }\n'
    )
    with pytest.raises(LayerError, match=r"noise.*4000000000000 bytes"):
        caffe.Net(str(proto), caffe.TEST)
    # under Caffe's limit but more than this machine has (pretend it has 1 MiB)
    monkeypatch.setattr(common, "_physical_memory", lambda: 1 << 20)
    proto.write_text(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 512 dim: 512 } } }\n'
    )
    with pytest.raises(LayerError, match=r"'in'.*needs 3145728 bytes as float32, more than this machine's 1048576"):
        caffe.Net(str(proto), caffe.TEST)


# -- item 6: every message names its file -----------------------------------------------------


def test_blob_value_count_names_file_layer_and_blob(tmp_path):
    path = _model_with_blob(tmp_path, [6, 16], values=[1.0, 2.0, 3.0], double=True)
    with pytest.raises(
        FormatError,
        match=rf"^{path}: layer 'ip' \(InnerProduct\) blob 0: shape \(6, 16\) needs 96 values but 'double_data' holds 3",
    ):
        caffe.Net(str(_lenet_like(tmp_path)), caffe.TEST, weights=str(path))


def _corrupt_h5(path: Path, name: str = "data") -> None:
    """An HDF5 file whose chunked, compressed dataset ``name`` has damaged chunk bytes."""
    with h5py.File(path, "w") as f:
        f.create_dataset(
            name, data=np.arange(4000, dtype=np.float32).reshape(40, 100), chunks=(40, 100), compression="gzip"
        )
        offset = f[name].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))


def test_hdf5_read_error_names_file_and_dataset(tmp_path):
    h5 = tmp_path / "bad.h5"
    _corrupt_h5(h5)
    with h5py.File(h5, "r") as f, pytest.raises(OSError, match="Can't synchronously read data"):
        f["data"][()]  # what h5py says, naming nothing
    lst = tmp_path / "list.txt"
    lst.write_text(f"{h5}\n")
    proto = tmp_path / "n.prototxt"
    proto.write_text(
        f'layer {{ name: "src" type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{lst}" batch_size: 4 }} }}\n'
    )
    with pytest.raises(
        DataError,
        match=rf"layer 'src' \(HDF5Data\): {h5}: dataset 'data' \(entry 1 of '{lst}'\): cannot read it: HDF5 error \(Can't synchronously read data",
    ):
        caffe.Net(str(proto), caffe.TRAIN)


def _weights_h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        build(g)
    return path


def test_caffemodel_h5_refused_whole(tmp_path):
    from caffe_compat import io as cio

    w = np.arange(96, dtype=np.float32).reshape(6, 16)
    b = np.arange(6, dtype=np.float32)

    def good(g):
        g.create_group("data")
        ip = g.create_group("ip")
        ip["0"], ip["1"] = w, b

    ok = cio.read_caffemodel_h5(_weights_h5(tmp_path / "ok.h5", good), layers={"ip": (2, ())})
    np.testing.assert_array_equal(ok["ip"][0], w)
    np.testing.assert_array_equal(ok["ip"][1], b)

    def missing(g):
        g.create_group("ip")["0"] = w

    def string(g):
        ip = g.create_group("ip")
        ip["0"] = w
        ip["1"] = np.array([b"abc", b"def"])

    def compound(g):
        ip = g.create_group("ip")
        ip["0"] = w
        ip["1"] = np.zeros(6, dtype=[("a", "<f4"), ("b", "<i4")])

    def dangling(g):
        ip = g.create_group("ip")
        ip["0"] = w
        ip["1"] = h5py.SoftLink("/nowhere/1")

    def external(g):
        ip = g.create_group("ip")
        ip["0"] = w
        ip["1"] = h5py.ExternalLink(str(tmp_path / "absent.h5"), "/x")

    cases = {
        "missing": (missing, r"layer 'ip': incompatible number of blobs: blob 1 is missing"),
        "string": (string, r"layer 'ip' blob '1' \(dataset data/ip/1\) has type \|S3; only float and integer"),
        "compound": (compound, r"layer 'ip' blob '1' \(dataset data/ip/1\) has type .*only float and integer"),
        "dangling": (
            dangling,
            r"layer 'ip' blob '1' is a SoftLink to '/nowhere/1', not a stored blob; incompatible number of blobs",
        ),
        "external": (external, r"layer 'ip' blob '1' is a ExternalLink"),
    }
    for name, (build, words) in cases.items():
        path = _weights_h5(tmp_path / f"{name}.h5", build)
        with pytest.raises(FormatError, match=f"^{path}: {words}"):
            cio.read_caffemodel_h5(path, layers={"ip": (2, ())})
    # a shared parameter may be absent, as in Caffe
    got = cio.read_caffemodel_h5(tmp_path / "missing.h5", layers={"ip": (2, (1,))})
    assert sorted(got["ip"]) == [0]

    def extra(g):
        ip = g.create_group("ip")
        ip["0"], ip["1"], ip["2"] = w, b, b

    path = _weights_h5(tmp_path / "extra.h5", extra)
    with pytest.raises(
        FormatError, match=r"incompatible number of blobs: the file has \[0, 1, 2\], the net's layer has 2"
    ):
        cio.read_caffemodel_h5(path, layers={"ip": (2, ())})
    fifo = tmp_path / "w.caffemodel.h5"
    os.mkfifo(fifo)
    with _NoHang(), pytest.raises(FormatError, match=f"^{fifo}: is a FIFO"):
        cio.read_caffemodel_h5(fifo)


# -- item 9: lists are bytes, as in Caffe --------------------------------------------------------

LATIN1_NAME = b"caf\xe9 cr\xe8me.png"  # not UTF-8: Latin-1 é and è


def _latin1_png(folder: Path, pixels: np.ndarray, name: bytes = LATIN1_NAME) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(buf.tobytes())
    return name


def test_image_list_with_latin1_names(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    name = _latin1_png(tmp_path, pixels)
    lst = tmp_path / "list.txt"
    lst.write_bytes(name + b" 4\n")
    with pytest.raises(UnicodeDecodeError):
        lst.read_text(encoding="utf-8")  # the list is really not UTF-8
    proto = tmp_path / "n.prototxt"
    proto.write_text(
        f'layer {{ name: "src" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{lst}" '
        f'root_folder: "{tmp_path}/" batch_size: 1 }} }}\n'
    )
    net = caffe.Net(str(proto), caffe.TEST)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data[0], pixels.transpose(2, 0, 1).astype(np.float32))
    assert net.blobs["label"].data[0] == 4


def test_image_list_unreadable_line_is_file_line(tmp_path):
    from caffe_compat.data.image_list import read_image_list

    lst = tmp_path / "list.txt"
    lst.write_bytes(b"a.png 1\n\nb\x00c.png 2\n")
    with pytest.raises(DataError, match=rf"^{lst}:3: unreadable line: it holds a NUL byte"):
        read_image_list(str(lst))
    lst.write_bytes(b"a.png 1\n" + LATIN1_NAME + b" \xe9\n")
    with pytest.raises(DataError, match=rf"^{lst}:2: label '\\udce9' is not an integer"):
        read_image_list(str(lst))


def test_hdf5_source_list_with_latin1_names(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"donn\xe9es.h5")
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    with h5py.File(os.fsdecode(name), "w") as f:
        f["data"] = rows
    lst = tmp_path / "h5.txt"
    lst.write_bytes(name + b"\n")
    proto = tmp_path / "n.prototxt"
    proto.write_text(
        f'layer {{ name: "src" type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{lst}" batch_size: 4 }} }}\n'
    )
    net = caffe.Net(str(proto), caffe.TRAIN)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, rows)
    lst.write_bytes(name + b"\nbad\x00name.h5\n")
    with pytest.raises(DataError, match=rf"{lst}:2: unreadable line: it holds a NUL byte"):
        caffe.Net(str(proto), caffe.TRAIN)


def test_dental_csv_with_latin1_names_and_unreadable_line(tmp_path):
    from caffe_compat.dental.dataset import CSV_COLUMNS, read_dataset

    gray = np.zeros((20, 40), np.uint8)
    gray[:, :20] = 50
    gray[:, 20:] = 200
    name = _latin1_png(tmp_path, gray, b"radiographie_\xe9t\xe9.png")
    coords = [b"5", b"10"] * 4 + [b"30", b"10"] * 4
    header = ",".join(CSV_COLUMNS).encode()
    csv_path = tmp_path / "landmarks.csv"
    csv_path.write_bytes(header + b"\n" + b",".join([name, *coords, b"0.1"]) + b"\n")
    samples = read_dataset(str(tmp_path))
    assert [os.fsencode(s.name) for s in samples] == [name]
    np.testing.assert_allclose(samples[0].image, gray / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(samples[0].landmarks.ravel(), [float(c) for c in coords], rtol=0, atol=0)
    csv_path.write_bytes(
        header
        + b"\n"
        + b",".join([name, *coords, b"0.1"])
        + b"\n"
        + b",".join([b"x\x00y.png", *coords, b"0.1"])
        + b"\n"
    )
    with pytest.raises(DataError, match=rf"\n{csv_path}:3: unreadable line: it holds a NUL byte"):
        read_dataset(str(tmp_path))


def test_images_that_are_fifos_or_latin1_names(tmp_path):
    """An image path that is a FIFO is refused at once (OpenCV would block on it); an image whose
    name is not UTF-8 loads (OpenCV's imread crashes the process on such a name)."""
    from caffe_compat.data.image_list import read_image
    from caffe_compat.pycaffe_io import load_image

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with _NoHang():
        with pytest.raises(DataError, match=rf"^list.txt:3: {fifo}: is a FIFO \(named pipe\), not a regular file"):
            read_image(str(fifo), where="list.txt:3")
        with pytest.raises(DataError, match=rf"^load_image: {fifo}: is a FIFO"):
            load_image(str(fifo))
    rgb = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    name = _latin1_png(tmp_path, rgb[:, :, ::-1].copy())  # written as BGR, as OpenCV does
    got = load_image(os.fsdecode(os.path.join(os.fsencode(tmp_path), name)))
    np.testing.assert_allclose(got, rgb / 255.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_train_tool_resume_whose_learned_net_is_a_fifo(tmp_path, monkeypatch, fmt):
    """``train.py --snapshot``: the state's learned_net is a FIFO; refused at once, exit status 1,
    the message names the FIFO and the state file (a subprocess, so a hang would time out)."""
    import shutil

    src = REPO / "tests" / "fixtures" / "caffe_reference" / "solvers" / "sgd_step"
    for name in ("solver.prototxt", "train.prototxt", "data.h5", "h5list.txt"):
        shutil.copy(src / name, tmp_path / name)
    from caffe_compat.solvers import state

    fifo = tmp_path / "final_iter_2.caffemodel"
    os.mkfifo(fifo)
    snap = tmp_path / ("final_iter_2.solverstate" + (".h5" if fmt == "HDF5" else ""))
    state.write_state(state.SolverStateData(iter=2, learned_net=fifo.name), snap, hdf5=fmt == "HDF5")
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--solver", "solver.prototxt", "--snapshot", snap.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert re.search(
        rf"train.py: error: {fifo.name}: is a FIFO \(named pipe\), not a regular file .*learned_net in {snap.name}",
        res.stderr,
    ), res.stderr
