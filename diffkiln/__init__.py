"""diffkiln: an offline compiler for diffusion models.

Stages (one verb each): calibrate -> make_plan -> export_bundle -> load; in memory, quantize_.
``import diffkiln as dk`` gives the public API of :mod:`diffkiln.api` (loaded on first use, so
the command line starts fast).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    import diffkiln.api as api

    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'diffkiln' has no attribute {name!r}")
