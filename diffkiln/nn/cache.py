"""Apply a frozen cache schedule to a denoiser with diffusers' ``HookRegistry``: named, removable
hooks, no host sync (each step's decision is a Python bool read from the schedule).

``apply_cache_schedule(denoiser, schedule, scheduler)`` registers ``diffkiln.cache.denoiser`` on
the denoiser and, unless the schedule reuses the whole output, ``diffkiln.cache.block`` on each of
the schedule's blocks, and returns the
:class:`CacheRun` that holds the state and the counts. ``remove_cache_schedule`` takes them away;
``cache_schedule_applied`` does both around a block.

Steps are counted per *branch*: per diffusers cache context when the pipeline names its CFG calls
(``with transformer.cache_context("cond")``), else per position in a step's ``calls_per_step``
calls. With a pipeline's scheduler, a branch's count resets after its last step (and when diffusers
resets stateful hooks at the end of a pipeline call), and at a branch's first call the step count is
checked against the scheduler's (``len(scheduler.timesteps)``): another count raises
:class:`CacheScheduleError` before anything runs, naming the count the schedule is for. Without a
scheduler (a bare module), the caller resets the run before each sampling run; a call past the
schedule's last step raises. Another stateful (cache) hook on the denoiser or its blocks raises too.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from torch import nn

from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule, CacheScheduleError
from diffkiln.core.hooks import map_output_tensors, output_tensors

__all__ = [
    "CacheRun",
    "CacheStepTracer",
    "DenoisingContext",
    "apply_cache_schedule",
    "cache_schedule_applied",
    "remove_cache_schedule",
]

DENOISER_HOOK = "diffkiln.cache.denoiser"
BLOCK_HOOK = "diffkiln.cache.block"


@dataclass
class _Branch:
    calls: int = 0
    outputs: dict[int, Any] = field(default_factory=dict)  # deep: block index -> last output
    inputs: list[torch.Tensor] = field(default_factory=list)  # residual: streams entering the range
    history: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)  # last two computed values


@dataclass
class CacheRun:
    """The state of one applied schedule and what its hooks counted.

    Attributes:
        schedule: the schedule applied.
        scheduler: the pipeline's scheduler, whose timesteps the step count is checked against
            (None for a bare module: the count is then checked as the calls come).
        evaluated: block evaluations that ran.
        uncached: block evaluations the uncached denoiser would have run over the same calls.
        steps_run: the current (or last) sampling run's denoiser calls, in order: True computed,
            False reused. Cleared when a run starts with no other branch in progress.
        graph: the denoiser computes and takes the cached values itself (an exported pair of step
            graphs, :class:`CacheStepTracer`): no block hooks; it reads :attr:`step_computes` and
            calls :meth:`store` / :meth:`cached`.
    """

    schedule: CacheSchedule
    scheduler: Any = None
    graph: bool = False
    evaluated: int = 0
    uncached: int = 0
    steps_run: list[bool] = field(default_factory=list)
    branches: dict[tuple[str, int], _Branch] = field(default_factory=dict)
    current: tuple[_Branch, int, bool] | None = None

    @property
    def compute_fraction(self) -> float | None:
        """Block evaluations run over the uncached denoiser's, as counted; None before any call."""
        return self.evaluated / self.uncached if self.uncached else None

    def reset(self) -> None:
        """Forget every branch's cached values (the counts stay)."""
        self.branches.clear()
        self.current = None

    def _now(self) -> tuple[_Branch, int, bool]:
        if self.current is None:
            raise CacheScheduleError("no denoiser step is in progress (call inside the hooked denoiser's forward)")
        return self.current

    @property
    def step_computes(self) -> bool | None:
        """Whether the step in progress computes every block (None outside a denoiser call)."""
        return None if self.current is None else self.current[2]

    def store(self, values: list[torch.Tensor]) -> None:
        """Graph mode: keep the values a computing step's graph returned, for the branch in progress."""
        branch, step, _ = self._now()
        _remember(branch, step, list(values))

    def cached(self) -> list[torch.Tensor]:
        """Graph mode: the values a reusing step's graph takes: the last computed step's, extrapolated
        from the last two where the schedule says so (residual schedules; deep reuses as stored)."""
        branch, step, _ = self._now()
        extrapolate = self.schedule.extrapolate and self.schedule.mechanism is not CacheMechanism.DEEP
        return _extrapolated(branch.history, step, extrapolate)


