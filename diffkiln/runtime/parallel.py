"""Run a loaded pipeline over the ranks of a torch.distributed process group (launched by torchrun).

CFG parallel (``ParallelConfig(cfg=True)``): each denoiser call's batch is split over the ranks,
each rank runs its share, and an all-gather gives every rank the whole output, so the scheduler
loop, the VAE and the caller's code run unchanged (and identically) on every rank. Pipelines that
batch classifier-free guidance (SD, SDXL, SD3, PixArt: ``[uncond, cond]`` in one call of batch
``2B``) run their two branches on two ranks. Pipelines that call the denoiser once per branch
inside diffusers' cache context (Wan: ``cache_context("cond")``, then ``"uncond"``) do so on two
ranks too: step 0 runs as before and shows the pattern (two differently named calls per step);
from step 1 rank 0 computes the first branch and rank 1 the second, each rank returns a placeholder
for the other's branch, and after the second call each rank broadcasts its own output into the
other's placeholder (the pipeline holds the first branch's output until both are back). Any
other call whose batch does not divide by the world size (guidance off at batch 1) runs whole on
every rank: correct, not faster; :class:`ParallelRun` counts every kind.

The split is one named diffusers hook on the denoiser (``diffkiln.parallel.cfg``), applied after a
cache schedule's and sparse masks' hooks, so those see each rank's share: quantized layers, cached
residuals and block masks all work per row. A tensor argument is the batch's when its first axis
has the batch size of the call's first tensor argument (the sample), including tensors inside dict
arguments (SDXL's ``added_cond_kwargs``); a 0-d timestep is shared.

Context parallel (``ParallelConfig(cfg=False, ulysses_degree=N)`` or ``ring_degree``): diffusers'
own Ulysses / ring attention (``ContextParallelConfig``), for denoisers whose class carries a
context-parallel plan (``_cp_plan``: Wan, FLUX, LTX, QwenImage...): the sequence is split over the
ranks at the first block and gathered after the last; quantized layers see each rank's tokens.
A cache schedule composes with it (each rank caches its own tokens' block values or the gathered
output; bit-identical to one process, tests/runtime/test_parallel.py), and so do sparse masks under
Ulysses (each rank attends over the whole sequence for its share of the heads and runs those
heads' masks); ring attention, which splits the sequence inside attention, refuses masks.

The output matches one process up to the float arithmetic's dependence on the batch size or
sequence split (integer layers are exact; measured in tests/runtime/test_parallel.py and
tools/bench_cfg_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffkiln.core.distributed import init_distributed
from diffkiln.core.hooks import map_output_tensors, output_sample, output_tensors
from diffkiln.nn.cache import DenoisingContext

__all__ = ["CFG_HOOK", "ParallelConfig", "ParallelRun", "apply_parallel", "remove_parallel"]

CFG_HOOK = "diffkiln.parallel.cfg"


@dataclass(frozen=True)
class ParallelConfig:
    """How a loaded pipeline spreads over the process group.

    Attributes:
        cfg: split each denoiser call's batch (the two CFG branches of a batched-CFG pipeline) over
            the ranks. Default True.
        ulysses_degree: ranks that split the sequence with Ulysses attention (all-to-all of heads).
            Default 1 (none).
        ring_degree: ranks that split the sequence with ring attention. Default 1 (none).
    """

    cfg: bool = True
    ulysses_degree: int = 1
    ring_degree: int = 1

    def __post_init__(self) -> None:
        if self.ulysses_degree < 1 or self.ring_degree < 1:
            raise ValueError("ulysses_degree and ring_degree are >= 1")
        if self.cfg and self.context_degree > 1:
            raise ValueError(
                "CFG parallel and context parallel on the same ranks are not supported yet: "
                "pass cfg=False with ulysses_degree/ring_degree, or cfg=True alone"
            )

    @property
    def context_degree(self) -> int:
        """Ranks the sequence is split over (``ulysses_degree * ring_degree``)."""
        return self.ulysses_degree * self.ring_degree


@dataclass
class ParallelRun:
    """The state of an applied :class:`ParallelConfig` and what it did.

    Attributes:
        config: the configuration applied.
        rank: this process's rank.
        world: the number of ranks.
        split_calls: denoiser calls whose batch was split over the ranks.
        whole_calls: denoiser calls run whole on every rank (batch not divisible by ``world``).
        rows: batch rows this rank computed, over all calls.
        branch_calls: calls of a pipeline that runs each guidance branch in its own call, given
            to one rank (the other rank's output comes from it).
    """

    config: ParallelConfig
    rank: int
    world: int
    split_calls: int = 0
    whole_calls: int = 0
    rows: int = 0
    branch_calls: int = 0


def _split(value: Any, n: int, lo: int, hi: int) -> Any:
    """``value`` with every tensor whose first axis is ``n`` sliced to rows ``[lo, hi)``."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _split(v, n, lo, hi) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, n, lo, hi) for v in value)
    return value


def _gather(value: Any, rows: int, world: int) -> Any:
    """``value`` with every tensor whose first axis is ``rows`` all-gathered over the ranks."""
    import torch.distributed as dist

    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            return value
        parts = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)
    if isinstance(value, tuple):
        return tuple(_gather(v, rows, world) for v in value)
    if isinstance(value, dict) and hasattr(value, "__dataclass_fields__"):  # a diffusers/transformers output
        return replace(value, **{k: _gather(v, rows, world) for k, v in value.items()})  # type: ignore[type-var]
    return value


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value
    return None


