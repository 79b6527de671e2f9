"""Export of nets to other formats: ONNX (``caffe_compat.export.onnx``)."""

from __future__ import annotations

# the converters of the forks' layers register themselves in onnx.ONNX_CONVERTERS; importing
# them here (not from onnx.py) runs them whenever caffe_compat.export.onnx is imported, since
# Python imports this package first; onnx.py itself does not import them (no import cycle)
from caffe_compat.export import onnx_forks, onnx_ssd  # noqa: F401
from caffe_compat.export.onnx import (
    DEFAULT_OPSET,
    ONNX_CONVERTERS,
    OnnxExportError,
    OutputDiff,
    check_onnx,
    export_onnx,
    exportable_types,
    locate_divergence,
    random_inputs,
    randomize_params,
    register_converter,
    run_onnxruntime,
)

__all__ = [
    "DEFAULT_OPSET",
    "ONNX_CONVERTERS",
    "OnnxExportError",
    "OutputDiff",
    "check_onnx",
    "export_onnx",
    "exportable_types",
    "locate_divergence",
    "random_inputs",
    "randomize_params",
    "register_converter",
    "run_onnxruntime",
]
