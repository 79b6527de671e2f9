"""Reading and writing Caffe's text and binary files, and their error messages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from caffe_compat import io as cio
from caffe_compat.errors import FormatError, PrototxtError, SolverError
from caffe_compat.proto import caffe_pb2

REF = Path(__file__).parent / "fixtures" / "caffe_reference"
PROTOTXTS = sorted(REF.rglob("*.prototxt"))
CAFFEMODELS = sorted(REF.rglob("*.caffemodel"))
SOLVERSTATES = sorted(REF.rglob("*.solverstate"))


def _is_solver(path: Path) -> bool:
    return "solver" in path.name


def _ids(paths):
    return [str(p.relative_to(REF)) for p in paths]


# ---------------------------------------------------------------------------------------------
# Every fixture reads


def test_fixture_lists_are_not_empty():
    assert len(PROTOTXTS) > 90
    assert len(CAFFEMODELS) > 70
    assert len(SOLVERSTATES) > 15


@pytest.mark.parametrize("path", PROTOTXTS, ids=_ids(PROTOTXTS))
def test_every_fixture_prototxt_parses(path):
    cls = caffe_pb2.SolverParameter if _is_solver(path) else caffe_pb2.NetParameter
    msg = cio.read_prototxt(path, cls)
    assert msg.ListFields(), f"{path} parsed to an empty message"
    if _is_solver(path):
        solver = cio.read_solver(path)
        assert solver.type in ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
        assert not solver.HasField("solver_type")
    else:
        net = cio.read_net(path)
        assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
        assert len(net.layer) > 0
    # text written by us parses back to the same message
    assert cio.parse_prototxt(cio.message_to_text(msg), cls) == msg


@pytest.mark.parametrize("path", CAFFEMODELS, ids=_ids(CAFFEMODELS))
def test_every_caffemodel_round_trips(path, tmp_path):
    net = cio.read_caffemodel(path)
    assert len(net.layer) > 0
    out = tmp_path / "copy.caffemodel"
    cio.write_caffemodel(net, out)
    assert cio.read_caffemodel(out) == net
    if "legacy" not in path.parts:  # current-format files come back byte for byte
        assert out.read_bytes() == path.read_bytes()
    for layer in net.layer:
        for i, blob in enumerate(layer.blobs):
            arr = cio.blob_to_array(blob, what=f"{path}: {layer.name}[{i}]")
            assert np.all(np.isfinite(arr))


@pytest.mark.parametrize("path", SOLVERSTATES, ids=_ids(SOLVERSTATES))
def test_every_solverstate_round_trips(path, tmp_path):
    state = cio.read_solverstate(path)
    assert state.iter > 0
    assert state.learned_net.endswith(".caffemodel")
    out = tmp_path / "copy.solverstate"
    cio.write_solverstate(state, out)
    assert cio.read_solverstate(out) == state
    assert out.read_bytes() == path.read_bytes()
    for blob in state.history:
        cio.blob_to_array(blob)


def test_binaryproto_mean_file(tmp_path):
    blob = cio.read_blobproto(REF / "data_layers" / "mean.binaryproto")
    arr = cio.blob_to_array(blob)
    assert arr.shape == (1, 3, 8, 10)
    assert arr.dtype == np.float32
    cio.write_blobproto(blob, tmp_path / "m.binaryproto")
    np.testing.assert_allclose(cio.blob_to_array(cio.read_blobproto(tmp_path / "m.binaryproto")), arr, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Blobs and arrays


def test_double_data_reads_same_values_as_float():
    floats = cio.read_caffemodel(REF / "legacy" / "lenet_v1_upgraded_by_caffe.caffemodel")
    doubles = cio.read_caffemodel(REF / "legacy" / "lenet_double_data.caffemodel")
    n = 0
    for lf, ld in zip(floats.layer, doubles.layer, strict=True):
        assert lf.name == ld.name
        for bf, bd in zip(lf.blobs, ld.blobs, strict=True):
            assert len(bd.double_data) > 0 and len(bd.data) == 0
            a, b = cio.blob_to_array(bf), cio.blob_to_array(bd)
            assert a.dtype == np.float32 and b.dtype == np.float64
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a.astype(np.float64), rtol=0, atol=0)
            n += 1
    assert n == 4


def test_legacy_dims_give_4d_shape():
    blob = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3)
    blob.data.extend(range(6))
    arr = cio.blob_to_array(blob)
    assert arr.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(arr.ravel(), np.arange(6, dtype=np.float32), rtol=0, atol=0)
    # legacy dims win over shape, as in Caffe's Blob::FromProto
    blob.shape.dim.extend([6])
    assert cio.blob_to_array(blob).shape == (1, 1, 2, 3)


def test_empty_shape_is_scalar():
    blob = caffe_pb2.BlobProto()
    blob.shape.SetInParent()
    blob.data.append(2.5)
    arr = cio.blob_to_array(blob)
    assert arr.shape == ()
    np.testing.assert_allclose(arr, 2.5, rtol=0, atol=0)


def test_count_mismatch_is_clear():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0] * 5)
    with pytest.raises(FormatError, match=r"conv1\[0\]: shape \(2, 3\) needs 6 values but 'data' holds 5"):
        cio.blob_to_array(blob, what="conv1[0]")


def test_array_to_blob_round_trip():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype(np.float64)
    g = rng.standard_normal((2, 3, 4))
    blob = cio.array_to_blob(a, diff=g)
    assert list(blob.shape.dim) == [2, 3, 4]
    assert len(blob.data) == 24 and len(blob.double_data) == 0
    assert not blob.HasField("num")
    np.testing.assert_allclose(cio.blob_to_array(blob), a.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_allclose(cio.blob_to_array(blob, diff=True), g.astype(np.float32), rtol=0, atol=0)
    dblob = cio.array_to_blob(a, double=True)
    assert len(dblob.double_data) == 24 and len(dblob.data) == 0
    np.testing.assert_allclose(cio.blob_to_array(dblob), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="diff shape"):
        cio.array_to_blob(a, diff=np.zeros(3))


# ---------------------------------------------------------------------------------------------
# Writers


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")
    cio.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(os.listdir(tmp_path)) == ["w.bin"]


def test_atomic_write_missing_folder(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        cio.atomic_write_bytes(tmp_path / "nope" / "w.bin", b"x")


def test_write_net_round_trip(tmp_path):
    net = cio.read_net(REF / "legacy" / "lenet_v1.prototxt")
    cio.write_net(net, tmp_path / "n.prototxt")
    assert cio.read_net(tmp_path / "n.prototxt") == net
    text = (tmp_path / "n.prototxt").read_text()
    assert "lr_mult: 1\n" in text  # integral floats written as C++ Caffe writes them
    assert "value: 0.1\n" in text


def test_solver_upgrade_and_snapshot_prefix(tmp_path, in_dir):
    path = tmp_path / "my_solver.prototxt"
    path.write_text('net: "train.prototxt"\nsolver_type: ADAM\nbase_lr: 0.01\n')
    solver = cio.read_solver(path)
    assert solver.type == "Adam"
    assert not solver.HasField("solver_type")
    assert solver.snapshot_prefix == str(tmp_path / "my_solver")

    (tmp_path / "snaps").mkdir()
    path.write_text('net: "t.prototxt"\nsnapshot_prefix: "snaps"\n')
    with in_dir(tmp_path):
        assert cio.read_solver("my_solver.prototxt").snapshot_prefix == os.path.join("snaps", "my_solver")
        path.write_text('net: "t.prototxt"\nsnapshot_prefix: "snaps/run1"\n')
        assert cio.read_solver("my_solver.prototxt").snapshot_prefix == "snaps/run1"

    out = tmp_path / "w.prototxt"
    cio.write_solver(solver, out)
    assert cio.read_prototxt(out, caffe_pb2.SolverParameter) == solver


def test_solver_type_and_type_both_set(tmp_path):
    path = tmp_path / "s.prototxt"
    path.write_text('solver_type: NESTEROV\ntype: "Adam"\n')
    with pytest.raises(SolverError, match=r"s\.prototxt: both 'solver_type'.*and 'type'"):
        cio.read_solver(path)


# ---------------------------------------------------------------------------------------------
# Errors on bad binary files


def _caffemodel_bytes() -> bytes:
    return (REF / "legacy" / "lenet_v1_upgraded_by_caffe.caffemodel").read_bytes()


def _assert_clean(excinfo):
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_truncated_caffemodel(tmp_path):
    data = _caffemodel_bytes()
    bad = tmp_path / "trunc.caffemodel"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"trunc\.caffemodel: not a valid Caffe \.caffemodel.*truncated") as ei:
        cio.read_caffemodel(bad)
    _assert_clean(ei)


def test_png_is_not_a_caffemodel(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    png = tmp_path / "img.caffemodel"
    ok, enc = cv2.imencode(".png", (rng.random((16, 16, 3)) * 255).astype(np.uint8))
    assert ok
    png.write_bytes(enc.tobytes())
    with pytest.raises(FormatError, match=r"img\.caffemodel: .*PNG image"):
        cio.read_caffemodel(png)


def test_random_bytes_are_not_a_caffemodel(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(5):
        f = tmp_path / f"r{i}.caffemodel"
        f.write_bytes(rng.bytes(300))
        with pytest.raises(FormatError, match=rf"r{i}\.caffemodel: not a"):
            cio.read_caffemodel(f)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.caffemodel").write_bytes(b"")
    with pytest.raises(FormatError, match=r"e\.caffemodel: empty file \(expected Caffe \.caffemodel"):
        cio.read_caffemodel(tmp_path / "e.caffemodel")
    with pytest.raises(FormatError, match=r"missing\.caffemodel: no such file"):
        cio.read_caffemodel(tmp_path / "missing.caffemodel")
    with pytest.raises(FormatError, match=r"missing\.prototxt: no such file"):
        cio.read_net(tmp_path / "missing.prototxt")


def test_prototxt_given_as_caffemodel(tmp_path):
    f = tmp_path / "deploy.caffemodel"
    f.write_bytes((REF / "realworld" / "lenet" / "deploy.prototxt").read_bytes())
    with pytest.raises(FormatError, match="looks like a text file"):
        cio.read_caffemodel(f)


def test_caffemodel_given_as_prototxt():
    with pytest.raises(PrototxtError, match=r"lenet_v1\.caffemodel:\d+:\d+: .*binary"):
        cio.read_net(REF / "legacy" / "lenet_v1.caffemodel")


@pytest.mark.parametrize(
    "reader, path",
    [
        (cio.read_solverstate, "legacy/lenet_v1.caffemodel"),
        (cio.read_solverstate, "solvers/adam/final.caffemodel"),
        (cio.read_blobproto, "solvers/adam/final.solverstate"),
        (cio.read_blobproto, "solvers/adam/final.caffemodel"),
        (cio.read_caffemodel, "data_layers/mean.binaryproto"),
        (cio.read_caffemodel, "solvers/adam/final.solverstate"),
    ],
)
def test_wrong_kind_of_binary_file(reader, path):
    with pytest.raises(FormatError, match=r"not a"):
        reader(REF / path)


# ---------------------------------------------------------------------------------------------
# Errors on bad text files


def _write(tmp_path, text, name="net.prototxt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_typo_in_field_name(tmp_path):
    p = _write(tmp_path, 'name: "n"\nlayer {\n  name: "c"\n  botom: "data"\n}\n')
    with pytest.raises(PrototxtError) as ei:
        cio.read_net(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:4:3: ")
    assert "'botom'" in msg and "caffe.LayerParameter" in msg and "did you mean 'bottom'" in msg
    _assert_clean(ei)


def test_wrong_field_type(tmp_path):
    p = _write(tmp_path, 'layer {\n  name: "c"\n  convolution_param { num_output: "abc" }\n}\n')
    with pytest.raises(PrototxtError) as ei:
        cio.read_net(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3:35: ")
    assert '"abc"' in msg and "'num_output' (uint32)" in msg and "caffe.ConvolutionParameter" in msg
    _assert_clean(ei)


def test_unknown_enum_value(tmp_path):
    p = _write(tmp_path, "layer { pooling_param {\n pool: AVG } }\n")
    with pytest.raises(
        PrototxtError,
        match=r":2:8: 'AVG' is not a value of enum caffe\.PoolingParameter\.PoolMethod for field 'pool'; did you mean AVE\?",
    ):
        cio.read_net(p)


def test_unquoted_string(tmp_path):
    p = _write(tmp_path, "layer { name: conv1 }\n")
    with pytest.raises(PrototxtError, match=r":1:15: .*'name' \(string\).*double quotes"):
        cio.read_net(p)


def test_unclosed_and_extra_braces(tmp_path):
    with pytest.raises(PrototxtError, match=r":2:\d+: unexpected end of file: expected '}'"):
        cio.read_net(_write(tmp_path, 'layer { name: "a"\n type: "ReLU"\n'))
    with pytest.raises(PrototxtError, match=r":1:21: unexpected '}'"):
        cio.read_net(_write(tmp_path, 'layer { name: "a" } }\n'))


def test_field_set_twice(tmp_path):
    p = _write(tmp_path, 'layer { type: "ReLU"\n type: "TanH" }\n')
    with pytest.raises(
        PrototxtError, match=r":2:\d+: field 'type' of message caffe\.LayerParameter is given more than once"
    ):
        cio.read_net(p)


def test_layer_field_at_net_level(tmp_path):
    p = _write(tmp_path, 'bottom: "data"\n')
    with pytest.raises(PrototxtError, match=r":1:1: unknown field 'bottom' in message caffe\.NetParameter.*layer \{"):
        cio.read_net(p)


def test_solver_typo(tmp_path):
    p = _write(tmp_path, 'base_lr: 0.1\nlr_polcy: "step"\n', name="solver.prototxt")
    with pytest.raises(
        PrototxtError,
        match=r"solver\.prototxt:2:1: unknown field 'lr_polcy' in message caffe\.SolverParameter; did you mean 'lr_policy'\?",
    ):
        cio.read_solver(p)


def test_parse_prototxt_string_filename():
    with pytest.raises(PrototxtError, match=r"^<string>:1:9: unknown field 'nme'"):
        cio.parse_prototxt('layer { nme: "x" }', caffe_pb2.NetParameter)


def test_blob_values_read_from_wire_bytes_equal_protobufs_reading():
    import struct

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    d = rng.standard_normal((3, 4, 5)).astype(np.float32)
    blob = cio.array_to_blob(a, d)
    np.testing.assert_array_equal(np.array(blob.data, np.float32).reshape(a.shape), a)  # what protobuf holds
    np.testing.assert_array_equal(cio.blob_to_array(blob), a)
    np.testing.assert_array_equal(cio.blob_to_array(blob, diff=True), d)
    b64 = cio.array_to_blob(a.astype(np.float64) / 3, double=True)
    np.testing.assert_array_equal(cio.blob_to_array(b64), a.astype(np.float64) / 3)
    # an unpacked encoding (one fixed32 per value, as some writers produce) reads the same
    unpacked = caffe_pb2.BlobProto()
    unpacked.shape.dim.extend([2])
    raw = unpacked.SerializeToString() + b"".join(b"\x2d" + struct.pack("<f", v) for v in (1.5, -2.25))
    unpacked.ParseFromString(raw)
    np.testing.assert_array_equal(cio.blob_to_array(unpacked), np.array([1.5, -2.25], np.float32))
