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
    assert sys.modules["caffe"] is caffe and sys.modules["caffe.proto.caffe_pb2"] is caffe_pb2
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
        "print('ran on', caffe.__name__, list(net.blobs), sys.argv[1:], __name__)\n"
    )
    monkeypatch.setattr("sys.argv", ["python -m caffe_compat"])
    assert main(["run", str(script), "--flag", "v"]) == 0
    assert "ran on caffe_compat ['x'] ['--flag', 'v'] __main__" in capsys.readouterr().out
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
