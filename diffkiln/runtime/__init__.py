"""Runtime: load a bundle and run it as a diffusers pipeline on NPU, CUDA or CPU, or put a bundle's
layers into the user's own model object.

Imports only :mod:`diffkiln.core`, :mod:`diffkiln.nn` and :mod:`diffkiln.kernels` (never a stage),
so a deployment needs those alone.
"""

from diffkiln.core.errors import BundleError
from diffkiln.core.schema import LoadedBundle
from diffkiln.runtime.load import Backend, is_bundle, load, resolve_device
from diffkiln.runtime.parallel import ParallelConfig, ParallelRun
from diffkiln.runtime.reader import build_denoiser, load_into, open_bundle

__all__ = [
    "Backend",
    "BundleError",
    "LoadedBundle",
    "ParallelConfig",
    "ParallelRun",
    "build_denoiser",
    "is_bundle",
    "load",
    "load_into",
    "open_bundle",
    "resolve_device",
]
