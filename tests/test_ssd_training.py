"""SSD training end to end: synthetic annotated images (coloured rectangles on a grey ground, VOC
XML boxes) written by tools/create_annoset.py, read back by AnnotatedData, and a tiny SSD-like
net trained by an SGD solver with MultiBoxLoss.

References: the boxes the test draws (their pixel corners, normalized as SSD's
ReadXMLToAnnotatedDatum does: corner / size), and after a random crop, mirror and resize the
rendered rectangles themselves (each output box must enclose its own colour in the output image).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.cli import create_annoset
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2

# BGR colours per class (label map: 0 background, 1 red, 2 green, 3 blue)
COLOURS = {1: (0, 0, 230), 2: (0, 210, 0), 3: (230, 0, 0)}
NAMES = {1: "red", 2: "green", 3: "blue"}
LABEL_MAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "red" label: 1 display_name: "red" }
item { name: "green" label: 2 display_name: "green" }
item { name: "blue" label: 3 display_name: "blue" }
"""


def _voc_xml(name: str, w: int, h: int, objects) -> str:
    objs = "".join(
        f"<object><name>{NAMES[label]}</name><difficult>{int(diff)}</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for label, (x0, y0, x1, y1), diff in objects
    )
    return (
        f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )


def make_dataset(root, n: int, seed: int, size=(48, 40), max_objects: int = 2):
    """``n`` images (width, height = size) with 1..max_objects non-overlapping rectangles of
    random class; writes images/, annotations/, list.txt and labelmap.prototxt under ``root``.
    Returns the objects per image: [(label, (x0, y0, x1, y1), difficult)]."""
    rng = np.random.default_rng(seed)
    w, h = size
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "annotations", exist_ok=True)
    all_objects, lines = [], []
    for i in range(n):
        img = np.full((h, w, 3), 128, np.uint8)
        objects = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _try in range(20):
                bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                box = (x0, y0, x0 + bw, y0 + bh)
                if all(
                    box[2] <= o[1][0] or box[0] >= o[1][2] or box[3] <= o[1][1] or box[1] >= o[1][3] for o in objects
                ):
                    label = int(rng.integers(1, 4))
                    img[y0 : y0 + bh, x0 : x0 + bw] = COLOURS[label]
                    objects.append((label, box, bool(rng.random() < 0.2)))
                    break
        cv2.imwrite(str(root / "images" / f"{i:04d}.png"), img)
        (root / "annotations" / f"{i:04d}.xml").write_text(_voc_xml(f"{i:04d}.png", w, h, objects))
        lines.append(f"images/{i:04d}.png annotations/{i:04d}.xml")
        all_objects.append(objects)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labelmap.prototxt").write_text(LABEL_MAP)
    return all_objects


def write_lmdb(root, encode: str = "png") -> str:
    out = root / "lmdb"
    argv = ["--anno-type", "detection", "--label-map-file", str(root / "labelmap.prototxt")]
    argv += ["--encode-type", encode] if encode else []
    assert create_annoset.main([*argv, str(root) + "/", str(root / "list.txt"), str(out)]) == 0
    return str(out)


def _data_net(source: str, batch: int, phase_train: bool, transform: str = "", samplers: str = "") -> str:
    return f"""name: "annotated"
layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label"
  include {{ phase: {"TRAIN" if phase_train else "TEST"} }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB prefetch: 0 }}
  transform_param {{ {transform} }}
  annotated_data_param {{ {samplers} }}
}}"""


def _nearest_class(pixel) -> int:
    """The class whose colour is nearest to a BGR pixel (0: the grey ground). The sampled crops
    are re-encoded as JPEG (as SSD's CropImage does), which blurs colours at the edges."""
    palette = {0: (128, 128, 128), **COLOURS}
    return min(palette, key=lambda k: float(np.sum((np.asarray(pixel, np.float64) - palette[k]) ** 2)))


def _net(tmp_path, text: str, phase) -> caffe.Net:
    p = tmp_path / "net.prototxt"
    p.write_text(text)
    return caffe.Net(str(p), phase)


