"""Errors raised by caffe_compat. Each message names the file, line, layer or field at fault."""

from __future__ import annotations

__all__ = ["CaffeError", "FormatError", "PrototxtError", "LayerError", "NetError", "SolverError", "DataError"]


class CaffeError(Exception):
    """Base of every error caffe_compat raises on bad input."""


class FormatError(CaffeError):
    """A file that is not what it should be (truncated caffemodel, not a Caffe file...)."""


class PrototxtError(FormatError):
    """A text prototxt that does not parse; the message starts with ``file:line:column``."""


class LayerError(CaffeError):
    """A layer's definition or input is invalid; the message names the layer."""


class NetError(CaffeError):
    """A net's wiring or weights are invalid (unknown bottom, shape mismatch on load...)."""


class SolverError(CaffeError):
    """A solver definition is invalid; the message names the field."""


class DataError(CaffeError):
    """A data source is missing or malformed; the message names the file and the entry."""
