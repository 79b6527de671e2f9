"""An SSD deploy net end to end: a miniature of OpenCV's res10_300x300_ssd face detector's layer
structure (convolutions, a Normalize on the first source layer, two sources each with a 3x3 loc
and conf head, Permute + Flatten, PriorBox, Concat, Reshape + Softmax + Flatten, DetectionOutput),
with weights this test writes to a .caffemodel, gives the same detections as OpenCV's dnn module
(``cv2.dnn.readNetFromCaffe``, an independent implementation of SSD's layers) on the same image;
``tools/detect.py`` draws and prints them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import caffe_compat as caffe

cv2 = pytest.importorskip("cv2")

SIZE = 96  # the net's input is SIZE x SIZE
CLASSES = 3  # background, "red", "green"
THRESHOLD = 0.52
# (name, channels in, stride-2 convolution output size, min_size, max_size, step)
SOURCES = [("conv3", 12, 16, 32, 8), ("conv4", 6, 36, 60, 16)]
PRIORS_PER_CELL = 4  # aspect ratios 1, 2, 1/2 and the max_size square


def _conv(name, bottom, num_output, kernel=3, stride=1, pad=1):
    return (
        f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
        f"convolution_param {{ num_output: {num_output} kernel_size: {kernel} stride: {stride} pad: {pad} }} }}\n"
    )


def deploy_prototxt(detection_output: bool = True) -> str:
    """The deploy net, in res10_300x300_ssd_iter_140000.prototxt's naming (without its
    DetectionOutput layer: the part ONNX can express)."""
    t = 'name: "tiny_ssd"\n'
    t += f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: {SIZE} dim: {SIZE} }} }} }}\n'
    prev = "data"
    for i in (1, 2, 3, 4):
        t += _conv(f"conv{i}", prev, 8, stride=2)
        t += f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}\n'
        prev = f"conv{i}"
    t += (
        'layer { name: "conv3_norm" type: "Normalize" bottom: "conv3" top: "conv3_norm" norm_param { '
        'across_spatial: false channel_shared: false scale_filler { type: "constant" value: 20 } } }\n'
    )
    locs, confs, priors = [], [], []
    for src, _, min_size, max_size, step in SOURCES:
        feat = "conv3_norm" if src == "conv3" else src
        for head, n in (("loc", 4), ("conf", CLASSES)):
            name = f"{feat}_mbox_{head}"
            t += _conv(name, feat, PRIORS_PER_CELL * n)
            t += (
                f'layer {{ name: "{name}_perm" type: "Permute" bottom: "{name}" top: "{name}_perm" '
                "permute_param { order: 0 order: 2 order: 3 order: 1 } }\n"
            )
            t += (
                f'layer {{ name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" top: "{name}_flat" '
                "flatten_param { axis: 1 } }\n"
            )
            (locs if head == "loc" else confs).append(f"{name}_flat")
        t += (
            f'layer {{ name: "{feat}_mbox_priorbox" type: "PriorBox" bottom: "{feat}" bottom: "data" '
            f'top: "{feat}_mbox_priorbox" prior_box_param {{ min_size: {min_size} max_size: {max_size} '
            f"aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 "
            f"step: {step} offset: 0.5 }} }}\n"
        )
        priors.append(f"{feat}_mbox_priorbox")
    for name, tops, axis in (("mbox_loc", locs, 1), ("mbox_conf", confs, 1), ("mbox_priorbox", priors, 2)):
        bottoms = " ".join(f'bottom: "{b}"' for b in tops)
        t += f'layer {{ name: "{name}" type: "Concat" {bottoms} top: "{name}" concat_param {{ axis: {axis} }} }}\n'
    t += (
        'layer { name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape" '
        f"reshape_param {{ shape {{ dim: 0 dim: -1 dim: {CLASSES} }} }} }}\n"
        'layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" top: "mbox_conf_softmax" '
        "softmax_param { axis: 2 } }\n"
        'layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" top: "mbox_conf_flatten" '
        "flatten_param { axis: 1 } }\n"
    )
    if not detection_output:
        return t
    t += (
        'layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "mbox_conf_flatten" '
        f'bottom: "mbox_priorbox" top: "detection_out" include {{ phase: TEST }} detection_output_param {{ '
        f"num_classes: {CLASSES} share_location: true background_label_id: 0 "
        "nms_param { nms_threshold: 0.3 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 10 "
        f"confidence_threshold: {THRESHOLD} }} }}\n"
    )
    return t


def write_weights(model: str, path: str, seed: int = 0) -> None:
    """Weights that make the net a colour detector: channel 0 carries red, 1 green, 2 a constant;
    the conf heads score "red" from channel 0 and "green" from channel 1 (per prior a different
    gain, so no two priors tie), the background from the constant; small random loc weights move
    the boxes off the priors. Seeded noise everywhere else."""
    rng = np.random.default_rng(seed)
    net = caffe.Net(model, caffe.TEST)
    avg = np.full((3, 3), 1 / 9, np.float32)
    for i in (1, 2, 3, 4):
        w, b = net.params[f"conv{i}"]
        wv = rng.normal(0, 0.01, w.data.shape).astype(np.float32)
        src_r, src_g = (2, 1) if i == 1 else (0, 1)  # the image is BGR
        wv[0, src_r] += avg
        wv[1, src_g] += avg
        wv[2] = 0
        if i > 1:
            wv[2, 2, 1, 1] = 1.0  # carry the constant through (centre tap: no border effect)
        w.data[...] = wv
        b.data[...] = 0
        b.data[2] = 1.0 if i == 1 else 0.0
    smooth = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], np.float32) / 4
    for src, *_ in SOURCES:
        feat = "conv3_norm" if src == "conv3" else src
        gain = 0.18 if src == "conv3" else 2.4  # conv3_norm's features are ~14x larger (scale 20)
        w, b = net.params[f"{feat}_mbox_conf"]
        wv = rng.normal(0, 0.002, w.data.shape).astype(np.float32)
        for p in range(PRIORS_PER_CELL):
            g = gain * (1 + 0.15 * p)
            wv[p * CLASSES + 1, 0] += g * smooth
            wv[p * CLASSES + 2, 1] += g * smooth
        w.data[...] = wv
        b.data[...] = 0
        b.data[0::CLASSES] = 2.0  # the background's logit
        w, b = net.params[f"{feat}_mbox_loc"]
        w.data[...] = rng.normal(0, 0.01 if src == "conv3" else 0.05, w.data.shape)
        b.data[...] = 0
    net.save(path)


RED_BOX = (36, 50, 124, 138)  # x0, y0, x1, y1 in the 320 x 240 scene
GREEN_BOX = (190, 110, 290, 210)


def scene(width: int = 320, height: int = 240) -> np.ndarray:
    """A BGR image: a red square with a left-to-right gradient, a green rectangle with a
    top-to-bottom one, on black (gradients: no two cells score alike)."""
    img = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = RED_BOX
    img[y0:y1, x0:x1, 2] = np.linspace(150, 255, x1 - x0)[None, :].astype(np.uint8)
    x0, y0, x1, y1 = GREEN_BOX
    img[y0:y1, x0:x1, 1] = np.linspace(140, 255, y1 - y0)[:, None].astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def tiny_ssd(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ssd")
    model, weights, image = d / "deploy.prototxt", d / "tiny_ssd.caffemodel", d / "scene.png"
    model.write_text(deploy_prototxt())
    write_weights(str(model), str(weights))
    assert cv2.imwrite(str(image), scene())
    return d, str(model), str(weights), str(image)


def _opencv_detections(model, weights, blob):
    """OpenCV's rows ``[image, label, score, box]``, in Caffe's order. OpenCV sorts an image's
    rows by score (its ``group_by_classes`` defaults to false) and pads its top to keep_top_k
    rows of zeros; Caffe (and we) give the rows by label, then score. The detections are the
    same; the order is put back to Caffe's here (the scene's scores are far apart, so no tie)."""
    cvnet = cv2.dnn.readNetFromCaffe(model, weights)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setInput(blob)
    rows = cvnet.forward()[0, 0]
    rows = rows[rows[:, 2] > 0]
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


def _blob(image_path):
    return cv2.dnn.blobFromImage(cv2.imread(image_path), 1 / 255.0, (SIZE, SIZE), (0, 0, 0), swapRB=False, crop=False)


def test_tiny_ssd_matches_opencv_dnn(tiny_ssd):
    _, model, weights, image = tiny_ssd
    blob = _blob(image)
    theirs = _opencv_detections(model, weights, blob)
    net = caffe.Net(model, caffe.TEST, weights=weights)
    ours = net.forward(data=blob)["detection_out"]
    # the scene gives several boxes of both classes, scores well apart (float noise between
    # OpenCV and us is ~1e-6: no order or threshold decision rests on it)
    labels = theirs[:, 1]
    assert (labels == 1).sum() >= 3 and (labels == 2).sum() >= 3, theirs
    scores = np.sort(theirs[:, 2])
    assert np.min(np.diff(scores)) > 1e-4 and scores[0] > THRESHOLD + 1e-3
    assert ours.shape == (1, 1, len(theirs), 7)
    np.testing.assert_array_equal(ours[0, 0, :, :2], theirs[:, :2])
    np.testing.assert_allclose(ours[0, 0], theirs, rtol=1e-4, atol=1e-5)


def test_tiny_ssd_layers_match_opencv(tiny_ssd):
    """The intermediate SSD blobs (Normalize, Permute+Flatten, PriorBox, the softmaxed
    confidences) agree with OpenCV's too."""
    _, model, weights, image = tiny_ssd
    blob = _blob(image)
    names = ["conv3_norm", "conv3_norm_mbox_loc_flat", "mbox_priorbox", "mbox_conf_flatten", "mbox_loc"]
    cvnet = cv2.dnn.readNetFromCaffe(model, weights)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setInput(blob)
    theirs = cvnet.forward(names)
    net = caffe.Net(model, caffe.TEST, weights=weights)
    net.forward(data=blob)
    for name, t in zip(names, theirs):
        ours = net.blobs[name].data
        np.testing.assert_allclose(ours.reshape(t.shape), t, rtol=1e-4, atol=1e-5, err_msg=name)
        assert ours.size == t.size


