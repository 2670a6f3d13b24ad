"""Runtime: load a bundle and run it as a diffusers pipeline on NPU, CUDA or CPU.

Imports only from :mod:`diffkiln.kernels` (never calibrate or optimizer), so a deployment needs
runtime + kernels alone.
"""

from diffkiln.core.errors import BundleError
from diffkiln.nn.qmodules import QConv2d, QLinear, qmodule_for, register_qmodule
from diffkiln.runtime.load import Backend, is_bundle, load, resolve_device

__all__ = [
    "Backend",
    "BundleError",
    "QConv2d",
    "QLinear",
    "is_bundle",
    "load",
    "qmodule_for",
    "register_qmodule",
    "resolve_device",
]
