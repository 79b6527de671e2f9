"""pycaffe's ``caffe._caffe``: the names Caffe's compiled module exports, for scripts that import
from it (``from caffe._caffe import Net``, ``caffe._caffe.BlobVec``...).

What BVLC Caffe's ``python/caffe/_caffe.cpp`` registers, each mapped to caffe_compat's
counterpart: ``__version__`` (Caffe's, ``1.0.0``); ``init_log``, ``log``, ``has_nccl``,
``set_mode_cpu``, ``set_mode_gpu``, ``set_random_seed``, ``set_device``, ``solver_count``,
``set_solver_count``, ``solver_rank``, ``set_solver_rank``, ``set_multiprocess``,
``layer_type_list``; the classes ``Net``, ``Blob``, ``Layer``, ``SolverParameter``,
``LayerParameter``, ``Solver``, ``SGDSolver``, ``NesterovSolver``, ``AdaGradSolver``,
``RMSPropSolver``, ``AdaDeltaSolver``, ``AdamSolver``, ``NCCL``, ``Timer``; ``get_solver``; and
the vector types ``BlobVec`` (with ``add_blob(*shape)``), ``RawBlobVec``, ``LayerVec``,
``StringVec``, ``IntVec``, ``DtypeVec``, ``NetVec``, ``BoolVec``.

The vector types are Python lists that convert what is put into them as Caffe's
``std::vector`` does (``IntVec`` holds ints, ``DtypeVec`` float32 values...). The nets and
solvers of caffe_compat are built from these modules' own classes, so most of their lists are
plain lists, not these types.

``SolverLearningRate`` is the mixin behind pycaffe's ``SGDSolver.lr``; ``CaffeAlias`` is the
``caffe`` module that ``caffe_compat.install_as_caffe()`` registers.

The classes are imported on first use (this module is imported by the layers, which the net
and solvers import in turn).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import operator
import sys
import types

import numpy as np

#: The version Caffe's module reports (BVLC Caffe's last release; ``CAFFE_VERSION`` in its Makefile).
CAFFE_VERSION = "1.0.0"
__version__ = CAFFE_VERSION

# name -> (module, attribute)
_LAZY = {
    "init_log": ("caffe_compat", "init_log"),
    "log": ("caffe_compat", "log"),
    "has_nccl": ("caffe_compat.solvers.distributed", "has_nccl"),
    "set_mode_cpu": ("caffe_compat.mode", "set_mode_cpu"),
    "set_mode_gpu": ("caffe_compat.mode", "set_mode_gpu"),
    "set_random_seed": ("caffe_compat.mode", "set_random_seed"),
    "set_device": ("caffe_compat.mode", "set_device"),
    "solver_count": ("caffe_compat.mode", "solver_count"),
    "set_solver_count": ("caffe_compat.mode", "set_solver_count"),
    "solver_rank": ("caffe_compat.mode", "solver_rank"),
    "set_solver_rank": ("caffe_compat.mode", "set_solver_rank"),
    "set_multiprocess": ("caffe_compat.mode", "set_multiprocess"),
    "layer_type_list": ("caffe_compat", "layer_type_list"),
    "Net": ("caffe_compat.net", "Net"),
    "Blob": ("caffe_compat.blob", "Blob"),
    "Layer": ("caffe_compat.layers.python", "PyLayer"),
    "SolverParameter": ("caffe_compat.proto.caffe_pb2", "SolverParameter"),
    "LayerParameter": ("caffe_compat.proto.caffe_pb2", "LayerParameter"),
    "Solver": ("caffe_compat.solvers.base", "Solver"),
    "SGDSolver": ("caffe_compat.solvers", "SGDSolver"),
    "NesterovSolver": ("caffe_compat.solvers", "NesterovSolver"),
    "AdaGradSolver": ("caffe_compat.solvers", "AdaGradSolver"),
    "RMSPropSolver": ("caffe_compat.solvers", "RMSPropSolver"),
    "AdaDeltaSolver": ("caffe_compat.solvers", "AdaDeltaSolver"),
    "AdamSolver": ("caffe_compat.solvers", "AdamSolver"),
    "NCCL": ("caffe_compat.solvers.distributed", "NCCL"),
    "Timer": ("caffe_compat.timer", "Timer"),
    "get_solver": ("caffe_compat.solvers", "get_solver"),
}


__all__ = [
    "__version__",
    "CAFFE_VERSION",
    "BlobVec",
    "RawBlobVec",
    "LayerVec",
    "StringVec",
    "IntVec",
    "DtypeVec",
    "NetVec",
    "BoolVec",
    "SolverLearningRate",
    "CaffeAlias",
    *_LAZY,  # imported on first use
]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'caffe._caffe' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# ---------------------------------------------------------------------------------------------
# Caffe's std::vector wrappers (boost's vector_indexing_suite): lists that convert their items


class _Vec(list):
    """A list whose items pass through ``_item`` on the way in (as a ``std::vector<T>`` does)."""

    @staticmethod
    def _item(x):
        return x

    def __init__(self, items=()):
        super().__init__(self._item(x) for x in items)

    def append(self, x) -> None:
        super().append(self._item(x))

    def extend(self, items) -> None:
        super().extend(self._item(x) for x in items)

    def insert(self, i, x) -> None:
        super().insert(i, self._item(x))

    def __setitem__(self, i, x) -> None:
        if isinstance(i, slice):
            super().__setitem__(i, [self._item(v) for v in x])
        else:
            super().__setitem__(i, self._item(x))

    def __getitem__(self, i):
        if isinstance(i, slice):  # a slice of a vector is a vector of the same type
            return type(self)(super().__getitem__(i))
        return super().__getitem__(i)

    def __iadd__(self, items):
        self.extend(items)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list.__repr__(self)})"


def _int(x) -> int:
    return operator.index(x)


def _dims(shape: tuple, what: str) -> tuple[int, ...]:
    dims = []
    for d in shape:
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"{what}: dimensions must be integers, got {d!r} in {shape}") from None
        if d < 0:
            raise ValueError(f"{what}: negative dimension {d} in {shape}")
        dims.append(d)
    return tuple(dims)


class PyBlob:
    """A blob as a Python layer sees it: NumPy ``data``/``diff`` and ``reshape``."""

    def __init__(self, data: np.ndarray | None = None, shape=()):
        self.data = data if data is not None else np.zeros(shape, np.float32)
        self._diff = None

    @property
    def diff(self) -> np.ndarray:
        if self._diff is None or self._diff.shape != self.data.shape:
            self._diff = np.zeros_like(self.data)
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _legacy(self, i):
        return self.data.shape[i] if i < self.data.ndim else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if tuple(self.data.shape) != shape:
            self.data = np.zeros(shape, np.float32)
            self._diff = None


class BlobVec(_Vec):
    """Caffe's ``vector<shared_ptr<Blob>>`` (a layer's ``blobs``, a net's ``_blobs``).

    ``add_blob(*shape)`` appends a new zero-filled float32 blob of that shape and returns
    None, as pycaffe's (a Python layer's learnable blobs: ``self.blobs.add_blob(10, 5)``).
    """

    def add_blob(self, *shape, **kwargs) -> None:
        if kwargs:
            raise RuntimeError("BlobVec.add_blob takes no kwargs")
        self.append(PyBlob(shape=_dims(shape, "BlobVec.add_blob")))


class RawBlobVec(_Vec):
    """Caffe's ``vector<Blob*>``: the ``bottom`` and ``top`` a Python layer is handed."""


