"""Run a frozen sparse-attention plan: each masked layer's attention on its step group's block
masks, through the block-sparse kernel.

``apply_sparse_plan(denoiser, plan)`` registers two named hooks on the denoiser
(``diffkiln.sparse.enter`` / ``diffkiln.sparse.exit``) that intercept the SDPA calls made inside its
forward (:class:`diffkiln.core.attention.AttentionCalls`); ``remove_sparse_plan`` takes them away
and ``sparse_plan_applied`` does both around a block. The denoiser's call count gives the step:
call ``n`` (from 0) is step ``(n // calls_per_step) % steps``, whether or not its attention runs (a
cache schedule's reusing step calls the denoiser and runs no attention); call
:meth:`SparseRun.reset` if a sampling run stops midway.
A call whose token counts differ from the plan's raises :class:`SparsePlanError`: masks are made
for the resolution and frame count they were searched at. The run counts the attention FLOPs it
kept, so the density is measured as the kernels ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffkiln.core.attention import AttentionCall, AttentionCalls
from diffkiln.core.sparse_plan import SparsePlan, SparsePlanError
from diffkiln.kernels.sparse_attention import BlockLayout, SparseKernel, block_sparse_attention

__all__ = ["SparseRun", "apply_sparse_plan", "remove_sparse_plan", "sparse_plan_applied"]

ENTER_HOOK = "diffkiln.sparse.enter"
EXIT_HOOK = "diffkiln.sparse.exit"


@dataclass
class SparseRun:
    """The state of an applied plan and what it measured.

    Attributes:
        plan: the plan applied.
        kept: attention FLOPs (token pairs x heads) the masked calls ran.
        scheduler: the pipeline's scheduler: at the first call of each sampling run its step count
            is checked against the plan's (None: not checked).
        dense: what the same calls would have run dense.
        denoiser_calls: denoiser calls since the last :meth:`reset`.
        masked_by_step: masked attention calls per step, as they ran.
        kernel: the kernel the masked calls run on (:class:`~diffkiln.kernels.sparse_attention.SparseKernel`).
        shapes: per masked layer, the query shape ``(batch, heads, tokens, head_dim)``, dtype and
            device of its last call (what a benchmark of the layer alone replays).
        head_share: ``(rank, degree)`` when Ulysses context parallel gives this rank one
            ``degree``-th of every layer's heads over the whole sequence (rank r: heads
            ``[r * H / degree, (r + 1) * H / degree)``); None: every head.
    """

    plan: SparsePlan
    scheduler: Any = None
    kernel: SparseKernel = SparseKernel.AUTO
    kept: float = 0.0
    dense: float = 0.0
    denoiser_calls: int = 0
    masked_by_step: dict[int, int] = field(default_factory=dict)
    layouts: dict[tuple[str, int], BlockLayout] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]] = field(default_factory=dict)
    head_share: tuple[int, int] | None = None

    @property
    def density(self) -> float | None:
        """Kept over dense attention FLOPs of the masked calls so far; None before any."""
        return self.kept / self.dense if self.dense else None

    def reset(self) -> None:
        """Start counting steps afresh (the measured FLOPs stay)."""
        self.denoiser_calls = 0

    def layout(self, layer: str, group: int) -> BlockLayout:
        """The block layout of a layer's step group (every head), built once."""
        key = (layer, group)
        if key not in self.layouts:
            lm = next(x for x in self.plan.layers if x.layer == layer)
            first, count = self._heads(lm.heads)
            masks = torch.stack([lm.mask(group, h, self.plan.block) for h in range(first, first + count)])
            self.layouts[key] = BlockLayout.from_mask(masks, lm.q_len, lm.kv_len, self.plan.block)
        return self.layouts[key]

    def _heads(self, heads: int) -> tuple[int, int]:
        """(first head, head count) of a layer with ``heads`` heads that this rank's calls run."""
        if self.head_share is None:
            return 0, heads
        rank, degree = self.head_share
        return rank * (heads // degree), heads // degree

    def handle(self, call: AttentionCall) -> torch.Tensor | None:
        """The masked attention of one SDPA call of a planned layer (None: run it as called)."""
        lm = next((x for x in self.plan.layers if x.layer == call.layer), None)
        if lm is None or call.attn_mask is not None or call.is_causal:
            return None
        shape = (call.query.shape[1], call.query.shape[2], call.key.shape[2])
        heads = self._heads(lm.heads)[1]
        if shape != (heads, lm.q_len, lm.kv_len):
            raise SparsePlanError(
                f"attention layer {lm.layer} runs {shape[0]} heads over {shape[1]} query and {shape[2]} key tokens; "
                f"its masks are for {heads} heads over {lm.q_len} and {lm.kv_len} (the resolution and frame count "
                "they were searched at): call the pipeline at those, or search masks for this size"
            )
        step = ((self.denoiser_calls - 1) // self.plan.calls_per_step) % self.plan.steps
        self.masked_by_step[step] = self.masked_by_step.get(step, 0) + 1
        layout = self.layout(lm.layer, self.plan.group_of(step))
        pairs = float(call.query.shape[0] * heads * lm.q_len * lm.kv_len)
        self.dense += pairs
        self.kept += pairs * layout.density
        self.shapes[lm.layer] = (tuple(call.query.shape), call.query.dtype, call.query.device)
        return block_sparse_attention(call.query, call.key, call.value, layout, call.scale, self.kernel)


class _Mode:
    """Counts the denoiser's calls (the step) around its forward; the interception itself is active
    only inside the masked layers (:class:`AttentionCalls` with ``only``), so the rest of the
    denoiser's ops do not pass through a TorchFunctionMode."""

    def __init__(self, denoiser: nn.Module, run: SparseRun) -> None:
        self.run = run
        self.calls = AttentionCalls(denoiser, run.handle, only={lm.layer for lm in run.plan.layers})
        self.depth = 0

    def enter(self, *_a: Any) -> None:
        if self.depth == 0:
            run = self.run
            if run.denoiser_calls % (run.plan.steps * run.plan.calls_per_step) == 0:
                _check_steps(run.plan, run.scheduler)  # a sampling run starts
            run.denoiser_calls += 1
        self.depth += 1

    def exit(self, *_a: Any) -> None:
        self.depth -= 1


def _check_steps(plan: SparsePlan, scheduler: Any) -> None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is not None and len(timesteps) != plan.steps:
        raise SparsePlanError(
            f"these sparse-attention masks are for {plan.steps} sampler steps, but the pipeline runs {len(timesteps)}; "
            f"call it with num_inference_steps={plan.steps}, rebuild the bundle with --steps {len(timesteps)}, or "
            "load it with sparse=False"
        )


def apply_sparse_plan(denoiser: nn.Module, plan: SparsePlan, scheduler: Any = None,
                      kernel: SparseKernel | str = SparseKernel.AUTO) -> SparseRun:  # fmt: skip
    """Run ``plan``'s masks in ``denoiser``'s attention (see the module docstring).

    Args:
        denoiser: the denoiser the masks were searched for.
        plan: the masks.
        scheduler: the pipeline's scheduler, to check each run's step count before it starts.
        kernel: the block-sparse kernel (:class:`~diffkiln.kernels.sparse_attention.SparseKernel`).

    Raises:
        SparsePlanError: a plan is applied already, or a layer it names is missing; at a run's
            first call, a step count other than the plan's.
    """
    modules = dict(denoiser.named_modules())
    missing = [lm.layer for lm in plan.layers if lm.layer not in modules]
    if missing:
        raise SparsePlanError(f"the denoiser has no attention layer(s) {missing[:3]} the sparse plan names")
    if getattr(denoiser, "_diffkiln_sparse", None) is not None:
        raise SparsePlanError("a sparse-attention plan is applied to this denoiser already; remove it first")
    run = SparseRun(plan, scheduler, kernel=SparseKernel(kernel))
    mode = _Mode(denoiser, run)
    # always_call: the interception ends even when the forward raises.
    handles = [
        denoiser.register_forward_pre_hook(mode.enter),
        denoiser.register_forward_hook(mode.exit, always_call=True),
    ]
    mode.calls.__enter__()  # the masked layers' named hooks
    denoiser.__dict__["_diffkiln_sparse"] = {ENTER_HOOK: handles[0], EXIT_HOOK: handles[1], "run": run,
                                             "calls": mode.calls}  # fmt: skip
    return run


def remove_sparse_plan(denoiser: nn.Module) -> None:
    """Remove the plan's hooks (nothing happens without them)."""
    state = denoiser.__dict__.pop("_diffkiln_sparse", None)
    if state is not None:
        state[ENTER_HOOK].remove()
        state[EXIT_HOOK].remove()
        state["calls"].__exit__(None, None, None)


@contextmanager
def sparse_plan_applied(denoiser: nn.Module, plan: SparsePlan, scheduler: Any = None,
                        kernel: SparseKernel | str = SparseKernel.AUTO) -> Iterator[SparseRun]:  # fmt: skip
    """:func:`apply_sparse_plan` for the block; the hooks are removed on exit, normally or not."""
    run = apply_sparse_plan(denoiser, plan, scheduler, kernel)
    try:
        yield run
    finally:
        remove_sparse_plan(denoiser)
