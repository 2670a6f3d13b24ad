"""What a sparse-attention mask search needs, recorded while calibration runs the FP pipeline.

For the first calibration batch, at every SDPA call of every attention layer with at least two
key blocks (:mod:`diffkiln.core.attention` finds them from the data flow): the block attention mass
and the exact error of dropping each key block (:func:`block_attention_stats`), per head, query
block and key block. Calls are grouped into steps by order (``calls_per_step`` denoiser calls
make one step; CFG branches are averaged). The result is kept in the calibration cache file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.attention_blocks import block_attention_stats
from diffkiln.core.attention import AttentionCall, attention_calls
from diffkiln.core.errors import InvalidInputError

__all__ = ["AttentionRecorder", "AttentionStats", "LayerGeometry", "attention_recording"]


@dataclass(frozen=True)
class LayerGeometry:
    """An attention layer as calibration saw it: qualified name, heads, query and key tokens."""

    name: str
    heads: int
    q_len: int
    kv_len: int


@dataclass
class AttentionStats:
    """The recorded block statistics.

    Attributes:
        block: tokens per block.
        steps: sampler steps.
        calls_per_step: denoiser calls per step (CFG branches called separately).
        layers: the recorded layers, in call order.
        mass: per layer, ``(steps, heads, query_blocks, key_blocks)`` mean attention mass.
        drop_error: per layer, the same shape: mean output error of dropping each key block.
        grids: per layer, its token layout (:func:`diffkiln.calibrate.token_grids.find_token_grids`).
        left_dense: the attention layers calibration saw and did not record: per layer, why
            (``"short"``: fewer key tokens than two blocks; ``"mask"``: an attention mask;
            ``"causal"``) and its key tokens; None in statistics cached before it was recorded. What an
            error names when no layer was recorded.
    """

    block: int
    steps: int
    calls_per_step: int
    layers: tuple[LayerGeometry, ...]
    mass: dict[str, torch.Tensor]
    drop_error: dict[str, torch.Tensor]
    grids: dict[str, dict[str, int]]
    left_dense: dict[str, tuple[str, int]] | None = None

    def to_meta(self) -> dict[str, Any]:
        """JSON-ready metadata (the tensors go into the tensor file: :meth:`tensors`)."""
        left = None if self.left_dense is None else {n: list(v) for n, v in self.left_dense.items()}
        return {"block": self.block, "steps": self.steps, "calls_per_step": self.calls_per_step,
                "layers": [[g.name, g.heads, g.q_len, g.kv_len] for g in self.layers],
                "grids": {g.name: self.grids[g.name] for g in self.layers}, "left_dense": left}  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under the names :meth:`from_meta` reads."""
        out = {f"attn::mass::{g.name}": self.mass[g.name].contiguous() for g in self.layers}
        out.update({f"attn::drop::{g.name}": self.drop_error[g.name].contiguous() for g in self.layers})
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AttentionStats:
        """Inverse of :meth:`to_meta` and :meth:`tensors`."""
        layers = tuple(LayerGeometry(n, h, q, k) for n, h, q, k in meta["layers"])
        return cls(meta["block"], meta["steps"], meta["calls_per_step"], layers,
                   {g.name: tensors[f"attn::mass::{g.name}"] for g in layers},
                   {g.name: tensors[f"attn::drop::{g.name}"] for g in layers},
                   {g.name: dict(meta["grids"][g.name]) for g in layers},
                   _left_dense(meta.get("left_dense")))  # fmt: skip


class AttentionRecorder:
    """Collects per-call block statistics (the handler of :func:`attention_recording`).

    Args:
        block: tokens per block.
    """

    def __init__(self, block: int) -> None:
        if block <= 0:
            raise InvalidInputError(f"the attention block must be a positive number of tokens, got {block}")
        self.block = block
        self.active = True
        self.geometry: dict[str, LayerGeometry] = {}
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.left_dense: dict[str, tuple[str, int]] = {}

    def __call__(self, call: AttentionCall) -> None:
        if not self.active:
            return None
        why = self._left_dense_because(call)
        if why is not None:  # masked and short attention are left dense
            self.left_dense.setdefault(call.layer, (why, call.key.shape[2]))
            return None
        geometry = LayerGeometry(call.layer, call.query.shape[1], call.query.shape[2], call.key.shape[2])
        if self.geometry.setdefault(call.layer, geometry) != geometry:
            raise InvalidInputError(
                f"attention layer {call.layer} changed shape between calls ({self.geometry[call.layer]} then "
                f"{geometry}); calibrate at one resolution and frame count"
            )
        stats = block_attention_stats(call.query, call.key, call.value, self.block, call.scale)
        self.calls.setdefault(call.layer, []).append(stats)
        return None

    def _left_dense_because(self, call: AttentionCall) -> str | None:
        if call.attn_mask is not None:
            return "mask"
        if call.is_causal:
            return "causal"
        return "short" if call.key.shape[2] < 2 * self.block else None

    def finish(self, steps: int, grids: dict[str, dict[str, int]]) -> AttentionStats:
        """The statistics over ``steps`` sampler steps, CFG branches averaged, with each recorded
        layer's token layout from ``grids``.

        Raises:
            InvalidInputError: a layer's calls do not divide into ``steps`` steps.
        """
        mass, drop, cps = {}, {}, 1
        for name, calls in self.calls.items():
            if len(calls) % steps:
                raise InvalidInputError(
                    f"attention layer {name} ran {len(calls)} times in {steps} steps; the mask search needs the same "
                    "number of calls at every step"
                )
            cps = len(calls) // steps
            mass[name] = torch.stack([torch.stack([c[0] for c in calls[t * cps : (t + 1) * cps]]).mean(0)
                                      for t in range(steps)])  # fmt: skip
            drop[name] = torch.stack([torch.stack([c[1] for c in calls[t * cps : (t + 1) * cps]]).mean(0)
                                      for t in range(steps)])  # fmt: skip
        layers = tuple(self.geometry.values())
        return AttentionStats(self.block, steps, cps, layers, mass, drop, {g.name: grids[g.name] for g in layers},
                              dict(self.left_dense))  # fmt: skip


def _left_dense(meta: dict[str, Any] | None) -> dict[str, tuple[str, int]] | None:
    return None if meta is None else {n: (str(why), int(keys)) for n, (why, keys) in meta.items()}


@contextmanager
def attention_recording(denoiser: nn.Module, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """``recorder`` sees every attention call of ``denoiser`` while ``recorder.active``; the
    interception is removed on exit."""
    with attention_calls(denoiser, recorder):
        yield recorder
