"""tools/convert_imageset.py and tools/compute_image_mean.py: the LMDB and mean file they write
from the fixture images feed the Data layer with the same batches as ImageData on the images."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat
from caffe_compat.cli import compute_image_mean, convert_imageset
from caffe_compat.layers.base import layer_class
from caffe_compat.proto import caffe_pb2

FIXTURES = Path(__file__).parent / "fixtures" / "caffe_reference" / "data_layers"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A copy of the fixture images and list in tmp_path, which becomes the working directory."""
    shutil.copytree(FIXTURES / "images", tmp_path / "images")
    shutil.copy(FIXTURES / "list.txt", tmp_path / "list.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_layer(text: str, phase: int = caffe_pb2.TEST):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, [], phase)


def run_batches(layer, n):
    return [tuple(t.numpy().copy() for t in layer.forward()) for _ in range(n)]


def records(db: str) -> list[tuple[bytes, caffe_pb2.Datum]]:
    # LMDB allows one environment per database and process: a dropped net of an earlier test
    # that read this fixture may still hold the library's (nets are freed by the cyclic GC)
    gc.collect()
    env = lmdb.open(db, readonly=True, lock=False)
    out = []
    with env.begin() as txn:
        for k, v in txn.cursor():
            d = caffe_pb2.Datum()
            d.ParseFromString(v)
            out.append((bytes(k), d))
    env.close()
    return out


def assert_same_batches(a, b, atol=0.0):
    assert len(a) == len(b)
    for (da, la), (db, lb) in zip(a, b):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(da, db, rtol=0, atol=atol)


def test_convert_raw_resized_feeds_data_layer_like_imagedata(work):
    assert convert_imageset.main(["--resize_height", "10", "--resize_width", "12", "images/", "list.txt", "db"]) == 0
    recs = records("db")
    names = [line.split()[0] for line in (work / "list.txt").read_text().splitlines()]
    assert [k for k, _ in recs] == [f"{i:08d}_{n}".encode() for i, n in enumerate(names)]  # Caffe's key format
    assert all((d.channels, d.height, d.width, d.encoded) == (3, 10, 12, False) for _, d in recs)
    tp = "transform_param { scale: 0.5 mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 7 mirror: true }"
    torch.manual_seed(5)
    from_db = run_batches(
        make_layer(
            f'name: "d" type: "Data" top: "data" top: "label" {tp} '
            'data_param { source: "db" backend: LMDB batch_size: 3 }',
            caffe_pb2.TRAIN,
        ),
        4,
    )
    torch.manual_seed(5)
    from_images = run_batches(
        make_layer(
            f'name: "d" type: "ImageData" top: "data" top: "label" {tp} '
            'image_data_param { source: "list.txt" root_folder: "images/" batch_size: 3 '
            "new_height: 10 new_width: 12 }",
            caffe_pb2.TRAIN,
        ),
        4,
    )
    # same pixels (same resize), same seeds: same random crops and mirrors, bit for bit
    assert_same_batches(from_db, from_images)


def test_convert_encoded_and_gray(work):
    assert convert_imageset.main(["--encoded", "images/", "list.txt", "enc"]) == 0
    recs = records("enc")
    # no resize and a matching extension: the file itself is stored (Caffe's ReadFileToDatum)
    assert recs[0][1].encoded and recs[0][1].data == (work / "images" / "img0.png").read_bytes()
    assert recs[0][1].label == 0 and recs[3][1].label == 3
    # raw grey, no resize: images keep their own sizes, so batch_size 1
    assert convert_imageset.main(["-gray", "images/", "list.txt", "gray"]) == 0
    assert records("gray")[1][1].channels == 1
    for db, is_color in (("enc", "true"), ("gray", "false")):
        from_db = run_batches(
            make_layer(
                'name: "d" type: "Data" top: "data" top: "label" transform_param { scale: 0.5 } '
                f'data_param {{ source: "{db}" backend: LMDB batch_size: 1 }}'
            ),
            8,
        )
        from_images = run_batches(
            make_layer(
                'name: "d" type: "ImageData" top: "data" top: "label" '
                'transform_param { scale: 0.5 } image_data_param { source: "list.txt" '
                f'root_folder: "images/" batch_size: 1 is_color: {is_color} }}'
            ),
            8,
        )
        assert_same_batches(from_db, from_images)
    # resized + encode_type: re-encoded at the new size
    assert (
        convert_imageset.main(
            ["--encode_type", "png", "--resize_height", "5", "--resize_width", "6", "images/", "list.txt", "enc2"]
        )
        == 0
    )
    d = records("enc2")[2][1]
    img = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert d.encoded and img.shape == (5, 6, 3)


def test_convert_shuffle_is_seeded_permutation(work):
    assert convert_imageset.main(["--shuffle", "--seed", "3", "images/", "list.txt", "s1"]) == 0
    assert convert_imageset.main(["--shuffle", "--seed", "3", "images/", "list.txt", "s2"]) == 0
    k1 = [k for k, _ in records("s1")]
    assert k1 == [k for k, _ in records("s2")]
    paths = sorted(k.split(b"_", 1)[1] for k in k1)
    assert paths == sorted(f"img{i}.png".encode() for i in range(7))
    assert [k.split(b"_", 1)[1] for k in k1] != [f"img{i}.png".encode() for i in range(7)]


def test_compute_image_mean_feeds_mean_file(work, capsys):
    assert convert_imageset.main(["--resize_height", "10", "--resize_width", "12", "images/", "list.txt", "db"]) == 0
    assert compute_image_mean.main(["db", "mean.binaryproto", "--text_output", "mean.txt"]) == 0
    out = capsys.readouterr().out
    imgs = [cv2.resize(cv2.imread(f"images/img{i}.png"), (12, 10)).transpose(2, 0, 1) for i in range(7)]
    total = np.zeros((3, 10, 12), np.float32)
    for x in imgs:  # Caffe: float32 sum record by record, then / count
        total += x.astype(np.float32)
    expect = total / np.float32(7)
    blob = caffe_compat.io.read_blobproto("mean.binaryproto")
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 10, 12)  # Caffe's legacy dims
    mean = caffe_compat.io.blob_to_array(blob)
    np.testing.assert_allclose(mean[0], expect, rtol=0, atol=0)
    text = text_format.Parse(Path("mean.txt").read_text(), caffe_pb2.BlobProto())
    np.testing.assert_allclose(np.array(text.data, np.float32).reshape(3, 10, 12), expect, rtol=0, atol=0)
    for c in range(3):
        assert f"mean_value channel [{c}]: {expect[c].mean(dtype=np.float64):g}" in out
    tp = 'transform_param { mean_file: "mean.binaryproto" crop_size: 8 scale: 0.25 }'
    from_db = run_batches(
        make_layer(
            f'name: "d" type: "Data" top: "data" top: "label" {tp} '
            'data_param { source: "db" backend: LMDB batch_size: 2 }'
        ),
        4,
    )
    from_images = run_batches(
        make_layer(
            f'name: "d" type: "ImageData" top: "data" top: "label" {tp} '
            'image_data_param { source: "list.txt" root_folder: "images/" batch_size: 2 '
            "new_height: 10 new_width: 12 }"
        ),
        4,
    )
    assert_same_batches(from_db, from_images)
    # and against the NumPy formula: centre crop (1, 2) of (x - mean) * scale
    x0 = (imgs[0].astype(np.float32) - expect)[:, 1:9, 2:10] * np.float32(0.25)
    np.testing.assert_allclose(from_db[0][0][0], x0, rtol=0, atol=1e-6)


