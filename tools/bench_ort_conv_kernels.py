"""How onnxruntime's CPU provider runs one int8 convolution, by graph form (one layer, side by side).

The forms a W8A8 convolution can take in ONNX:

* ``float-fold``: QDQ on the activation, the weight already float32 (what diffkiln's
  onnxruntime backend makes of a float-output convolution, ``FoldConvWeightDequantizePass``);
* ``qdq``: QDQ on activation and int8 weight, float output (diffkiln's export as written);
* ``qlinearconv``: the same plus QDQ on the output, which onnxruntime fuses into QLinearConv
  (``--requantize-conv-outputs``, and onnxruntime's own ``quantize_static``);
* ``convint-u8s8`` / ``convint-s8s8``: ConvInteger on uint8 (zero point 128) or int8 activation
  codes, then Cast, Mul by the combined scale, Add bias (``--compute integer``): exact int32 sums
  with a float output.

Usage:
    python tools/bench_ort_conv_kernels.py [--channels 320] [--size 32] [--kernel 3] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: tuple[int, ...]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def forms(channels: int, size: int, kernel: int, seed: int = 0) -> tuple[np.ndarray, dict[str, onnx.ModelProto]]:
    """An input and the five graphs of one (channels -> channels) convolution, batch 2."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (channels, channels, kernel, kernel)).astype(np.int8)
    w_scale = ((rng.random(channels) + 0.5) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    x = rng.standard_normal((2, channels, size, size)).astype(np.float32)
    x_scale, pads = np.float32(0.02), [kernel // 2] * 4
    # The output grid covers the float output's range (calibrated on this input).
    y_float = 6.0 * float(np.sqrt(channels * kernel * kernel) * 0.02 * 127 * 1e-3)
    common = [numpy_helper.from_array(np.array(x_scale), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
              numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(bias, "b"),
              numpy_helper.from_array(w, "W")]  # fmt: skip
    act_qdq = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
               helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]  # fmt: skip
    w_dq = helper.make_node("DequantizeLinear", ["W", "ws"], ["wd"], axis=0)
    folded = (w.astype(np.float32) * w_scale[:, None, None, None]).astype(np.float32)
    out: dict[str, onnx.ModelProto] = {
        "float-fold": _model(
            [*act_qdq, helper.make_node("Conv", ["xd", "wf", "b"], ["y"], pads=pads)],
            [*common, numpy_helper.from_array(folded, "wf")],
            x.shape,
        ),
        "qdq": _model([*act_qdq, w_dq, helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=pads)], common, x.shape),
        "qlinearconv": _model(
            [
                *act_qdq,
                w_dq,
                helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=pads),
                helper.make_node("QuantizeLinear", ["c", "ys", "xz"], ["cq"]),
                helper.make_node("DequantizeLinear", ["cq", "ys", "xz"], ["y"]),
            ],
            [*common, numpy_helper.from_array(np.array(y_float / 127, np.float32), "ys")],
            x.shape,
        ),
    }
    combined = (x_scale * w_scale).astype(np.float32).reshape(1, channels, 1, 1)
    for name, dtype, zero in (("convint-u8s8", np.uint8, 128), ("convint-s8s8", np.int8, 0)):
        out[name] = _model(
            [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["q"]),
             helper.make_node("ConvInteger", ["q", "W", "z"], ["acc"], pads=pads),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "cs"], ["m"]), helper.make_node("Add", ["m", "b4"], ["y"])],
            [*common, numpy_helper.from_array(np.array(zero, dtype), "z"), numpy_helper.from_array(combined, "cs"),
             numpy_helper.from_array(bias.reshape(1, channels, 1, 1), "b4")], x.shape)  # fmt: skip
    return x, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=320, help="input and output channels (default 320)")
    ap.add_argument("--size", type=int, default=32, help="height and width (default 32)")
    ap.add_argument("--kernel", type=int, default=3, help="kernel size (default 3)")
    ap.add_argument("--repeat", type=int, default=7, help="rounds, each form once per round (default 7)")
    a = ap.parse_args()
    x, models = forms(a.channels, a.size, a.kernel)
    sessions = {}
    for name, model in models.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sessions[name].run(None, {"x": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(a.repeat):  # in turns, so the machine's drift hits every form alike
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:14s} {1000 * statistics.median(ts):8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
