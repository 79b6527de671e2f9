"""Python layers (pycaffe's caffe.Layer): the opt-in, param_str, and a Euclidean loss written in
Python (tests/fixtures/pycaffe/pycaffe_pyloss.py) that must train exactly as the built-in one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import net_spec
from caffe_compat.errors import CaffeError
from caffe_compat.proto import caffe_pb2

L = net_spec.layers
ENV = "CAFFE_COMPAT_ALLOW_PYTHON_LAYERS"
FIXTURE_DIR = Path(__file__).parent / "fixtures" / "pycaffe"


@pytest.fixture(autouse=True)
def _python_layers_off(monkeypatch):
    """Each test starts and ends with Python layers refused and the fixture module importable."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.syspath_prepend(str(FIXTURE_DIR))
    caffe.allow_python_layers(False)
    yield
    caffe.allow_python_layers(False)


def _regression_net(python_loss: bool, batch: int = 4) -> caffe_pb2.NetParameter:
    n = net_spec.NetSpec()
    n.x = L.Input(shape=dict(dim=[batch, 3]))
    n.target = L.Input(shape=dict(dim=[batch, 2]))
    n.ip = L.InnerProduct(
        n.x, num_output=2, weight_filler=dict(type="gaussian", std=0.5), bias_filler=dict(type="constant", value=0.1)
    )
    if python_loss:
        n.loss = L.Python(
            n.ip, n.target, python_param=dict(module="pycaffe_pyloss", layer="EuclideanLossLayer"), loss_weight=1
        )
    else:
        n.loss = L.EuclideanLoss(n.ip, n.target)
    return n.to_proto()


def _scale_net(param_str: str) -> caffe_pb2.NetParameter:
    n = net_spec.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.y = L.Python(n.x, python_param=dict(module="pycaffe_pyloss", layer="ScaleByParamStr", param_str=param_str))
    return n.to_proto()


def test_python_layer_refused_without_opt_in():
    with pytest.raises(CaffeError) as exc:
        caffe.Net(_regression_net(python_loss=True), caffe.TRAIN)
    msg = str(exc.value)
    assert "'loss'" in msg  # the layer's name
    assert "pycaffe_pyloss" in msg and "EuclideanLossLayer" in msg
    assert "allow_python_layers()" in msg and ENV in msg


def test_python_layer_opt_in_by_call_and_by_env(monkeypatch):
    caffe.allow_python_layers()
    net = caffe.Net(_scale_net("2.5"), caffe.TEST)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(net.forward(x=x)["y"], 2.5 * x, rtol=1e-6, atol=0)
    caffe.allow_python_layers(False)
    with pytest.raises(CaffeError, match="allow_python_layers"):
        caffe.Net(_scale_net("2.5"), caffe.TEST)
    monkeypatch.setenv(ENV, "1")
    net = caffe.Net(_scale_net("-3"), caffe.TEST)
    np.testing.assert_allclose(net.forward(x=x)["y"], -3 * x, rtol=1e-6, atol=0)


def test_python_layer_backward_uses_param_str():
    caffe.allow_python_layers()
    n = net_spec.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.y = L.Python(n.x, python_param=dict(module="pycaffe_pyloss", layer="ScaleByParamStr", param_str="4"))
    n.loss = L.EuclideanLoss(n.y, n.x)
    proto = n.to_proto()
    proto.force_backward = True
    net = caffe.Net(proto, caffe.TRAIN)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    net.forward(x=x)
    net.backward()
    # loss = sum((4x - x)^2) / 2 / 2 through both bottoms: d/dx = (3x) * 4 / 2 - (3x) / 2
    np.testing.assert_allclose(net.blobs["x"].diff, (3 * x) * 4 / 2 - (3 * x) / 2, rtol=1e-5, atol=1e-6)


