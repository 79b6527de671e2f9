"""caffe_compat: Caffe, faithfully, on PyTorch. ``import caffe_compat as caffe`` runs pycaffe scripts.

Reads and writes Caffe's formats (prototxt, caffemodel, binaryproto, solverstate, V0/V1 nets),
interprets nets layer by layer with Caffe's numerics, and trains with Caffe's solvers.
"""

from __future__ import annotations

import sys as _sys

__version__ = "0.2.0.dev0"  # CHANGELOG.md

from caffe_compat import (
    coord_map,  # noqa: F401  (pycaffe's caffe.coord_map)
    io,  # noqa: F401  (pycaffe's caffe.io)
)
from caffe_compat.classifier import Classifier
from caffe_compat.detector import Detector
from caffe_compat.errors import CaffeError, DataError, FormatError, LayerError, NetError, PrototxtError, SolverError
from caffe_compat.layers.base import registered_types as _registered_types
from caffe_compat.layers.python import PyLayer as Layer
from caffe_compat.layers.python import allow_python_layers
from caffe_compat.mode import (
    allow_tf32,
    current_device,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
    set_multiprocess,
    set_random_seed,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)
from caffe_compat.net import TEST, TRAIN, Net
from caffe_compat.net_spec import NetSpec, params, to_proto
from caffe_compat.proto import caffe_pb2
from caffe_compat.solvers import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
)
from caffe_compat.solvers.distributed import NCCL, has_nccl
from caffe_compat.timer import Timer


def layer_type_list() -> list[str]:
    """The registered layer types, as pycaffe's ``caffe.layer_type_list()``."""
    return _registered_types()


def init_log(*args, **kwargs) -> None:
    """pycaffe's ``caffe.init_log``: route caffe_compat's log to stderr at INFO."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")


_CAFFE_SUBMODULES = ("io", "proto", "draw", "net_spec", "coord_map", "classifier", "detector")


def install_as_caffe() -> bool:
    """Make ``import caffe`` give caffe_compat, for code written for pycaffe that cannot be edited
    (a Python layer's module, a third-party helper): ``caffe`` and ``caffe.io``, ``caffe.proto``
    (with ``caffe.proto.caffe_pb2``), ``caffe.draw``, ``caffe.net_spec``, ``caffe.coord_map``,
    ``caffe.classifier``, ``caffe.detector``, ``caffe.pycaffe`` and ``caffe._caffe`` are
    registered in ``sys.modules``. ``caffe`` is an alias module (``_caffe.CaffeAlias``): every
    name is caffe_compat's except ``caffe.__version__``, which is Caffe's (``1.0.0``). Also gives
    caffe_compat's log glog's default of INFO lines on stderr (``_glog.install_default_handler``),
    as pycaffe prints without ``init_log()``.

    Does nothing, and returns False, when a real ``caffe`` module is importable (it is never
    shadowed); returns True when ``import caffe`` gives caffe_compat. The Python layer does it
    before importing the user's module."""
    import importlib
    import importlib.util

    from caffe_compat import _caffe, _glog

    this = _sys.modules[__name__]
    current = _sys.modules.get("caffe")
    if current is this or getattr(current, "_caffe_compat_alias", False):
        return True
    if current is not None:
        return False
    try:
        if importlib.util.find_spec("caffe") is not None:
            return False
    except (ImportError, ValueError):
        pass
    alias = _caffe.CaffeAlias(this)
    _sys.modules["caffe"] = alias
    _sys.modules["caffe.pycaffe"] = alias
    _sys.modules["caffe._caffe"] = _caffe
    for sub in _CAFFE_SUBMODULES:
        _sys.modules[f"caffe.{sub}"] = importlib.import_module(f"{__name__}.{sub}")
    _sys.modules["caffe.proto.caffe_pb2"] = caffe_pb2
    _glog.install_default_handler()
    return True


def log(message: str) -> None:
    """pycaffe's ``caffe.log``: one INFO line in caffe_compat's log."""
    import logging

    logging.getLogger("caffe_compat").info("%s", message)


__all__ = [
    "Classifier",
    "Detector",
    "NetSpec",
    "layers",
    "params",
    "to_proto",
    "CaffeError",
    "DataError",
    "FormatError",
    "Layer",
    "LayerError",
    "allow_python_layers",
    "allow_tf32",
    "get_solver",
    "SGDSolver",
    "NesterovSolver",
    "AdaGradSolver",
    "RMSPropSolver",
    "AdaDeltaSolver",
    "AdamSolver",
    "Net",
    "NetError",
    "PrototxtError",
    "SolverError",
    "TEST",
    "TRAIN",
    "caffe_pb2",
    "current_device",
    "init_log",
    "install_as_caffe",
    "log",
    "NCCL",
    "has_nccl",
    "Timer",
    "solver_count",
    "set_solver_count",
    "solver_rank",
    "set_solver_rank",
    "set_multiprocess",
    "layer_type_list",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
]
