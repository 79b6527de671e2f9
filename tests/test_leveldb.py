"""The pure-Python LevelDB reader against the real LevelDB library.

The databases under tests/fixtures/leveldb/ were written by plyvel (libleveldb 1.22 with snappy,
tests/fixtures/leveldb/make_fixtures.py); next to each, NAME.json holds what plyvel iterated:
every key and the SHA-256 of its value, in order. The Data layer reading a LevelDB copy of the
LMDB that real Caffe read must give Caffe's batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import caffe_compat
from caffe_compat.data import leveldb_db
from caffe_compat.data.leveldb_db import LevelDBReader, crc32c, snappy_decompress
from caffe_compat.data.lmdb_db import LMDBReader
from caffe_compat.errors import DataError
from caffe_compat.layers.base import layer_class
from caffe_compat.proto import caffe_pb2
from tools import compute_image_mean

FIXTURES = Path(__file__).parent / "fixtures" / "leveldb"
CAFFE_DATA = Path(__file__).parent / "fixtures" / "caffe_reference" / "data_layers"
DATABASES = ["snappy_levels", "uncompressed", "data_layer"]


def plyvel_records(name: str) -> list[list]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["records"]


def summary(records) -> list[list]:
    return [[k.hex(), hashlib.sha256(v).hexdigest(), len(v)] for k, v in records]


@pytest.fixture
def pure_snappy(monkeypatch) -> list[int]:
    """Force the pure-Python snappy decoder (whatever is installed) and count its calls."""
    calls = []

    def counting(data: bytes) -> bytes:
        calls.append(len(data))
        return snappy_decompress(data)

    monkeypatch.setattr(leveldb_db, "_snappy_impl", counting)
    return calls


def copy_db(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    for p in [dst, *dst.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the fixtures may be checked out read-only
    return dst


def tables(db: Path) -> list[Path]:
    return sorted(db.glob("*.ldb"))


# -- the real library's iteration ------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("name", DATABASES)
def test_iteration_equals_plyvel(name, verify, pure_snappy):
    reader = LevelDBReader(str(FIXTURES / name), verify_checksums=verify)
    assert summary(reader) == plyvel_records(name)
    assert reader.count == len(plyvel_records(name))
    if name == "uncompressed":
        assert not pure_snappy  # compression=None: no block goes through snappy
    elif name == "snappy_levels":
        assert len(pure_snappy) > 50  # data and index blocks, decoded by the pure-Python decoder
    # (data_layer's random pixels do not compress: LevelDB stores such blocks uncompressed)


def test_fixtures_cover_what_they_claim():
    snappy = LevelDBReader(str(FIXTURES / "snappy_levels"))
    levels = [len(level) for level in snappy._levels]
    assert levels[0] >= 2 and sum(n > 0 for n in levels[1:]) >= 2, levels  # level 0 + two deeper levels
    assert len(snappy._log_entries) > 100  # entries written after the last compaction
    assert (FIXTURES / "snappy_levels" / "000019.log").stat().st_size > 32768  # a fragmented log record
    plain = LevelDBReader(str(FIXTURES / "uncompressed"))
    assert len(plain._levels[0]) >= 2 and any(plain._levels[1:]) and plain._log_entries
    keys = [bytes.fromhex(k) for k, _, _ in plyvel_records("uncompressed")]
    assert all(k.startswith(b"train/class_") for k in keys)
    for name in ("snappy_levels", "uncompressed"):  # values larger than a 1 KiB block
        assert max(n for _, _, n in plyvel_records(name)) > 2048
    layer = LevelDBReader(str(FIXTURES / "data_layer"))
    assert len(layer._levels[2]) == 1 and len(layer._log_entries) == 2


def test_records_match_the_lmdb_caffe_read():
    assert list(LevelDBReader(str(FIXTURES / "data_layer"))) == list(LMDBReader(str(CAFFE_DATA / "lmdb_raw")))


def test_first_reads_one_block_per_source(monkeypatch):
    reads = []
    original = leveldb_db._TableFile._entries

    def counting(self, offset, size, what):
        reads.append(what)
        return original(self, offset, size, what)

    monkeypatch.setattr(leveldb_db._TableFile, "_entries", counting)
    LevelDBReader(str(FIXTURES / "snappy_levels"))  # reads the first record
    sources = 2 + 2  # two level-0 tables, levels 1 and 2
    assert reads.count("data block") == sources
    reads.clear()
    list(LevelDBReader(str(FIXTURES / "snappy_levels")))
    assert reads.count("data block") > 20 * sources


def test_first_and_cycle_wrap_around():
    reader = LevelDBReader(str(FIXTURES / "data_layer"))
    records = list(reader)
    assert len(records) == 5 and reader.first() == records[0]
    for skip in (0, 3, 5, 7, 12):
        it = reader.cycle(skip)
        got = [next(it) for _ in range(11)]
        assert got == [records[(skip + i) % 5] for i in range(11)], skip
    lmdb = LMDBReader(str(CAFFE_DATA / "lmdb_raw"))
    it_lmdb, it_level = lmdb.cycle(7), LevelDBReader(str(FIXTURES / "data_layer")).cycle(7)  # count not known yet
    assert [next(it_level) for _ in range(9)] == [next(it_lmdb) for _ in range(9)]


def test_legacy_sst_names_and_no_lock_needed(tmp_path, pure_snappy):
    db = copy_db("snappy_levels", tmp_path)
    (db / "LOCK").unlink()
    for t in tables(db):
        t.rename(t.with_suffix(".sst"))  # LevelDB before 1.14
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in db.iterdir()}
    assert summary(LevelDBReader(str(db))) == plyvel_records("snappy_levels")
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in db.iterdir()} == before  # nothing written


def test_refuses_other_comparators_and_reports_empty():
    with pytest.raises(DataError, match=r"comparator 'test.ReverseBytewiseComparator'; only 'leveldb.BytewiseComp"):
        LevelDBReader(str(FIXTURES / "reverse_comparator"))
    with pytest.raises(DataError, match=r"all_deleted' is an empty LevelDB \(no records\)"):
        LevelDBReader(str(FIXTURES / "all_deleted"), what="INPUT_DB")


# -- snappy and CRC-32C ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _literal(data: bytes, extra: int | None = None) -> bytes:
    """A literal element; ``extra`` forces 1-4 length bytes (non-minimal encodings are legal)."""
    n = len(data) - 1
    if extra is None:
        extra = 0 if n < 60 else (n.bit_length() + 7) // 8
    if extra == 0:
        return bytes([n << 2]) + data
    return bytes([(59 + extra) << 2]) + n.to_bytes(extra, "little") + data


def _copy(kind: int, offset: int, length: int) -> bytes:
    if kind == 1:
        assert 4 <= length <= 11 and offset < 2048
        return bytes([(offset >> 8) << 5 | (length - 4) << 2 | 1, offset & 0xFF])
    width = 2 if kind == 2 else 4
    return bytes([(length - 1) << 2 | kind]) + offset.to_bytes(width, "little")


def _reference(elements: list[tuple]) -> bytes:
    """What the elements decode to, one byte at a time."""
    out = bytearray()
    for e in elements:
        if e[0] == "lit":
            out += e[1]
        else:
            _, _, offset, length = e
            for _ in range(length):
                out.append(out[-offset])
    return bytes(out)


def _encode(elements: list[tuple]) -> bytes:
    body = b"".join(_literal(e[1], e[2]) if e[0] == "lit" else _copy(e[1], e[2], e[3]) for e in elements)
    return _varint(len(_reference(elements))) + body


def test_snappy_decoder_every_element_kind():
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 70000, dtype=np.uint8).tobytes()
    elements = [
        ("lit", b"ab", None),
        ("copy", 1, 2, 9),  # overlapping: ababababa...
        ("lit", blob[:60], None),  # the longest literal in the tag itself
        ("lit", blob[:61], 1),  # length in 1 extra byte
        ("lit", blob[:300], 2),
        ("copy", 1, 300, 11),  # 1-byte-offset copy using the tag's high offset bits
        ("lit", blob[:70000], 3),
        ("lit", blob[:5], 4),  # 4 length bytes (non-minimal)
        ("copy", 2, 1000, 64),
        ("copy", 2, 1, 33),  # run-length
        ("copy", 3, 70100, 40),
        ("copy", 3, 3, 50),
        ("lit", b"x", 1),
    ]
    data = _encode(elements)
    assert snappy_decompress(data) == _reference(elements)
    assert snappy_decompress(b"\x00") == b""


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (b"\xff\xff\xff\xff\xff\x01", "longer than 5 bytes"),
        (_varint(4) + _literal(b"abcd")[:3], "runs past the end"),
        (_varint(4) + bytes([60 << 2]), "length bytes run past the end"),
        (_varint(6) + _literal(b"ab") + _copy(2, 3, 4), "copy offset 3 is invalid"),
        (_varint(6) + _literal(b"ab") + _copy(2, 0, 4), "copy offset 0 is invalid"),
        (_varint(6) + _literal(b"ab") + _copy(3, 1, 4)[:3], "truncated copy"),
        (_varint(3) + _literal(b"abcd"), "exceeds the 3 bytes"),
        (_varint(9) + _literal(b"abcd"), "4 bytes, 9 announced"),
    ],
)
def test_snappy_decoder_rejects_corrupt_input(data, match):
    with pytest.raises(ValueError, match=match):
        snappy_decompress(data)


def _crc_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c():
    # RFC 3720 (iSCSI) B.4 and the classic check value
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(1).integers(0, 256, 40000, dtype=np.uint8).tobytes()
    for n in (0, 1, 63, 8191, 8192, 8193, 12345, 40000):  # the byte loop and the NumPy lanes
        assert crc32c(data[:n]) == _crc_reference(data[:n]), n
    assert crc32c(data[20000:], crc32c(data[:20000])) == crc32c(data)


# -- damaged databases -----------------------------------------------------------------------


def _first_data_block(table: Path) -> tuple[int, int]:
    t = leveldb_db._TableFile(str(table), None, False)
    t.f.close()
    offset, size, _ = leveldb_db._decode_handle(t.index[0][1], 0, len(t.index[0][1]), "handle")
    return offset, size


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


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


def test_bad_current_and_manifest(tmp_path):
    db = copy_db("data_layer", tmp_path)
    (db / "CURRENT").write_bytes(b"MANIFEST-000002")  # no newline
    with pytest.raises(DataError, match=r"CURRENT': holds b'MANIFEST-000002', not the name of a MANIFEST"):
        LevelDBReader(str(db))
    (db / "CURRENT").write_bytes(b"MANIFEST-000009\n")
    with pytest.raises(DataError, match=r"CURRENT': names MANIFEST-000009, which does not exist"):
        LevelDBReader(str(db))
    (db / "CURRENT").write_bytes(b"MANIFEST-000002\n")
    manifest = db / "MANIFEST-000002"
    data = bytearray(manifest.read_bytes())
    data[20] ^= 0x40
    manifest.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"MANIFEST-000002': log record at offset 0 fails its checksum .*copy it again"):
        LevelDBReader(str(db))


def test_missing_and_truncated_tables(tmp_path):
    db = copy_db("snappy_levels", tmp_path)
    victim = tables(db)[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(DataError, match=rf"{victim.name}': table is {len(data) - 10} bytes, the MANIFEST says"):
        list(LevelDBReader(str(db)))
    victim.write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match=rf"{victim.name}': bad table magic number"):
        list(LevelDBReader(str(db)))
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim.name}', listed in the MANIFEST, is missing"):
        list(LevelDBReader(str(db)))


def test_corrupt_blocks(tmp_path, pure_snappy):
    db = copy_db("uncompressed", tmp_path)
    table = tables(db)[0]
    _patch(table, 0, b"\xff" * 6)  # the first entry's header
    with pytest.raises(DataError, match=rf"{table.name}': .*(bad entry|varint).* of data block at offset 0"):
        list(LevelDBReader(str(db)))
    with pytest.raises(DataError, match=rf"{table.name}': data block at offset 0 fails its checksum"):
        list(LevelDBReader(str(db), verify_checksums=True))

    db = copy_db("snappy_levels", tmp_path)
    table = tables(db)[0]
    _patch(table, 0, b"\x01")  # the compressed block's length preamble
    with pytest.raises(DataError, match=rf"{table.name}': data block at offset 0: corrupt snappy-compressed block"):
        list(LevelDBReader(str(db)))
    offset, size = _first_data_block(table)
    _patch(table, offset + size, b"\x02")  # zstd, LevelDB >= 1.23
    with pytest.raises(DataError, match=r"uses compression type 2 \(zstd\); only uncompressed and snappy"):
        list(LevelDBReader(str(db)))


def test_log_checksum_and_truncated_tail(tmp_path):
    db = copy_db("data_layer", tmp_path)
    log = db / "000004.log"
    data = log.read_bytes()
    records = list(LevelDBReader(str(FIXTURES / "data_layer")))
    log.write_bytes(data[:-5])  # the writer died inside the last record: LevelDB ignores it
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # other tests may turn off propagation to caplog's root handler
    leveldb_db.log.addHandler(handler)
    try:
        assert list(LevelDBReader(str(db))) == records[:4]
    finally:
        leveldb_db.log.removeHandler(handler)
    assert any("000004.log' ends inside a record" in w.getMessage() for w in warnings)
    log.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(DataError, match=r"000004.log': log record at offset 0 fails its checksum"):
        LevelDBReader(str(db))


# -- the Data layer and compute_image_mean ---------------------------------------------------


def _data_layer(source: str, backend: str = "", top: str = 'top: "data" top: "label"'):
    text = (
        f'name: "d" type: "Data" {top} transform_param {{ mean_file: "mean.binaryproto" crop_size: 6 }} '
        f'data_param {{ source: "{source}" {backend} batch_size: 2 }}'
    )
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class("Data")(param, [], caffe_pb2.TEST)


@pytest.mark.parametrize("backend", ["", "backend: LEVELDB"])  # LEVELDB is the default
def test_data_layer_reads_leveldb_as_caffe_read_the_lmdb(backend, monkeypatch):
    monkeypatch.chdir(CAFFE_DATA)
    ref = np.load("lmdb_raw_mean_file_crop.npz")
    layer = _data_layer(str(FIXTURES / "data_layer"), backend)
    assert layer.top_shapes([]) == [(2, 3, 6, 6), (2,)]
    for k in range(4):  # 5 records, batches of 2: wraps around
        data, label = (t.numpy() for t in layer.forward())
        np.testing.assert_array_equal(label, ref[f"label__{k}"])
        np.testing.assert_allclose(data, ref[f"data__{k}"], rtol=0, atol=1e-4)


def test_data_layer_through_net_and_backend_mismatch(tmp_path, monkeypatch):
    monkeypatch.chdir(CAFFE_DATA)
    ref = np.load("lmdb_raw_mean_file_crop.npz")
    proto = tmp_path / "net.prototxt"
    proto.write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" '
        'transform_param { mean_file: "mean.binaryproto" crop_size: 6 } '
        f'data_param {{ source: "{FIXTURES / "data_layer"}" batch_size: 2 prefetch: 0 }} }}'
    )
    net = caffe_compat.Net(str(proto), caffe_compat.TEST)
    for k in range(2):
        net.forward()
        np.testing.assert_allclose(net.blobs["data"].data, ref[f"data__{k}"], rtol=0, atol=1e-4)
    with pytest.raises(DataError, match=r"is a LevelDB \(it holds CURRENT\) but data_param.backend is LMDB: set"):
        _data_layer(str(FIXTURES / "data_layer"), "backend: LMDB")
    with pytest.raises(DataError, match=r"'lmdb_raw' is an LMDB .* add `backend: LMDB`"):
        _data_layer("lmdb_raw")


def test_compute_image_mean_of_a_leveldb(tmp_path, capsys):
    from_leveldb, from_lmdb = tmp_path / "a.binaryproto", tmp_path / "b.binaryproto"
    assert compute_image_mean.main(["--backend", "leveldb", str(FIXTURES / "data_layer"), str(from_leveldb)]) == 0
    assert compute_image_mean.main([str(CAFFE_DATA / "lmdb_raw"), str(from_lmdb)]) == 0
    a, b = (caffe_compat.io.blob_to_array(caffe_compat.io.read_blobproto(str(p))) for p in (from_leveldb, from_lmdb))
    np.testing.assert_array_equal(a, b)  # the same records, summed in the same order
    capsys.readouterr()
    assert compute_image_mean.main(["-backend", "leveldb", str(CAFFE_DATA / "lmdb_raw")]) == 1
    err = capsys.readouterr().err
    assert "INPUT_DB" in err and "it is an LMDB" in err
    assert compute_image_mean.main(["--backend", "rocksdb", str(FIXTURES / "data_layer")]) == 1
    assert "'rocksdb' is unknown; use lmdb or leveldb" in capsys.readouterr().err


def test_open_files_are_closed(tmp_path):
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    reader = LevelDBReader(str(FIXTURES / "snappy_levels"))
    it = reader.cycle(0)
    for _ in range(2000):  # more than two passes
        next(it)
    it.close()
    list(reader)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
