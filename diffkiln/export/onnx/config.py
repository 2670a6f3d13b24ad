"""The ONNX export's settings: :class:`OnnxExportConfig` and how quantized layers compute."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from diffkiln.core.errors import InvalidInputError

__all__ = ["MAX_OPSET", "MIN_OPSET", "OnnxCompute", "OnnxExportConfig"]


class OnnxCompute(str, Enum):
    """How a quantized layer computes in the graph.

    * ``QDQ``: ``QuantizeLinear -> DequantizeLinear`` around a float ``MatMul`` / ``Conv``: the
      form TensorRT, Ascend ATC and onnxruntime's QDQ fusions look for.
    * ``INTEGER``: ``QuantizeLinear`` then ``MatMulInteger`` / ``ConvInteger`` (int32 sums), one
      float scale multiply and the bias: the runtime's own arithmetic, so onnxruntime reproduces
      the torch bundle closely (QDQ's float GEMM rounds differently and flips activation codes).
    """

    QDQ = "qdq"
    INTEGER = "integer"


MIN_OPSET = 19
"""The lowest opset the export writes: torch's exporter emits GroupNormalization and QDQ nodes that
the onnx version converter cannot take below 19."""
MAX_OPSET = 25
"""The highest: above it the converter keeps GroupNormalization-18, which opset 26 deprecated, and
the checker refuses the graph."""


@dataclass(frozen=True)
class OnnxExportConfig:
    """Where and how to export.

    Attributes:
        out: the folder to write (created; see ``overwrite``).
        opset: the ONNX opset, ``MIN_OPSET`` (19) to ``MAX_OPSET`` (25); 21 or later stores 4-,
            3- and 2-bit weights as INT4, 25 2-bit weights as INT2. Default 21.
        prompt: the prompt of the recorded sampler call that gives the example inputs. Default
            "a red circle on the left".
        dynamic: export batch and resolution axes as dynamic where the model allows (each
            component falls back to the recorded shapes where it does not, and the manifest says
            which). Default True.
        keep_fp: a layer whose activation format has no static QDQ form (dynamic per-token,
            timestep-aware) keeps float activations (its int8 weights dequantized) with a warning,
            recorded in the manifest, instead of failing the export. Default False.
        components: export the text encoders and the VAE decoder too (False: the denoiser only).
            Default True.
        overwrite: replace an existing ``out``. Default False.
        progress: show a progress bar over the components. Default True.
        compute: how quantized layers compute (:class:`OnnxCompute`). Default ``QDQ``.
        matmulnbits: store 4- and 2-bit Linear weights as onnxruntime's contrib op
            ``com.microsoft.MatMulNBits`` (packed blocks with float scales, run by onnxruntime's
            low-bit kernels; grouped weights keep their 4-/2-bit codes) instead of standard ONNX
            INT4/INT2 ``DequantizeLinear``. Other runtimes may lack the op. 3-bit layers, layers
            with groups of 8 and convolutions keep the standard form. Default False.
        check_call_kwargs: pipeline-call arguments of the second shape a dynamic denoiser graph is
            run at before it is declared dynamic (with a batch of 2), as (name, value) pairs; none:
            twice the recorded height and width where the pipeline takes them. Default none.
    """

    out: Path
    opset: int = 21
    prompt: str = "a red circle on the left"
    dynamic: bool = True
    keep_fp: bool = False
    components: bool = True
    overwrite: bool = False
    progress: bool = True
    compute: OnnxCompute = OnnxCompute.QDQ
    matmulnbits: bool = False
    check_call_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.compute, OnnxCompute):
            valid = ", ".join(c.value for c in OnnxCompute)
            raise ValueError(f"compute must be an OnnxCompute ({valid}), got {self.compute!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InvalidInputError(
                f"--opset {self.opset} is outside the opsets diffkiln's ONNX export writes, "
                f"{MIN_OPSET} to {MAX_OPSET}; give one of them (default {OnnxExportConfig.opset})"
            )
