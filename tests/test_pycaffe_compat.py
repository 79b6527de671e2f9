"""pycaffe's names outside the net runtime, checked against what BVLC Caffe's sources define:
``caffe._caffe`` (python/caffe/_caffe.cpp), ``SGDSolver.lr`` (``SGDSolver::GetLearningRate``,
src/caffe/solvers/sgd_solver.cpp), ``caffe.__version__`` (the Makefile's 1.0.0), the draw helpers
(python/caffe/draw.py) and glog's stderr logging without ``init_log()``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import caffe_compat
from caffe_compat import _caffe, draw
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]

# Every name BVLC master's _caffe.cpp registers in its module (BOOST_PYTHON_MODULE(_caffe)).
CAFFE_CPP_NAMES = [
    "__version__",
    "init_log",
    "log",
    "has_nccl",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
    "set_device",
    "solver_count",
    "set_solver_count",
    "solver_rank",
    "set_solver_rank",
    "set_multiprocess",
    "layer_type_list",
    "Net",
    "Blob",
    "Layer",
    "SolverParameter",
    "LayerParameter",
    "Solver",
    "SGDSolver",
    "NesterovSolver",
    "AdaGradSolver",
    "RMSPropSolver",
    "AdaDeltaSolver",
    "AdamSolver",
    "get_solver",
    "BlobVec",
    "RawBlobVec",
    "LayerVec",
    "StringVec",
    "IntVec",
    "DtypeVec",
    "NetVec",
    "BoolVec",
    "NCCL",
    "Timer",
]


@pytest.fixture
def as_caffe(monkeypatch):
    """``import caffe`` through install_as_caffe, with sys.modules restored afterwards."""
    for name in [m for m in sys.modules if m == "caffe" or m.startswith("caffe.")]:
        monkeypatch.delitem(sys.modules, name)
    assert caffe_compat.install_as_caffe()
    import caffe

    yield caffe
    for name in [m for m in sys.modules if m == "caffe" or m.startswith("caffe.")]:
        del sys.modules[name]


# -- caffe._caffe ------------------------------------------------------------------------------


def test_caffe_underscore_caffe_exports_every_name_of_caffe_cpp(as_caffe):
    import importlib

    mod = importlib.import_module("caffe._caffe")
    assert mod is _caffe
    from caffe._caffe import BlobVec, Net, get_solver  # noqa: F401  (the import form scripts use)

    missing = [n for n in CAFFE_CPP_NAMES if not hasattr(mod, n)]
    assert missing == []
    # the same objects the package hands out (pycaffe: caffe.Net is caffe._caffe.Net)
    for name in ("Net", "SGDSolver", "AdamSolver", "get_solver", "set_mode_cpu", "Layer", "NCCL", "Timer"):
        assert getattr(mod, name) is getattr(as_caffe, name), name
    assert mod.Blob is importlib.import_module("caffe_compat.blob").Blob
    assert mod.SolverParameter is caffe_pb2.SolverParameter
    assert mod.layer_type_list() == caffe_compat.layer_type_list()
    assert "Python" in mod.layer_type_list()
    with pytest.raises(AttributeError):
        mod.NoSuchThing  # noqa: B018


def test_vectors_convert_as_std_vector():
    iv = _caffe.IntVec([1, np.int64(2)])
    iv.append(3)
    assert iv == [1, 2, 3] and all(type(x) is int for x in iv)
    with pytest.raises(TypeError):
        iv.append(1.5)
    assert isinstance(iv[1:], _caffe.IntVec) and iv[1:] == [2, 3]
    sv = _caffe.StringVec(["conv1"])
    with pytest.raises(TypeError):
        sv.append(1)
    dv = _caffe.DtypeVec([0.1])
    assert dv[0] == float(np.float32(0.1))  # vector<float>: float32 values
    bv = _caffe.BoolVec([1, 0])
    assert bv == [True, False]
    blobs = _caffe.BlobVec()
    assert blobs.add_blob(2, 3) is None
    assert len(blobs) == 1 and blobs[0].data.shape == (2, 3) and blobs[0].diff.shape == (2, 3)
    np.testing.assert_array_equal(blobs[0].data, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="negative"):
        blobs.add_blob(-1)


def test_caffe_version_through_the_alias_is_caffes(as_caffe):
    # BVLC's Makefile: CAFFE_VERSION = DYNAMIC_VERSION_MAJOR.MINOR.REVISION = 1.0.0
    assert as_caffe.__version__ == "1.0.0"
    assert _caffe.__version__ == "1.0.0"
    own = Path(ROOT / "caffe_compat" / "__init__.py").read_text()
    assert f'__version__ = "{caffe_compat.__version__}"' in own  # caffe_compat keeps its own
    assert as_caffe.Net is caffe_compat.Net and as_caffe.io is caffe_compat.io
    assert "Net" in dir(as_caffe)
    with pytest.raises(ModuleNotFoundError):  # no second copy of a caffe_compat module under caffe.*
        import caffe.blob  # noqa: F401


# -- SGDSolver.lr ------------------------------------------------------------------------------


def _solver_param(**fields) -> caffe_pb2.SolverParameter:
    sp = caffe_pb2.SolverParameter()
    p = sp.net_param
    p.layer.add(name="x", type="Input", top=["x"]).input_param.shape.add().dim.extend([2, 3])
    ip = p.layer.add(name="ip", type="InnerProduct", bottom=["x"], top=["ip"])
    ip.inner_product_param.num_output = 1
    ip.inner_product_param.weight_filler.type = "constant"
    ip.inner_product_param.weight_filler.value = 0.1
    p.layer.add(name="loss", type="Reduction", bottom=["ip"], top=["loss"]).loss_weight.append(1.0)
    sp.max_iter = 100
    sp.display = 0
    sp.snapshot_after_train = False
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(sp, k).extend(v)
        else:
            setattr(sp, k, v)
    return sp


class _LrSGD(caffe_compat.SGDSolver, _caffe.SolverLearningRate):
    pass


class _LrAdam(caffe_compat.AdamSolver, _caffe.SolverLearningRate):
    pass


@pytest.mark.parametrize(
    "fields, rate_at",
    [
        # SGDSolver::GetLearningRate's formulas at iter_
        (dict(lr_policy="step", base_lr=0.1, gamma=0.5, stepsize=3), lambda it: 0.1 * 0.5 ** (it // 3)),
        (dict(lr_policy="inv", base_lr=0.01, gamma=1e-2, power=0.75), lambda it: 0.01 * (1 + 1e-2 * it) ** -0.75),
        (dict(lr_policy="fixed", base_lr=0.05), lambda it: 0.05),
    ],
)
def test_sgd_solver_lr_is_get_learning_rate_at_iter(fields, rate_at):
    s = _LrSGD(_solver_param(**fields))
    for _ in range(3):
        expected = rate_at(s.iter)
        assert math.isclose(s.lr, expected, rel_tol=1e-6, abs_tol=0.0), (s.iter, s.lr, expected)
        s.step(4)
    with pytest.raises(AttributeError):
        s.lr = 1.0


def test_multistep_lr_moves_the_step_as_caffe_does():
    """multistep: GetLearningRate advances current_step_ by one when iter_ has passed the next
    stepvalue (and the update calls the same function)."""
    s = _LrSGD(_solver_param(lr_policy="multistep", base_lr=1.0, gamma=0.1, stepvalue=[2, 4]))
    assert s.lr == 1.0
    s.step(5)  # the updates at iterations 2 and 4 moved it twice
    assert math.isclose(s.lr, 0.01, rel_tol=1e-6)


def test_adam_solver_has_lr_too():
    """pycaffe binds AdamSolver (and Nesterov, AdaGrad, RMSProp, AdaDelta) with SGDSolver as base."""
    s = _LrAdam(_solver_param(lr_policy="fixed", base_lr=0.001, type="Adam"))
    assert math.isclose(s.lr, 0.001, rel_tol=1e-6)


def test_sgd_solver_class_has_lr():
    s = caffe_compat.SGDSolver(_solver_param(lr_policy="fixed", base_lr=0.05))
    assert math.isclose(s.lr, 0.05, rel_tol=1e-6)


def test_net_underscore_blobs_is_a_blobvec_in_blob_order():
    sp = _solver_param(lr_policy="fixed", base_lr=0.05)
    net = caffe_compat.Net(sp.net_param, caffe_compat.TRAIN)
    blobs = net._blobs
    assert isinstance(blobs, _caffe.BlobVec)
    assert [b for b in blobs] == [net.blobs[n] for n in net._blob_names]


# -- draw --------------------------------------------------------------------------------------


def test_get_pooling_types_dict_is_caffe_protos_pool_method():
    # caffe.proto: enum PoolMethod { MAX = 0; AVE = 1; STOCHASTIC = 2; }
    assert draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}


def _layer(type_: str, lr_mults: list[float | None]) -> caffe_pb2.LayerParameter:
    lp = caffe_pb2.LayerParameter(name="l", type=type_)
    for m in lr_mults:
        spec = lp.param.add()
        if m is not None:
            spec.lr_mult = m
    return lp


@pytest.mark.parametrize(
    "type_, mults, expected",
    [
        ("InnerProduct", [], (1.0, 1.0)),  # no param: (1.0, 1.0)
        ("Convolution", [2.0], (2.0, 1.0)),  # one: (its lr_mult, 1.0)
        ("Deconvolution", [0.0, 2.0], (0.0, 2.0)),
        ("Convolution", [None, 3.0], (1.0, 3.0)),  # an unset lr_mult is caffe.proto's default 1
    ],
)
def test_get_layer_lr_mult(type_, mults, expected):
    assert draw.get_layer_lr_mult(_layer(type_, mults)) == expected


def test_get_layer_lr_mult_refuses_what_pycaffe_refuses():
    with pytest.raises(ValueError, match="ReLU layers do not have a learning rate multiplier"):
        draw.get_layer_lr_mult(_layer("ReLU", []))
    with pytest.raises(ValueError, match="Could not parse the learning rate multiplier"):
        draw.get_layer_lr_mult(_layer("Convolution", [1.0, 1.0, 1.0]))


# -- glog's stderr log without init_log() ------------------------------------------------------

_LOG_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import caffe_compat
    assert caffe_compat.install_as_caffe()
    import caffe
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    sp = text_format.Parse(sys.argv[1], caffe_pb2.SolverParameter())
    mode = sys.argv[2]
    if mode == "tools":
        from caffe_compat.solvers.log import setup_logging
        setup_logging()
    elif mode == "basicConfig":
        logging.basicConfig(level=logging.INFO, format="ROOT %(message)s")
    s = caffe.get_solver(sp)
    s.step(3)
    """
)


