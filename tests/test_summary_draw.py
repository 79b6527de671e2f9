"""Net summary (shapes, parameter counts, FLOPs) and drawing (Caffe draw_net's DOT)."""

from __future__ import annotations

import json
import os
import re

import pytest

import caffe_compat as caffe
from caffe_compat import draw, summary
from caffe_compat import io as cio
from caffe_compat.cli import draw_net
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2
from tests.conftest import CAFFE_REF

ALEXNET = CAFFE_REF / "zoo" / "bvlc_alexnet"


@pytest.fixture(scope="module")
def alexnet():
    net = caffe.Net(str(ALEXNET / "deploy.prototxt"), caffe.TEST)
    return net


def test_alexnet_summary_counts(alexnet):
    rows = summary.summarize(alexnet)
    by = {r.name: r for r in rows}
    assert [r.name for r in rows] == list(alexnet._layer_names)
    params, flops = summary.totals(rows)
    assert params == 60_965_224  # AlexNet's published parameter count
    n = alexnet.blobs["data"].shape[0]  # 10 in the deploy file
    assert by["conv1"].flops == 2 * n * 96 * 55 * 55 * (3 * 11 * 11)
    assert by["conv2"].flops == 2 * n * 256 * 27 * 27 * (48 * 5 * 5)  # group 2
    assert by["fc6"].flops == 2 * n * 9216 * 4096
    assert by["fc6"].params == 9216 * 4096 + 4096
    assert by["relu1"].flops == n * 96 * 55 * 55 and by["drop6"].flops == 0
    assert by["pool1"].flops == n * 96 * 27 * 27 * 9
    assert flops == sum(r.flops for r in rows)
    assert by["conv2"].bottoms == ["pool1"] and by["conv2"].tops == ["conv2"]


def test_summary_top_shapes_are_caffes(alexnet):
    ref = json.loads((ALEXNET / "shapes.json").read_text())["blobs"]
    for r in summary.summarize(alexnet):
        for t, s in zip(r.tops, r.top_shapes):
            assert list(s) == ref[t], (r.name, t)


def test_summary_after_reshape_and_text_table(alexnet):
    alexnet.blobs["data"].reshape(1, 3, 227, 227)
    alexnet.reshape()
    rows = summary.summarize(alexnet)
    assert rows[1].top_shapes == [(1, 96, 55, 55)]
    text = summary.format_summary(rows, title="AlexNet")
    lines = text.splitlines()
    assert lines[0] == "AlexNet"
    assert lines[1].split()[:4] == ["layer", "type", "bottoms", "->"]
    assert re.search(r"^conv1\s+Convolution\s+data -> conv1\s+1x96x55x55\s+34,944\s+210,830,400$", text, re.M)
    assert re.search(r"^total\s+24 layers\s+60,965,224\s+1,454,393,272$", text, re.M)
    assert lines[-1] == "60.97M parameters, 1.45GFLOPs per forward pass"