def test_create_annoset_then_annotated_data_reads_the_boxes(tmp_path):
    """Write with tools/create_annoset.py, read with AnnotatedData (no random transform): the
    label rows are the XML's boxes, normalized by the image size, grouped by label in order of
    first appearance with instance ids per group, and the images are the written pixels."""
    objects = make_dataset(tmp_path, n=5, seed=1)
    source = write_lmdb(tmp_path)
    net = _net(tmp_path, _data_net(source, 5, False), caffe.TEST)
    out = net.forward()
    data, label = out["data"], out["label"]
    assert data.shape == (5, 3, 40, 48)
    expected = []
    for item, objs in enumerate(objects):
        groups = {}
        for lab, box, diff in objs:
            groups.setdefault(lab, []).append((box, diff))
        for lab, boxes in groups.items():
            for inst, ((x0, y0, x1, y1), diff) in enumerate(boxes):
                expected.append([item, lab, inst, x0 / 48, y0 / 40, x1 / 48, y1 / 40, float(diff)])
        img = cv2.imread(str(tmp_path / "images" / f"{item:04d}.png"))
        np.testing.assert_array_equal(data[item], img.transpose(2, 0, 1).astype(np.float32))
    assert label.shape == (1, 1, len(expected), 8)
    np.testing.assert_allclose(label[0, 0], np.array(expected, np.float32), rtol=0, atol=1e-7)


def test_annotated_data_random_transform_keeps_boxes_on_their_rectangles(tmp_path):
    """TRAIN with SSD's expansion, batch samplers (min_jaccard_overlap), mirror and a WARP resize: every
    emitted box, in the output image, encloses pixels of its own class colour and its centre
    lies on that colour (the crop, mirror and resize moved image and boxes together)."""
    make_dataset(tmp_path, n=6, seed=2, size=(64, 48), max_objects=1)
    source = write_lmdb(tmp_path)
    samplers = """batch_sampler { sampler { min_scale: 1 max_scale: 1 } max_trials: 1 max_sample: 1 }
      batch_sampler { sampler { min_scale: 0.5 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                      sample_constraint { min_jaccard_overlap: 0.3 } max_trials: 50 max_sample: 1 }"""
    transform = "mirror: true distort_param { brightness_prob: 0.5 brightness_delta: 16 contrast_prob: 0.5 contrast_lower: 0.8 contrast_upper: 1.2 } expand_param { prob: 0.5 max_expand_ratio: 3 } resize_param { resize_mode: WARP height: 32 width: 32 interp_mode: NEAREST } emit_constraint { emit_type: CENTER }"
    caffe.set_random_seed(5)
    net = _net(tmp_path, _data_net(source, 6, True, transform, samplers), caffe.TRAIN)
    checked = 0
    for _ in range(4):
        out = net.forward()
        data, label = out["data"], out["label"]
        assert data.shape == (6, 3, 32, 32)
        for row in label[0, 0]:
            if row[0] < 0:
                continue
            item, lab = int(row[0]), int(row[1])
            x0, y0, x1, y1 = row[3:7] * 32
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            img = data[item].transpose(1, 2, 0)
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert _nearest_class(img[cy, cx]) == lab
            inner = img[int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)].reshape(-1, 3)
            assert np.mean([_nearest_class(px) == lab for px in inner]) > 0.85
            checked += 1
    assert checked >= 10


def test_annotated_data_refuses_unsupported_fields(tmp_path):
    make_dataset(tmp_path, n=1, seed=3)
    source = write_lmdb(tmp_path)
    for transform, field in [
        ("noise_param { prob: 0.5 }", "noise_param"),
        ("resize_param { resize_mode: FIT_LARGE_SIZE_AND_PAD height: 8 width: 8 }", "FIT_LARGE_SIZE_AND_PAD"),
    ]:
        with pytest.raises(CaffeError, match=field):
            _net(tmp_path, _data_net(source, 1, True, transform), caffe.TRAIN)


def test_create_annoset_refuses_unknown_names(tmp_path, capsys):
    make_dataset(tmp_path, n=2, seed=4)
    (tmp_path / "labelmap.prototxt").write_text('item { name: "red" label: 1 }')
    argv = ["--anno-type", "detection", "--label-map-file", str(tmp_path / "labelmap.prototxt")]
    rc = create_annoset.main([*argv, str(tmp_path) + "/", str(tmp_path / "list.txt"), str(tmp_path / "db")])
    assert rc != 0
    assert "unknown name" in capsys.readouterr().err


