"""Optimizer: quantizers, sensitivity, ILP bit allocation, sparsity and cache schedules -> a Plan.

Not built yet (issues 3 and 4). Importing it is harmless; it exports nothing.
"""

__all__: list[str] = []
