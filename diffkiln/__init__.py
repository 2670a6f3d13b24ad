"""diffkiln: an offline compiler for diffusion models.

Stages (one verb each): calibrate -> make_plan -> export_bundle -> load; in memory, quantize_.
The public API is :mod:`diffkiln.api` (``import diffkiln.api as dk``); the command line is
``diffkiln`` (:mod:`diffkiln.cli`).
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
