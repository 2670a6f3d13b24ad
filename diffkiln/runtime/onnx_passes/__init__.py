"""onnx-ir passes the onnxruntime backend applies to a loaded graph before building its session, one
per file, each with a ``requires``/``call``/``ensures`` contract. They change how onnxruntime runs
the graph, never what it computes, and never the files on disk."""

from diffkiln.runtime.onnx_passes.fold_conv_weight_dequantize import FoldConvWeightDequantizePass

__all__ = ["FoldConvWeightDequantizePass"]
