"""A cache schedule: pure, versioned data saying, for each sampler step, whether the denoiser's
blocks are computed or reused from the last computed step.

It is searched offline (:mod:`diffkiln.optimizer.cache_search`), written into the Plan and the
bundle manifest, and applied at run time by named hooks (:mod:`diffkiln.nn.cache`). Its format is
specified in docs/plan-format.md ("Cache schedules").

The denoiser's *blocks* are the units its forward runs in sequence (the elements of its module
lists and the modules called between them, e.g. a UNet's mid block), found from one traced call
(:mod:`diffkiln.calibrate.blocks`). A *block evaluation* is one block run once; the compute
fraction is the block evaluations run over those of the uncached denoiser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from diffkiln.core.errors import InvalidInputError

__all__ = ["CacheMechanism", "CacheSchedule", "CacheScheduleError", "Stream"]


class CacheScheduleError(InvalidInputError):
    """A schedule is malformed, or does not fit the call it is applied to; the message says how."""


class CacheMechanism(str, Enum):
    """What a reusing step reuses.

    ``whole``: the denoiser's whole output from the last computed step (FORA-style); no block runs.
    ``residual``: blocks ``[start, end)`` of one block list are skipped and the residual they added
    (output minus input, per stream) at the last computed step is added back (DBCache, MindIE-SD's
    DiTCache); the blocks before and after run. ``deep``: blocks ``[start, end)`` return their
    outputs of the last computed step, the others run (DeepCache: the UNet's shallow branch is
    recomputed, its deep features reused).
    """

    WHOLE = "whole"
    RESIDUAL = "residual"
    DEEP = "deep"


@dataclass(frozen=True)
class Stream:
    """One hidden-state stream a residual-capable block passes on.

    Attributes:
        output_index: its position in the block's output (0 for a block returning one tensor).
        argument: the name of the block's forward argument the next block receives it as.
    """

    output_index: int
    argument: str


@dataclass(frozen=True)
class CacheSchedule:
    """A frozen per-step cache decision for one denoiser and one step count.

    Attributes:
        mechanism: what reusing steps reuse (:class:`CacheMechanism`).
        blocks: the denoiser's blocks, qualified module names in call order.
        start: first reused block (index into ``blocks``); 0 for ``whole``.
        end: one past the last reused block; ``len(blocks)`` for ``whole``.
        compute: one entry per step: True computes every block, False reuses. Step 0 computes.
        calls_per_step: denoiser calls per step and branch that share one decision (2 when a
            pipeline makes its two CFG calls without naming them). Default 1.
        streams: ``residual`` only: the streams the skipped blocks pass on, in output order.
        output_arity: ``residual`` only: 0 when a block returns one tensor, else the length of the
            tuple it returns.
        extrapolate: reuse a first-order extrapolation from the last two computed steps
            (TaylorSeer-style) instead of the last computed value. Default False.
        budget: the compute fraction the search was given, in (0, 1].
        search: what the search measured (proxies, candidates validated); informational.
    """

    mechanism: CacheMechanism
    blocks: tuple[str, ...]
    start: int
    end: int
    compute: tuple[bool, ...]
    calls_per_step: int = 1
    streams: tuple[Stream, ...] = ()
    output_arity: int = 0
    extrapolate: bool = False
    budget: float = 1.0
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, CacheMechanism):
            valid = [m.value for m in CacheMechanism]
            raise CacheScheduleError(f"unknown cache mechanism {self.mechanism!r}; valid: {valid}")
        if not self.blocks:
            raise CacheScheduleError("a cache schedule needs the denoiser's blocks")
        if not 0 <= self.start < self.end <= len(self.blocks):
            raise CacheScheduleError(f"reused blocks [{self.start}, {self.end}) are not within 0..{len(self.blocks)}")
        if self.mechanism is CacheMechanism.WHOLE and (self.start, self.end) != (0, len(self.blocks)):
            raise CacheScheduleError("a 'whole' schedule reuses every block: start 0, end len(blocks)")
        if self.mechanism is CacheMechanism.RESIDUAL and not self.streams:
            raise CacheScheduleError("a 'residual' schedule needs the streams its blocks pass on")
        if not self.compute or not self.compute[0]:
            raise CacheScheduleError("a schedule needs at least one step, and step 0 must compute (nothing is cached)")
        if self.calls_per_step < 1:
            raise CacheScheduleError(f"calls_per_step must be >= 1, got {self.calls_per_step}")
        if not 0.0 < self.budget <= 1.0:
            raise CacheScheduleError(f"the compute budget must be in (0, 1], got {self.budget}")

    @property
    def steps(self) -> int:
        """The step count the schedule is for."""
        return len(self.compute)

    @property
    def reused_blocks(self) -> int:
        """Blocks a reusing step skips."""
        return self.end - self.start

    @property
    def pattern(self) -> str:
        """The decisions as one letter per step: ``C`` computes, ``r`` reuses (``"CrCrr..."``)."""
        return "".join("C" if c else "r" for c in self.compute)

    def runs_at(self, module: str) -> tuple[bool, ...]:
        """Per step, whether the denoiser's submodule ``module`` (a qualified name) runs under the
        schedule: a computing step runs it; a reusing step runs nothing under ``whole`` and, otherwise,
        what lies outside the reused blocks."""
        if self.mechanism is CacheMechanism.WHOLE:
            return self.compute
        inside = any(module == b or module.startswith(f"{b}.") for b in self.blocks[self.start : self.end])
        return tuple(c or not inside for c in self.compute)

    def block_evaluations(self) -> int:
        """Block evaluations per branch over all steps, as planned."""
        n = len(self.blocks)
        return sum(n if c else n - self.reused_blocks for c in self.compute)

    @property
    def compute_fraction(self) -> float:
        """Planned block evaluations over those of the uncached denoiser."""
        return self.block_evaluations() / (len(self.blocks) * self.steps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["mechanism"] = self.mechanism.value
        return d

    @classmethod
    def from_dict(cls, d: Any) -> CacheSchedule:
        """Rebuild a schedule from :meth:`to_dict` output, checking every field's type.

        Raises:
            CacheScheduleError: a missing or mistyped field, or an invalid schedule.
        """
        if not isinstance(d, dict):
            raise CacheScheduleError(f"a cache schedule must be a JSON object, got {type(d).__name__}")
        ints = {"start", "end", "calls_per_step", "output_arity"}
        try:
            for key in ints:
                if not isinstance(d.get(key, 0), int) or isinstance(d.get(key, 0), bool):
                    raise CacheScheduleError(f"cache schedule field {key!r} must be an integer")
            blocks, compute = d["blocks"], d["compute"]
            if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, str) for b in blocks):
                raise CacheScheduleError("cache schedule field 'blocks' must be a list of module names")
            if not isinstance(compute, (list, tuple)) or not all(isinstance(c, bool) for c in compute):
                raise CacheScheduleError("cache schedule field 'compute' must be a list of booleans")
            streams = d.get("streams", [])
            if not isinstance(streams, (list, tuple)) or not all(
                isinstance(s, dict) and isinstance(s.get("output_index"), int) and isinstance(s.get("argument"), str)
                for s in streams
            ):
                raise CacheScheduleError("cache schedule field 'streams' must list {output_index, argument}")
            budget = d.get("budget", 1.0)
            if not isinstance(budget, (int, float)) or isinstance(budget, bool):
                raise CacheScheduleError("cache schedule field 'budget' must be a number")
            try:
                mechanism = CacheMechanism(d["mechanism"])
            except ValueError:
                valid = [m.value for m in CacheMechanism]
                raise CacheScheduleError(f"unknown cache mechanism {d['mechanism']!r}; valid: {valid}") from None
            return cls(
                mechanism=mechanism,
                blocks=tuple(blocks),
                start=d["start"],
                end=d["end"],
                compute=tuple(compute),
                calls_per_step=d.get("calls_per_step", 1),
                streams=tuple(Stream(s["output_index"], s["argument"]) for s in streams),
                output_arity=d.get("output_arity", 0),
                extrapolate=bool(d.get("extrapolate", False)),
                budget=float(budget),
                search=dict(d.get("search", {})),
            )
        except KeyError as exc:
            raise CacheScheduleError(f"cache schedule lacks field {exc}") from None
