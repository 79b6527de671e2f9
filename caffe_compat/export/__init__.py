"""Export of nets to other formats: ONNX (``caffe_compat.export.onnx``)."""

from __future__ import annotations

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
