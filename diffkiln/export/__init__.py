"""Export: freeze a model and its Plan into a bundle (safetensors + manifest.json, ONNX, Ascend).

Not built yet (issues 3 and 5). Importing it is harmless; it exports nothing.
"""

__all__: list[str] = []