class DenoisingContext(StateManager):
    """Receives diffusers' cache context, which pipelines wrap around a denoiser call
    (``cache_context("cond", step_index=i)``; ``_set_cache_context`` looks for StateManagers on a
    stateful hook): keeps the call's name ("" outside a context) and step (None when not given)."""

    def __init__(self) -> None:
        super().__init__(dict)  # type: ignore[arg-type]  # the per-context states are not used
        self.name = ""
        self.step: int | None = None

    def set_context(self, context: Any) -> None:
        self.name = "" if context is None else str(context.name)
        self.step = None if context is None else context.step_index


def _extrapolated(history: list[tuple[int, list[torch.Tensor]]], step: int, extrapolate: bool) -> list[torch.Tensor]:
    (j, vj) = history[-1]
    if not extrapolate or len(history) < 2:
        return vj
    (i, vi) = history[-2]
    w = (step - j) / (j - i)
    return [b + (b - a) * w for a, b in zip(vi, vj, strict=True)]


def _remember(branch: _Branch, step: int, values: list[torch.Tensor]) -> None:
    branch.history = [*branch.history[-1:], (step, values)]


def _rebuilt(template: Any, values: list[torch.Tensor]) -> Any:
    """An output of ``template``'s kind holding ``values``, one per tensor of it in order (every
    prediction: a model denoising several latents, as LTX-2, reuses each)."""
    it = iter(values)
    return map_output_tensors(template, lambda _t: next(it))


class _Skipping(ModelHook):
    """A hook that may skip the module: ``new_forward`` runs the original forward only when needed."""

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        assert forward is not None  # set by HookRegistry.register_hook for hooks with new_forward
        return forward(*args, **kwargs)


class _DenoiserHook(_Skipping):
    _is_stateful = True

    def __init__(self, run: CacheRun, foreign_check: Any) -> None:
        super().__init__()
        self.run = run
        self.context = DenoisingContext()
        self.foreign_check = foreign_check

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run, schedule = self.run, self.run.schedule
        cps = schedule.calls_per_step if not self.context.name else 1
        counter = run.branches.setdefault((self.context.name, -1), _Branch())
        step, position = divmod(counter.calls, cps)
        branch = run.branches.setdefault((self.context.name, position), _Branch())
        if counter.calls == 0:
            self.foreign_check()
            _check_steps(schedule, run.scheduler)
        if step >= schedule.steps:
            raise CacheScheduleError(
                f"the denoiser ran a step past the {schedule.steps} its cache schedule is for; run "
                f"{schedule.steps} steps, and call reset() on the CacheRun before each new sampling run of a bare "
                "module (a pipeline's scheduler lets the hooks see where a run starts)"
            )
        compute = schedule.compute[step]
        run.current = (branch, step, compute)
        run.uncached += len(schedule.blocks)
        if counter.calls == 0 and sum(1 for key in run.branches if key[1] == -1) == 1:
            run.steps_run.clear()  # a new sampling run: keep one run's flags, not every call ever made
        run.steps_run.append(compute)
        counter.calls += 1
        try:
            if run.graph and schedule.mechanism is not CacheMechanism.WHOLE:
                run.evaluated += len(schedule.blocks) - (0 if compute else schedule.end - schedule.start)
                return self._original(*args, **kwargs)
            if schedule.mechanism is CacheMechanism.WHOLE and not compute:
                return _rebuilt(branch.outputs[-1], _extrapolated(branch.history, step, schedule.extrapolate))
            out = self._original(*args, **kwargs)
            if schedule.mechanism is CacheMechanism.WHOLE:
                # Every block ran inside this call; 'whole' needs no block hooks (so it also runs on a
                # denoiser without torch blocks, e.g. an onnxruntime session).
                run.evaluated += len(schedule.blocks)
                branch.outputs[-1] = out
                _remember(branch, step, output_tensors(out))
            return out
        finally:
            run.current = None
            if run.scheduler is not None and counter.calls == schedule.steps * cps:
                for key in [k for k in run.branches if k[0] == self.context.name]:
                    del run.branches[key]

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.run.reset()
        return module