class _CfgHook(ModelHook):
    """Splits a call's batch over the ranks before the denoiser and gathers its output after; or,
    for pipelines that run each guidance branch in its own call, gives each branch to one rank."""

    _is_stateful = True  # so that diffusers hands its cache context to ``self.context``

    def __init__(self, run: ParallelRun) -> None:
        super().__init__()
        self.run = run
        self.shares: list[int] = []  # per call in flight: this rank's rows (0: run whole)
        self.context = DenoisingContext()
        # Branch mode: the call names seen at the first step this model runs in a pipeline call
        # (step 0; an expert's first step, as Wan 2.2's transformer_2's below its boundary): those
        # calls run as before and show the pattern. Then each branch's first-step output (the shape
        # of the later ones), and this step's first-branch output, which the other rank fills in
        # after the second branch's call.
        self.step0: list[str] = []
        self.templates: dict[str, Any] = {}
        self.first_output: Any = None
        self.last_step: int | None = None
        self.first_step: int | None = None

    def reset_state(self, module: nn.Module) -> nn.Module:
        """Forget the learnt branch pattern (the next pipeline call learns it again at its first step)."""
        self.step0, self.templates, self.first_output, self.last_step, self.first_step = [], {}, None, None, None
        return module

    def _pair(self) -> tuple[str, str] | None:
        """The two branch names when the pipeline called the denoiser once per branch at step 0
        (two differently named calls), on two ranks; else None."""
        if self.run.world != 2 or len(self.step0) != 2 or self.step0[0] == self.step0[1]:
            return None
        return self.step0[0], self.step0[1]

    def _branch_mode(self) -> bool:
        pair = self._pair()
        return pair is not None and self.context.name in pair and self.context.step not in (None, self.first_step)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward: Any = self.fn_ref.original_forward  # set by the registry for a hook with new_forward
        name, step = self.context.name, self.context.step
        if name and step is not None and (self.last_step is None or step < self.last_step):  # a new pipeline call
            self.step0, self.templates, self.first_output, self.first_step = [], {}, None, step
        if name and step is not None:
            if step == self.first_step:
                self.step0.append(name)
            self.last_step = step
        if not self._branch_mode():
            return forward(*args, **kwargs)
        import torch.distributed as dist

        pair = self._pair()
        assert pair is not None
        run = self.run
        run.branch_calls += 1
        mine = pair.index(name) == run.rank
        out = forward(*args, **kwargs) if mine else _placeholder(self.templates[name])
        if name == pair[0]:
            self.first_output = out
            return out
        first = self.first_output
        if first is None:
            raise RuntimeError(f"CFG parallel: a {pair[1]!r} call came without the {pair[0]!r} call before it")
        # The first branch's output is rank 0's, the second's rank 1's: each rank sends its own,
        # into the other's placeholder (the pipeline holds the first one until both are back).
        for tensor in output_tensors(first):
            dist.broadcast(tensor, src=0)
        for tensor in output_tensors(out):
            dist.broadcast(tensor, src=1)
        self.first_output = None
        return out

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        run = self.run
        if self._branch_mode():
            self.shares.append(-1)  # new_forward gives the call to one rank
            return args, kwargs
        sample = _first_tensor(args, kwargs)
        n = 0 if sample is None else sample.shape[0]
        if n == 0 or n % run.world:
            run.whole_calls += 1
            self.shares.append(0)
            return args, kwargs
        share = n // run.world
        lo = run.rank * share
        run.split_calls += 1
        run.rows += share
        self.shares.append(share)
        return _split(args, n, lo, lo + share), _split(kwargs, n, lo, lo + share)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        share = self.shares.pop()
        if share > 0:
            output = _gather_checked(output, share, self.run.world)
        if share >= 0 and self.context.name and self.context.step == self.first_step:
            self.templates[self.context.name] = output  # the whole call's output: later ones' shape
        return output


