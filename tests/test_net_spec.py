"""pycaffe's net_spec (caffe.NetSpec, L, P, to_proto) and coord_map, against Caffe's own prototxts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat import coord_map as cm
from caffe_compat import net_spec
from caffe_compat.errors import LayerError
from caffe_compat.proto import caffe_pb2

L = net_spec.layers
P = net_spec.params
NetSpec = net_spec.NetSpec

LENET = Path(__file__).parent / "fixtures" / "caffe_reference" / "realworld" / "lenet"


def _parse(path: Path) -> caffe_pb2.NetParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def _roundtrip(p: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    return text_format.Parse(text_format.MessageToString(p), caffe_pb2.NetParameter())


def _lenet_body(n: NetSpec) -> None:
    """LeNet from conv1 to ip2, as examples/01-learning-lenet writes it (with lr_mult params)."""
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    fill = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.conv1 = L.Convolution(n.data, param=lr, num_output=20, kernel_size=5, stride=1, **fill)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=lr, num_output=50, kernel_size=5, stride=1, **fill)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=lr, num_output=500, **fill)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=lr, num_output=10, **fill)


def test_lenet_deploy_matches_caffe_prototxt():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[64, 1, 28, 28]))
    _lenet_body(n)
    n.prob = L.Softmax(n.ip2)
    net = n.to_proto()
    net.name = "LeNet"
    expected = _parse(LENET / "lenet.prototxt")
    assert net == expected, text_format.MessageToString(net)
    assert _roundtrip(net) == net


def test_lenet_train_test_matches_caffe_prototxt():
    def data(phase, source, batch_size):
        return L.Data(
            name="mnist",
            include=dict(phase=phase),
            transform_param=dict(scale=1.0 / 256),
            source=source,
            batch_size=batch_size,
            backend=P.Data.LMDB,
            ntop=2,
        )

    n = NetSpec()
    n.data, n.label = data(caffe.TRAIN, "examples/mnist/mnist_train_lmdb", 64)
    _lenet_body(n)
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=caffe.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    net = n.to_proto()
    # the TEST data layer produces the same tops: spec it alone and put it after the TRAIN one
    t = NetSpec()
    t.data, t.label = data(caffe.TEST, "examples/mnist/mnist_test_lmdb", 100)
    net.layer.insert(1, t.to_proto().layer[0])
    net.name = "LeNet"
    expected = _parse(LENET / "lenet_train_test.prototxt")
    assert net == expected, text_format.MessageToString(net)
    assert _roundtrip(net) == net
    # and Caffe's net filtering sees one data layer per phase
    assert [lp.include[0].phase for lp in net.layer[:2]] == [caffe.TRAIN, caffe.TEST]


def test_generated_lenet_builds_and_runs():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 28, 28]))
    _lenet_body(n)
    n.prob = L.Softmax(n.ip2)
    caffe.set_random_seed(3)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    assert list(net.blobs) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    assert net.params["ip1"][0].data.shape == (500, 800)
    rng = np.random.default_rng(0)
    out = net.forward(data=rng.random((2, 1, 28, 28), dtype=np.float32))
    np.testing.assert_allclose(out["prob"].sum(1), [1.0, 1.0], rtol=1e-5, atol=1e-6)


def test_autonaming_follows_pycaffe():
    data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    c1 = L.Convolution(data, num_output=4, kernel_size=3)
    c2 = L.Convolution(c1, num_output=4, kernel_size=1)
    r = L.ReLU(c2, in_place=True)
    net = net_spec.to_proto(r)
    assert [lp.name for lp in net.layer] == ["Input1", "Convolution1", "Convolution2", "ReLU1"]
    assert [list(lp.top) for lp in net.layer] == [["Input1"], ["Convolution1"], ["Convolution2"], ["Convolution2"]]
    assert list(net.layer[2].bottom) == ["Convolution1"]
    # a Top's own to_proto is the same thing
    assert r.to_proto() == net


def test_named_and_unnamed_tops_mix():
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2, 1])], ntop=2)
    hidden = L.InnerProduct(n.data, num_output=3)
    n.loss = L.EuclideanLoss(hidden, n.data, loss_weight=0.5)
    net = n.to_proto()
    assert [lp.name for lp in net.layer] == ["data", "InnerProduct1", "loss"]
    assert list(net.layer[0].top) == ["data", "label"]
    assert [list(s.dim) for s in net.layer[0].dummy_data_param.shape] == [[2, 3], [2, 1]]
    assert list(net.layer[2].bottom) == ["InnerProduct1", "data"]
    assert list(net.layer[2].loss_weight) == [0.5]


def test_multi_top_unnamed_and_ntop_zero():
    tops = L.Slice(L.Input(shape=dict(dim=[4, 6])), slice_param=dict(axis=1, slice_point=[2, 4]), ntop=3)
    assert len(tops) == 3
    silence = L.Silence(tops[0], tops[2], ntop=0)
    assert isinstance(silence, net_spec.Function)
    net = net_spec.to_proto(tops[1], silence)
    assert [lp.name for lp in net.layer] == ["Input1", "Slice1", "Silence1"]
    assert list(net.layer[1].top) == ["Slice1", "Slice2", "Slice3"]
    assert list(net.layer[2].bottom) == ["Slice1", "Slice3"]
    assert len(net.layer[2].top) == 0
    assert list(net.layer[1].slice_param.slice_point) == [2, 4]


def test_repeated_and_nested_parameters():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 5, 5]))
    n.conv = L.Convolution(
        n.data,
        num_output=3,
        kernel_size=[3, 1],  # a list for a repeated field
        pad=1,  # a scalar for a repeated field
        param=[dict(lr_mult=1, decay_mult=1, name="w"), dict(lr_mult=2, decay_mult=0)],
        weight_filler=dict(type="gaussian", std=0.01),
        include=dict(phase=caffe.TRAIN, stage=["a", "b"]),
        exclude=[dict(not_stage="c"), dict(min_level=2)],
        propagate_down=[False],
        engine=P.Convolution.CAFFE,
    )
    n.loss = L.SoftmaxWithLoss(
        n.conv, n.data, loss_param=dict(ignore_label=255, normalization="VALID"), loss_weight=[2.0]
    )
    lp = n.to_proto().layer[1]
    cp = lp.convolution_param
    assert list(cp.kernel_size) == [3, 1] and list(cp.pad) == [1] and cp.num_output == 3
    assert [(p.lr_mult, p.decay_mult, p.name) for p in lp.param] == [(1, 1, "w"), (2, 0, "")]
    assert cp.weight_filler.type == "gaussian"
    assert cp.weight_filler.std == pytest.approx(0.01, rel=1e-6)
    assert not cp.HasField("bias_filler")
    assert lp.include[0].phase == caffe.TRAIN and list(lp.include[0].stage) == ["a", "b"]
    assert lp.exclude[0].not_stage == ["c"] and lp.exclude[1].min_level == 2
    assert list(lp.propagate_down) == [False]
    assert cp.engine == caffe_pb2.ConvolutionParameter.CAFFE
    loss = n.to_proto().layer[2]
    assert loss.loss_param.ignore_label == 255
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.VALID
    assert list(loss.loss_weight) == [2.0]


def test_numpy_values_messages_and_deconvolution_keywords():
    data = L.Input(shape=dict(dim=np.array([1, 1, 4, 4])))
    up = L.Deconvolution(
        data,
        num_output=np.int64(2),
        kernel_size=4,
        stride=2,
        bias_term=False,
        weight_filler=caffe_pb2.FillerParameter(type="bilinear"),
    )
    net = net_spec.to_proto(up)
    cp = net.layer[1].convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride), cp.bias_term) == (2, [4], [2], False)
    assert cp.weight_filler.type == "bilinear"
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 1, 4, 4]


def test_params_enums():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == caffe_pb2.PoolingParameter.AVE
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
    with pytest.raises(AttributeError, match="PoolingParameter has no constant 'MAXX'"):
        _ = P.Pooling.MAXX
    with pytest.raises(AttributeError, match="NoSuchParameter"):
        _ = P.NoSuch.X


def test_netspec_container_api_and_update():
    n = NetSpec()
    n["data"] = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n["data"], num_output=2)
    assert n.keys() == ["data", "ip"] and n.vals() == [n.data, n.ip] and "ip" in n
    n.update("ip", dict(num_output=5, bias_term=False))
    p = n.to_proto().layer[1].inner_product_param
    assert (p.num_output, p.bias_term) == (5, False)
    del n["ip"]
    assert [lp.name for lp in n.to_proto().layer] == ["data"]
    with pytest.raises(AttributeError, match="no top 'nope'"):
        _ = n.nope


def test_unknown_field_names_layer_and_field():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.ip = L.InnerProduct(n.data, num_outptu=2)
    with pytest.raises(LayerError, match=r"layer 'ip' \(InnerProduct\): unknown parameter 'num_outptu'"):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, weight_filler="xavier")
    with pytest.raises(LayerError, match=r"layer 'ip' \(InnerProduct\): cannot set inner_product_param.weight_filler"):
        n.to_proto()
    n.ip = L.Pooling(n.data, pool="MAXIMUM")
    with pytest.raises(LayerError, match="'MAXIMUM' is not a value of PoolMethod"):
        n.to_proto()


def test_bad_bottom_is_refused_at_once():
    tops = L.DummyData(shape=[dict(dim=[1]), dict(dim=[1])], ntop=2)
    with pytest.raises(TypeError, match=r"ReLU input 0 is not a Top .*pass one of them"):
        L.ReLU(tops)
    with pytest.raises(TypeError, match=r"Eltwise input 1 is not a Top .*must be a top"):
        L.Eltwise(tops[0], "data")


def test_layers_package_is_also_the_layer_factory(monkeypatch):
    import caffe_compat.layers as layers_pkg

    if not hasattr(layers_pkg, "__getattr__"):  # until caffe_compat/layers/__init__.py gains the hook
        monkeypatch.setattr(layers_pkg, "__getattr__", net_spec.layer_factory_getattr, raising=False)
    from caffe_compat import layers as LL

    top = LL.Convolution(LL.Input(shape=dict(dim=[1, 1, 3, 3])), num_output=1, kernel_size=3)
    net = net_spec.to_proto(top)
    assert [lp.type for lp in net.layer] == ["Input", "Convolution"]
    # the package's own attributes and submodules are untouched
    from caffe_compat.layers import base, conv

    assert conv.__name__ == "caffe_compat.layers.conv" and base.Layer is layers_pkg.Layer
    with pytest.raises(AttributeError):
        _ = layers_pkg.not_a_layer
    with pytest.raises(AttributeError):
        _ = layers_pkg.__wrapped__
    assert net_spec.layer_factory_getattr("HDF5Data").__name__ == "HDF5Data"


def test_package_exports_pycaffe_names():
    """caffe.NetSpec / caffe.layers / caffe.params / caffe.to_proto / caffe.io as in pycaffe."""
    assert caffe.NetSpec is NetSpec
    assert caffe.to_proto is net_spec.to_proto
    assert caffe.params.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert callable(caffe.layers.Convolution)
    from caffe_compat.classifier import Classifier
    from caffe_compat.detector import Detector

    assert caffe.Classifier is Classifier and caffe.Detector is Detector
    for name in (
        "Transformer",
        "load_image",
        "resize_image",
        "oversample",
        "array_to_datum",
        "datum_to_array",
        "blobproto_to_array",
        "array_to_blobproto",
    ):
        assert hasattr(caffe.io, name), name


# ---------------------------------------------------------------------------------------------
# coord_map (pycaffe's python/caffe/test/test_coord_map.py cases)


def _coord_net(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad)
    return n


def test_coord_map_conv_pool_deconv():
    n = _coord_net()
    ax, a, b = cm.coord_map_from_to(n.deconv, n.data)
    assert (ax, float(a[0]), float(b[0])) == (1, 1.0, 0.0)
    n = _coord_net(pool=4, dstride=4)
    ax, a, b = cm.coord_map_from_to(n.deconv, n.data)
    assert (ax, float(a[0]), float(b[0])) == (1, 1.0, -1.0)


@pytest.mark.parametrize("pad", [0, 3, 7])
def test_coord_map_padding(pad):
    n = _coord_net()
    _, a, b = cm.coord_map_from_to(n.deconv, n.data)
    n = _coord_net(pad=pad)
    _, a2, b2 = cm.coord_map_from_to(n.deconv, n.data)
    np.testing.assert_allclose((a2, b2), (a, b - pad), rtol=0, atol=1e-12)
    n = _coord_net(dpad=pad)
    _, a3, b3 = cm.coord_map_from_to(n.deconv, n.data)
    np.testing.assert_allclose((a3, b3), (a, b + pad), rtol=0, atol=1e-12)
    n = _coord_net(pad=pad, dpad=pad)
    _, a4, b4 = cm.coord_map_from_to(n.deconv, n.data)
    np.testing.assert_allclose((a4, b4), (a, b), rtol=0, atol=1e-12)


def test_coord_map_pass_through_rect_and_crop_of_crop():
    n = _coord_net()
    ax, a, b = cm.coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert cm.coord_map_from_to(top, n.data)[2] == b
    n3 = _coord_net(ks=3, stride=1, pad=0)
    n5 = _coord_net(ks=5, stride=2, pad=10)
    n35 = _coord_net(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    _, a3, b3 = cm.coord_map_from_to(n3.deconv, n3.data)
    _, a5, b5 = cm.coord_map_from_to(n5.deconv, n5.data)
    _, a35, b35 = cm.coord_map_from_to(n35.deconv, n35.data)
    np.testing.assert_allclose([a35, b35], [[a3[0], a5[0]], [b3[0], b5[0]]], rtol=0, atol=1e-12)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=4)
    ax_c, a_c, b_c = cm.coord_map_from_to(n.crop, n.data)
    assert ax_c == ax and a_c == a and b_c == b + 4


def test_coord_map_errors():
    n = _coord_net()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError, match="Could not compute map"):
        cm.coord_map_from_to(n.ip, n.data)
    n = _coord_net(pool=3, dstride=2)
    with pytest.raises(AssertionError, match="scale mismatch"):
        cm.crop(n.deconv, n.data)
    n = _coord_net(dpad=10)
    with pytest.raises(AssertionError, match="negative offset"):
        cm.crop(n.deconv, n.data)


def test_crop_helper_builds_a_net_that_aligns_to_the_input():
    """FCN-style: padded conv → pool 2 → deconv 2 gives a larger map; crop cuts it to the input."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=5, pad=3, weight_filler=dict(type="gaussian", std=0.1))
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(
        n.pool, num_output=2, kernel_size=4, stride=2, bias_term=False, weight_filler=dict(type="bilinear")
    )
    n.score = cm.crop(n.up, n.data)
    proto = n.to_proto()
    crop_lp = proto.layer[-1]
    _, _, b = cm.coord_map_from_to(n.up, n.data)
    assert crop_lp.type == "Crop" and crop_lp.crop_param.axis == 2
    assert list(crop_lp.crop_param.offset) == [int(-b[0])]
    net = caffe.Net(proto, caffe.TEST)
    assert list(crop_lp.crop_param.offset) == [2]  # b = -((3 - 2) + 2 * -0.25 + 1.5): conv, pool, deconv
    assert net.blobs["up"].shape == (1, 2, 24, 24)
    assert net.blobs["score"].shape == (1, 2, 20, 20)
    x = np.random.default_rng(1).random((1, 1, 20, 20), dtype=np.float32)
    out = net.forward(data=x)
    off = crop_lp.crop_param.offset[0]
    h, w = out["score"].shape[2:]
    np.testing.assert_array_equal(out["score"], net.blobs["up"].data[:, :, off : off + h, off : off + w])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_non_top_input_type_error_is_worded_as_pycaffe():
    """pycaffe's net_spec.Function: TypeError('%s input %d is not a Top (type is %s)' %
    (type_name, index, type(input))); scripts match on that text."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    for bad in (3, "data", [n.data]):
        with pytest.raises(TypeError) as exc:
            L.Eltwise(n.data, bad)
        expected = "%s input %d is not a Top (type is %s)" % ("Eltwise", 1, type(bad))  # noqa: UP031
        assert str(exc.value).startswith(expected)