def _check_steps(schedule: CacheSchedule, scheduler: Any) -> None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return
    if len(timesteps) != schedule.steps:
        raise CacheScheduleError(
            f"this cache schedule is for {schedule.steps} sampler steps, but the pipeline runs {len(timesteps)}; call "
            f"it with num_inference_steps={schedule.steps}, rebuild the bundle with --steps {len(timesteps)}, or load "
            "it with cache=False"
        )


class _BlockHook(_Skipping):
    def __init__(self, run: CacheRun, index: int, module: nn.Module) -> None:
        super().__init__()
        self.run, self.index = run, index
        self.signature = inspect.signature(module.forward)

    def _streams_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        return [bound[s.argument] for s in self.run.schedule.streams]

    def _arrange(self, streams: list[torch.Tensor]) -> Any:
        schedule = self.run.schedule
        if schedule.output_arity == 0:
            return streams[0]
        out: list[Any] = [None] * schedule.output_arity
        for s, t in zip(schedule.streams, streams, strict=True):
            out[s.output_index] = t
        return tuple(out)

    def _streams_out(self, out: Any) -> list[torch.Tensor]:
        if self.run.schedule.output_arity == 0:
            return [out]
        return [out[s.output_index] for s in self.run.schedule.streams]

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run, schedule, i = self.run, self.run.schedule, self.index
        if run.current is None:  # called outside the denoiser's hooked forward
            return self._original(*args, **kwargs)
        branch, step, compute = run.current
        inside = schedule.start <= i < schedule.end
        if compute or not inside:
            if compute and inside and schedule.mechanism is CacheMechanism.RESIDUAL and i == schedule.start:
                branch.inputs = self._streams_in(args, kwargs)
            out = self._original(*args, **kwargs)
            run.evaluated += 1
            if compute and inside:
                if schedule.mechanism is CacheMechanism.DEEP:
                    branch.outputs[i] = out
                elif schedule.mechanism is CacheMechanism.RESIDUAL and i == schedule.end - 1:
                    residual = [o - x for o, x in zip(self._streams_out(out), branch.inputs, strict=True)]
                    _remember(branch, step, residual)
                    branch.inputs = []
            return out
        if schedule.mechanism is CacheMechanism.DEEP:
            return branch.outputs[i]
        streams = self._streams_in(args, kwargs)
        if i == schedule.start:
            residual = _extrapolated(branch.history, step, schedule.extrapolate)
            streams = [x + r for x, r in zip(streams, residual, strict=True)]
        return self._arrange(streams)


def _blocks(denoiser: nn.Module, schedule: CacheSchedule) -> list[nn.Module]:
    modules = dict(denoiser.named_modules())
    missing = [b for b in schedule.blocks if b not in modules]
    if missing:
        raise CacheScheduleError(f"the denoiser has no block(s) {missing[:3]} the cache schedule names")
    return [modules[b] for b in schedule.blocks]


def _foreign_stateful(modules: list[nn.Module]) -> list[str]:
    names = []
    for m in modules:
        registry = getattr(m, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            names += [n for n, h in registry.hooks.items() if h._is_stateful and not n.startswith("diffkiln.")]
    return names


def apply_cache_schedule(
    denoiser: nn.Module, schedule: CacheSchedule, scheduler: Any = None, check_blocks: bool = True, graph: bool = False
) -> CacheRun:
    """Hook ``schedule`` onto ``denoiser`` (see the module docstring).

    Args:
        denoiser: the denoiser the schedule was searched for (its blocks by name).
        schedule: the frozen schedule.
        scheduler: the pipeline's scheduler, to check each run's step count before it starts.
        check_blocks: require the blocks the schedule names (a ``whole`` schedule does not hook
            them; False lets it run on a denoiser without torch blocks, e.g. an onnxruntime session).
            Default True.
        graph: the denoiser runs the schedule's two step graphs itself (an onnxruntime denoiser of
            an export with a block-range schedule; :attr:`CacheRun.graph`): only the denoiser hook
            is registered, and no block is required. Default False.

    Returns:
        The run state, whose counts the hooks update.

    Raises:
        CacheScheduleError: a block the schedule names is missing, a schedule is applied already,
            or another cache is on the denoiser.
    """
    # 'whole' and graph-mode schedules hook the denoiser only.
    hook_blocks = schedule.mechanism is not CacheMechanism.WHOLE and not graph
    blocks = _blocks(denoiser, schedule) if hook_blocks or (check_blocks and not graph) else []
    modules = dict(denoiser.named_modules())
    watched = [modules[b] for b in schedule.blocks if b in modules]  # another cache may hook them
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(DENOISER_HOOK) is not None:
        raise CacheScheduleError("a cache schedule is applied to this denoiser already; remove it first")

    def foreign_check() -> None:
        if names := _foreign_stateful([denoiser, *watched]):
            raise CacheScheduleError(
                f"another cache ({', '.join(sorted(set(names)))}) runs on top of diffkiln's frozen cache schedule; "
                "remove it (e.g. disable_cache()), or load the bundle with cache=False to use your own"
            )

    foreign_check()
    run = CacheRun(schedule, scheduler, graph=graph)
    for i, block in enumerate(blocks if hook_blocks else []):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(run, i, block), BLOCK_HOOK)
    registry.register_hook(_DenoiserHook(run, foreign_check), DENOISER_HOOK)
    return run


