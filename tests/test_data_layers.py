"""Data layers against real Caffe's batches (tests/fixtures/caffe_reference/data_layers) and
against independent NumPy formulas; error paths with real bad files."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import h5py
import lmdb
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat
from caffe_compat.data.prefetch import Prefetcher
from caffe_compat.data.transformer import DataTransformer
from caffe_compat.errors import DataError, LayerError
from caffe_compat.layers.base import layer_class
from caffe_compat.proto import caffe_pb2

FIXTURES = Path(__file__).parent / "fixtures" / "caffe_reference" / "data_layers"
CASES = sorted(p.stem for p in FIXTURES.glob("*.prototxt"))


def make_layer(text: str, phase: int = caffe_pb2.TEST, bottom_shapes=()):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, list(bottom_shapes), phase)


def batches(layer, n: int) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy().copy() for t in layer.forward()) for _ in range(n)]


def write_png(path: Path, img: np.ndarray) -> None:
    assert cv2.imwrite(str(path), img)


# -- real Caffe's batches --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fixture_replay_through_net(case, monkeypatch):
    assert len(CASES) == 4
    monkeypatch.chdir(FIXTURES)
    ref = np.load(f"{case}.npz")
    net = caffe_compat.Net(f"{case}.prototxt", caffe_compat.TEST)
    atol = 0.00390625 * 1.001 if "resize" in case else 1e-4
    for k in range(4):
        net.forward()
        np.testing.assert_array_equal(net.blobs["label"].data.ravel(), ref[f"label__{k}"].ravel())
        data = net.blobs["data"].data
        assert data.shape == ref[f"data__{k}"].shape
        np.testing.assert_allclose(data, ref[f"data__{k}"], rtol=0, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_fixture_replay_layer_directly(case, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    ref = np.load(f"{case}.npz")
    net_param = text_format.Parse(Path(f"{case}.prototxt").read_text(), caffe_pb2.NetParameter())
    (lp,) = net_param.layer
    layer = layer_class(lp.type)(lp, [], caffe_pb2.TEST)
    first = ref["data__0"].shape
    assert layer.top_shapes([]) == [first, (first[0],)]
    atol = 0.00390625 * 1.001 if "resize" in case else 1e-4
    for k, (data, label) in enumerate(batches(layer, 4)):
        assert data.dtype == np.float32 and label.shape == (first[0],)
        np.testing.assert_array_equal(label, ref[f"label__{k}"])
        np.testing.assert_allclose(data, ref[f"data__{k}"], rtol=0, atol=atol)


# -- DataTransformer against NumPy -----------------------------------------------------------


def _transformer(text: str, phase=caffe_pb2.TEST, seed=0):
    tp = text_format.Parse(text, caffe_pb2.TransformationParameter())
    return DataTransformer(tp, phase, np.random.default_rng(seed))


def test_transform_scale_mean_value_per_channel():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    t = _transformer("scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30")
    expect = (x.astype(np.float32) - np.array([10, 20, 30], np.float32)[:, None, None]) * np.float32(0.5)
    np.testing.assert_allclose(t.transform(x), expect, rtol=0, atol=0)
    one = _transformer("mean_value: 7")
    np.testing.assert_allclose(one.transform(x), x.astype(np.float32) - 7, rtol=0, atol=0)


def test_transform_mean_file_indexed_at_source_position_train_crop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    mean = rng.normal(100, 20, (2, 7, 9)).astype(np.float32)
    caffe_compat.io.write_blobproto(caffe_compat.io.array_to_blob(mean[None]), "m.binaryproto")
    x = rng.integers(0, 256, (2, 7, 9), dtype=np.uint8)
    t = _transformer('mean_file: "m.binaryproto" crop_size: 4 scale: 2', phase=caffe_pb2.TRAIN, seed=3)
    seen = set()
    for _ in range(60):
        out = t.transform(x)
        assert out.shape == (2, 4, 4)
        full = (x.astype(np.float32) - mean) * np.float32(2)
        # find the offset this crop came from: exactly one window matches
        hits = [(h, w) for h in range(4) for w in range(6) if np.array_equal(full[:, h : h + 4, w : w + 4], out)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 8  # random offsets in TRAIN, over the whole (4, 6) range


def test_transform_test_phase_center_crop_and_random_mirror_in_test():
    x = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    t = _transformer("crop_size: 4 mirror: true", phase=caffe_pb2.TEST, seed=5)
    center = x[:, 1:5, 2:6]
    flips = 0
    for _ in range(40):
        out = t.transform(x)
        if np.array_equal(out, center[:, :, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, center)
    assert 5 < flips < 35  # Caffe mirrors at random in TEST too


def test_transform_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(DataError, match="mean_value"):
        _transformer("mean_value: 1 mean_value: 2").transform(x)
    with pytest.raises(DataError, match="crop_size 5 is larger than the 4×4"):
        _transformer("crop_size: 5").transform(x)
    with pytest.raises(DataError, match="not found"):
        _transformer('mean_file: "nope.binaryproto"')
    caffe_compat.io.write_blobproto(caffe_compat.io.array_to_blob(np.zeros((1, 3, 5, 5))), "m.binaryproto")
    with pytest.raises(DataError, match="both mean_file and mean_value"):
        _transformer('mean_file: "m.binaryproto" mean_value: 3')
    with pytest.raises(DataError, match="full size"):
        _transformer('mean_file: "m.binaryproto"').transform(x)
    with pytest.raises(DataError, match="force_color and force_gray"):
        _transformer("force_color: true force_gray: true")


# -- ImageData ---------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path, monkeypatch):
    """Six 6×7 BGR images with labels 0..5 in tmp_path/imgs, listed in list.txt."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(7)
    (tmp_path / "imgs").mkdir()
    images = []
    lines = []
    for i in range(6):
        img = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        write_png(tmp_path / "imgs" / f"im {i}.png", img)  # a space in the path, as Caffe allows
        images.append(img)
        lines.append(f"im {i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return images


IMAGE_DATA = """name: "d" type: "ImageData" top: "data" top: "label"
  image_data_param {{ source: "list.txt" root_folder: "imgs/" batch_size: {bs} {extra} }}
  transform_param {{ {tp} }}
  data_param {{ prefetch: {prefetch} }}"""


def image_layer(bs=4, extra="", tp="", prefetch=4, phase=caffe_pb2.TEST):
    return make_layer(IMAGE_DATA.format(bs=bs, extra=extra, tp=tp, prefetch=prefetch), phase)


def test_imagedata_order_wraps_and_matches_numpy(image_dir):
    layer = image_layer(bs=4, tp="scale: 0.25")
    assert layer.top_shapes([]) == [(4, 3, 6, 7), (4,)]
    got = batches(layer, 3)
    order = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    for b, (data, label) in enumerate(got):
        idx = order[4 * b : 4 * b + 4]
        np.testing.assert_array_equal(label, np.array(idx, np.float32))
        expect = np.stack([image_dir[i].transpose(2, 0, 1) for i in idx]).astype(np.float32) * np.float32(0.25)
        np.testing.assert_allclose(data, expect, rtol=0, atol=0)


def test_imagedata_gray_resize(image_dir):
    layer = image_layer(bs=2, extra="is_color: false new_height: 4 new_width: 5")
    data, label = layer.forward()
    gray = cv2.cvtColor(image_dir[0], cv2.COLOR_BGR2GRAY)
    expect = cv2.resize(gray, (5, 4)).astype(np.float32)
    assert tuple(data.shape) == (2, 1, 4, 5)
    np.testing.assert_allclose(data[0, 0].numpy(), expect, rtol=0, atol=1.001)


def test_imagedata_shuffle_is_a_permutation_each_pass_and_seeded(image_dir):
    def run(seed):
        torch.manual_seed(seed)
        return np.concatenate([lab for _, lab in batches(image_layer(bs=3, extra="shuffle: true"), 4)])

    a, b, c = run(11), run(11), run(12)
    np.testing.assert_array_equal(a, b)
    assert sorted(a[:6]) == list(range(6)) and sorted(a[6:]) == list(range(6))
    assert not np.array_equal(a, c)  # another seed, another order
    assert not np.array_equal(a[:6], a[6:])  # reshuffled at the wrap-around


def test_set_random_seed_reproduces_train_crops_and_prefetch_keeps_order(image_dir):
    tp = "crop_size: 4 mirror: true"

    def run(seed, prefetch):
        caffe_compat.set_random_seed(seed)
        return batches(image_layer(bs=3, tp=tp, prefetch=prefetch, phase=caffe_pb2.TRAIN), 5)

    a, b, sync = run(3, 4), run(3, 4), run(3, 0)
    other = run(4, 4)
    for x, y, z in zip(a, b, sync):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[0], z[0])  # prefetching changes when, never which
    assert any(not np.array_equal(x[0], o[0]) for x, o in zip(a, other))