def _head(name: str, bottom: str, num_priors: int, num_classes: int, min_size: int, max_size: int) -> str:
    """SSD's multibox head on one feature map: loc and conf convolutions, Permute to NHWC,
    Flatten, and its PriorBox."""
    return f"""
layer {{ name: "{name}_loc" type: "Convolution" bottom: "{bottom}" top: "{name}_loc"
  convolution_param {{ num_output: {num_priors * 4} kernel_size: 3 pad: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "{name}_loc_perm" type: "Permute" bottom: "{name}_loc" top: "{name}_loc_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "{name}_loc_flat" type: "Flatten" bottom: "{name}_loc_perm" top: "{name}_loc_flat"
  flatten_param {{ axis: 1 }} }}
layer {{ name: "{name}_conf" type: "Convolution" bottom: "{bottom}" top: "{name}_conf"
  convolution_param {{ num_output: {num_priors * num_classes} kernel_size: 3 pad: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "{name}_conf_perm" type: "Permute" bottom: "{name}_conf" top: "{name}_conf_perm"
  permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "{name}_conf_flat" type: "Flatten" bottom: "{name}_conf_perm" top: "{name}_conf_flat"
  flatten_param {{ axis: 1 }} }}
layer {{ name: "{name}_priorbox" type: "PriorBox" bottom: "{bottom}" bottom: "data" top: "{name}_priorbox"
  prior_box_param {{ min_size: {min_size} max_size: {max_size} aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }} }}"""


def ssd_train_net(source: str, batch: int = 8) -> str:
    """A tiny SSD: three convolutions, heads on an 8x8 and a 4x4 map (4 priors per cell: 320),
    Concat of locations, confidences and priors, and MultiBoxLoss (SSD's VOC settings)."""
    conv = """
layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}"
  convolution_param {{ num_output: {o} kernel_size: 3 pad: 1 stride: {s}
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "{n}_relu" type: "ReLU" bottom: "{n}" top: "{n}" }}"""
    pool = """
layer {{ name: "{n}" type: "Pooling" bottom: "{b}" top: "{n}" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}"""
    body = (
        conv.format(n="conv1", b="data", o=16, s=1)
        + pool.format(n="pool1", b="conv1")
        + conv.format(n="conv2", b="pool1", o=32, s=1)
        + pool.format(n="pool2", b="conv2")
        + conv.format(n="conv3", b="pool2", o=32, s=1)
        + conv.format(n="conv4", b="conv3", o=32, s=2)
    )
    heads = _head("f1", "conv3", 4, 4, 8, 16) + _head("f2", "conv4", 4, 4, 16, 28)
    concat = "".join(
        f"""
layer {{ name: "mbox_{k}" type: "Concat" bottom: "f1_{src}" bottom: "f2_{src}" top: "mbox_{k}"
  concat_param {{ axis: {axis} }} }}"""
        for k, src, axis in (("loc", "loc_flat", 1), ("conf", "conf_flat", 1), ("priorbox", "priorbox", 2))
    )
    transform = "mirror: true mean_value: 128 scale: 0.0078125 resize_param { resize_mode: WARP height: 32 width: 32 interp_mode: LINEAR } emit_constraint { emit_type: CENTER }"
    samplers = """batch_sampler { sampler { min_scale: 1 max_scale: 1 } max_trials: 1 max_sample: 1 }
      batch_sampler { sampler { min_scale: 0.6 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                      sample_constraint { min_jaccard_overlap: 0.5 } max_trials: 50 max_sample: 1 }"""
    loss = """
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf" bottom: "mbox_priorbox"
  bottom: "label" top: "mbox_loss" include { phase: TRAIN }
  propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1 num_classes: 4
    share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5 use_prior_for_matching: true
    background_label_id: 0 use_difficult_gt: true neg_pos_ratio: 3 neg_overlap: 0.5 code_type: CENTER_SIZE
    ignore_cross_boundary_bbox: false mining_type: MAX_NEGATIVE } }"""
    return _data_net(source, batch, True, transform, samplers) + body + heads + concat + loss


