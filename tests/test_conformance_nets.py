"""Deploy nets of the model zoo and real-world nets build with exactly Caffe's shapes, names
and types (shapes.json was written by a real Caffe build)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import caffe_compat as caffe
from tests.conftest import CAFFE_REF

SHAPE_CASES = sorted(str(p.parent.relative_to(CAFFE_REF)) for p in CAFFE_REF.glob("*/*/shapes.json"))


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_deploy_net_shapes_match_caffe(case):
    d = CAFFE_REF / case
    ref = json.loads((d / "shapes.json").read_text())
    net = caffe.Net(str(d / "deploy.prototxt"), caffe.TEST)
    assert list(net._layer_names) == ref["layers"]
    assert [layer.type for layer in net.layers] == ref["layer_types"]
    assert set(net.blobs) == set(ref["blobs"])
    for b, shp in ref["blobs"].items():
        assert list(net.blobs[b].data.shape) == shp, f"blob {b}"
    assert set(net.params) == set(ref["params"])
    for layer, shps in ref["params"].items():
        assert [list(p.data.shape) for p in net.params[layer]] == shps, f"params of {layer}"


def test_legacy_v1_lenet_forward_matches_caffe():
    d = CAFFE_REF / "legacy"
    ref = np.load(d / "lenet_v1_forward.npz")
    net = caffe.Net(str(d / "lenet_v1.prototxt"), str(d / "lenet_v1.caffemodel"), caffe.TEST)
    net.blobs["data"].data[...] = ref["data__data"]
    net.forward()
    for k in ref.files:
        blob = k[len("data__") :]
        np.testing.assert_allclose(net.blobs[blob].data, ref[k], rtol=1e-4, atol=1e-5, err_msg=blob)
