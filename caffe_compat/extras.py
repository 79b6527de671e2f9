"""The optional dependencies (setup.cfg's extras) and the one-line error when one is missing.

``import caffe_compat`` and running a net need only torch, numpy, protobuf, h5py, lmdb,
opencv-python-headless and tqdm. The rest is imported where it is used, through :func:`require`:

- ``[paper]``: matplotlib (the paper pipeline's figures, ``parse_log --plot``);
- ``[onnx]``: onnx and onnxruntime (``tools/export_onnx.py``, ``caffe_compat.export``);
- ``[leveldb]``: plyvel (reading LevelDB databases: the Data layer's ``backend: LEVELDB``).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from caffe_compat.errors import CaffeError

__all__ = ["EXTRAS", "MissingExtraError", "available", "require"]

#: module -> the extra that installs it
EXTRAS = {"matplotlib": "paper", "onnx": "onnx", "onnxruntime": "onnx", "plyvel": "leveldb"}


class MissingExtraError(CaffeError, ImportError):
    """An optional dependency is not installed; the message (one line) names the extra."""


def _message(module: str, what: str) -> str:
    extra = EXTRAS[module.partition(".")[0]]
    return f"{what} needs {module}, which is not installed: pip install 'caffe-compat[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS`, or one of its submodules) for ``what``; raises
    :class:`MissingExtraError` naming the extra to install when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.partition(".")[0] != module.partition(".")[0]:
            raise  # the extra is there but something it imports is broken: show that
        raise MissingExtraError(_message(module, what)) from None