def test_detect_tool_draws_and_prints_the_opencv_boxes(tiny_ssd, capsys):
    from caffe_compat.cli import detect

    d, model, weights, image = tiny_ssd
    out_png, out_json = d / "boxes.png", d / "boxes.json"
    rc = detect.main(
        [
            "--model",
            model,
            "--weights",
            weights,
            "--image",
            image,
            "--out",
            str(out_png),
            "--json",
            str(out_json),
            "--threshold",
            str(THRESHOLD),
            "--scale",
            str(1 / 255.0),
            "--labels",
            "background,red,green",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_json.read_text())
    theirs = _opencv_detections(model, weights, _blob(image))
    h, w = cv2.imread(image).shape[:2]
    dets = printed["detections"]
    assert len(dets) == len(theirs)
    for det, row in zip(dets, theirs):
        assert det["label"] == int(row[1]) and det["name"] == ["background", "red", "green"][int(row[1])]
        np.testing.assert_allclose(det["score"], row[2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(det["box"], row[3:7] * [w, h, w, h], rtol=1e-4, atol=1e-3)
    drawn = cv2.imread(str(out_png))
    assert drawn.shape == cv2.imread(image).shape
    # the boxes are drawn in the class colours (colours the scene does not have)
    for lab in (1, 2):
        color = detect.PALETTE[lab - 1]
        assert not np.any(np.all(scene() == color, axis=-1))
        assert np.all(drawn == color, axis=-1).sum() > 100, f"no boxes drawn for label {lab}"
    # the best red box is centred on the red square, the best green one on the green rectangle
    best = {lab: max((x for x in dets if x["label"] == lab), key=lambda x: x["score"]) for lab in (1, 2)}
    for lab, (x0, y0, x1, y1) in ((1, RED_BOX), (2, GREEN_BOX)):
        bx0, by0, bx1, by1 = best[lab]["box"]
        assert x0 < (bx0 + bx1) / 2 < x1 and y0 < (by0 + by1) / 2 < y1, best[lab]


def test_detect_tool_errors_are_one_line(tiny_ssd, capsys, tmp_path):
    from caffe_compat.cli import detect

    _, model, weights, _ = tiny_ssd
    rc = detect.main(["--model", model, "--weights", weights, "--image", str(tmp_path / "nope.png"), "--out", "x.png"])
    assert rc == 1 and "cannot read it as an image" in capsys.readouterr().err


def test_tiny_ssd_onnx_export_matches_and_detection_output_is_refused(tiny_ssd, tmp_path):
    """ONNX: the net up to DetectionOutput's bottoms exports (Normalize, Permute, PriorBox as a
    constant) and onnxruntime gives our blobs; DetectionOutput on onnxruntime's outputs gives the
    net's detections; the whole net is refused naming the layer."""
    from caffe_compat.export import onnx as ox

    _, model, weights, image = tiny_ssd
    full = caffe.Net(model, caffe.TEST, weights=weights)
    with pytest.raises(ox.OnnxExportError, match="'detection_out' \\(DetectionOutput\\)"):
        ox.export_onnx(full)
    head_path = tmp_path / "head.prototxt"
    head_path.write_text(deploy_prototxt(detection_output=False))
    head = caffe.Net(str(head_path), caffe.TEST, weights=weights)
    onnx_model = ox.export_onnx(head, tmp_path / "tiny_ssd_head.onnx")
    blob = _blob(image)
    assert ox.locate_divergence(head, onnx_model, {"data": blob}, tol=1e-4) is None
    outs = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    theirs = ox.run_onnxruntime(onnx_model, {"data": blob}, outs)
    det = full.layer_dict["detection_out"]
    import torch

    (rows,) = det(*(torch.from_numpy(np.ascontiguousarray(theirs[o])) for o in outs))
    want = full.forward(data=blob)["detection_out"]
    assert rows.shape == want.shape
    np.testing.assert_allclose(rows.numpy(), want, rtol=1e-4, atol=1e-5)
