"""Prepared static W8A8 layers for the CUDA backend's Triton kernels (:mod:`triton_int8`,
:mod:`triton_conv`): what each keeps on the device, and the linear layer's calls."""

from __future__ import annotations

from typing import Any

import torch

from diffkiln.kernels.triton_int8 import static_linear_stepped_triton, static_linear_triton, step_tables

__all__ = ["PreparedStatic", "TritonStaticLinear"]


class PreparedStatic:
    """What a prepared static W8A8 layer keeps on the device for its Triton kernel: the int8 (K, N)
    codes (the layer's only copy, ``holds_codes``), the weight scales, column sums and bias, and the
    epilogue scales of each activation grid it has met, made once per grid."""

    holds_codes = True

    def __init__(self, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: Any) -> None:
        self.act = act
        self.w_t = w_t.contiguous()
        self.w_scale = w_scale.to(device=w_t.device, dtype=torch.float32).contiguous()
        self.colsum = self.w_t.to(torch.int32).sum(dim=0).contiguous()
        self.bias = None if bias is None else bias.to(device=w_t.device, dtype=torch.float32).contiguous()
        self._scales: dict[float, torch.Tensor] = {}
        self._steps: tuple[torch.Tensor, torch.Tensor] | None = None

    def codes_t(self) -> torch.Tensor:
        """The int8 (K, N) weight codes."""
        return self.w_t

    def scale_for(self, grid: Any) -> torch.Tensor:
        """Activation scale x weight scale, as the CPU backend forms it (a timestep-aware layer has
        one grid per step range)."""
        scale = self._scales.get(grid.scale)
        if scale is None:
            scale = self._scales.setdefault(grid.scale, (grid.scale * self.w_scale).contiguous())
        return scale

    def tables_for(self, grids: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`step_tables` of the layer's grids (which never change), made once."""
        if self._steps is None:
            self._steps = step_tables(grids, self.w_scale)
        return self._steps

    @staticmethod
    def out_dtype(x: torch.Tensor) -> torch.dtype:
        """The epilogue writes half-precision activations' dtype directly, float32 otherwise."""
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


class TritonStaticLinear(PreparedStatic):
    """A static W8A8 linear as one Triton launch: float activations in, the activations' dtype out
    (quantised in the prologue; zero point, scales and bias in the epilogue)."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: Any) -> None:
        super().__init__(w_q.t(), w_scale, bias, act)

    def call_step(self, x: torch.Tensor, grids: list[Any], step: torch.Tensor) -> torch.Tensor:
        """A timestep-aware layer's call on the grid of ``step`` (a 0-d device tensor): no host sync."""
        table, scales = self.tables_for(grids)
        return static_linear_stepped_triton(x, self.w_t, scales, self.colsum, self.bias, table, step,
                                            self.out_dtype(x))  # fmt: skip

    def __call__(self, x: torch.Tensor, act: Any = None) -> torch.Tensor:
        grid = act or self.act
        return static_linear_triton(x, self.w_t, self.scale_for(grid), self.colsum, self.bias,
                                    (grid.scale, grid.zero_point, grid.qmin, grid.qmax), self.out_dtype(x))  # fmt: skip