def test_summary_deconvolution_shared_params_and_splits():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 5 dim: 5 } } }
    layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
            convolution_param { num_output: 6 kernel_size: 3 stride: 2 group: 2 } }
    layer { name: "a" type: "Convolution" bottom: "up" top: "a" param { name: "w" } convolution_param { num_output: 6 kernel_size: 1 bias_term: false } }
    layer { name: "b" type: "Convolution" bottom: "up" top: "b" param { name: "w" } convolution_param { num_output: 6 kernel_size: 1 bias_term: false } }
    layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 1 coeff: 0.5 } }
    """
    net = caffe.Net(cio.read_net_text(text), caffe.TEST)
    rows = summary.summarize(net)
    by = {r.name: r for r in rows}
    assert "Split" not in [r.type for r in rows]
    assert by["up"].top_shapes == [(2, 6, 11, 11)]
    assert by["up"].flops == 2 * (2 * 4 * 5 * 5) * (6 // 2) * 9
    assert by["up"].params == 4 * 3 * 9 + 6
    assert by["a"].params == 36 and by["b"].params == 0  # shared blob counted at its owner
    assert by["sum"].flops == 2 * (2 * 6 * 11 * 11)  # one add, one coefficient
    with_splits = summary.summarize(net, splits=True)
    assert [r.type for r in with_splits].count("Split") == 1


def test_summary_recurrent_and_spp_layers():
    text = """
    layer { name: "x" type: "Input" top: "x" top: "cont" top: "xs"
            input_param { shape { dim: 5 dim: 2 dim: 8 } shape { dim: 5 dim: 2 } shape { dim: 2 dim: 3 } } }
    layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "xs" top: "h"
            recurrent_param { num_output: 16 } }
    layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "o" recurrent_param { num_output: 4 } }
    layer { name: "r" type: "Reshape" bottom: "h" top: "h4" reshape_param { shape { dim: 5 dim: 2 dim: 4 dim: 4 } } }
    layer { name: "spp" type: "SPP" bottom: "h4" top: "spp" spp_param { pyramid_height: 3 } }
    """
    net = caffe.Net(cio.read_net_text(text), caffe.TEST)
    by = {r.name: r for r in summary.summarize(net)}
    # LSTM: W_xc 64x8, b_c 64, W_xc_static 64x3, W_hc 64x16
    assert by["lstm"].params == 64 * 8 + 64 + 64 * 3 + 64 * 16
    assert by["lstm"].flops == 5 * 2 * (2 * 8 * 64 + 2 * 16 * 64 + 10 * 16) + 2 * 3 * 64 * 2
    # RNN: W_xh 4x8, b_h 4, W_hh 4x4, W_ho 4x4, b_o 4
    assert by["rnn"].params == 32 + 4 + 16 + 16 + 4
    assert by["rnn"].flops == 5 * 2 * (2 * 8 * 4 + 2 * 4 * 4 + 4 + 2 * 4 * 4 + 4)
    assert by["spp"].top_shapes == [(5, 2 * (1 + 4 + 16))] and by["spp"].flops == 3 * 5 * 2 * 4 * 4


# ---------------------------------------------------------------------------------------------
# drawing


def _parse_dot(text: str):
    """Nodes (id -> attrs) and edges of our DOT output; checks its structure on the way."""
    lines = text.strip().splitlines()
    assert lines[0].startswith("digraph ") and lines[0].endswith("{") and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[1:-1]:
        m = re.fullmatch(r'  "((?:[^"\\]|\\.)*)" \[(.*)\];', line)
        if m:
            attrs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            nodes[m.group(1)] = attrs
            continue
        m = re.fullmatch(r'  "((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"(?: \[label="((?:[^"\\]|\\.)*)"\])?;', line)
        if m:
            edges.append((m.group(1), m.group(2), m.group(3) or ""))
            continue
        assert re.fullmatch(r"  rankdir=(LR|TB|BT|RL);", line), line
    for a, b, _ in edges:
        assert a in nodes and b in nodes, (a, b)
    return nodes, edges


def test_dot_has_caffe_draw_net_look():
    param = cio.read_net(str(ALEXNET / "deploy.prototxt"))
    nodes, edges = _parse_dot(draw.get_dot_graph(param, "LR"))
    conv = nodes["conv1_Convolution"]
    assert conv["shape"] == "record" and conv["fillcolor"] == "#FF5050" and conv["style"] == "filled"
    assert conv["label"] == r"conv1\n(Convolution)\nkernel size: 11\nstride: 4\npad: 0"
    assert nodes["pool1_Pooling"]["fillcolor"] == "#FF9900"
    assert nodes["pool1_Pooling"]["label"].startswith(r"pool1\n(Pooling MAX)")
    assert nodes["fc6_InnerProduct"]["fillcolor"] == "#CC33FF"
    assert nodes["norm1_LRN"]["fillcolor"] == "#6495ED"
    assert nodes["relu1_ReLU"]["fillcolor"] == "#90EE90"  # in place
    assert nodes["conv1_blob"]["shape"] == "octagon" and nodes["conv1_blob"]["fillcolor"] == "#E0E0E0"
    assert ("conv1_Convolution", "conv1_blob", "96") in edges
    assert ("fc8_InnerProduct", "fc8_blob", "1000") in edges
    assert ("relu1_ReLU", "conv1_blob", "") in edges and ("conv1_blob", "relu1_ReLU", "") in edges
    tb_nodes, _ = _parse_dot(draw.get_dot_graph(param, "TB"))
    assert tb_nodes["conv1_Convolution"]["label"] == "conv1 (Convolution) kernel size: 11 stride: 4 pad: 0"
    assert "rankdir=TB;" in draw.get_dot_graph(param, "TB")


def test_dot_phase_filter_and_lr_mults():
    param = cio.read_net(str(ALEXNET / "train_val.prototxt"))
    all_nodes, _ = _parse_dot(draw.get_dot_graph(param, "LR"))
    train, _ = _parse_dot(draw.get_dot_graph(param, "LR", phase=caffe_pb2.TRAIN))
    test, _ = _parse_dot(draw.get_dot_graph(param, "LR", phase=caffe_pb2.TEST))
    assert "accuracy_Accuracy" in all_nodes and "accuracy_Accuracy" in test and "accuracy_Accuracy" not in train
    labelled, _ = _parse_dot(draw.get_dot_graph(param, "LR", display_lrm=True))
    assert labelled["conv1_Convolution"]["label"].endswith(r"\nlr mult: 1.0, 2.0")


def test_dot_of_a_built_net_hides_splits_and_shows_shapes():
    text = """
    name: "has \\"quotes\\""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
    layer { name: "a" type: "ReLU" bottom: "data" top: "a" }
    layer { name: "b" type: "Sigmoid" bottom: "data" top: "b" }
    """
    net = caffe.Net(cio.read_net_text(text), caffe.TEST)
    dot = draw.get_dot_graph(net, "LR")
    assert dot.startswith('digraph "has \\"quotes\\"" {')
    nodes, edges = _parse_dot(dot)
    assert not any("split" in n for n in nodes)
    assert nodes["data_blob"]["label"] == r"data\n(1x2x4x4)"
    assert ("data_blob", "a_ReLU", "") in edges and ("data_blob", "b_Sigmoid", "") in edges


def test_draw_without_graphviz_writes_dot(tmp_path, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    param = cio.read_net(str(ALEXNET / "deploy.prototxt"))
    written = draw.draw_net_to_file(param, tmp_path / "net.png", "TB")
    assert written == str(tmp_path / "net.dot")
    assert (tmp_path / "net.dot").read_text() == draw.get_dot_graph(param, "TB")
    assert not (tmp_path / "net.png").exists()
    with pytest.raises(CaffeError, match="Graphviz's 'dot'"):
        draw.draw_net(param, "LR", ext="png")
    assert draw.draw_net(param, "LR", ext="raw") == draw.get_dot_graph(param, "LR").encode()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (PNG spec: signature, then IHDR's length, type, w, h)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# .ci/run installs Graphviz and sets CAFFE_COMPAT_REQUIRE_GRAPHVIZ=1: there a missing dot fails
@pytest.mark.skipif(
    not draw.dot_available() and not os.environ.get("CAFFE_COMPAT_REQUIRE_GRAPHVIZ"),
    reason="Graphviz's dot is not installed (apt-get install graphviz; CI installs it)",
)
def test_draw_with_graphviz_renders_png(tmp_path, capsys):
    """draw_net renders AlexNet through dot: a PNG as wide as a left-to-right chain of its layers
    (one box per layer and blob: far wider than tall), and the same from tools/draw_net.py."""
    param = cio.read_net(str(ALEXNET / "deploy.prototxt"))
    written = draw.draw_net_to_file(param, tmp_path / "net.png")
    assert written == str(tmp_path / "net.png")
    width, height = _png_size((tmp_path / "net.png").read_bytes())
    assert width > 4 * height and width > 2000, (width, height)  # rankdir LR: 24 layers in a row
    assert draw_net.main([str(ALEXNET / "deploy.prototxt"), str(tmp_path / "tb.png"), "--rankdir", "TB"]) == 0
    assert "Drawing net to" in capsys.readouterr().out
    width, height = _png_size((tmp_path / "tb.png").read_bytes())
    assert height > 1.2 * width and height > 2000, (width, height)  # top to bottom (the side branches widen it)


def test_bad_rankdir_is_refused():
    param = cio.read_net(str(ALEXNET / "deploy.prototxt"))
    with pytest.raises(CaffeError, match="rankdir"):
        draw.get_dot_graph(param, "XY")


# ---------------------------------------------------------------------------------------------
# command lines


def test_draw_net_tool(tmp_path, capsys, monkeypatch):
    from caffe_compat.cli import draw_net

    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    out = tmp_path / "tv.dot"
    rc = draw_net.main([str(ALEXNET / "train_val.prototxt"), str(out), "--rankdir", "TB", "--phase", "TRAIN"])
    assert rc == 0
    nodes, _ = _parse_dot(out.read_text())
    assert "accuracy_Accuracy" not in nodes and "loss_SoftmaxWithLoss" in nodes
    rc = draw_net.main([str(ALEXNET / "train_val.prototxt"), str(tmp_path / "x.png"), "--phase", "VAL"])
    assert rc == 1 and "--phase" in capsys.readouterr().err


def test_python_m_summary_and_tools_summary(tmp_path, capsys, monkeypatch):
    from caffe_compat.__main__ import main
    from caffe_compat.cli import summary as summary_tool

    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    proto = CAFFE_REF / "realworld" / "lenet" / "deploy.prototxt"
    rc = main(["summary", str(proto), "--batch", "2", "--draw", str(tmp_path / "lenet.png")])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^conv1\s+Convolution\s+data -> conv1\s+2x20x24x24\s+520\s+", out, re.M)
    assert f"drew the net into {tmp_path / 'lenet.dot'}" in out
    assert (tmp_path / "lenet.dot").exists()
    rc = summary_tool.main([str(proto)])
    assert rc == 0 and "431,080" in capsys.readouterr().out  # LeNet's parameter count
    rc = main(["summary", str(tmp_path / "missing.prototxt")])
    assert rc == 1 and "missing.prototxt" in capsys.readouterr().err