def remove_cache_schedule(denoiser: nn.Module) -> None:
    """Remove the schedule's hooks from ``denoiser`` and its blocks (nothing happens without them)."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    if isinstance(registry, HookRegistry):
        registry.remove_hook(DENOISER_HOOK, recurse=False)
        registry.remove_hook(BLOCK_HOOK, recurse=True)


@contextmanager
def cache_schedule_applied(denoiser: nn.Module, schedule: CacheSchedule, scheduler: Any = None) -> Iterator[CacheRun]:
    """:func:`apply_cache_schedule` for the block; the hooks are removed on exit, normally or not."""
    run = apply_cache_schedule(denoiser, schedule, scheduler)
    try:
        yield run
    finally:
        remove_cache_schedule(denoiser)


class CacheStepTracer:
    """A block-range schedule's two step graphs, for export: ``fill`` runs a computing step and also
    returns the values reusing steps need (the residual the range adds, per stream; or every reused
    block's output, flattened); ``reuse`` runs a reusing step on such values. Both run the block hooks
    the runtime runs, so an exported pair computes what the torch runtime does.

    Args:
        denoiser: the denoiser (its blocks by name).
        schedule: a ``residual`` or ``deep`` schedule.

    Raises:
        CacheScheduleError: a ``whole`` schedule (it needs no graphs), or a block is missing.
    """

    def __init__(self, denoiser: nn.Module, schedule: CacheSchedule) -> None:
        if schedule.mechanism is CacheMechanism.WHOLE:
            raise CacheScheduleError("a 'whole' cache schedule reuses the denoiser's output; it has no step graphs")
        self.run = CacheRun(schedule)
        self.blocks = _blocks(denoiser, schedule)
        self.specs: list[Any] = []  # deep: each reused block's output structure (from the last fill)
        for i, block in enumerate(self.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self.run, i, block), BLOCK_HOOK)

    def fill(self, call: Any) -> tuple[Any, list[torch.Tensor]]:
        """``call()`` (the denoiser's forward) as a computing step; returns its output and the values."""
        from torch.utils._pytree import tree_flatten

        schedule, branch = self.run.schedule, _Branch()
        self.run.current = (branch, 0, True)
        try:
            out = call()
        finally:
            self.run.current = None
        if schedule.mechanism is CacheMechanism.RESIDUAL:
            return out, list(branch.history[-1][1])
        values: list[torch.Tensor] = []
        self.specs = []
        for i in range(schedule.start, schedule.end):
            leaves, spec = tree_flatten(branch.outputs[i])
            values += leaves
            self.specs.append((len(leaves), spec))
        return out, values

    def reuse(self, call: Any, values: list[torch.Tensor]) -> Any:
        """``call()`` as a reusing step on ``values`` (as :meth:`fill` returned them)."""
        from torch.utils._pytree import tree_unflatten

        schedule, branch = self.run.schedule, _Branch()
        if schedule.mechanism is CacheMechanism.RESIDUAL:
            branch.history = [(0, list(values))]
        else:
            at = 0
            for i, (n, spec) in zip(range(schedule.start, schedule.end), self.specs, strict=True):
                branch.outputs[i] = tree_unflatten(list(values[at : at + n]), spec)
                at += n
        self.run.current = (branch, 1, False)
        try:
            return call()
        finally:
            self.run.current = None

    def remove(self) -> None:
        """Remove the block hooks."""
        for block in self.blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                registry.remove_hook(BLOCK_HOOK, recurse=False)