def test_legacy_blob_accessors_follow_caffe():
    """Caffe's num/channels/height/width are LegacyShape(0..3): shape[i], 1 past the last axis."""
    import pycaffe_pyloss

    caffe.allow_python_layers()
    n = net_spec.NetSpec()
    n.x = L.Input(shape=dict(dim=[4, 3]))
    n.y = L.Python(n.x, python_param=dict(module="pycaffe_pyloss", layer="RecordLegacyShape"))
    net = caffe.Net(n.to_proto(), caffe.TEST)
    pycaffe_pyloss.SEEN.clear()
    net.forward(x=np.ones((4, 3), np.float32))
    assert pycaffe_pyloss.SEEN == [(4, 3, 1, 1)]
    x = net.blobs["x"]
    assert (x.num, x.channels, x.height, x.width) == (4, 3, 1, 1)


def _pair():
    caffe.allow_python_layers()
    caffe.set_random_seed(1)
    py = caffe.Net(_regression_net(python_loss=True), caffe.TRAIN)
    ref = caffe.Net(_regression_net(python_loss=False), caffe.TRAIN)
    for k in range(2):
        ref.params["ip"][k].data[...] = py.params["ip"][k].data
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = rng.standard_normal((4, 2)).astype(np.float32)
    return py, ref, x, t


