"""Versions of the tools a build or a report was made with (recorded in manifests and reports)."""

from __future__ import annotations

import platform

__all__ = ["toolchain_versions"]


def toolchain_versions() -> dict[str, str]:
    """diffkiln, torch, diffusers, transformers and Python versions."""
    import diffusers
    import torch
    import transformers

    from diffkiln import __version__

    return {
        "diffkiln": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
