"""caffe_compat: Caffe, faithfully, on PyTorch. ``import caffe_compat as caffe`` runs pycaffe scripts.

Reads and writes Caffe's formats (prototxt, caffemodel, binaryproto, solverstate, V0/V1 nets),
interprets nets layer by layer with Caffe's numerics, and trains with Caffe's solvers.
"""

from __future__ import annotations

__version__ = "0.2.0.dev0"  # CHANGELOG.md

from caffe_compat import (
    coord_map,  # noqa: F401  (pycaffe's caffe.coord_map)
    io,  # noqa: F401  (pycaffe's caffe.io)
)
from caffe_compat._caffe import install_as_caffe
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