def test_python_euclidean_loss_matches_builtin_forward_and_gradient():
    py, ref, x, t = _pair()
    out_py = py.forward(x=x, target=t)
    out_ref = ref.forward(x=x, target=t)
    W, b = ref.params["ip"][0].data.astype(np.float64), ref.params["ip"][1].data.astype(np.float64)
    pred = x.astype(np.float64) @ W.T + b
    expect = ((pred - t) ** 2).sum() / 4 / 2
    np.testing.assert_allclose(float(np.sum(out_py["loss"])), expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(np.sum(out_ref["loss"])), expect, rtol=1e-5, atol=1e-7)
    py.backward()
    ref.backward()
    np.testing.assert_allclose(py.blobs["ip"].diff, (pred - t) / 4, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(py.blobs["ip"].diff, ref.blobs["ip"].diff, rtol=1e-5, atol=1e-7)
    for k in range(2):
        np.testing.assert_allclose(py.params["ip"][k].diff, ref.params["ip"][k].diff, rtol=1e-5, atol=1e-7)
    assert np.abs(py.params["ip"][0].diff).max() > 1e-3


def _solver_param(net_param: caffe_pb2.NetParameter) -> caffe_pb2.SolverParameter:
    sp = caffe_pb2.SolverParameter()
    sp.net_param.CopyFrom(net_param)
    sp.base_lr = 0.1
    sp.lr_policy = "fixed"
    sp.momentum = 0.9
    sp.weight_decay = 0.001
    sp.max_iter = 20
    sp.display = 0
    sp.snapshot_after_train = False
    sp.random_seed = 1
    return sp


def test_python_loss_trains_like_builtin_through_solver():
    caffe.allow_python_layers()
    if not hasattr(caffe, "get_solver"):  # pragma: no cover - solvers are part of the package
        pytest.skip("caffe_compat.get_solver is not available")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = (x @ rng.standard_normal((3, 2)) + 0.5).astype(np.float32)
    solvers = []
    for python_loss in (True, False):
        s = caffe.get_solver(_solver_param(_regression_net(python_loss)))
        s.net.blobs["x"].data[...] = x
        s.net.blobs["target"].data[...] = t
        solvers.append(s)
    py, ref = solvers
    for k in range(2):  # same start (random_seed makes them equal already; make sure)
        ref.net.params["ip"][k].data[...] = py.net.params["ip"][k].data
    start = float(np.sum(py.net.forward()["loss"]))
    py.step(20)
    ref.step(20)
    for k in range(2):
        np.testing.assert_allclose(py.net.params["ip"][k].data, ref.net.params["ip"][k].data, rtol=1e-4, atol=1e-5)
    end_py = float(np.sum(py.net.forward()["loss"]))
    end_ref = float(np.sum(ref.net.forward()["loss"]))
    np.testing.assert_allclose(end_py, end_ref, rtol=1e-4, atol=1e-6)
    assert end_py < 0.5 * start


def test_tools_refuse_python_layers_without_the_flag(tmp_path, capsys):
    import os

    from caffe_compat import io as cio
    from caffe_compat.cli import time as time_tool

    model = tmp_path / "py.prototxt"
    cio.write_net(_scale_net("3"), str(model))
    try:
        assert time_tool.main(["--model", str(model), "--iterations", "1"]) == 1
        err = capsys.readouterr().err
        assert "'y'" in err and "--allow-python-layers" in err
        assert time_tool.main(["--model", str(model), "--iterations", "1", "--allow-python-layers"]) == 0
        assert os.environ.get(ENV) == "1"  # passed on to worker processes
    finally:
        os.environ.pop(ENV, None)


@pytest.fixture
def _no_caffe_module(monkeypatch):
    """Take any ``caffe`` module out of sys.modules for the test; restore afterwards."""
    import sys

    for name in [m for m in sys.modules if m == "caffe" or m.startswith("caffe.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "caffe" or m.startswith("caffe.")]:
        del sys.modules[name]


def test_python_layer_module_written_with_import_caffe_runs(_no_caffe_module):
    import sys

    caffe.allow_python_layers(True)
    n = net_spec.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.y = L.Python(n.x, python_param=dict(module="pycaffe_import_caffe", layer="TwiceLayer"))
    net = caffe.Net(n.to_proto(), caffe.TEST)
    net.blobs["x"].data[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(net.forward()["y"], 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
    alias = sys.modules["caffe"]
    # the alias hands out caffe_compat's own objects (one Net class, one caffe_pb2)
    assert alias.Net is caffe.Net and alias.Layer is caffe.Layer and alias.TRAIN == caffe_pb2.TRAIN
    assert sys.modules["caffe.proto.caffe_pb2"] is caffe_pb2
    assert net.layers[1].user.phase_name == "TEST"
    import importlib

    assert importlib.import_module("caffe.io") is caffe.io  # the submodules resolve too


def test_install_as_caffe_never_shadows_a_real_caffe(_no_caffe_module, tmp_path, monkeypatch):
    real = tmp_path / "caffe"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert caffe.install_as_caffe() is False
    import importlib

    assert importlib.import_module("caffe").REAL is True


def test_python_m_caffe_compat_run_runs_a_pycaffe_script_unchanged(_no_caffe_module, tmp_path, monkeypatch, capsys):
    from caffe_compat.__main__ import main

    script = tmp_path / "classify.py"
    script.write_text(
        "import sys\n"
        "import caffe\n"
        "from caffe.proto import caffe_pb2\n"
        "p = caffe_pb2.NetParameter()\n"
        "p.layer.add(name='x', type='Input', top=['x']).input_param.shape.add().dim.extend([1, 2])\n"
        "net = caffe.Net(p, caffe.TEST)\n"
        "print('ran on', caffe.Net.__module__, list(net.blobs), sys.argv[1:], __name__)\n"
    )
    monkeypatch.setattr("sys.argv", ["python -m caffe_compat"])
    assert main(["run", str(script), "--flag", "v"]) == 0
    assert "ran on caffe_compat.net ['x'] ['--flag', 'v'] __main__" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "missing.py")]) == 1
    assert "no such script" in capsys.readouterr().err


def test_python_m_caffe_compat_run_refuses_over_a_real_caffe(_no_caffe_module, tmp_path, monkeypatch, capsys):
    from caffe_compat.__main__ import main

    (tmp_path / "caffe").mkdir()
    (tmp_path / "caffe" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    script = tmp_path / "s.py"
    script.write_text("print('should not run')\n")
    assert main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert "a real Caffe is importable" in err


# -- pycaffe's own Python-layer behaviour (python/caffe/test/test_python_layer.py, _caffe.cpp) -----


def _one_layer_net(layer: str, param_str: str = "", shape=(10, 9, 8), force_backward: bool = True):
    """pycaffe's test nets: an Input 'data' and one Python layer 'layer' from pycaffe_layers."""
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.top = L.Python(n.data, name="layer", python_param=dict(module="pycaffe_layers", layer=layer, param_str=param_str))
    proto = n.to_proto()
    proto.force_backward = force_backward
    for lp in proto.layer:  # NetSpec names a layer after its top
        if lp.type == "Python":
            lp.name = "layer"
    return proto


def test_exception_in_setup_reaches_the_caller_as_its_own_type():
    """pycaffe's test_exception: assertRaises(RuntimeError, caffe.Net, net_file, caffe.TEST)."""
    caffe.allow_python_layers()
    with pytest.raises(RuntimeError) as exc:
        caffe.Net(_one_layer_net("RaisesInSetup"), caffe.TEST)
    e = exc.value
    assert isinstance(e, caffe.LayerError)  # also caffe_compat's own kind
    assert "setup refused" in str(e)
    assert "'layer'" in str(e) and "pycaffe_layers.RaisesInSetup.setup" in str(e)


def test_exception_in_forward_keeps_type_args_attributes_and_traceback():
    import traceback

    from caffe_compat.layers.python import PythonLayerError

    caffe.allow_python_layers()
    net = caffe.Net(_one_layer_net("RaisesInForward"), caffe.TEST)
    caught = None
    try:
        net.forward()
    except ValueError as e:  # what a pycaffe script writes
        caught = e
    assert caught is not None
    assert isinstance(caught, PythonLayerError) and isinstance(caught, caffe.LayerError)
    assert caught.args == ("negative input", 3)
    assert caught.where == "forward"
    assert (caught.layer_name, caught.layer_type, caught.method) == ("layer", "Python", "forward")
    assert caught.python_layer == "pycaffe_layers.RaisesInForward"
    assert "negative input" in str(caught) and "'layer'" in str(caught)
    frames = traceback.extract_tb(caught.__traceback__)
    assert any(f.filename.endswith("pycaffe_layers.py") and f.name == "forward" for f in frames)


def test_exception_with_its_own_constructor_keeps_its_state_and_pickles_as_the_original():
    import pickle

    import pycaffe_layers

    caffe.allow_python_layers()
    net = caffe.Net(_one_layer_net("RaisesInForward", param_str="coded"), caffe.TEST)
    with pytest.raises(pycaffe_layers.CodedError) as exc:
        net.forward()
    e = exc.value
    assert e.code == 7 and e.args == ("failed with code 7",)
    back = pickle.loads(pickle.dumps(e))
    plain = pickle.loads(pickle.dumps(pycaffe_layers.CodedError(7)))  # how the type itself round-trips
    assert type(back) is pycaffe_layers.CodedError
    assert back.args == plain.args and back.code == plain.code == 7


def test_exception_in_backward_reaches_the_caller_as_its_own_type():
    caffe.allow_python_layers()
    net = caffe.Net(_one_layer_net("RaisesInBackward"), caffe.TRAIN)
    net.forward()
    with pytest.raises(KeyError) as exc:
        net.backward()
    assert exc.value.args == ("no gradient for this",)
    assert exc.value.method == "backward" and "'layer'" in str(exc.value)


def _times_ten_net():
    """pycaffe's test net: data (10, 9, 8) through three x10 Python layers, force_backward."""
    caffe.allow_python_layers()
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[10, 9, 8]))
    n.one = L.Python(n.data, python_param=dict(module="pycaffe_layers", layer="TimesTen"))
    n.two = L.Python(n.one, python_param=dict(module="pycaffe_layers", layer="TimesTen"))
    n.three = L.Python(n.two, python_param=dict(module="pycaffe_layers", layer="TimesTen"))
    proto = n.to_proto()
    proto.force_backward = True
    return caffe.Net(proto, caffe.TRAIN)


def test_times_ten_chain_forward_backward_and_reshape():
    """pycaffe's test_forward / test_backward / test_reshape on three x10 layers."""
    net = _times_ten_net()
    net.blobs["data"].data[...] = 8
    net.forward()
    np.testing.assert_array_equal(net.blobs["three"].data, np.full((10, 9, 8), 10**3 * 8, np.float32))
    net.blobs["three"].diff[...] = 7
    net.backward()
    np.testing.assert_array_equal(net.blobs["data"].diff, np.full((10, 9, 8), 10**3 * 7, np.float32))
    net.blobs["data"].reshape(4, 4, 4, 4)
    net.forward()
    for name, blob in net.blobs.items():
        assert blob.data.shape == (4, 4, 4, 4), name


def test_parameter_blob_made_with_blobs_add_blob(tmp_path):
    """pycaffe's test_parameter: self.blobs.add_blob(1); data 0; backward sets its diff to 1;
    the blob is saved and loaded with the net."""
    caffe.allow_python_layers()
    proto = _one_layer_net("OneParameter")
    net = caffe.Net(proto, caffe.TRAIN)
    net.forward()
    net.backward()
    blob = net.params["layer"][0]
    assert blob.data.shape == (1,)
    assert blob.data[0] == 0 and blob.diff[0] == 1
    blob.data[0] += blob.diff[0]
    assert net.params["layer"][0].data[0] == 1
    path = str(tmp_path / "p.caffemodel")
    net.save(path)
    net.params["layer"][0].data[0] = -1
    net.copy_from(path)
    assert net.params["layer"][0].data[0] == 1
    net2 = caffe.Net(proto, caffe.TRAIN)
    net2.share_with(net)
    assert net2.params["layer"][0].data[0] == 1


def test_blobs_is_a_blobvec_with_caffes_add_blob():
    from caffe_compat._caffe import BlobVec

    caffe.allow_python_layers()
    net = caffe.Net(_one_layer_net("OneParameter"), caffe.TRAIN)
    user = net.layers[list(net._layer_names).index("layer")].user
    assert isinstance(user.blobs, BlobVec)
    assert user.blobs.add_blob(2, 3) is None  # pycaffe's add_blob returns None
    assert user.blobs[-1].data.shape == (2, 3) and user.blobs[-1].data.dtype == np.float32
    np.testing.assert_array_equal(user.blobs[-1].data, np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="takes no kwargs"):
        user.blobs.add_blob(2, shape=3)
    with pytest.raises(TypeError):
        user.blobs.add_blob(2.5)


def test_phase_reaches_the_layer():
    """pycaffe's test_phase: the layer outputs self.phase."""
    caffe.allow_python_layers()
    n = net_spec.NetSpec()
    n.phase = L.Python(python_param=dict(module="pycaffe_layers", layer="OutputsPhase"))
    proto = n.to_proto()
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(proto, phase)
        assert net.forward()["phase"] == phase


def test_user_init_receives_the_layer_parameter():
    """Caffe builds a Python layer as ``cls(layer_param)`` (layer_factory.cpp GetPythonLayer)."""
    import pycaffe_layers

    caffe.allow_python_layers()
    pycaffe_layers.INIT_SEEN.clear()
    net = caffe.Net(_one_layer_net("TakesParam", param_str="p=1", shape=(2, 3)), caffe.TEST)
    assert pycaffe_layers.INIT_SEEN == [("layer", "p=1")]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(net.forward(data=x)["top"], x + 1)
    assert net.params["layer"][0].data.shape == (2, 3)


def test_times_ten_backward_without_a_forward():
    """pycaffe's test_backward runs on a net whose forward never ran: Caffe's Backward reads only
    the blobs, so each layer's user backward (10 x top diff) applies, the user's forward is not
    called (it may have side effects)."""
    net = _times_ten_net()
    calls = []
    for layer in net.layers[1:]:
        user = layer.user
        real = user.forward
        user.forward = lambda bottom, top, real=real: (calls.append(1), real(bottom, top))
    net.blobs["three"].diff[...] = 7
    net.backward()
    np.testing.assert_array_equal(net.blobs["data"].diff, np.full((10, 9, 8), 10**3 * 7, np.float32))
    assert calls == []