class LayerVec(_Vec):
    """Caffe's ``vector<shared_ptr<Layer>>``."""


class NetVec(_Vec):
    """Caffe's ``vector<shared_ptr<Net>>`` (a solver's ``test_nets``)."""


class StringVec(_Vec):
    """Caffe's ``vector<string>``: str items."""

    @staticmethod
    def _item(x) -> str:
        if not isinstance(x, str):
            raise TypeError(f"StringVec holds str, got {type(x).__name__} {x!r}")
        return x


class IntVec(_Vec):
    """Caffe's ``vector<int>``: int items (anything with ``__index__``)."""

    _item = staticmethod(_int)


class DtypeVec(_Vec):
    """Caffe's ``vector<float>``: items rounded to float32, read back as Python floats."""

    @staticmethod
    def _item(x) -> float:
        return float(np.float32(x))


class BoolVec(_Vec):
    """Caffe's ``vector<bool>``."""

    @staticmethod
    def _item(x) -> bool:
        return bool(x)


# ---------------------------------------------------------------------------------------------
# pycaffe's solver properties


class SolverLearningRate:
    """pycaffe's ``SGDSolver.lr`` (and its subclasses'): ``SGDSolver::GetLearningRate()``, the
    rate the solver's ``lr_policy`` gives at the current ``iter``, read-only.

    As in Caffe, reading it is the same call the update makes (for ``multistep`` it moves the
    solver's step counter to this iteration). For a solver class with ``get_learning_rate()``.
    """

    @property
    def lr(self) -> float:
        return float(self.get_learning_rate())


# ---------------------------------------------------------------------------------------------
# the ``caffe`` module that ``install_as_caffe`` registers


class CaffeAlias(types.ModuleType):
    """``import caffe`` after ``caffe_compat.install_as_caffe()``: every name is caffe_compat's,
    except ``__version__``, which is Caffe's (``1.0.0``: scripts compare it with Caffe
    versions); ``caffe_compat.__version__`` stays caffe_compat's own.

    It is a package without a search path: its submodules are the ones ``install_as_caffe``
    registers (``caffe.io``, ``caffe.proto``, ``caffe._caffe``...); another ``import caffe.x``
    raises ``ModuleNotFoundError`` instead of loading a second copy of a caffe_compat module.
    """

    _caffe_compat_alias = True

    def __init__(self, target: types.ModuleType):
        super().__init__("caffe", target.__doc__)
        spec = importlib.machinery.ModuleSpec("caffe", None, is_package=True)
        spec.submodule_search_locations = []
        self.__spec__ = spec
        self.__path__ = []
        self.__package__ = "caffe"
        self.__version__ = CAFFE_VERSION
        self._caffe_compat_target = target

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__") and name not in ("__all__", "__file__"):
            raise AttributeError(name)
        return getattr(self.__dict__["_caffe_compat_target"], name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self.__dict__["_caffe_compat_target"])) | set(self.__dict__))


_PACKAGE = __name__.rpartition(".")[0]
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
    from caffe_compat import _glog
    from caffe_compat.proto import caffe_pb2

    # the caffe_compat package: Python imports a package before any of its modules
    this = sys.modules[_PACKAGE]
    current = sys.modules.get("caffe")
    if current is this or getattr(current, "_caffe_compat_alias", False):
        return True
    if current is not None:
        return False
    try:
        if importlib.util.find_spec("caffe") is not None:
            return False
    except (ImportError, ValueError):
        pass
    alias = CaffeAlias(this)
    sys.modules["caffe"] = alias
    sys.modules["caffe.pycaffe"] = alias
    sys.modules["caffe._caffe"] = sys.modules[__name__]
    for sub in _CAFFE_SUBMODULES:
        sys.modules[f"caffe.{sub}"] = importlib.import_module(f"{_PACKAGE}.{sub}")
    sys.modules["caffe.proto.caffe_pb2"] = caffe_pb2
    _glog.install_default_handler()
    return True
