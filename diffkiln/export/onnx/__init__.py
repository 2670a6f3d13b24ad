"""ONNX export of bundles (issue 5, first part: the denoiser with QDQ and int8 initializers)."""

from diffkiln.export.onnx.exporter import OnnxExportConfig, export_denoiser_onnx
from diffkiln.export.onnx.modules import OnnxExportError

__all__ = ["OnnxExportConfig", "OnnxExportError", "export_denoiser_onnx"]
