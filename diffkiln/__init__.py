"""diffkiln: an offline compiler for diffusion models.

Stages (one verb each): calibrate -> optimize (plan) -> export (bundle) -> runtime.load.
This release ships the foundation: built-in trained models, the content judge, FP generation
and evaluation reports.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