@pytest.mark.parametrize("kind", ["ImageData", "Data"])
def test_data_threads_give_the_same_batches_as_one_image_at_a_time(image_dir, tmp_path, monkeypatch, kind):
    """The images of a batch are decoded and transformed on several threads (data.workers); the
    random draws stay in record order, so TRAIN crops, mirrors and reshuffles are bit-identical
    to one thread's."""
    tp = "crop_size: 4 mirror: true mean_value: 10 scale: 0.5"
    if kind == "Data":
        from caffe_compat.cli import convert_imageset

        assert convert_imageset.main(["--encoded", "imgs/", "list.txt", str(tmp_path / "db")]) == 0

    def run(threads):
        monkeypatch.setenv("CAFFE_COMPAT_DATA_THREADS", str(threads))
        caffe_compat.set_random_seed(5)
        if kind == "ImageData":
            layer = image_layer(bs=4, extra="shuffle: true", tp=tp, prefetch=0, phase=caffe_pb2.TRAIN)
        else:
            layer = make_layer(
                f'name: "d" type: "Data" top: "data" top: "label" transform_param {{ {tp} }} '
                f'data_param {{ source: "{tmp_path / "db"}" backend: LMDB batch_size: 4 prefetch: 0 }}',
                caffe_pb2.TRAIN,
            )
        return batches(layer, 5)

    one, three = run(1), run(3)
    for (d1, l1), (d3, l3) in zip(one, three):
        np.testing.assert_array_equal(l1, l3)
        np.testing.assert_array_equal(d1, d3)


