"""ONNX export of bundles: one model per component (QDQ or integer GEMMs), int8/int4 initializers, checked.

The exporter imports onnxscript and torch.onnx, about half a second: its names load on first use
(PEP 562), so that importing :mod:`diffkiln.api` (every CLI command) does not pay for them. The
config types are plain dataclasses, imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffkiln.core.schema import ONNX_FORMAT, ONNX_VERSION
from diffkiln.export.onnx.config import OnnxCompute, OnnxExportConfig

if TYPE_CHECKING:
    from diffkiln.export.onnx.exporter import export_denoiser_onnx, export_module_onnx, export_onnx
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

# name -> the submodule that defines it, imported when the name is first read
_LAZY = {
    "export_denoiser_onnx": "exporter",
    "export_module_onnx": "exporter",
    "export_onnx": "exporter",
    "OnnxExportError": "modules",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later reads skip this function
    return value