def test_compute_image_mean_of_caffe_lmdb_float32_sum(tmp_path):
    mean_path = tmp_path / "m.binaryproto"
    assert compute_image_mean.main([str(FIXTURES / "lmdb_raw"), str(mean_path)]) == 0
    xs = [
        np.frombuffer(d.data, np.uint8).reshape(3, 8, 10).astype(np.float32)
        for _, d in records(str(FIXTURES / "lmdb_raw"))
    ]
    np.testing.assert_allclose(
        caffe_compat.io.blob_to_array(caffe_compat.io.read_blobproto(str(mean_path)))[0],
        np.mean(xs, axis=0),
        rtol=1e-6,
        atol=1e-5,
    )


def _one_line_error(capsys, prog: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    for f in fragments:
        assert f in err[0], err[0]


def test_convert_errors(work, capsys, caplog):
    assert convert_imageset.main(["images/", "nolist.txt", "db"]) == 1
    _one_line_error(capsys, "convert_imageset", "LISTFILE 'nolist.txt' not found")
    assert convert_imageset.main(["--backend", "leveldb", "images/", "list.txt", "db"]) == 1
    _one_line_error(capsys, "convert_imageset", "writing LevelDB is not supported", "--backend lmdb")
    (work / "db").mkdir()
    assert convert_imageset.main(["images/", "list.txt", "db"]) == 1
    _one_line_error(capsys, "convert_imageset", "'db' already exists")
    assert convert_imageset.main(["--check_size", "images/", "list.txt", "db2"]) == 1
    _one_line_error(capsys, "convert_imageset", "list.txt:2: 'img1.png' gives 360 bytes, the first image 297")
    (work / "list2.txt").write_text("img0.png 0\nmissing.png 1\nimg2.png 2\n")
    assert convert_imageset.main(["images/", "list2.txt", "db3"]) == 0  # Caffe skips unreadable images
    assert "list2.txt:2: could not open or decode 'images/missing.png'; skipped" in caplog.text
    assert [k for k, _ in records("db3")] == [b"00000000_img0.png", b"00000002_img2.png"]


def test_compute_image_mean_errors(work, capsys):
    assert compute_image_mean.main(["nodb", "m.binaryproto"]) == 1
    _one_line_error(capsys, "compute_image_mean", "INPUT_DB 'nodb' is not an LMDB directory")
    assert convert_imageset.main(["images/", "list.txt", "db"]) == 0  # mixed sizes
    capsys.readouterr()
    assert compute_image_mean.main(["db", "m.binaryproto"]) == 1
    _one_line_error(capsys, "compute_image_mean", "db key '00000001_img1.png': record is 3×10×12, the first is 3×9×11")
    assert not Path("m.binaryproto").exists()


def test_usage_error_is_one_line(capsys):
    assert convert_imageset.main(["only_one_arg"]) == 1
    _one_line_error(capsys, "convert_imageset", "the following arguments are required")
    assert compute_image_mean.main(["db", "--no_such_flag"]) == 1
    _one_line_error(capsys, "compute_image_mean", "unrecognized arguments: --no_such_flag")