def test_data_threads_raise_the_first_bad_record_of_a_batch(image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_DATA_THREADS", "3")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "list.txt").write_text("im 0.png 0\nmissing.png 1\nbad.png 2\nim 1.png 3\n")
    with pytest.raises(DataError, match=r"list.txt:2: image file 'imgs/missing.png' not found"):
        image_layer(bs=4, prefetch=0).forward()


def test_imagedata_rand_skip_starts_inside_the_range(image_dir):
    starts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        ((_, label),) = batches(image_layer(bs=1, extra="rand_skip: 4"), 1)
        starts.add(int(label[0]))
    assert starts <= {0, 1, 2, 3} and len(starts) > 1


def test_imagedata_missing_image_names_list_line(image_dir, tmp_path):
    (tmp_path / "list.txt").write_text("im 0.png 0\nim 1.png 1\nmissing.png 2\n")
    layer = image_layer(bs=2, prefetch=2)
    layer.forward()  # the first batch is fine
    with pytest.raises(
        DataError, match=r"layer 'd' \(ImageData\): list.txt:3: image file 'imgs/missing.png' not found"
    ):
        layer.forward()


def test_imagedata_undecodable_image_names_line(image_dir, tmp_path):
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "list.txt").write_text("bad.png 0\n")
    with pytest.raises(DataError, match=r"list.txt:1: could not decode image 'imgs/bad.png'"):
        image_layer(bs=1)


def test_imagedata_bad_list_and_size_mismatch(image_dir, tmp_path):
    with pytest.raises(DataError, match="image_data_param.source 'nolist.txt' not found"):
        make_layer('name: "d" type: "ImageData" top: "a" top: "b" image_data_param { source: "nolist.txt" }')
    (tmp_path / "list.txt").write_text("im 0.png 0\nim 1.png x1\n")
    with pytest.raises(DataError, match=r"list.txt:2: label 'x1' is not an integer"):
        image_layer()
    write_png(tmp_path / "imgs" / "big.png", np.zeros((9, 9, 3), np.uint8))
    (tmp_path / "list.txt").write_text("im 0.png 0\nbig.png 1\n")
    with pytest.raises(DataError, match=r"list.txt:2: .*batch_size 1"):
        image_layer(bs=2).forward()
    with pytest.raises(LayerError, match="new_height and new_width"):
        image_layer(extra="new_height: 4")


# -- Data (LMDB) -------------------------------------------------------------------------------


def write_lmdb(path: Path, records: list[tuple[bytes, bytes]]) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in records:
            txn.put(k, v)
    env.close()


