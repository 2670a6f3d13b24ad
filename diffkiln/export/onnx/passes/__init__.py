"""onnx-ir graph passes of the ONNX export, one per file, each with a ``requires``/``call``/``ensures``
contract (``onnx_ir.passes.InPlacePass``)."""

from diffkiln.export.onnx.passes.drop_shape_info import DropShapeInfoPass
from diffkiln.export.onnx.passes.float16_initializers import Float16InitializersPass
from diffkiln.export.onnx.passes.int4_initializers import Int4InitializersPass
from diffkiln.export.onnx.passes.noop_squeeze import NoopSqueezePass

__all__ = ["DropShapeInfoPass", "Float16InitializersPass", "Int4InitializersPass", "NoopSqueezePass"]
