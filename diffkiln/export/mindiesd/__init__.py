"""The MindIE-SD / msModelSlim export: the files MindIE-SD's own ``quantize`` loads (docs/mindiesd-export.md)."""

from diffkiln.export.mindiesd.encode import MindieExportError, deq_scale_stored, encode_linear, input_scale_used
from diffkiln.export.mindiesd.writer import FILE_MODE, MindieExportConfig, MindieFloat, export_mindiesd

__all__ = [
    "FILE_MODE",
    "MindieExportConfig",
    "MindieExportError",
    "MindieFloat",
    "deq_scale_stored",
    "encode_linear",
    "export_mindiesd",
    "input_scale_used",
]
