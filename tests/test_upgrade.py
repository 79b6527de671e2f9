"""Net and solver upgrades against what Caffe's own upgrade tools produced."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from caffe_compat import io as cio
from caffe_compat.errors import FormatError
from caffe_compat.proto import caffe_pb2
from caffe_compat.upgrade import net_needs_upgrade, upgrade_net, upgrade_solver

REF = Path(__file__).parent / "fixtures" / "caffe_reference"
LEGACY = REF / "legacy"
ROOT = Path(__file__).resolve().parent.parent


def _raw(path: Path) -> caffe_pb2.NetParameter:
    return cio.read_prototxt(path, caffe_pb2.NetParameter)


def _net(text: str) -> caffe_pb2.NetParameter:
    return cio.parse_prototxt(text, caffe_pb2.NetParameter)


@pytest.mark.parametrize("name", ["lenet_v1", "caffenet_v1"])
def test_text_upgrade_matches_caffe(name):
    raw = _raw(LEGACY / f"{name}.prototxt")
    assert net_needs_upgrade(raw)
    ours = upgrade_net(raw, source=f"{name}.prototxt")
    caffes = _raw(LEGACY / f"{name}_upgraded_by_caffe.prototxt")
    assert ours == caffes
    # and the text we write is the text Caffe wrote
    assert cio.message_to_text(ours) == (LEGACY / f"{name}_upgraded_by_caffe.prototxt").read_text()
    assert not net_needs_upgrade(ours)
    assert raw == _raw(LEGACY / f"{name}.prototxt")  # input not modified


def test_binary_upgrade_matches_caffe():
    ours = cio.read_caffemodel(LEGACY / "lenet_v1.caffemodel")
    caffes = caffe_pb2.NetParameter()
    caffes.ParseFromString((LEGACY / "lenet_v1_upgraded_by_caffe.caffemodel").read_bytes())
    assert ours == caffes
    assert ours.SerializeToString() == (LEGACY / "lenet_v1_upgraded_by_caffe.caffemodel").read_bytes()
    # Caffe keeps the legacy num/channels/height/width dims of the blobs
    conv_w = ours.layer[1].blobs[0]
    assert (conv_w.num, conv_w.channels, conv_w.height, conv_w.width) == (4, 1, 5, 5)
    assert not conv_w.HasField("shape")


def test_realworld_v1_deploy_upgrades():
    net = cio.read_net(REF / "realworld" / "legacy_v1" / "deploy.prototxt")
    assert net.layer[0].type == "Input" and net.layer[0].name == "input"
    assert list(net.layer[0].input_param.shape[0].dim) == [10, 3, 227, 227]
    assert [layer.type for layer in net.layer[1:4]] == ["Convolution", "ReLU", "Pooling"]


def test_mixed_layers_and_layer_is_an_error(tmp_path):
    p = tmp_path / "mixed.prototxt"
    p.write_text(
        'layers { name: "a" type: RELU bottom: "x" top: "x" }\nlayer { name: "b" type: "ReLU" bottom: "x" top: "x" }\n'
    )
    with pytest.raises(FormatError, match=r"mixed\.prototxt: the net defines both 'layers'.*and 'layer'"):
        cio.read_net(p)


def test_v1_fields_map_to_param_specs():
    net = upgrade_net(
        _net(
            """
            layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
              param: "w" param: "b" blob_share_mode: PERMISSIVE
              blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 loss_weight: 0.5
              include { phase: TRAIN } inner_product_param { num_output: 3 } }
            layers { name: "d" type: DATA top: "x" data_param { source: "db" batch_size: 4 scale: 0.5 mirror: true } }
            layers { name: "n" }
            """
        )
    )
    ip = net.layer[0]
    assert ip.type == "InnerProduct"
    assert [p.name for p in ip.param] == ["w", "b"]
    assert ip.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not ip.param[1].HasField("share_mode")
    assert [p.lr_mult for p in ip.param] == pytest.approx([1.0, 2.0], rel=0, abs=0)
    assert [p.decay_mult for p in ip.param] == pytest.approx([1.0, 0.0], rel=0, abs=0)
    assert list(ip.loss_weight) == pytest.approx([0.5], rel=0, abs=0)
    assert ip.include[0].phase == caffe_pb2.TRAIN
    assert ip.inner_product_param.num_output == 3
    data = net.layer[1]
    assert data.type == "Data"
    assert data.transform_param.scale == pytest.approx(0.5, rel=0, abs=0)
    assert data.transform_param.mirror is True
    assert not data.data_param.HasField("scale") and not data.data_param.HasField("mirror")
    assert data.data_param.source == "db" and data.data_param.batch_size == 4
    assert not net.layer[2].HasField("type")


def test_v0_net_with_padding_layer():
    net = upgrade_net(
        _net(
            """
            name: "v0"
            input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
            layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
            layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2
                             biasterm: false blobs_lr: 1 blobs_lr: 2
                             weight_filler { type: "gaussian" std: 0.01 } }
                     bottom: "pad1" top: "conv1" }
            layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
            layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "pool1" top: "pool1" }
            layers { layer { name: "d" type: "data" source: "db" batchsize: 5 scale: 0.25 cropsize: 4 } top: "x" }
            """
        ),
        source="v0.prototxt",
    )
    names = [layer.name for layer in net.layer]
    assert names == ["input", "conv1", "pool1", "drop", "d"]  # padding merged, Input first
    conv = net.layer[1]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride), list(cp.pad)) == (4, [3], [2], [2])
    assert cp.bias_term is False and cp.weight_filler.type == "gaussian"
    assert [p.lr_mult for p in conv.param] == pytest.approx([1.0, 2.0], rel=0, abs=0)
    pool = net.layer[2]
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert pool.pooling_param.kernel_size == 2
    assert net.layer[3].dropout_param.dropout_ratio == pytest.approx(0.3, rel=1e-6, abs=0)
    d = net.layer[4]
    assert d.type == "Data" and d.data_param.source == "db" and d.data_param.batch_size == 5
    assert d.transform_param.scale == pytest.approx(0.25, rel=0, abs=0)
    assert d.transform_param.crop_size == 4
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]


def test_v0_unknown_type_names_file():
    with pytest.raises(FormatError, match=r"old\.prototxt: unknown V0 layer type 'convolution'"):
        upgrade_net(_net('layers { layer { name: "c" type: "convolution" } }'), source="old.prototxt")


def test_input_shape_becomes_input_layer():
    net = upgrade_net(
        _net(
            """
            input: "a" input_shape { dim: 2 dim: 3 }
            input: "b" input_shape { dim: 2 }
            layer { name: "r" type: "ReLU" bottom: "a" top: "r" }
            """
        )
    )
    assert [layer.name for layer in net.layer] == ["input", "r"]
    inp = net.layer[0]
    assert inp.type == "Input" and list(inp.top) == ["a", "b"]
    assert [list(s.dim) for s in inp.input_param.shape] == [[2, 3], [2]]
    assert len(net.input) == 0 and len(net.input_shape) == 0


def test_input_without_shape_is_just_dropped():
    # a legacy caffemodel lists its inputs without shapes: Caffe drops them
    net = upgrade_net(_net('input: "data" layer { name: "r" type: "ReLU" }'))
    assert [layer.name for layer in net.layer] == ["r"]
    assert len(net.input) == 0


def test_too_few_input_dims():
    with pytest.raises(FormatError, match=r"n\.prototxt: 2 net inputs need 8 input_dim values"):
        upgrade_net(_net('input: "a" input: "b" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1'), "n.prototxt")


def test_batchnorm_param_specs_zeroed():
    net = upgrade_net(
        _net(
            """
            layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 name: "s" } param { lr_mult: 1 } }
            layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } }
            """
        )
    )
    bn = net.layer[0]
    assert [(p.lr_mult, p.decay_mult) for p in bn.param] == [(0.0, 0.0)] * 3
    assert bn.param[1].name == "s"
    assert [p.lr_mult for p in net.layer[1].param] == pytest.approx([1.0, 1.0], rel=0, abs=0)


def test_current_net_unchanged():
    path = REF / "zoo" / "bvlc_alexnet" / "deploy.prototxt"
    raw = _raw(path)
    assert not net_needs_upgrade(raw)
    assert upgrade_net(raw) == raw


def test_upgrade_solver_types():
    for enum, name in [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
                       ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")]:  # fmt: skip
        s = cio.parse_prototxt(f"solver_type: {enum}", caffe_pb2.SolverParameter)
        up = upgrade_solver(s)
        assert up.type == name and not up.HasField("solver_type")
        assert not up.HasField("snapshot_prefix")  # no source: prefix untouched
        assert s.HasField("solver_type")  # input not modified


# ---------------------------------------------------------------------------------------------
# tools/upgrade_net.py


def _tool():
    spec = importlib.util.spec_from_file_location("_tool_upgrade_net", ROOT / "tools" / "upgrade_net.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tool_text_round_trip(tmp_path):
    out = tmp_path / "up.prototxt"
    assert _tool().main([str(LEGACY / "caffenet_v1.prototxt"), str(out)]) == 0
    assert out.read_text() == (LEGACY / "caffenet_v1_upgraded_by_caffe.prototxt").read_text()
    again = tmp_path / "again.prototxt"
    assert _tool().main([str(out), str(again)]) == 0  # already current: copied unchanged
    assert again.read_text() == out.read_text()


def test_tool_binary_round_trip(tmp_path):
    out = tmp_path / "up.caffemodel"
    assert _tool().main(["--binary", str(LEGACY / "lenet_v1.caffemodel"), str(out)]) == 0
    assert out.read_bytes() == (LEGACY / "lenet_v1_upgraded_by_caffe.caffemodel").read_bytes()


def test_tool_solver_upgrades_solver_type(tmp_path):
    old = tmp_path / "old_solver.prototxt"
    old.write_text('net: "train.prototxt"\nbase_lr: 0.01\nsolver_type: ADAGRAD\nmax_iter: 10\n')
    out = tmp_path / "solver.prototxt"
    assert _tool().main(["--solver", str(old), str(out)]) == 0
    new = cio.read_prototxt(out, caffe_pb2.SolverParameter)
    assert new.type == "AdaGrad" and not new.HasField("solver_type")
    assert new.net == "train.prototxt" and new.base_lr == pytest.approx(0.01) and new.max_iter == 10
    assert not new.HasField("snapshot_prefix")  # the tool upgrades only (no path filled in)


def test_tool_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { nme: 'x' }\n")
    assert _tool().main([str(bad), str(tmp_path / "o.prototxt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"upgrade_net.py: error: {bad}:1:9: unknown field 'nme'")
    assert not (tmp_path / "o.prototxt").exists()

    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    assert _tool().main(["--binary", str(junk), str(tmp_path / "o.caffemodel")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.caffemodel" in err and "PNG" in err