def test_data_float_datum_and_wrap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(3)]
    recs = []
    for i, x in enumerate(xs):
        d = caffe_pb2.Datum(channels=2, height=3, width=4, label=10 + i)
        d.float_data.extend(x.ravel().tolist())
        recs.append((f"{i:08d}".encode(), d.SerializeToString()))
    write_lmdb(tmp_path / "db", recs)
    layer = make_layer(
        'name: "d" type: "Data" top: "x" top: "y" '
        'data_param { source: "db" backend: LMDB batch_size: 2 } transform_param { scale: 3 }'
    )
    got = batches(layer, 3)
    order = [0, 1, 2, 0, 1, 2]
    for b, (data, label) in enumerate(got):
        idx = order[2 * b : 2 * b + 2]
        np.testing.assert_array_equal(label, [10 + i for i in idx])
        np.testing.assert_allclose(data, np.stack([xs[i] for i in idx]) * np.float32(3), rtol=0, atol=0)
    one_top = make_layer('name: "d" type: "Data" top: "x" data_param { source: "db" backend: LMDB batch_size: 2 }')
    assert one_top.top_shapes([]) == [(2, 2, 3, 4)]
    assert len(one_top.forward()) == 1


def test_data_encoded_force_gray(monkeypatch):
    monkeypatch.chdir(FIXTURES)
    layer = make_layer(
        'name: "d" type: "Data" top: "x" top: "y" transform_param { force_gray: true } '
        'data_param { source: "lmdb_encoded" backend: LMDB batch_size: 1 }'
    )
    assert layer.top_shapes([]) == [(1, 1, 8, 10), (1,)]
    color = make_layer(
        'name: "d" type: "Data" top: "x" top: "y" data_param { source: "lmdb_encoded" backend: LMDB batch_size: 1 }'
    )
    bgr = color.forward()[0][0].numpy().transpose(1, 2, 0).astype(np.uint8)
    expect = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    np.testing.assert_allclose(layer.forward()[0][0, 0].numpy(), expect, rtol=0, atol=1.0)


def test_data_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4), label=1).SerializeToString()
    write_lmdb(
        tmp_path / "db",
        [
            (b"00000000", good),
            (b"00000001", b"\xff\xff\xff garbage"),
            (b"00000002", caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(3)).SerializeToString()),
        ],
    )
    base = 'name: "d" type: "Data" top: "x" top: "y" data_param {{ source: "{src}" batch_size: 1 {extra} }}'
    with pytest.raises(
        DataError, match=r"'db' is an LMDB .*backend is LEVELDB \(the default when unset\): add `backend: LMDB`"
    ):
        make_layer(base.format(src="db", extra=""))
    with pytest.raises(DataError, match="'nodb' is not an LMDB directory"):
        make_layer(base.format(src="nodb", extra="backend: LMDB"))
    layer = make_layer(base.format(src="db", extra="backend: LMDB"))
    layer.forward()
    with pytest.raises(DataError, match=r"db key '00000001': record is not a Datum"):
        layer.forward()
    with pytest.raises(DataError, match=r"db key '00000001'"):
        layer.forward()  # the failure sticks: no silent skipping past a bad record
    layer = make_layer(base.format(src="db", extra="backend: LMDB prefetch: 0"))
    layer.forward()
    with pytest.raises(DataError):
        layer.forward()
    bad_size = tmp_path / "db2"
    write_lmdb(bad_size, [(b"k", caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(3)).SerializeToString())])
    with pytest.raises(DataError, match=r"db2 key 'k': Datum holds 3 bytes but channels×height×width = 1×2×2 = 4"):
        make_layer(base.format(src="db2", extra="backend: LMDB"))


# -- HDF5Data --------------------------------------------------------------------------------


def write_h5(path: Path, **arrays) -> None:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


@pytest.fixture
def h5_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(8)
    a = rng.normal(size=(3, 2, 2)).astype(np.float64)
    b = rng.normal(size=(2, 2, 2)).astype(np.float32)
    write_h5(tmp_path / "a.h5", data=a, label=np.array([0, 1, 2], np.int32))
    write_h5(tmp_path / "b.h5", data=b, label=np.array([3, 4], np.int64))
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\n")
    return np.concatenate([a, b]).astype(np.float32)


def h5_layer(bs=2, extra="", tops=("data", "label")):
    t = " ".join(f'top: "{x}"' for x in tops)
    return make_layer(
        f'name: "h" type: "HDF5Data" {t} hdf5_data_param {{ source: "list.txt" batch_size: {bs} {extra} }}'
    )