def _gather_checked(output: Any, share: int, world: int) -> Any:
    if output_sample(output).shape[0] != share:
        raise RuntimeError(f"the denoiser returned {output_sample(output).shape[0]} rows for {share} inputs")
    return _gather(output, share, world)


def _placeholder(template: Any) -> Any:
    """An output of ``template``'s structure (a tuple, or a diffusers output) with every tensor an
    empty one of its shape (each prediction of a model denoising several latents, as LTX-2's video
    and audio), filled in place by the broadcasts after the second branch's call."""
    return map_output_tensors(template, torch.empty_like)


def apply_parallel(
    denoiser: nn.Module, config: ParallelConfig, device: torch.device, run: ParallelRun | None = None
) -> ParallelRun:
    """Register the ``config``'s hooks on ``denoiser`` (see the module docstring); the process group
    comes from :func:`diffkiln.core.distributed.init_distributed`.

    Args:
        denoiser: the model to run over the ranks.
        config: how.
        device: this rank's device.
        run: the run state to count in, shared by the denoiser and its experts (Wan 2.2's
            ``transformer_2``); None starts one.

    Returns:
        The run state, counting split and whole calls.

    Raises:
        ValueError: context parallel on a denoiser without a context-parallel plan, or a degree
            that is not the world size.
    """
    rank, world = init_distributed(device)
    run = run or ParallelRun(config, rank, world)
    if config.context_degree > 1:
        _apply_context_parallel(denoiser, config, rank, world, device)
    elif config.cfg and world > 1:
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_CfgHook(run), CFG_HOOK)
    return run


def _apply_context_parallel(denoiser: nn.Module, config: ParallelConfig, rank: int, world: int,
                            device: torch.device) -> None:  # fmt: skip
    from diffusers import ContextParallelConfig

    plan = getattr(denoiser, "_cp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(denoiser).__name__} has no context-parallel plan (diffusers' _cp_plan); context parallel "
            "runs on classes that carry one (Wan, FLUX, LTX, QwenImage...). Use ParallelConfig(cfg=True) instead"
        )
    if config.context_degree != world:
        raise ValueError(f"ulysses_degree x ring_degree is {config.context_degree}; it must be the world size {world}")
    cp: Any = ContextParallelConfig(ulysses_degree=config.ulysses_degree, ring_degree=config.ring_degree)
    if device.type != "cpu":
        denoiser.enable_parallelism(config=cp)  # type: ignore[operator]
        return
    # diffusers' enable_parallelism picks the device as rank % torch.accelerator.device_count(),
    # which divides by zero on a host without accelerators; on CPU the same steps are taken here:
    # the mesh, the config recorded on the model and its attention processors, the plan's hooks.
    from diffusers import ParallelConfig as DiffusersParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    full: Any = DiffusersParallelConfig(context_parallel_config=cp)
    full.setup(rank, world, device, mesh=mesh)
    setattr(denoiser, "_parallel_config", full)  # noqa: B010  # what enable_parallelism records
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = full
    apply_context_parallel(denoiser, cp, plan)


def remove_parallel(denoiser: nn.Module) -> None:
    """Remove the hooks :func:`apply_parallel` registered (none registered: nothing happens)."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(CFG_HOOK) is not None:
        registry.remove_hook(CFG_HOOK, recurse=False)
