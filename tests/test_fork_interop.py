"""The forks' layers against independent implementations: OpenCV 4's dnn module (it implements
ReLU6, Interp, ShuffleChannel, Axpy, ROIPooling, PSROIPooling, ConvolutionDepthwise and
Faster R-CNN's Proposal for the Caffe models it imports), and our ONNX export run in
onnxruntime (ReLU6, Interp, Upsample's nearest form, ShuffleChannel, the depthwise types,
Axpy, BN in INFERENCE mode; the rest refused by name)."""

from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.export import onnx as ox

cv2 = pytest.importorskip("cv2")

TOL = 1e-4
CV_RTOL, CV_ATOL = 1e-4, 1e-5


def _input(name: str, shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def _net(text: str, phase=caffe.TEST):
    return caffe.Net(cio.read_net_text(text, "<fork net>"), phase)


def _opencv(tmp_path, text: str, net, inputs: dict, out: str):
    """The same prototxt (and our net's weights) run by OpenCV's Caffe importer."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    weights = tmp_path / "net.caffemodel"
    net.save(str(weights))
    cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    for k, v in inputs.items():
        cvnet.setInput(np.ascontiguousarray(v, np.float32), k)
    return cvnet.forward(out)


def _ours(net, inputs: dict, out: str):
    for k, v in inputs.items():
        net.blobs[k].data[...] = v
    net.forward()
    return net.blobs[out].data.copy()


# -- OpenCV -----------------------------------------------------------------------------------------

CV_CASES = {
    "relu6": ({"x": (2, 3, 4, 5)}, 'layer { name: "y" type: "ReLU6" bottom: "x" top: "y" }'),
    "interp_size": (
        {"x": (1, 3, 5, 6)},
        'layer { name: "y" type: "Interp" bottom: "x" top: "y" interp_param { height: 9 width: 13 } }',
    ),
    "interp_zoom": (
        {"x": (2, 2, 4, 7)},
        'layer { name: "y" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 3 } }',
    ),
    # (OpenCV 4.14 sizes a shrink_factor Interp 0x0: that mode is checked against the fork's loop only)
    "shuffle": (
        {"x": (2, 6, 3, 4)},
        'layer { name: "y" type: "ShuffleChannel" bottom: "x" top: "y" shuffle_channel_param { group: 3 } }',
    ),
    "axpy": (
        {"a": (1, 4, 1, 1), "x": (1, 4, 3, 5), "z": (1, 4, 3, 5)},  # OpenCV: batch 1 only
        'layer { name: "y" type: "Axpy" bottom: "a" bottom: "x" bottom: "z" top: "y" }',
    ),
    "conv_depthwise": (
        {"x": (1, 4, 7, 6)},
        'layer { name: "y" type: "ConvolutionDepthwise" bottom: "x" top: "y" convolution_param { num_output: 4 '
        "kernel_size: 3 stride: 2 pad: 1 weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'gaussian' std: 1 } } }",
    ),
}


@pytest.mark.parametrize("case", sorted(CV_CASES))
def test_forward_matches_opencv(case, tmp_path):
    shapes, body = CV_CASES[case]
    text = 'name: "t"\n' + "".join(_input(k, s) for k, s in shapes.items()) + body + "\n"
    net = _net(text)
    rng = np.random.default_rng(0)
    inputs = {k: rng.uniform(-2, 8, size=s).astype(np.float32) for k, s in shapes.items()}
    ours = _ours(net, inputs, "y")
    if case == "axpy":
        # OpenCV 4.14 computes a · bottom[2] + bottom[1]; SENet's axpy_layer.cpp (@ 577864e, which
        # we follow) a · bottom[1] + bottom[2]: give OpenCV the two operands swapped
        text = text.replace('bottom: "x" bottom: "z"', 'bottom: "z" bottom: "x"')
    theirs = _opencv(tmp_path, text, net, inputs, "y")
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=CV_RTOL, atol=CV_ATOL)


def _rois(n_img: int, size=(128, 96), r=8, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(r):
        x1, y1 = rng.uniform(0, size[0] * 0.7), rng.uniform(0, size[1] * 0.7)
        out.append([rng.integers(n_img), x1, y1, x1 + rng.uniform(4, 40), y1 + rng.uniform(4, 40)])
    return np.array(out, np.float32)


@pytest.mark.parametrize(
    "body, channels",
    [
        (
            'layer { name: "y" type: "ROIPooling" bottom: "x" bottom: "rois" top: "y" '
            "roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.0625 } }",
            5,
        ),
        (
            'layer { name: "y" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "y" '
            "psroi_pooling_param { spatial_scale: 0.0625 output_dim: 3 group_size: 3 } }",
            27,
        ),
    ],
)
def test_roi_layers_match_opencv(body, channels, tmp_path):
    shapes = {"x": (1, channels, 6, 8), "rois": (8, 5)}
    text = 'name: "t"\n' + "".join(_input(k, s) for k, s in shapes.items()) + body + "\n"
    net = _net(text)
    inputs = {"x": np.random.default_rng(0).normal(size=shapes["x"]).astype(np.float32), "rois": _rois(1)}
    ours = _ours(net, inputs, "y")
    theirs = _opencv(tmp_path, text, net, inputs, "y")
    np.testing.assert_allclose(ours, theirs, rtol=CV_RTOL, atol=CV_ATOL)


# -- ONNX ---------------------------------------------------------------------------------------------

ONNX_CASES = {
    "relu6": 'layer { name: "y" type: "ReLU6" bottom: "data" top: "y" }',
    "interp_size": 'layer { name: "y" type: "Interp" bottom: "data" top: "y" interp_param { height: 11 width: 5 } }',
    "interp_zoom_crop": 'layer { name: "y" type: "Interp" bottom: "data" top: "y" interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -1 } }',
    "interp_shrink": 'layer { name: "y" type: "Interp" bottom: "data" top: "y" interp_param { shrink_factor: 2 } }',
    "interp_same_size_crop": 'layer { name: "y" type: "Interp" bottom: "data" top: "y" interp_param { height: 7 width: 6 pad_end: -2 } }',
    "interp_nearest": 'layer { name: "y" type: "Interp" bottom: "data" top: "y" '
    "interp_param { height: 14 width: 11 interp_type: 'nearest_neighbor' } }",
    "upsample_nearest": 'layer { name: "y" type: "Upsample" bottom: "data" top: "y" upsample_param { scale: 2 } }',
    "shuffle": 'layer { name: "y" type: "ShuffleChannel" bottom: "data" top: "y" shuffle_channel_param { group: 2 } }',
    "depthwise": 'layer { name: "y" type: "DepthwiseConvolution" bottom: "data" top: "y" convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }',
    "conv_depthwise": 'layer { name: "y" type: "ConvolutionDepthwise" bottom: "data" top: "y" convolution_param { num_output: 4 kernel_size: 3 } }',
    "bn_inference": 'layer { name: "y" type: "BN" bottom: "data" top: "y" bn_param { bn_mode: INFERENCE } }',
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_onnx_export_matches_our_net(case, dynamic_batch):
    net = _net(_input("data", (2, 4, 9, 8)) + ONNX_CASES[case])
    ox.randomize_params(net, seed=1)
    model = ox.export_onnx(net, dynamic_batch=dynamic_batch)
    inputs = ox.random_inputs(net, seed=2)
    inputs["data"] = inputs["data"] * 4  # ReLU6's upper kink in range
    assert ox.locate_divergence(net, model, inputs, tol=TOL) is None
    (d,) = ox.check_onnx(net, model, inputs)
    assert d.relative <= TOL, d


def test_onnx_axpy_exports():
    text = _input("a", (2, 4)) + _input("x", (2, 4, 3, 5)) + _input("z", (2, 4, 3, 5))
    net = _net(text + 'layer { name: "y" type: "Axpy" bottom: "a" bottom: "x" bottom: "z" top: "y" }')
    model = ox.export_onnx(net)
    (d,) = ox.check_onnx(net, model, ox.random_inputs(net, seed=3))
    assert d.relative <= TOL, d


@pytest.mark.parametrize(
    "text, match",
    [
        (
            _input("x", (1, 4, 6, 8))
            + _input("rois", (3, 5))
            + 'layer { name: "roi" type: "ROIPooling" bottom: "x" bottom: "rois" '
            'top: "y" roi_pooling_param { pooled_h: 2 pooled_w: 2 } }',
            "layer 'roi' \\(ROIPooling\\)",
        ),
        (
            _input("x", (1, 8, 6, 8))
            + _input("rois", (3, 5))
            + 'layer { name: "ps" type: "PSROIPooling" bottom: "x" bottom: "rois" '
            'top: "y" psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 } }',
            "layer 'ps' \\(PSROIPooling\\)",
        ),
        (
            _input("cls", (1, 18, 3, 4))
            + _input("bbox", (1, 36, 3, 4))
            + _input("im_info", (1, 3))
            + 'layer { name: "prop" type: "Proposal" bottom: "cls" bottom: "bbox" bottom: "im_info" top: "rois" }',
            "layer 'prop' \\(Proposal\\)",
        ),
        (
            _input("data", (1, 2, 4, 4)) + 'layer { name: "bn" type: "BN" bottom: "data" top: "bn" }',
            "layer 'bn' \\(BN\\).*INFERENCE",
        ),
    ],
)
def test_onnx_refuses_the_rest_by_name(text, match):
    net = _net(text)
    with pytest.raises(ox.OnnxExportError, match=match):
        ox.export_onnx(net)


def test_onnx_refuses_upsample_mask_form_by_name():
    text = (
        _input("v", (1, 2, 2, 2))
        + _input("mask", (1, 2, 2, 2))
        + 'layer { name: "up" type: "Upsample" bottom: "v" bottom: "mask" top: "up" upsample_param { scale: 2 } }'
    )
    with pytest.raises(ox.OnnxExportError, match="layer 'up' \\(Upsample\\).*mask form"):
        ox.export_onnx(_net(text))


def test_python_proposal_form_matches_opencvs_proposal(tmp_path):
    """OpenCV's Proposal follows py-faster-rcnn's proposal_layer.py (anchors of base_size · scale
    pixels): our Python-layer form must give its rois (OpenCV pads its top to post_nms_topn rows)."""
    h, w = 5, 7
    rng = np.random.default_rng(0)
    inputs = {
        "cls": rng.uniform(0, 1, (1, 18, h, w)).astype(np.float32),
        "bbox": rng.uniform(-0.3, 0.3, (1, 36, h, w)).astype(np.float32),
        "im_info": np.array([[h * 16.0, w * 16.0, 1.0]], np.float32),
    }
    head = "".join(_input(k, v.shape) for k, v in inputs.items())
    ours_text = head + (
        'layer { name: "proposal" type: "Python" bottom: "cls" bottom: "bbox" bottom: "im_info" top: "rois" '
        'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "\'feat_stride\': 16" } }'
    )
    cv_text = head + (
        'layer { name: "proposal" type: "Proposal" bottom: "cls" bottom: "bbox" bottom: "im_info" top: "rois" '
        "proposal_param { feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 ratio: 1 ratio: 2 scale: 8 "
        "scale: 16 scale: 32 pre_nms_topn: 6000 post_nms_topn: 300 nms_thresh: 0.7 } }"
    )
    net = _net(ours_text)
    ours = _ours(net, inputs, "rois")
    (tmp_path / "cv.prototxt").write_text(cv_text)
    cvnet = cv2.dnn.readNetFromCaffe(str(tmp_path / "cv.prototxt"))
    for k, v in inputs.items():
        cvnet.setInput(v, k)
    theirs = cvnet.forward("proposal").reshape(-1, 5)
    assert 0 < len(ours) <= len(theirs)
    np.testing.assert_allclose(ours, theirs[: len(ours)], rtol=CV_RTOL, atol=1e-4)