def test_hdf5data_rows_in_order_across_files(h5_files):
    layer = h5_layer(bs=2)
    assert layer.top_shapes([]) == [(2, 2, 2), (2,)]
    got = batches(layer, 5)
    rows = np.arange(10) % 5
    for k, (data, label) in enumerate(got):
        np.testing.assert_array_equal(label, rows[2 * k : 2 * k + 2].astype(np.float32))
        np.testing.assert_allclose(data, h5_files[rows[2 * k : 2 * k + 2]], rtol=0, atol=0)


def test_hdf5data_shuffle_permutes_files_and_rows(h5_files):
    torch.manual_seed(0)
    layer = h5_layer(bs=5, extra="shuffle: true")
    passes = [batches(layer, 1)[0] for _ in range(6)]
    orders = []
    for data, label in passes:
        assert sorted(label) == [0, 1, 2, 3, 4]  # each batch of 5 is one pass
        np.testing.assert_allclose(data, h5_files[label.astype(int)], rtol=0, atol=0)  # rows stay paired
        # file structure: rows of a file are contiguous
        in_a = label < 3
        assert in_a[:3].all() or in_a[2:].all()
        orders.append(tuple(label))
    assert len(set(orders)) > 1


def test_hdf5data_label_column_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / "c.h5", x=np.zeros((4, 3), np.float32), y=np.arange(4, dtype=np.float32)[:, None])
    (tmp_path / "l.txt").write_text("c.h5")
    layer = make_layer('name: "h" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "l.txt" batch_size: 3 }')
    assert layer.top_shapes([]) == [(3, 3), (3, 1)]
    x, y = layer.forward()
    np.testing.assert_array_equal(y.numpy(), [[0], [1], [2]])


def test_hdf5data_errors(h5_files, tmp_path):
    with pytest.raises(LayerError, match="does not transform data"):
        make_layer(
            'name: "h" type: "HDF5Data" top: "data" transform_param { scale: 2 } '
            'hdf5_data_param { source: "list.txt" batch_size: 2 }'
        )
    with pytest.raises(DataError, match=r"'a.h5' \(entry 1 of 'list.txt'\) has no dataset 'nope'"):
        h5_layer(tops=("data", "nope"))
    write_h5(tmp_path / "bad.h5", data=np.zeros((3, 2, 2)), label=np.zeros(2))
    (tmp_path / "list.txt").write_text("bad.h5\n")
    with pytest.raises(DataError, match=r"'bad.h5'.*dataset 'label' has 2 rows but 'data' has 3"):
        h5_layer()
    (tmp_path / "list.txt").write_text("a.h5\nmissing.h5\n")
    layer = h5_layer(bs=2)
    layer.forward()
    with pytest.raises(DataError, match=r"'missing.h5' \(entry 2 of 'list.txt'\) not found"):
        layer.forward()  # reaching the end of a.h5 loads the next file
    write_h5(tmp_path / "odd.h5", data=np.zeros((2, 5)), label=np.zeros(2))
    (tmp_path / "list.txt").write_text("a.h5 odd.h5")
    layer = h5_layer(bs=3)
    with pytest.raises(DataError, match=r"'odd.h5' \(entry 2.*rows of shape \(5,\), the first file's have \(2, 2\)"):
        layer.forward()
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no HDF5 file"):
        h5_layer()
    (tmp_path / "noth5.h5").write_text("hello")
    (tmp_path / "list.txt").write_text("noth5.h5")
    with pytest.raises(DataError, match="'noth5.h5'.*could not be opened"):
        h5_layer()


# -- MemoryData and HDF5Output -------------------------------------------------------------------


def test_memorydata_set_input_arrays_through_net(tmp_path):
    proto = tmp_path / "m.prototxt"
    proto.write_text(
        'layer { name: "m" type: "MemoryData" top: "data" top: "label" '
        "memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }"
    )
    net = caffe_compat.Net(str(proto), caffe_compat.TEST)
    data = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([5, 6, 7, 8], np.float32).reshape(4, 1, 1, 1)
    net.set_input_arrays(data, labels)
    for k in range(3):
        net.forward()
        rows = [(2 * k) % 4, (2 * k) % 4 + 1]
        np.testing.assert_allclose(net.blobs["data"].data, data[rows], rtol=0, atol=0)
        np.testing.assert_array_equal(net.blobs["label"].data, labels.ravel()[rows])


