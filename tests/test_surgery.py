"""Net surgery (caffe_compat/surgery.py, tools/surgery.py): copy by name with shape checks and a
report, caffemodel to caffemodel, and Caffe's fully-connected -> convolutional transplant."""

from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import io as cio
from caffe_compat.errors import NetError
from caffe_compat.surgery import copy_layers, fc_to_conv, load_weights, parse_mapping

FC_NET = """
name: "fc"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "fc6" type: "InnerProduct" bottom: "conv1" top: "fc6"
  inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
"""

CONV_NET = """
name: "fullyconv"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "fc6-conv" type: "Convolution" bottom: "conv1" top: "fc6-conv"
  convolution_param { num_output: 7 kernel_size: 2 } }
layer { name: "other" type: "InnerProduct" bottom: "fc6-conv" top: "other" inner_product_param { num_output: 2 } }
"""


def _net(text: str, tmp_path, name: str, seed: int = 0):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    caffe.set_random_seed(seed)
    return caffe.Net(str(path), caffe.TEST), str(path)


def test_parse_mapping():
    assert parse_mapping(["conv1", "fc6:fc6_conv,fc7:x"]) == [("conv1", "conv1"), ("fc6", "fc6_conv"), ("fc7", "x")]
    assert parse_mapping([]) is None
    with pytest.raises(ValueError, match="source:destination"):
        parse_mapping(["a:b:c"])


def test_copy_by_name_reports_copied_and_filler(tmp_path):
    src, _ = _net(FC_NET, tmp_path, "src", seed=1)
    dst, _ = _net(CONV_NET, tmp_path, "dst", seed=2)
    rep = copy_layers(src, dst)  # common names only: conv1
    assert [c["dst"] for c in rep.copied] == ["conv1"]
    assert rep.copied[0]["shapes"] == [[5, 3, 3, 3], [5]]
    assert rep.left_at_filler == ["fc6-conv", "other"]
    for k in range(2):
        np.testing.assert_allclose(dst.params["conv1"][k].data, src.params["conv1"][k].data, rtol=0, atol=0)
    assert "copied  conv1 -> conv1" in rep.to_text() and "kept    other" in rep.to_text()


def test_shape_mismatch_raises_or_is_reported(tmp_path):
    src, _ = _net(FC_NET, tmp_path, "src")
    dst, _ = _net(CONV_NET, tmp_path, "dst")
    before = dst.params["fc6-conv"][0].data.copy()
    with pytest.raises(
        NetError, match=r"fc6 -> fc6-conv: blob 0: source shape \[7, 20\], destination shape \[7, 5, 2, 2\]"
    ):
        copy_layers(src, dst, ["fc6:fc6-conv"])
    rep = copy_layers(src, dst, ["fc6:fc6-conv", "nope:conv1"], strict=False)
    assert [s["src"] for s in rep.skipped] == ["fc6", "nope"]
    assert "no layer 'nope'" in rep.skipped[1]["reason"]
    np.testing.assert_allclose(dst.params["fc6-conv"][0].data, before, rtol=0, atol=0)


def test_fc_to_conv_computes_the_same_outputs(tmp_path):
    src, _ = _net(FC_NET, tmp_path, "src", seed=3)
    dst, _ = _net(CONV_NET, tmp_path, "dst", seed=4)
    rep = fc_to_conv(src, dst, ["conv1", "fc6:fc6-conv"])
    assert [c["reshaped"] for c in rep.copied] == [False, True]
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    fc = src.forward(data=x)["fc6"]
    conv = dst.forward(data=x, blobs=["fc6-conv"])["fc6-conv"]
    assert conv.shape == (2, 7, 1, 1)
    np.testing.assert_allclose(conv.reshape(2, 7), fc, rtol=1e-5, atol=1e-5)


def test_caffemodel_to_caffemodel_tool(tmp_path, capsys):
    from caffe_compat.cli import surgery

    src, _ = _net(FC_NET, tmp_path, "src", seed=5)
    dst, dst_proto = _net(CONV_NET, tmp_path, "dst", seed=6)
    src.save(str(tmp_path / "src.caffemodel"))
    dst.save(str(tmp_path / "dst.caffemodel"))
    out = tmp_path / "out.caffemodel"
    rc = surgery.main(
        [
            "--source",
            str(tmp_path / "src.caffemodel"),
            "--dest-weights",
            str(tmp_path / "dst.caffemodel"),
            "--map",
            "conv1,fc6:fc6-conv",
            "--fc-to-conv",
            "--output",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "copied  fc6 -> fc6-conv" in text and "(reshaped)" in text
    w = load_weights(str(out))
    np.testing.assert_allclose(w["fc6-conv"][0], src.params["fc6"][0].data.reshape(7, 5, 2, 2), rtol=0, atol=0)
    np.testing.assert_allclose(w["other"][0], dst.params["other"][0].data, rtol=0, atol=0)
    # into a net built from its prototxt, then loadable by name
    out2 = tmp_path / "out2.caffemodel"
    assert surgery.main(["--source", str(out), "--model", dst_proto, "--output", str(out2)]) == 0
    net = caffe.Net(dst_proto, str(out2), caffe.TEST)
    np.testing.assert_allclose(net.params["fc6-conv"][1].data, src.params["fc6"][1].data, rtol=0, atol=0)
    # a mismatch without --fc-to-conv: one line, exit 1
    assert (
        surgery.main(
            [
                "--source",
                str(tmp_path / "src.caffemodel"),
                "--model",
                dst_proto,
                "--map",
                "fc6:fc6-conv",
                "--output",
                str(tmp_path / "x.caffemodel"),
            ]
        )
        == 1
    )
    assert "--fc-to-conv" in capsys.readouterr().err
    assert cio.read_caffemodel(str(out)).layer