@pytest.fixture
def one_thread():
    """torch on one intra-op thread: this net is tiny, and on a shared 2-core machine two
    threads per convolution cost far more in waiting than they gain."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ssd_solver_loss_falls(tmp_path, one_thread):
    """An SGD solver (SSD's momentum and weight decay) on 32 synthetic annotated images: the
    MultiBoxLoss of the last 8 of 60 iterations is well below that of the first 8."""
    make_dataset(tmp_path, n=32, seed=6, size=(48, 40))
    source = write_lmdb(tmp_path)
    (tmp_path / "train.prototxt").write_text(ssd_train_net(source))
    solver_text = f"""net: "{tmp_path / "train.prototxt"}" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9
      weight_decay: 0.0005 max_iter: 60 display: 0 snapshot: 0 random_seed: 3 type: "SGD" """
    (tmp_path / "solver.prototxt").write_text(solver_text)
    caffe.set_random_seed(3)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    losses = []
    solver.loss_observers.append(lambda it, loss: losses.append(loss))
    solver.step(60)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    first, last = float(np.mean(losses[:8])), float(np.mean(losses[-8:]))
    print(f"MultiBoxLoss: first 8 iterations {first:.3f}, last 8 {last:.3f}")
    assert last < 0.6 * first, (first, last, losses)


def test_annotated_data_expansion_places_image_and_boxes_on_the_canvas(tmp_path):
    """SSD's expand_param on raw records: the image lands whole on a larger canvas of byte 32
    (SSD's buffer of spaces), and each box, scaled to the canvas, bounds exactly its rectangle."""
    objects = make_dataset(tmp_path, n=3, seed=8, size=(40, 32))
    source = write_lmdb(tmp_path, encode="")
    net = _net(tmp_path, _data_net(source, 1, True, "expand_param { prob: 1 max_expand_ratio: 3 }"), caffe.TRAIN)
    grown = 0
    for i in range(6):
        out = net.forward()
        img, rows = out["data"][0], out["label"][0, 0]
        _, big_h, big_w = img.shape
        grown += (big_h, big_w) != (32, 40)
        assert (img != 32).any(axis=0).sum() == 32 * 40  # the grey image, whole, once
        assert len(rows) == len(objects[i % 3])
        for row in rows:
            x0, y0, x1, y1 = row[3:7] * np.array([big_w, big_h, big_w, big_h], np.float32)
            corners = np.rint([x0, y0, x1, y1]).astype(int)
            np.testing.assert_allclose([x0, y0, x1, y1], corners, atol=1e-3)
            region = img[:, corners[1] : corners[3], corners[0] : corners[2]]
            assert (region == np.array(COLOURS[int(row[1])], np.float32).reshape(3, 1, 1)).all()
    assert grown >= 4


def _distort_param(text: str):
    p = caffe_pb2.DistortionParameter()
    text_format.Parse(text, p)
    return p


def test_distortion_steps_follow_ssd():
    """SSD's ApplyDistort, one step at a time (probability 1, the others 0): brightness adds one
    delta in [-32, 32] to every pixel (saturating), contrast multiplies by one factor in
    [0.5, 1.5], the channel reorder permutes the channels; all steps at once keep the shape."""
    rng = np.random.default_rng(0)
    img = rng.integers(40, 216, (3, 12, 10), dtype=np.uint8)
    from caffe_compat.data.annotated import apply_distort

    for seed in range(5):
        r = np.random.default_rng(seed)
        out = apply_distort(img, _distort_param("brightness_prob: 1 brightness_delta: 32"), r).astype(int)
        delta = out - img.astype(int)
        assert delta.min() == delta.max() and abs(delta[0, 0, 0]) <= 32
        out = apply_distort(img, _distort_param("contrast_prob: 1 contrast_lower: 0.5 contrast_upper: 1.5"), r)
        factor = float(np.median(out.astype(float) / img))
        assert 0.49 <= factor <= 1.51
        np.testing.assert_allclose(out, np.clip(np.rint(img * factor), 0, 255), atol=1)
        out = apply_distort(img, _distort_param("random_order_prob: 1"), r)
        assert sorted(tuple(c.ravel()) for c in out) == sorted(tuple(c.ravel()) for c in img)
    full = """brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 contrast_lower: 0.5 contrast_upper: 1.5
      hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5 saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0"""
    out = apply_distort(img, _distort_param(full), np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8


def test_create_annoset_classification_records_and_example_link(tmp_path):
    """--anno-type classification: records without an annotation type, the Datum label read
    back by AnnotatedData as a (batch, 1, 1, 1) label top; EXAMPLEDIR gets a link to OUTDIR."""
    make_dataset(tmp_path, n=3, seed=9)
    (tmp_path / "cls.txt").write_text("".join(f"images/{i:04d}.png {7 + i}\n" for i in range(3)))
    out, examples = tmp_path / "cls_lmdb", tmp_path / "examples"
    argv = ["--encode-type", "png", str(tmp_path) + "/", str(tmp_path / "cls.txt"), str(out), str(examples)]
    assert create_annoset.main(argv) == 0
    assert os.path.realpath(examples / "cls_lmdb") == os.path.realpath(out)
    assert create_annoset.main(argv) != 0  # OUTDIR exists: --redo replaces it
    assert create_annoset.main(["--redo", *argv]) == 0
    net = _net(tmp_path, _data_net(str(out), 3, False), caffe.TEST)
    label = net.forward()["label"]
    assert label.shape == (3, 1, 1, 1)
    np.testing.assert_array_equal(label.ravel(), [7, 8, 9])
