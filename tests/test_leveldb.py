"""The LevelDB reader (plyvel, the ``[leveldb]`` extra) against what was written and what Caffe read.

The databases under tests/fixtures/leveldb/ were written by plyvel (libleveldb 1.22 with snappy,
tests/fixtures/leveldb/make_fixtures.py); next to each, NAME.json holds what plyvel iterated when
it wrote them: every key and the SHA-256 of its value, in order. The Data layer reading a
LevelDB copy of the LMDB that real Caffe read must give Caffe's batches. LevelDB's ``Open``
may rewrite a database's log into a table (as in Caffe), so every test reads a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import caffe_compat
from caffe_compat.cli import compute_image_mean
from caffe_compat.data import leveldb_db
from caffe_compat.data.leveldb_db import LevelDBReader
from caffe_compat.data.lmdb_db import LMDBReader
from caffe_compat.errors import DataError
from caffe_compat.layers.base import layer_class
from caffe_compat.proto import caffe_pb2

pytest.importorskip("plyvel", reason="the [leveldb] extra (plyvel) reads LevelDB")

FIXTURES = Path(__file__).parent / "fixtures" / "leveldb"
CAFFE_DATA = Path(__file__).parent / "fixtures" / "caffe_reference" / "data_layers"
DATABASES = ["snappy_levels", "uncompressed", "data_layer"]


def written_records(name: str) -> list[list]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["records"]


def summary(records) -> list[list]:
    return [[k.hex(), hashlib.sha256(v).hexdigest(), len(v)] for k, v in records]


def copy_db(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    for p in [dst, *dst.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the fixtures may be checked out read-only
    return dst


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("name", DATABASES)
def test_iteration_equals_what_was_written(name, verify, tmp_path):
    reader = LevelDBReader(str(copy_db(name, tmp_path)), verify_checksums=verify)
    assert summary(reader) == written_records(name)
    assert reader.count == len(written_records(name))
    reader.close()


def test_records_match_the_lmdb_caffe_read(tmp_path):
    reader = LevelDBReader(str(copy_db("data_layer", tmp_path)))
    assert list(reader) == list(LMDBReader(str(CAFFE_DATA / "lmdb_raw")))


def test_first_and_cycle_wrap_around(tmp_path):
    db = str(copy_db("data_layer", tmp_path))
    reader = LevelDBReader(db)
    records = list(reader)
    assert len(records) == 5 and reader.first() == records[0]
    for skip in (0, 3, 5, 7, 12):
        it = reader.cycle(skip)
        got = [next(it) for _ in range(11)]
        assert got == [records[(skip + i) % 5] for i in range(11)], skip
    lmdb = LMDBReader(str(CAFFE_DATA / "lmdb_raw"))
    it_lmdb, it_level = lmdb.cycle(7), LevelDBReader(db).cycle(7)  # count not known yet
    assert [next(it_level) for _ in range(9)] == [next(it_lmdb) for _ in range(9)]


def test_readers_in_one_process_share_the_database(tmp_path):
    """A train and a test net reading one LevelDB: LevelDB's LOCK allows one open per process."""
    db = str(copy_db("data_layer", tmp_path))
    a, b = LevelDBReader(db), LevelDBReader(db)
    assert list(a) == list(b)
    a.close()
    assert len(list(b)) == 5  # still open for b
    b.close()
    assert os.path.realpath(db) not in leveldb_db._OPEN
    with pytest.raises(DataError, match=r"the reader was closed"):
        list(b)


def test_refuses_other_comparators_and_reports_empty(tmp_path):
    with pytest.raises(DataError, match=r"comparator 'test.ReverseBytewiseComparator'; only 'leveldb.BytewiseComp"):
        LevelDBReader(str(copy_db("reverse_comparator", tmp_path)))
    with pytest.raises(DataError, match=r"all_deleted' is an empty LevelDB \(no records\)"):
        LevelDBReader(str(copy_db("all_deleted", tmp_path)), what="INPUT_DB")


def test_not_a_leveldb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"INPUT_DB 'nodb' is not a LevelDB directory \(relative paths are read"):
        LevelDBReader("nodb", what="INPUT_DB")
    Path("file").write_bytes(b"x")
    with pytest.raises(DataError, match=r"'file' is not a LevelDB directory \(an LMDB file or a single file\?\)"):
        LevelDBReader("file")
    Path("empty").mkdir()
    with pytest.raises(DataError, match=r"'empty' has no CURRENT file: not a LevelDB \(a LevelDB directory holds"):
        LevelDBReader("empty")
    with pytest.raises(DataError, match=r"has no CURRENT file: not a LevelDB \(it holds data.mdb: it is an LMDB"):
        LevelDBReader(str(CAFFE_DATA / "lmdb_raw"))
    with pytest.raises(DataError, match=r"has no data.mdb: not an LMDB \(it holds CURRENT: it is a LevelDB"):
        LMDBReader(str(FIXTURES / "data_layer"))