@pytest.mark.parametrize("mode", ["plain", "tools", "basicConfig"])
def test_solver_step_logs_to_stderr_once_without_init_log(mode):
    """pycaffe's solver.step() prints Caffe's lines on stderr (glog before InitGoogleLogging);
    each line exactly once whoever configured logging."""
    sp = _solver_param(lr_policy="fixed", base_lr=0.05, display=1)
    from google.protobuf import text_format

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GLOG_minloglevel", None)
    env.pop("GLOG_log_dir", None)
    r = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, text_format.MessageToString(sp), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    for it in range(3):  # sgd_solver.cpp: "Iteration N, lr = R" at each display
        hits = [ln for ln in lines if ln.endswith(f"Iteration {it}, lr = 0.05")]
        assert len(hits) == 1, (mode, it, r.stderr[-3000:])
        if mode in ("plain", "tools"):  # glog's prefix: Lmmdd hh:mm:ss.uuuuuu pid file:line]
            assert hits[0][0] == "I" and "] Iteration" in hits[0]
    assert r.stdout == ""


def test_gpu_pointers_exist_and_refuse_a_cpu_blob():
    """pycaffe's Blob._gpu_data_ptr / _gpu_diff_ptr: on a CPU net they refuse with the reason
    (the GPU case waits for a device: tests/test_layers_cuda.py style)."""
    sp = _solver_param(lr_policy="fixed", base_lr=0.05)
    net = caffe_compat.Net(sp.net_param, caffe_compat.TRAIN)
    blob = next(iter(net.blobs.values()))
    param = next(iter(net.params.values()))[0]
    for b in (blob, param):
        for attr in ("_gpu_data_ptr", "_gpu_diff_ptr"):
            with pytest.raises(AttributeError, match="set_mode_gpu"):
                getattr(b, attr)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_pointers_are_the_device_storage():
    import torch

    sp = _solver_param(lr_policy="fixed", base_lr=0.05)
    caffe_compat.set_mode_gpu()
    try:
        net = caffe_compat.Net(sp.net_param, caffe_compat.TRAIN)
        net.forward()
        name = next(iter(net.params))
        p = net.params[name][0]
        assert p._gpu_data_ptr == p.param.data.data_ptr()
        b = net.blobs[net.outputs[0]]
        assert b._gpu_data_ptr == b.tensor.data_ptr()
        assert isinstance(b._gpu_diff_ptr, int) and torch.cuda.is_available()
    finally:
        caffe_compat.set_mode_cpu()
