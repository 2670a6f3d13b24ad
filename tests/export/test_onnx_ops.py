"""The export's custom ops (``diffkiln::*``): each fake kernel, which is all torch.export sees of
the op, gives the shape and dtype the real kernel computes (``torch.library.opcheck``), over
convolutions of every rank, stride, padding and dilation the models use and odd sizes besides."""

from __future__ import annotations

import pytest
import torch

from diffkiln.export.onnx import ops

# (input spatial size, kernel, stride, padding, dilation), one entry per spatial axis.
CONVS = {
    "1d-stride2": ((17,), (3,), [2], [1], [1]),
    "2d-same": ((9, 6), (3, 3), [1, 1], [1, 1], [1, 1]),
    "2d-down": ((9, 7), (3, 3), [2, 2], [1, 1], [1, 1]),
    "2d-patch": ((8, 12), (2, 2), [2, 2], [0, 0], [1, 1]),
    "2d-dilated": ((11, 10), (3, 1), [1, 2], [2, 0], [2, 1]),
    "3d-causal": ((5, 6, 7), (3, 3, 3), [1, 2, 1], [0, 1, 1], [1, 1, 1]),
}


def _conv_args(case: str, integer: bool) -> tuple[object, ...]:
    size, kernel, stride, padding, dilation = CONVS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g)
    w = torch.randint(-127, 128, (5, 3, *kernel), generator=g, dtype=torch.int8)
    per_out = (5, *([1] * len(size)))
    a_scale, a_zp = torch.tensor(0.02), torch.tensor(0, dtype=torch.int8)
    if integer:
        return x, w, torch.full(per_out, 1e-3), torch.zeros(per_out), a_scale, a_zp, stride, padding, dilation
    return x, w, torch.full((5,), 1e-3), torch.zeros(5), a_scale, a_zp, stride, padding, dilation


@pytest.mark.parametrize("case", sorted(CONVS))
@pytest.mark.parametrize("op", ["qdq_conv", "wo_conv", "int_conv"])
def test_the_conv_ops_fake_kernels_match_the_real_ones(op: str, case: str) -> None:
    args = _conv_args(case, integer=op == "int_conv")
    if op == "wo_conv":
        args = args[:4] + args[6:]
    torch.library.opcheck(getattr(ops, op), args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", ["qdq_conv", "wo_conv", "int_conv"])
def test_a_conv_of_other_input_channels_is_refused_at_trace_time(op: str) -> None:
    args = list(_conv_args("2d-same", integer=op == "int_conv"))
    if op == "wo_conv":
        args = args[:4] + args[6:]
    args[0] = torch.randn(2, 4, 9, 6)
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(RuntimeError, match="input channels 4"):
        getattr(ops, op)(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("op", ["qdq_linear", "wo_linear", "int_linear"])
def test_the_linear_ops_fake_kernels_match_the_real_ones(op: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, w_t = torch.randn(2, 7, 12, generator=g), torch.randint(-127, 128, (12, 10), generator=g, dtype=torch.int8)
    a_scale, a_zp = torch.tensor(0.02), torch.tensor(0, dtype=torch.int8)
    args = {"qdq_linear": (x, w_t, torch.full((10,), 1e-3), torch.zeros(10), a_scale, a_zp),
            "wo_linear": (x, w_t, torch.full((10,), 1e-3), torch.zeros(10)),
            "int_linear": (x, w_t, torch.full((10,), 1e-3), torch.zeros(10), a_scale, a_zp)}[op]  # fmt: skip
    torch.library.opcheck(getattr(ops, op), args, test_utils=("test_schema", "test_faketensor"))
