"""Resume costs O(1) in the iteration count (issue 23 item 4): ``skip_batches(n)`` seeks instead
of replaying, and k batches + skip + N-k batches are bit-identical to N batches straight, for
every data layer type with crop, mirror and shuffle; skipping 10^7 batches decodes one batch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.data.lmdb_db import LMDBWriter
from caffe_compat.layers import data as data_layers
from caffe_compat.layers.base import layer_class
from caffe_compat.proto import caffe_pb2
from tests.test_window_data import write_window_file

N, K = 7, 3  # batches straight; batches before the resume


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Images of two sizes, a list, an LMDB of encoded and raw Datums, HDF5 files, a window file."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(7)
    (tmp_path / "img").mkdir()
    lines = []
    with LMDBWriter(str(tmp_path / "db")) as db:
        for i in range(11):
            h, w = (10, 12) if i % 2 else (9, 9)
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), img)
            lines.append(f"{i}.png {i % 5}")
            datum = caffe_pb2.Datum(label=i % 5)
            if i % 3:
                ok, buf = cv2.imencode(".png", img)
                datum.encoded, datum.data = True, buf.tobytes()
            else:
                datum.channels, datum.height, datum.width = 3, h, w
                datum.data = img.transpose(2, 0, 1).tobytes()
            db.put(f"{i:08d}".encode(), datum.SerializeToString())
    Path("list.txt").write_text("\n".join(lines) + "\n")
    names = []
    for j, rows in enumerate((5, 3, 8)):  # row counts that batch_size 4 does not divide
        name = f"part{j}.h5"
        with h5py.File(name, "w") as f:
            f["data"] = rng.normal(size=(rows, 2, 3)).astype(np.float32)
            f["label"] = (np.arange(rows) + 10 * j).astype(np.float32)
        names.append(name)
    Path("h5.txt").write_text("\n".join(names) + "\n")
    write_window_file(
        tmp_path / "windows.txt",
        [
            ("img/1.png", (3, 10, 12), [(1, 0.8, 1, 1, 9, 8), (2, 0.6, 0, 0, 6, 6), (0, 0.1, 3, 3, 11, 9)]),
            ("img/2.png", (3, 9, 9), [(3, 0.9, 1, 1, 7, 8), (0, 0.2, 0, 0, 8, 8)]),
        ],
    )
    return tmp_path


LAYERS = {
    "Data": 'type: "Data" top: "data" top: "label" data_param { source: "db" backend: LMDB batch_size: 4 '
    "rand_skip: 5 prefetch: 2 } transform_param { crop_size: 8 mirror: true scale: 0.5 }",
    "ImageData": 'type: "ImageData" top: "data" top: "label" image_data_param { source: "list.txt" '
    'root_folder: "img/" batch_size: 3 shuffle: true rand_skip: 4 } transform_param { crop_size: 7 mirror: true }',
    "HDF5Data": 'type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h5.txt" batch_size: 4 '
    "shuffle: true }",
    "WindowData": 'type: "WindowData" top: "data" top: "label" window_data_param { source: "windows.txt" '
    "batch_size: 4 fg_fraction: 0.5 } transform_param { crop_size: 5 mirror: true }",
    "MemoryData": 'type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 channels: 1 '
    "height: 2 width: 3 }",
}


def _layer(kind: str, seed: int = 5, prefetch: bool = True):
    text = LAYERS[kind]
    if not prefetch:  # batches read on demand: what was decoded can be counted exactly
        text = text.replace("prefetch: 2", "prefetch: 0")
        if kind in ("ImageData", "WindowData"):
            text += " data_param { prefetch: 0 }"
    param = text_format.Parse(f'name: "src" {text}', caffe_pb2.LayerParameter())
    torch.manual_seed(seed)
    layer = layer_class(param.type)(param, [], caffe_pb2.TRAIN)
    if kind == "MemoryData":
        rows = np.arange(10 * 6, dtype=np.float32).reshape(10, 1, 2, 3)
        layer.set_input_arrays(rows, np.arange(10, dtype=np.float32))
    return layer


def _batches(layer, n: int) -> list[list[np.ndarray]]:
    return [[t.numpy().copy() for t in layer.forward()] for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_resume_is_bit_identical_to_a_straight_run(sources, kind):
    straight = _batches(_layer(kind), N)
    first = _batches(_layer(kind), K)
    resumed = _layer(kind)  # a new process: same seed, the solver skips what was done
    resumed.skip_batches(K)
    rest = _batches(resumed, N - K)
    for k, (want, got) in enumerate(zip(straight, first + rest)):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} batch {k}")
    # the stream really is random: another seed gives other batches
    if kind != "MemoryData":
        other = _batches(_layer(kind, seed=6), N)
        assert any(not np.array_equal(a[0], b[0]) for a, b in zip(straight, other))


@pytest.mark.parametrize("kind", ["Data", "ImageData", "HDF5Data", "WindowData", "MemoryData"])
def test_skipping_ten_million_batches_decodes_one_batch(sources, kind, monkeypatch):
    """Counted, not timed: the records decoded (Datums parsed, images read, HDF5 files loaded)."""
    from caffe_compat.data import hdf5, image_list
    from caffe_compat.layers import window_data

    decoded = {"n": 0}

    def counting(fn):
        def wrapper(*args, **kwargs):
            decoded["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(data_layers._DatumSource, "decode", counting(data_layers._DatumSource.decode))
    monkeypatch.setattr(data_layers, "read_image", counting(image_list.read_image))
    monkeypatch.setattr(data_layers, "load_hdf5_file", counting(hdf5.load_hdf5_file))
    monkeypatch.setattr(window_data, "imread", counting(image_list.imread))
    n = 10**7
    skipped = _layer(kind, prefetch=False)
    at_setup = decoded["n"]
    skipped.skip_batches(n)
    got = _batches(skipped, 2)
    # two batches' records (HDF5Data: the file it seeks into, and perhaps the next one)
    per_batch = {"Data": 4, "ImageData": 3, "WindowData": 4, "MemoryData": 0}
    if kind == "HDF5Data":
        assert decoded["n"] - at_setup <= 3
    else:
        assert decoded["n"] - at_setup == 2 * per_batch[kind]
    # the same position reached the other way: skip n - 1, then read the batch n - 1 and n
    other = _layer(kind)
    other.skip_batches(n - 1)
    want = _batches(other, 3)[1:]
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_skip_positions_by_index_arithmetic(sources):
    """Without shuffle the batch after a skip of n is the list's entries (start + n·bs + i) mod N:
    checked against that formula, not against our own walk."""
    text = LAYERS["ImageData"].replace("shuffle: true rand_skip: 4", "").replace("mirror: true", "")
    param = text_format.Parse(f'name: "src" {text}', caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, [], caffe_pb2.TEST)
    n = 123_456_789
    layer.skip_batches(n)
    _, labels = layer.forward()
    want = [((n * 3 + i) % 11) % 5 for i in range(3)]
    np.testing.assert_array_equal(labels.numpy(), want)
    text = LAYERS["HDF5Data"].replace("shuffle: true", "")
    param = text_format.Parse(f'name: "src" {text}', caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, [], caffe_pb2.TRAIN)
    layer.skip_batches(n)
    _, labels = layer.forward()
    all_labels = [0, 1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 23, 24, 25, 26, 27]
    want = [all_labels[(n * 4 + i) % 16] for i in range(4)]
    np.testing.assert_array_equal(labels.numpy(), want)


SOLVER = textwrap.dedent(
    """\
    net: "train.prototxt"
    base_lr: 0.05
    momentum: 0.9
    lr_policy: "fixed"
    max_iter: 100
    random_seed: 11
    snapshot_prefix: "snap"
    display: 0
    """
)
TRAIN_NET = textwrap.dedent(
    """\
    layer { name: "src" %s }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """
)


@pytest.mark.parametrize("kind", ["ImageData", "Data"])
def test_solver_resume_after_snapshot_is_bit_identical(sources, kind):
    from caffe_compat.solvers import get_solver

    Path("solver.prototxt").write_text(SOLVER)
    Path("train.prototxt").write_text(TRAIN_NET % LAYERS[kind])
    full = get_solver("solver.prototxt")
    full.step(6)
    mid = get_solver("solver.prototxt")
    mid.step(3)
    state = mid.snapshot()
    resumed = get_solver("solver.prototxt")
    resumed.restore(state)
    resumed.step(3)
    for a, b in zip(full.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    np.testing.assert_array_equal(full.net.blobs["data"].data, resumed.net.blobs["data"].data)
