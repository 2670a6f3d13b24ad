"""Runtime: load a bundle and run it as a diffusers pipeline on NPU, CUDA or CPU.

Not built yet (issue 3). Importing it is harmless; it exports nothing.
"""

__all__: list[str] = []
