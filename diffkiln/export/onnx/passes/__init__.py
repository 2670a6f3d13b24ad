"""onnx-ir graph passes of the ONNX export, one per file, each with a ``requires``/``call``/``ensures``
contract (``onnx_ir.passes.InPlacePass``)."""

from diffkiln.export.onnx.passes.clear_value_metadata import ClearValueMetadataPass
from diffkiln.export.onnx.passes.drop_shape_info import DropShapeInfoPass
from diffkiln.export.onnx.passes.float16_initializers import Float16InitializersPass
from diffkiln.export.onnx.passes.graph_optimize import GraphOptimizePass
from diffkiln.export.onnx.passes.short_node_names import ShortNodeNamesPass
from diffkiln.export.onnx.passes.strip_name_prefix import StripNamePrefixPass
from diffkiln.export.onnx.passes.sub_byte_initializers import SubByteInitializersPass

__all__ = [
    "ClearValueMetadataPass",
    "DropShapeInfoPass",
    "Float16InitializersPass",
    "GraphOptimizePass",
    "ShortNodeNamesPass",
    "StripNamePrefixPass",
    "SubByteInitializersPass",
]