def test_damaged_databases_say_so(tmp_path):
    db = copy_db("snappy_levels", tmp_path)
    victim = sorted(db.glob("*.ldb"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(DataError, match=rf"{victim.name}.*the database is damaged or was copied incompletely"):
        list(LevelDBReader(str(db)))
    victim.unlink()
    with pytest.raises(DataError, match=rf"missing files.*{victim.name}.*copy it again, or re-create it"):
        list(LevelDBReader(str(db)))


def test_missing_plyvel_is_one_line_naming_the_extra(tmp_path):
    """Without the extra (plyvel absent), reading a LevelDB prints one line: what to install."""
    db = copy_db("data_layer", tmp_path)
    code = (
        "import sys; sys.modules['plyvel'] = None\n"
        "from caffe_compat.cli.compute_image_mean import main\n"
        f"sys.exit(main(['--backend', 'leveldb', {str(db)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's caffe_compat
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "plyvel" in lines[0] and "pip install 'caffe-compat[leveldb]'" in lines[0]


# -- the Data layer and compute_image_mean ---------------------------------------------------


def _data_layer(source: str, backend: str = "", top: str = 'top: "data" top: "label"'):
    text = (
        f'name: "d" type: "Data" {top} transform_param {{ mean_file: "mean.binaryproto" crop_size: 6 }} '
        f'data_param {{ source: "{source}" {backend} batch_size: 2 }}'
    )
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class("Data")(param, [], caffe_pb2.TEST)


@pytest.mark.parametrize("backend", ["", "backend: LEVELDB"])  # LEVELDB is the default
def test_data_layer_reads_leveldb_as_caffe_read_the_lmdb(backend, monkeypatch, tmp_path):
    db = copy_db("data_layer", tmp_path)
    monkeypatch.chdir(CAFFE_DATA)
    ref = np.load("lmdb_raw_mean_file_crop.npz")
    layer = _data_layer(str(db), backend)
    assert layer.top_shapes([]) == [(2, 3, 6, 6), (2,)]
    for k in range(4):  # 5 records, batches of 2: wraps around
        data, label = (t.numpy() for t in layer.forward())
        np.testing.assert_array_equal(label, ref[f"label__{k}"])
        np.testing.assert_allclose(data, ref[f"data__{k}"], rtol=0, atol=1e-4)


def test_data_layer_through_net_and_backend_mismatch(tmp_path, monkeypatch):
    db = copy_db("data_layer", tmp_path)
    monkeypatch.chdir(CAFFE_DATA)
    ref = np.load("lmdb_raw_mean_file_crop.npz")
    proto = tmp_path / "net.prototxt"
    proto.write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" '
        'transform_param { mean_file: "mean.binaryproto" crop_size: 6 } '
        f'data_param {{ source: "{db}" batch_size: 2 prefetch: 0 }} }}'
    )
    net = caffe_compat.Net(str(proto), caffe_compat.TEST)
    for k in range(2):
        net.forward()
        np.testing.assert_allclose(net.blobs["data"].data, ref[f"data__{k}"], rtol=0, atol=1e-4)
    with pytest.raises(DataError, match=r"is a LevelDB \(it holds CURRENT\) but data_param.backend is LMDB: set"):
        _data_layer(str(db), "backend: LMDB")
    with pytest.raises(DataError, match=r"'lmdb_raw' is an LMDB .* add `backend: LMDB`"):
        _data_layer("lmdb_raw")


def test_compute_image_mean_of_a_leveldb(tmp_path, capsys):
    db = copy_db("data_layer", tmp_path)
    from_leveldb, from_lmdb = tmp_path / "a.binaryproto", tmp_path / "b.binaryproto"
    assert compute_image_mean.main(["--backend", "leveldb", str(db), str(from_leveldb)]) == 0
    assert compute_image_mean.main([str(CAFFE_DATA / "lmdb_raw"), str(from_lmdb)]) == 0
    a, b = (caffe_compat.io.blob_to_array(caffe_compat.io.read_blobproto(str(p))) for p in (from_leveldb, from_lmdb))
    np.testing.assert_array_equal(a, b)  # the same records, summed in the same order
    capsys.readouterr()
    assert compute_image_mean.main(["-backend", "leveldb", str(CAFFE_DATA / "lmdb_raw")]) == 1
    err = capsys.readouterr().err
    assert "INPUT_DB" in err and "it is an LMDB" in err
    assert compute_image_mean.main(["--backend", "rocksdb", str(db)]) == 1
    assert "'rocksdb' is unknown; use lmdb or leveldb" in capsys.readouterr().err
