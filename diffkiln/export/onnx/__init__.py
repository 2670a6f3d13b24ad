"""ONNX export of bundles: one QDQ model per component, int8/int4 initializers, checked."""

from diffkiln.export.onnx.exporter import ONNX_FORMAT, ONNX_VERSION, OnnxExportConfig, export_denoiser_onnx, export_onnx
from diffkiln.export.onnx.modules import OnnxExportError

__all__ = ["ONNX_FORMAT", "ONNX_VERSION", "OnnxExportConfig", "OnnxExportError", "export_denoiser_onnx", "export_onnx"]