def test_memorydata_errors():
    layer = make_layer(
        'name: "m" type: "MemoryData" top: "a" top: "b" '
        "memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 }"
    )
    assert layer.top_shapes([]) == [(2, 1, 2, 2), (2,)]
    with pytest.raises(LayerError, match="call net.set_input_arrays"):
        layer.forward()
    with pytest.raises(LayerError, match="N×1×2×2"):
        layer.set_input_arrays(np.zeros((2, 3, 2, 2)), np.zeros(2))
    with pytest.raises(LayerError, match="multiple of batch_size 2"):
        layer.set_input_arrays(np.zeros((3, 1, 2, 2)), np.zeros(3))
    with pytest.raises(LayerError, match="same first dimension"):
        layer.set_input_arrays(np.zeros((2, 1, 2, 2)), np.zeros(4))
    with pytest.raises(LayerError, match="must be specified and positive"):
        make_layer('name: "m" type: "MemoryData" top: "a" top: "b" memory_data_param { batch_size: 2 }')


def test_hdf5output_writes_data_and_label_legacy_4d(tmp_path):
    out = tmp_path / "out.h5"
    layer = make_layer(
        f'name: "o" type: "HDF5Output" bottom: "x" bottom: "y" hdf5_output_param {{ file_name: "{out}" }}',
        bottom_shapes=[(2, 3), (2,)],
    )
    assert layer.top_shapes([(2, 3), (2,)]) == []
    x1, y1 = torch.arange(6.0).reshape(2, 3), torch.tensor([1.0, 2.0])
    x2, y2 = x1 + 100, y1 + 10
    assert layer.forward(x1, y1) == ()
    layer.forward(x2, y2)
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"data", "label"}
        assert f["data"].shape == (4, 3, 1, 1) and f["label"].shape == (4, 1, 1, 1)
        assert f["data"].dtype == np.float32
        np.testing.assert_allclose(f["data"][:, :, 0, 0], torch.cat([x1, x2]).numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(f["label"][:].ravel(), [1, 2, 11, 12], rtol=0, atol=0)
    with pytest.raises(LayerError, match="same batch size"):
        layer.forward(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(LayerError, match="could not create HDF5 file"):
        make_layer(
            f'name: "o" type: "HDF5Output" bottom: "x" bottom: "y" '
            f'hdf5_output_param {{ file_name: "{tmp_path}/no/such/dir.h5" }}',
            bottom_shapes=[(2,), (2,)],
        )


# -- Prefetcher ------------------------------------------------------------------------------------


def test_prefetcher_order_and_error_at_its_batch():
    state = {"n": 0}

    def produce():
        state["n"] += 1
        if state["n"] == 4:
            raise DataError("batch 4 is bad")
        return state["n"]

    p = Prefetcher(produce, depth=2)
    assert [p.next() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(DataError, match="batch 4 is bad"):
        p.next()
    with pytest.raises(DataError, match="batch 4 is bad"):
        p.next()
    p.close()
    assert not p.running


def test_prefetching_layer_thread_stops_when_closed(image_dir):
    layer = image_layer(bs=2, prefetch=3)
    layer.forward()
    assert layer._prefetcher.running
    layer.close()
    assert not layer._prefetcher.running


def test_legacy_transform_fields_in_image_data_param(image_dir):
    legacy = make_layer(
        'name: "d" type: "ImageData" top: "a" top: "b" '
        'image_data_param { source: "list.txt" root_folder: "imgs/" batch_size: 2 scale: 0.25 crop_size: 4 }'
    )
    modern = image_layer(bs=2, tp="scale: 0.25 crop_size: 4")
    assert legacy.top_shapes([]) == [(2, 3, 4, 4), (2,)]
    np.testing.assert_allclose(legacy.forward()[0].numpy(), modern.forward()[0].numpy(), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_data_threads_work_in_a_forked_child(image_dir, monkeypatch):
    """A process forked after the data threads started gets threads of its own (a child with the
    parent's pool object and none of its threads would wait forever)."""
    import multiprocessing

    monkeypatch.setenv("CAFFE_COMPAT_DATA_THREADS", "2")
    image_layer(bs=4, prefetch=0).forward()  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        labels = pool.apply_async(_labels_of_one_batch).get(timeout=60)
    assert labels == [0.0, 1.0, 2.0, 3.0]


def _labels_of_one_batch():
    return image_layer(bs=4, prefetch=0).forward()[1].tolist()
