"""Interoperability with OpenCV's dnn module: our .caffemodel files load in OpenCV's Caffe
importer, and our ONNX exports load in its ONNX importer; both give our outputs.

Besides the net's outputs, the input of each output layer (``fc8`` under ``prob``...) is
compared too, so a near-uniform softmax cannot hide a difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.export import onnx as ox
from tests.conftest import CAFFE_REF

cv2 = pytest.importorskip("cv2")

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-4  # of the blob's scale (max |value|)

NETS = [
    CAFFE_REF / "zoo" / "bvlc_alexnet" / "deploy.prototxt",  # LRN, grouped conv, ceil pooling
    CAFFE_REF / "realworld" / "cifar10_quick" / "deploy.prototxt",  # AVE pooling with overhang
    CAFFE_REF / "realworld" / "squeezenet11" / "deploy.prototxt",  # Concat, global AVE pooling
    CAFFE_REF / "realworld" / "mobilenet" / "deploy.prototxt",  # BatchNorm + Scale, depthwise conv
    "decoder",  # Deconvolution (grouped, strided), Reshape, Crop: the CAE's decoder layers, small
]
# prototxt/dental_cae_deploy.prototxt (125M parameters) passes both tests too, in ~40 s: too slow here.

DECODER = """name: "decoder"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 20 dim: 20 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 64 } }
layer { name: "reshape" type: "Reshape" bottom: "fc" top: "fc_map" reshape_param { shape { dim: 0 dim: 4 dim: 4 dim: 4 } } }
layer { name: "up1" type: "Deconvolution" bottom: "fc_map" top: "up1"
  convolution_param { num_output: 8 kernel_size: 4 stride: 2 pad: 1 group: 4 } }
layer { name: "relu2" type: "ReLU" bottom: "up1" top: "up1" }
layer { name: "up2" type: "Deconvolution" bottom: "up1" top: "up2" convolution_param { num_output: 3 kernel_size: 5 stride: 3 } }
layer { name: "crop" type: "Crop" bottom: "up2" bottom: "data" top: "recon" crop_param { axis: 2 offset: 2 } }
"""


def _compared_blobs(net) -> list[str]:
    """The outputs and the bottoms of the layers producing them."""
    names = list(net.outputs)
    split_tops = {t for lname, layer in net.layer_dict.items() if layer.type == "Split" for t in net.top_names[lname]}
    for lname in net._layer_names:
        if any(t in net.outputs for t in net.top_names[lname]):
            names += [
                b for b in net.bottom_names[lname] if b not in names and b not in net.inputs and b not in split_tops
            ]
    return names


def _last_writer(net) -> dict[str, str]:
    return {t: lname for lname in net._layer_names for t in net.top_names[lname]}


def _assert_close(name: str, theirs: np.ndarray, ours: np.ndarray, what: str) -> None:
    theirs = theirs.reshape(ours.shape)
    scale = float(np.abs(ours).max())
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=RTOL * max(scale, 1e-30), err_msg=f"{what}: blob {name}")


@pytest.fixture(scope="module", params=NETS, ids=lambda p: p if isinstance(p, str) else p.parent.name)
def prepared(request, tmp_path_factory):
    proto = request.param
    if proto == "decoder":
        proto = tmp_path_factory.mktemp("decoder") / "decoder.prototxt"
        proto.write_text(DECODER)
    net = caffe.Net(str(proto), caffe.TEST)
    for b in net.inputs:
        net.blobs[b].reshape(1, *net.blobs[b].shape[1:])
    net.reshape()
    ox.randomize_params(net, seed=21)
    inputs = ox.random_inputs(net, seed=22)
    ox._run_net(net, inputs)
    ours = {b: net.blobs[b].data.copy() for b in _compared_blobs(net)}
    return proto, net, inputs, ours


def test_our_caffemodel_loads_in_opencv_caffe_importer(prepared, tmp_path):
    proto, net, inputs, ours = prepared
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    for b, arr in inputs.items():
        cvnet.setInput(arr, b)
    writer = _last_writer(net)  # OpenCV's Caffe importer names outputs by layer
    names = list(ours)
    outs = cvnet.forward([writer[b] for b in names])
    for b, o in zip(names, outs):
        _assert_close(b, o, ours[b], f"OpenCV Caffe importer on {proto.name}")


def test_our_onnx_export_loads_in_opencv_onnx_importer(prepared, tmp_path):
    proto, net, inputs, ours = prepared
    path = tmp_path / "m.onnx"
    model = ox.export_onnx(net, path, check=False)
    blob_value = ox._blob_values(model)
    cvnet = cv2.dnn.readNetFromONNX(str(path))
    for b, arr in inputs.items():
        cvnet.setInput(arr, b)
    outputs = list(net.outputs)
    outs = cvnet.forward(outputs)
    for b, o in zip(outputs, outs):
        _assert_close(b, o, ours[b], f"OpenCV ONNX importer on {proto.name}")
    # the inner blobs through onnxruntime's view of the same file (OpenCV may fuse them away)
    got = ox.run_onnxruntime(model, inputs, [blob_value[b] for b in ours])
    for b in ours:
        _assert_close(b, got[blob_value[b]], ours[b], f"onnxruntime on {proto.name}")


def test_onnx_lrn_export_has_no_if_node_and_runs_in_opencv(tmp_path):
    # torch.onnx's LocalResponseNorm export emits an If node OpenCV cannot read; ours is ONNX LRN
    text = (
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 dim: 5 dim: 5 } } }\n'
        'layer { name: "norm" type: "LRN" bottom: "data" top: "norm" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }'
    )
    from caffe_compat import io as cio

    net = caffe.Net(cio.read_net_text(text), caffe.TEST)
    path = tmp_path / "lrn.onnx"
    model = ox.export_onnx(net, path)
    assert [n.op_type for n in model.graph.node] == ["LRN"]
    x = ox.random_inputs(net, 3)
    ours = ox._run_net(net, x)["norm"]
    cvnet = cv2.dnn.readNetFromONNX(str(path))
    cvnet.setInput(x["data"], "data")
    _assert_close("norm", cvnet.forward("norm"), ours, "OpenCV LRN")
