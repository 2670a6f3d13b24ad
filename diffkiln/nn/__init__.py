"""Quantized modules (a registry keyed by the float type each replaces), freezing a float layer
into their tensors, and swapping them into a model: shared by the optimizer (which measures
plans on them), export and the runtime."""

from diffkiln.nn.conv import QConv, QConv1d, QConv2d, QConv3d, requantize
from diffkiln.nn.freeze import apply_plan, freeze_layer, layer_meta
from diffkiln.nn.qmodules import IntGemm, QLinear, qmodule_for, quantized_module_types, register_qmodule
from diffkiln.nn.swap import replace_layers

__all__ = [
    "IntGemm",
    "QConv",
    "QConv1d",
    "QConv2d",
    "QConv3d",
    "QLinear",
    "apply_plan",
    "freeze_layer",
    "layer_meta",
    "qmodule_for",
    "quantized_module_types",
    "register_qmodule",
    "replace_layers",
    "requantize",
]
