"""Kernels: integer GEMM, packing and attention per backend, each beside a pure-torch reference.

Not built yet (issue 3). Importing it is harmless; it exports nothing.
"""

__all__: list[str] = []
