"""Export: freeze a model and its Plan into a bundle (safetensors + manifest.json), and write a
bundle in other formats (ONNX, MindIE-SD), registered by config type."""

from diffkiln.export.bundle import ExportConfig, FloatStorage, export_bundle
from diffkiln.export.formats import convert_bundle, format_config_from_options, format_names, register_format

__all__ = [
    "ExportConfig",
    "FloatStorage",
    "convert_bundle",
    "export_bundle",
    "format_config_from_options",
    "format_names",
    "register_format",
]
