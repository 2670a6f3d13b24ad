"""ONNX export of bundles: one model per component (QDQ or integer GEMMs), int8/int4 initializers, checked."""

from diffkiln.export.onnx.exporter import (
    ONNX_FORMAT,
    ONNX_VERSION,
    OnnxCompute,
    OnnxExportConfig,
    export_denoiser_onnx,
    export_module_onnx,
    export_onnx,
)
from diffkiln.export.onnx.modules import OnnxExportError

__all__ = [
    "ONNX_FORMAT",
    "ONNX_VERSION",
    "OnnxCompute",
    "OnnxExportConfig",
    "OnnxExportError",
    "export_denoiser_onnx",
    "export_module_onnx",
    "export_onnx",
]
