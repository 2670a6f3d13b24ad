"""Calibration: run the FP pipeline on prompts and record per-layer, per-timestep statistics.

Not built yet (issue 3, W8A8 end to end). Importing it is harmless; it exports nothing.
"""

__all__: list[str] = []
