"""The dental data: synthetic generator, the user's CSV format, half-images, splits, HDF5, the
evaluation in mm, and the shipped nets (tests of caffe_compat/dental and tools/prepare_dental.py)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_compat.dental import evaluate, nets
from caffe_compat.dental.dataset import (
    CSV_COLUMNS,
    Sample,
    make_halves,
    prepare,
    read_dataset,
    split_images,
    to_image_pixels,
)
from caffe_compat.dental.generator import generate_dataset, generate_radiograph
from caffe_compat.errors import DataError
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generator_is_deterministic_and_bilateral():
    a, b, c = generate_radiograph(3, 1, 96, 192), generate_radiograph(3, 1, 96, 192), generate_radiograph(4, 1, 96, 192)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(a.landmarks, b.landmarks, rtol=0, atol=0)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (96, 192) and a.image.dtype == np.uint8
    for r in (a, c):
        assert np.all(r.landmarks[:4, 0] < 96 - 0.5) and np.all(r.landmarks[4:, 0] > 96 - 0.5)
        assert np.all((r.landmarks[:, 1] > 0) & (r.landmarks[:, 1] < 96))
        assert 0.35 <= r.spacing_mm <= 0.45
        # landmark k and k + 4 are mirror partners: roughly symmetric about the image centre
        np.testing.assert_allclose(r.landmarks[:4, 0] + r.landmarks[4:, 0], 192, rtol=0, atol=20)
        assert r.image.std() > 10  # not blank


def test_write_read_roundtrip(tmp_path):
    csv_path = generate_dataset(str(tmp_path), num_images=4, num_annotated=2, seed=1, height=64, width=128)
    samples = read_dataset(str(tmp_path))
    assert [s.name for s in samples] == [f"synthetic_{i:04d}.png" for i in range(4)]
    assert [s.landmarks is not None for s in samples] == [True, True, False, False]
    want = generate_radiograph(1, 0, 64, 128)
    np.testing.assert_allclose(samples[0].landmarks, want.landmarks, rtol=0, atol=1e-3)
    np.testing.assert_allclose(samples[0].image, want.image / 255.0, rtol=0, atol=1e-6)
    assert samples[0].spacing_mm == pytest.approx(want.spacing_mm, abs=1e-9)
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == CSV_COLUMNS


def _bad_csv(tmp_path, row: list[str]) -> str:
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 40), np.uint8))
    lines = [",".join(CSV_COLUMNS), ",".join(row)]
    (tmp_path / "landmarks.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_dataset(str(tmp_path))
    return str(e.value)


def _row(**over) -> list[str]:
    vals = {"image": "a.png", "spacing_mm": "0.1"}
    for k in range(1, 9):
        vals[f"x{k}"] = "5" if k <= 4 else "30"
        vals[f"y{k}"] = "10"
    vals.update(over)
    return [vals[c] for c in CSV_COLUMNS]


@pytest.mark.parametrize(
    "over, column, text",
    [
        ({"x3": "abc"}, 6, "not a number"),
        ({"y2": ""}, 5, "partly given"),
        ({"spacing_mm": ""}, 18, "pixel spacing"),
        ({"spacing_mm": "-1"}, 18, "positive"),
        ({"x6": "3"}, 12, "right half"),
        ({"x1": "25"}, 2, "left half"),
        ({"y8": "99"}, 17, "outside"),
        ({"image": "missing.png"}, 1, "not found"),
    ],
)
def test_malformed_rows_name_file_line_column(tmp_path, over, column, text):
    msg = _bad_csv(tmp_path, _row(**over))
    assert f"landmarks.csv:2:{column}" in msg
    assert text in msg


def test_every_malformed_row_is_reported(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 40), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((20, 40), np.uint8))
    rows = [",".join(CSV_COLUMNS), ",".join(_row(x1="q")), ",".join(_row(image="b.png", y1="w")), "a.png,1"]
    (tmp_path / "landmarks.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        read_dataset(str(tmp_path))
    msg = str(e.value)
    assert "landmarks.csv:2:2" in msg and "landmarks.csv:3:3" in msg and "landmarks.csv:4:" in msg
    assert "3 problem(s)" in msg


def test_halves_mirror_landmarks_consistently():
    rng = np.random.default_rng(0)
    left = rng.random((30, 25)).astype(np.float32)
    img = np.concatenate([left, rng.random((30, 1)).astype(np.float32), left[:, ::-1]], axis=1)  # width 51 (odd)
    lm_left = np.array([[3.0, 4.0], [10.2, 7.5], [20.0, 25.0], [1.5, 28.0]])
    lm = np.concatenate([lm_left, np.stack([50 - lm_left[:, 0], lm_left[:, 1]], axis=1)])
    halves = make_halves(Sample("s", img, lm, 0.2), 16)
    a, b = halves
    assert (a.side, b.side, a.half_width) == ("left", "right", 25)
    np.testing.assert_allclose(a.image, b.image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.targets, b.targets, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.targets, (lm_left + 0.5) / [25, 30], rtol=0, atol=1e-12)
    for h, want in ((a, lm[:4]), (b, lm[4:])):
        back = to_image_pixels(h.targets, h.side, 51, 30, 25)
        np.testing.assert_allclose(back, want, rtol=0, atol=1e-9)


def test_split_keeps_both_halves_and_is_seeded(tmp_path):
    names = [f"img{i}" for i in range(30)]
    tr, va = split_images(names, 0.1, seed=5)
    assert len(va) == 3 and not set(tr) & set(va) and set(tr) | set(va) == set(names)
    assert split_images(names, 0.1, seed=5) == (tr, va)
    assert split_images(names, 0.1, seed=6) != (tr, va)

    generate_dataset(str(tmp_path / "raw"), num_images=10, num_annotated=6, seed=0, height=48, width=96)
    prep = prepare(read_dataset(str(tmp_path / "raw")), str(tmp_path / "out"), size=32, seed=0)
    for split in prep.lists:
        rows = prep.rows(split)
        by_image: dict = {}
        for r in rows:
            by_image.setdefault(r["image"], set()).add(r["side"])
        assert all(v == {"left", "right"} for v in by_image.values()), split
    cae_imgs = [{r["image"] for r in prep.rows(s)} for s in ("cae_train", "cae_val")]
    assert len(cae_imgs[1]) == 1 and not cae_imgs[0] & cae_imgs[1]
    lm_imgs = [{r["image"] for r in prep.rows(s)} for s in ("landmarks_train", "landmarks_val")]
    assert sum(map(len, lm_imgs)) == 6 and len(lm_imgs[1]) == 1
    with h5py.File(prep.h5["landmarks_train"], "r") as f:
        assert f["data"].shape == (10, 3, 32, 32) and f["landmarks"].shape == (10, 8)
        assert np.all((f["landmarks"][()] > 0) & (f["landmarks"][()] < 1))
    with h5py.File(prep.h5["cae_train"], "r") as f:
        assert f["data"].shape == (18, 3, 32, 32) and "landmarks" not in f
    assert open(prep.lists["cae_val"]).read().split() == [prep.h5["cae_val"]]


def test_prepare_scale_multiplies_the_data_and_is_recorded(tmp_path):
    from caffe_compat.dental.dataset import load_prepared

    generate_dataset(str(tmp_path / "raw"), num_images=4, num_annotated=3, seed=0, height=48, width=96)
    samples = read_dataset(str(tmp_path / "raw"))
    one = prepare(samples, str(tmp_path / "a"), size=32, seed=0)
    quarter = prepare(samples, str(tmp_path / "b"), size=32, seed=0, scale=0.25)
    assert one.scale == 1.0 and quarter.scale == 0.25 and load_prepared(str(tmp_path / "b")).scale == 0.25
    for split in one.h5:
        with h5py.File(one.h5[split], "r") as f, h5py.File(quarter.h5[split], "r") as g:
            np.testing.assert_allclose(g["data"][()], 0.25 * f["data"][()], rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match="scale"):
        prepare(samples, str(tmp_path / "c"), size=32, scale=0.0)
    # the training halves' mean image: subtracted, saved, and undone by to_gray
    own = prepare(samples, str(tmp_path / "d"), size=32, seed=0, scale=0.25, mean="train")
    mean = np.load(str(tmp_path / "d" / "mean.npy"))
    assert mean.shape == (3, 32, 32) and load_prepared(str(tmp_path / "d")).mean == "train"
    with h5py.File(own.h5["cae_train"], "r") as f:
        data = f["data"][()]
    np.testing.assert_allclose(data.mean(axis=0), 0.0, rtol=0, atol=1e-3)
    with h5py.File(one.h5["cae_train"], "r") as f:
        np.testing.assert_allclose(own.to_gray(data), one.to_gray(f["data"][()]), rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="mean"):
        prepare(samples, str(tmp_path / "e"), size=32, mean="dataset")


def test_prepare_dental_tool_writes_default_layout(tmp_path, in_dir):
    from caffe_compat.cli import prepare_dental

    with in_dir(tmp_path):
        assert prepare_dental.main(["--num-images", "4", "--num-annotated", "3", "--size", "64"]) == 0
    out = tmp_path / nets.DEFAULT_DATA_DIR
    for name in ("cae_train.txt", "cae_val.txt", "landmarks_train.txt", "landmarks_val.txt", "halves.csv", "meta.json"):
        assert (out / name).is_file(), name
    assert (out / "snapshots").is_dir()
    # the shipped prototxts read exactly these lists
    tv = text_format.Parse(
        (ROOT / "prototxt/dental_landmarks_train_val.prototxt").read_text(), caffe_pb2.NetParameter()
    )
    sources = {lp.hdf5_data_param.source for lp in tv.layer if lp.type == "HDF5Data"}
    assert sources == {f"{nets.DEFAULT_DATA_DIR}/landmarks_train.txt", f"{nets.DEFAULT_DATA_DIR}/landmarks_val.txt"}


def test_prepare_dental_tool_reports_bad_csv(tmp_path, capsys):
    from caffe_compat.cli import prepare_dental

    _ = _bad_csv(tmp_path, _row(x2="nope"))
    assert prepare_dental.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "landmarks.csv:2:4" in capsys.readouterr().err


def test_errors_mm_from_known_shift():
    """A prediction shifted by a known number of (resized) pixels gives the known mm error."""
    size, spacing = 224, 0.25
    sample = Sample(
        "s",
        np.zeros((300, 401), np.float32),
        np.array(
            [[20, 30], [50, 60], [100, 200], [150, 250], [380, 30], [350, 60], [300, 200], [250, 250]], dtype=np.float64
        ),
        spacing,
    )
    halves = make_halves(sample, size)
    rows = [
        {
            "side": h.side,
            "image_width": h.image_width,
            "image_height": h.image_height,
            "half_width": h.half_width,
            "spacing_mm": h.spacing_mm,
            **{f"{a}{k + 1}": h.landmarks_px[k, i] for k in range(4) for i, a in enumerate("xy")},
        }
        for h in halves
    ]
    truth = np.stack([h.targets.reshape(8) for h in halves])
    np.testing.assert_allclose(evaluate.landmark_errors_mm(truth, rows), 0, rtol=0, atol=1e-9)
    dx, dy = 3.0, 4.0  # resized pixels
    shifted = truth.copy()
    shifted[:, 0::2] += dx / size
    shifted[:, 1::2] -= dy / size
    mm_x = dx * (200 / size) * spacing  # half width 200 px squeezed into 224
    mm_y = dy * (300 / size) * spacing
    err = evaluate.landmark_errors_mm(shifted, rows)
    np.testing.assert_allclose(err, np.full((2, 4), np.hypot(mm_x, mm_y)), rtol=1e-12, atol=0)
    s = evaluate.summarize(np.array([[1.0, 2, 3, 4], [3.0, 2, 5, 8]]))
    np.testing.assert_allclose(s["mean"], [2, 2, 4, 6], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s["std"], [1, 0, 1, 2], rtol=0, atol=1e-12)
    assert s["mean_over_landmarks"] == pytest.approx(3.5, abs=1e-12)


def test_table_gain_and_files(tmp_path):
    res = {k: evaluate.summarize(np.array([[m for m, _ in v]])) for k, v in evaluate.PAPER_TABLE.items()}
    rows = {r["config"]: r for r in evaluate.table_rows(res)}
    assert rows["cae_fc6_finetuned"]["mean_over_landmarks"] == pytest.approx(5.4017, abs=1e-4)
    assert rows["cae_fc6_finetuned"]["cae_gain"] == pytest.approx(1 - 5.4017 / 7.3072, abs=1e-4)
    assert rows["nocae_fc6_frozen"]["cae_gain"] is None
    paths = evaluate.write_table(res, str(tmp_path), ["note"])
    assert all(os.path.isfile(p) for p in paths.values())
    with open(paths["csv"], newline="") as f:
        assert len(list(csv.reader(f))) == 5


def test_mean_predictor_row(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.uniform(0.2, 0.8, (10, 8))
    ref = evaluate.mean_predictor(train, 3)
    np.testing.assert_allclose(ref, np.repeat(train.mean(0, keepdims=True), 3, 0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        evaluate.mean_predictor(train[:, :6], 3)
    res = {k: evaluate.summarize(np.array([[m for m, _ in v]])) for k, v in evaluate.PAPER_TABLE.items()}
    res[evaluate.MEAN_PREDICTOR[0]] = evaluate.summarize(np.array([[10.0, 10.0, 10.0, 10.0]]))
    rows = evaluate.table_rows(res)
    assert rows[0]["config"] == evaluate.MEAN_PREDICTOR[0] and rows[0]["cae_gain"] is None
    assert rows[-1]["vs_mean_predictor"] == pytest.approx(1 - 5.4017 / 10.0, abs=1e-4)
    md = open(evaluate.write_table(res, str(tmp_path))["md"]).read()
    assert "vs. mean predictor" in md and evaluate.MEAN_PREDICTOR[1] in md and "| 46.0% |" in md


def test_scratch_recipe_options_reach_the_layers():
    arch = nets.Arch(
        input_size=64,
        conv=(8, 16, 16, 16, 16),
        fc=16,
        code=8,
        filler="msra",
        decoder_conv=(4, 8, 8, 8, 8),
        decoder_relu_slope=0.1,
        cae_target_scale=1.0,
        cae_loss_weight=0.5,
        head_lr_mult=1.0,
        head_std=0.001,
    )
    cae = {lp.name: lp for lp in nets.cae_train_val(arch).layer}
    assert cae["conv1"].convolution_param.weight_filler.type == "msra"
    assert cae["fc6"].inner_product_param.weight_filler.type == "msra"
    assert cae["relu5"].relu_param.negative_slope == 0 and cae["derelu5"].relu_param.negative_slope == pytest.approx(
        0.1
    )
    assert cae["deconv5"].convolution_param.num_output == 8 and cae["depool1"].convolution_param.num_output == 4
    assert cae["target"].power_param.scale == 1.0 and list(cae["loss"].loss_weight) == [0.5]
    lm = {lp.name: lp for lp in nets.landmark_train_val(arch).layer}
    head = lm["fc8_landmarks"]
    assert head.inner_product_param.weight_filler.type == "gaussian"
    assert head.inner_product_param.weight_filler.std == pytest.approx(0.001)
    assert [p.lr_mult for p in head.param] == [1.0, 2.0]
    sp = nets.solver("n.prototxt", "s", base_lr=1e-4, max_iter=10, type="Adam", lr_policy="fixed")
    assert sp.type == "Adam" and sp.lr_policy == "fixed" and not sp.HasField("stepsize")


def test_shipped_files_equal_the_builders():
    for rel, msg in nets.shipped_messages().items():
        text = (ROOT / rel).read_text()
        cls = caffe_pb2.SolverParameter if rel.startswith("solvers/") else caffe_pb2.NetParameter
        assert text_format.Parse(text, cls()) == msg, f"{rel} is stale: run python -m caffe_compat.dental.nets"


@pytest.mark.parametrize("size", [64, 128, 224])
def test_cae_decoder_returns_to_the_input_size(size):
    from caffe_compat.net import TEST, Net

    arch = nets.Arch(input_size=size, conv=(8, 16, 16, 16, 16), fc=16, code=8)
    net = Net(nets.cae_deploy(arch), TEST)
    assert net.blobs["recon"].shape == (1, 3, size, size)
    assert net.blobs["fc8"].shape == (1, 8)


def test_shipped_alexnet_names_and_shapes_match_bvlc():
    from caffe_compat.net import TEST, Net

    net = Net(str(ROOT / "prototxt/dental_cae_deploy.prototxt"), TEST)
    shapes = {k: tuple(v[0].data.shape) for k, v in net.params.items()}
    bvlc = {
        "conv1": (96, 3, 11, 11),
        "conv2": (256, 48, 5, 5),
        "conv3": (384, 256, 3, 3),
        "conv4": (384, 192, 3, 3),
        "conv5": (256, 192, 3, 3),
        "fc6": (4096, 9216),
        "fc7": (4096, 4096),
        "fc8": (1000, 4096),
    }
    for k, v in bvlc.items():
        assert shapes[k] == v, k


def test_denoising_cae_corrupts_the_input_not_the_target(tmp_path):
    from caffe_compat.net import TEST, TRAIN, Net

    small = dict(input_size=64, conv=(8, 16, 16, 16, 16), fc=16, code=8, cae_target_scale=1.0)
    plain = {lp.name: lp for lp in nets.cae_train_val(nets.Arch(**small)).layer}
    assert "corrupt" not in plain and list(plain["conv1"].bottom) == ["data"]
    h5 = tmp_path / "cae.h5"
    rng = np.random.default_rng(0)
    with h5py.File(h5, "w") as f:
        f["data"] = rng.normal(size=(4, 3, 64, 64)).astype(np.float32) + 3.0  # no pixel is 0
    (tmp_path / "cae.txt").write_text(f"{h5}\n")
    msg = nets.cae_train_val(
        nets.Arch(**small, cae_input_dropout=0.25),
        str(tmp_path / "cae.txt"),
        str(tmp_path / "cae.txt"),
        batch=4,
        val_batch=4,
    )
    layers = {lp.name: lp for lp in msg.layer}
    assert layers["corrupt"].type == "Dropout"
    assert layers["corrupt"].dropout_param.dropout_ratio == pytest.approx(0.25)
    assert list(layers["conv1"].bottom) == ["data_corrupt"] and list(layers["target"].bottom) == ["data"]
    train = Net(msg, TRAIN)
    train.forward()
    data, noisy = train.blobs["data"].data, train.blobs["data_corrupt"].data
    np.testing.assert_allclose(train.blobs["target"].data, data, rtol=0, atol=0)
    dropped = noisy == 0
    assert 0.2 < dropped.mean() < 0.3
    np.testing.assert_allclose(noisy[~dropped], data[~dropped] / 0.75, rtol=1e-6, atol=0)
    test = Net(msg, TEST)
    test.forward()
    np.testing.assert_allclose(test.blobs["data_corrupt"].data, test.blobs["data"].data, rtol=0, atol=0)
    deploy = {lp.name for lp in nets.cae_deploy(nets.Arch(**small, cae_input_dropout=0.25)).layer}
    assert "corrupt" not in deploy
