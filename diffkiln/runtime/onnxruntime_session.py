"""onnxruntime sessions for the ONNX backend: options, and graphs onnxruntime's own optimizer breaks.

``open_session`` builds a session; where onnxruntime's optimizer breaks the graph, it builds it
again without the offending rewrite. On the CPU provider it can dequantize convolution weights once
first (:class:`diffkiln.runtime.onnx_passes.FoldConvWeightDequantizePass`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["open_session", "session_options"]

log = logging.getLogger(__name__)
# onnxruntime (1.32) breaks some QDQ graphs while optimizing them: a QuantizeLinear that one of its
# rewrites inserts gets an output_dtype that contradicts its zero point (after the s8 -> u8
# conversion), and the session fails to build with the error of onnxruntime issue 25526. Measured:
# MatMulAddFusion on a QDQ MatMul + Add with a static 3-D input (diffkiln's static-shape exports:
# dynamic=False, or a component whose dynamic export fell back to the recorded shapes), and QDQ
# propagation through Transpose in onnxruntime's own quantize_static output of the SD1.5 UNet.
# The session is then built without the first of these rewrites that lets it build.
_BROKEN_REWRITE_MARK = "does not match y_zero_point type"
_PROTOBUF_BYTES = 1_800_000_000
"""Below this many initializer bytes a folded graph is handed to onnxruntime as one protobuf (2 GB cap)."""
_REWRITE_FALLBACKS = (
    ["MatMulAddFusion"],
    ["QDQPropagationTransformer"],
    ["MatMulAddFusion", "QDQPropagationTransformer"],
)


def session_options(optimize: bool) -> Any:
    """Session options: quiet, no idle spinning; ``optimize`` False disables every graph rewrite."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The pipeline alternates sessions with torch work (scheduler, guidance): idle session
    # threads must not spin on the cores that work needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = os.environ.get("DIFFKILN_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # the CLI's --threads (diffkiln.core.threads)
        options.intra_op_num_threads = int(threads)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def open_session(path: Path, options: Any, providers: list[str], fold_conv_weights: bool = False) -> Any:
    """An onnxruntime InferenceSession; where onnxruntime's own optimizer breaks the graph (see
    ``_REWRITE_FALLBACKS``), built again without the offending rewrite, with a warning that names it.

    Args:
        path: the .onnx file.
        options: onnxruntime SessionOptions.
        providers: execution providers.
        fold_conv_weights: apply ``FoldConvWeightDequantizePass`` to the loaded graph first (for
            onnxruntime's CPU provider: its convolutions then get constant float weights, dequantized
            once; the file on disk is unchanged). Default False.
    """
    import onnxruntime as ort

    source: str | bytes = str(path)
    keep_alive = None
    if fold_conv_weights:
        source, keep_alive = _folded_source(path)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail type
        if _BROKEN_REWRITE_MARK not in str(exc):
            raise
        error = exc
        session = None
    for disabled in () if session is not None else _REWRITE_FALLBACKS:
        try:
            session = ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
        except Exception as exc:
            if _BROKEN_REWRITE_MARK not in str(exc):
                raise
            continue
        log.warning("%s: onnxruntime's optimizer breaks this graph; built without %s", path.name, ", ".join(disabled))
        break
    if session is None:
        raise error
    # A folded graph too large for one protobuf lives in a temporary folder as long as its session.
    session.diffkiln_folded_files = keep_alive
    del source  # the serialized folded graph: onnxruntime holds its own copy now
    _return_freed_memory()
    return session


def _return_freed_memory() -> None:
    """Hand the heap that loading freed back to the operating system (glibc's ``malloc_trim``).

    Parsing the graph (ours for the conv-weight fold, onnxruntime's own) leaves gigabytes of freed
    heap that glibc keeps resident: on the full-size SD1.5 UNet, more than half of what the process
    holds after building the session (BENCHMARKS.md). No-op where the C library has no
    ``malloc_trim`` (macOS, Windows, musl).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # an onnx-ir graph is full of reference cycles (nodes <-> values)
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def _folded_source(path: Path) -> tuple[str | bytes, Any]:
    """The graph at ``path`` with its convolution weights dequantized: serialized bytes, or, above
    protobuf's 2 GB or with external data, a file in a temporary folder (returned to keep alive)."""
    import onnx_ir as ir

    from diffkiln.runtime.onnx_passes import FoldConvWeightDequantizePass

    model = ir.load(path)
    if not FoldConvWeightDequantizePass()(model).modified:
        return str(path), None
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    external = any(isinstance(t, ir.ExternalTensor) for t in tensors)
    if not external and sum(t.nbytes for t in tensors) < _PROTOBUF_BYTES:
        return ir.to_proto(model).SerializeToString(), None
    folder = tempfile.TemporaryDirectory(prefix="diffkiln-ort-")
    out = Path(folder.name) / path.name
    ir.save(model, out, external_data=f"{path.stem}.folded.data")
    return str(out), folder
