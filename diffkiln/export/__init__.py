"""Export: freeze a model and its Plan into a bundle (safetensors + manifest.json)."""

from diffkiln.export.bundle import ExportConfig, FloatStorage, export_bundle
from diffkiln.nn.freeze import freeze_layer, layer_meta

__all__ = ["ExportConfig", "FloatStorage", "export_bundle", "freeze_layer", "layer_meta"]
