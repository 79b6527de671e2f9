"""docs/layers.md lists exactly the registered layer types, and unknown types fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import caffe_compat as caffe
from caffe_compat.errors import LayerError
from caffe_compat.layers.base import LAYER_REGISTRY, register_layer

DOC = Path(__file__).resolve().parents[1] / "docs" / "layers.md"


def test_support_table_lists_exactly_the_registered_types():
    rows = re.findall(r"^\| (\w+) \| (\w+)\.py \| yes \|", DOC.read_text(), flags=re.M)
    listed = {t: f for t, f in rows}
    assert set(listed) == set(caffe.layer_type_list())
    for t, f in listed.items():
        assert LAYER_REGISTRY[t].__module__ == f"caffe_compat.layers.{f}", t


def test_registering_a_type_twice_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register_layer("ReLU")(type("Again", (), {}))


def test_unknown_layer_type_names_layer_and_known_types(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "spp1" type: "SPPX" bottom: "data" top: "out" }\n'
    )
    with pytest.raises(LayerError) as e:
        caffe.Net(str(p), caffe.TEST)
    msg = str(e.value)
    assert "'SPPX'" in msg and "'spp1'" in msg and "Convolution" in msg


def test_blob_list_indexing_matches_parameter_list():
    import torch

    from caffe_compat.layers.base import BlobList

    ours, ref = BlobList(), torch.nn.ParameterList()
    params = [torch.nn.Parameter(torch.full((2,), float(i))) for i in range(3)]
    for p in params:
        ours.append(p)
        ref.append(p)
    for i in (0, 1, 2, -1, -3):
        assert ours[i] is ref[i]
    assert list(ours[1:]) == list(ref[1:]) and len(ours) == 3
    ours[1] = params[0]  # replacing a blob (Layer.top_shapes does) is seen by the next read
    assert ours[1] is params[0]
    for bad in (3, -4):
        with pytest.raises(IndexError):
            ours[bad]


def test_scalar_tensor_is_cached_per_value_dtype_device():
    import torch

    from caffe_compat.layers.base import scalar_tensor

    a = scalar_tensor(-10.0, torch.float32)
    assert a.dim() == 0 and a.dtype == torch.float32 and a.device.type == "cpu" and float(a) == -10.0
    assert scalar_tensor(-10.0, torch.float32, "cpu") is a  # no new tensor (or device copy) per call
    b = scalar_tensor(-10.0, torch.float64)
    assert b is not a and b.dtype == torch.float64
    # dividing by it is a true division, as by the number itself
    x = torch.randn(1000)
    assert torch.equal(x / a, x / -10.0)
