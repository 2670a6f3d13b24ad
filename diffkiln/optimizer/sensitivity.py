"""The ``sensitivity`` verb: metric-decoupled, per-layer sensitivity to each candidate bit-width.

For every layer and every candidate, that layer alone is quantized (weights and activations
scored separately; simulated, see :mod:`diffkiln.optimizer.simulate`) and the damage measured
against the FP model, with the metric of the layer's group (:mod:`diffkiln.optimizer.roles`):

* content layers: the final outputs against FP's for the same samples and seeds
  (:mod:`diffkiln.optimizer.workload`: SSIM of images and video frames, SQNR of audio and of a
  bare module's outputs);
* quality layers: SQNR of the denoiser output against FP, on denoiser calls recorded from the FP
  sampler trajectory (``quality_steps`` calls, evenly spaced).

Results are appended to a JSON-lines file in the cache as they arrive, so an interrupted run
resumes where it stopped; ``workers`` > 1 shards the trials over processes, each of which
rebuilds the model with a picklable ``reload`` callable.

Under torch.distributed (``torchrun``), the trials left to measure are sharded over the ranks
(rank r takes every world-th one), each rank appends its results to its own shard file
(``sens-KEY.shard-R.jsonl``), and the ranks exchange their results: every rank ends with the whole
table, the same as one process measures (each trial's result depends only on the trial). A re-run,
with any number of ranks, reads every shard file of the key first, so the trials a killed run
finished are not measured again (counted in the table's ``reused``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.distributed import all_gather_objects, barrier, rank_world
from diffkiln.core.plan import Plan
from diffkiln.optimizer.roles import LayerRole
from diffkiln.optimizer.simulate import LayerSim, SimChoice, simulated
from diffkiln.optimizer.workload import Workload, build_workload

__all__ = [
    "SENSITIVITY_FORMAT",
    "SensitivityConfig",
    "SensitivityEntry",
    "SensitivityTable",
    "Trial",
    "analyze_sensitivity",
]

SENSITIVITY_FORMAT = "diffkiln.sensitivity"
SENSITIVITY_VERSION = 1


@dataclass(frozen=True)
class SensitivityConfig:
    """How to measure sensitivities.

    Attributes:
        weight_candidates: weight bit-widths to score, each below 16 (16, FP, costs no error).
            Default (2, 4, 8).
        act_candidates: activation bit-widths to score (8; 16 is FP). Default (8,).
        prompts: how many of the calibration prompts (with their seeds) the trials use.
            Default 4.
        quality_steps: sampler steps whose recorded denoiser inputs score quality layers.
            Default 5.
        workers: processes to shard the trials over (each loads the model). Default 1.
        cache_dir: where results are cached and resumed from; None disables caching. Default None.
        progress: show a progress bar with ETA. Default True.
        group_size: score 4-, 3- and 2-bit weights with two-level groups of this many inputs, as
            they will be stored (:class:`~diffkiln.core.plan.WeightSpec`). Default None
            (per channel).
    """

    weight_candidates: tuple[int, ...] = (2, 4, 8)
    act_candidates: tuple[int, ...] = (8,)
    prompts: int = 4
    quality_steps: int = 5
    workers: int = 1
    cache_dir: Path | None = None
    progress: bool = True
    group_size: int | None = None

    def __post_init__(self) -> None:
        bad_w = [b for b in self.weight_candidates if b not in (2, 3, 4, 8)]
        if not self.weight_candidates or bad_w:
            raise ValueError(
                f"weight candidates to score must be among 2, 3, 4, 8 (16 is FP), got {self.weight_candidates}"
            )
        if any(b != 8 for b in self.act_candidates):
            raise ValueError(f"activation candidates to score must be 8 (16 is FP), got {self.act_candidates}")
        for name in ("prompts", "quality_steps", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def key_fields(self) -> dict[str, Any]:
        """The settings that change the results (part of the cache key)."""
        return {
            "weight_candidates": sorted(self.weight_candidates),
            "act_candidates": sorted(self.act_candidates),
            "prompts": self.prompts,
            "quality_steps": self.quality_steps,
            # Per-channel tables keep their old keys (and caches); grouped ones get their own.
            **({"group_size": self.group_size} if self.group_size is not None else {}),
        }


@dataclass(frozen=True)
class Trial:
    """One measurement: ``layer`` quantized alone, its ``target`` ("weight" or "act") at ``bits``."""

    layer: str
    target: str
    bits: int

    def key(self) -> str:
        """A stable text key, e.g. ``"down.0.attn2.to_k|weight|4"``."""
        return f"{self.layer}|{self.target}|{self.bits}"


@dataclass(frozen=True)
class SensitivityEntry:
    """One measured trial.

    Attributes:
        layer: the layer's name.
        role: its group ("content" or "quality").
        target: "weight" or "act".
        bits: the bit-width tried.
        metric: "ssim" (content) or "sqnr_db" (quality).
        value: the measurement (SSIM in [-1, 1]; SQNR in dB, ``inf`` when exact).
    """

    layer: str
    role: str
    target: str
    bits: int
    metric: str
    value: float

    @property
    def error(self) -> float:
        """The damage on a common footing, >= 0: 1 - SSIM, or the noise-to-signal power ratio."""
        if self.metric == "ssim":
            return max(0.0, 1.0 - self.value)
        return 0.0 if math.isinf(self.value) else 10.0 ** (-self.value / 10.0)


@dataclass(frozen=True)
class SensitivityTable:
    """Every layer's measured sensitivities.

    Attributes:
        roles: layer -> its group.
        params: layer -> its weight parameters.
        entries: the measurements.
        settings: how they were measured (the cache key's inputs).
        reused: trials read back from the cache (this or an earlier, possibly sharded, run)
            instead of measured. Default 0.
        ranks: torch.distributed ranks the trials were sharded over. Default 1.
    """

    roles: dict[str, LayerRole]
    params: dict[str, int]
    entries: tuple[SensitivityEntry, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    reused: int = 0
    ranks: int = 1

    def error(self, layer: str, target: str, bits: int) -> float:
        """The measured error of ``layer`` with its ``target`` at ``bits`` (0 at 16 bits).

        Raises:
            KeyError: that trial was not measured; the message names the measured bit-widths.
        """
        if bits >= 16:
            return 0.0
        for e in self.entries:
            if e.layer == layer and e.target == target and e.bits == bits:
                return e.error
        have = sorted(e.bits for e in self.entries if e.layer == layer and e.target == target)
        raise KeyError(f"no {target} sensitivity of {layer!r} at {bits} bits; measured: {have}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with format and version."""
        return {
            "format": SENSITIVITY_FORMAT,
            "version": SENSITIVITY_VERSION,
            "settings": self.settings,
            "layers": [{"name": n, "role": r.value, "params": self.params[n]} for n, r in self.roles.items()],
            # JSON has no infinity: an exact trial (infinite SQNR) is written as null.
            "entries": [{**e.__dict__, "value": None if math.isinf(e.value) else e.value} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityTable:
        """Rebuild a table from :meth:`to_dict` output.

        Raises:
            ValueError: another format or version, or a malformed entry.
        """
        if d.get("format") != SENSITIVITY_FORMAT or d.get("version") != SENSITIVITY_VERSION:
            raise ValueError(
                f"not a diffkiln sensitivity table of version {SENSITIVITY_VERSION} "
                f"(format {d.get('format')!r}, version {d.get('version')!r})"
            )
        try:
            roles = {lay["name"]: LayerRole(lay["role"]) for lay in d["layers"]}
            params = {lay["name"]: int(lay["params"]) for lay in d["layers"]}
            entries = tuple(
                SensitivityEntry(**{**e, "value": math.inf if e["value"] is None else float(e["value"])})
                for e in d["entries"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed sensitivity table: {exc}") from exc
        return cls(roles, params, entries, dict(d.get("settings", {})))

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: name, role, params, and each trial's value as ``"<target><bits>"``."""
        out: dict[str, dict[str, Any]] = {
            n: {"layer": n, "role": r.value, "params": self.params[n]} for n, r in self.roles.items()
        }
        for e in self.entries:
            out[e.layer][f"{'w' if e.target == 'weight' else 'a'}{e.bits}"] = e.value
        return list(out.values())


# --- the trials, in this process or in workers -----------------------------------------------------


@dataclass
class _Trials:
    """The reference run and everything a trial needs (one per process)."""

    workload: Workload
    roles: dict[str, LayerRole]
    sims: dict[str, LayerSim]
    group_size: int | None = None

    def measure(self, trial: Trial) -> SensitivityEntry:
        choice = (
            SimChoice(weight_bits=trial.bits, group_size=self.group_size)
            if trial.target == "weight"
            else SimChoice(act_bits=trial.bits)
        )
        role = self.roles[trial.layer]
        w = self.workload
        with simulated(w.denoiser, {trial.layer: choice}, self.sims):
            if role is LayerRole.CONTENT:
                value, metric = float(np.mean(w.scores(w.final()))), w.metric
            else:
                value, metric = w.replay_sqnr(), "sqnr_db"
        return SensitivityEntry(trial.layer, role.value, trial.target, trial.bits, metric, value)


_WORKER: _Trials | None = None


def _worker_init(reload: Callable[[], Any], stats: CalibrationStats, args: tuple[Any, ...]) -> None:
    global _WORKER
    torch.set_num_threads(1)  # the processes share the cores
    roles, sims, prompts, quality_steps, group_size = args
    model = reload()
    _WORKER = _Trials(build_workload(model, stats, prompts, quality_steps), roles, sims, group_size)


def _worker_measure(trial: Trial) -> SensitivityEntry:
    if _WORKER is None:
        raise RuntimeError("sensitivity worker used before its initializer ran")
    return _WORKER.measure(trial)


# --- the resumable result log ----------------------------------------------------------------------


class _ResultLog:
    """A JSON-lines file: a header line (format, key), then one measured entry per line.

    A line cut short by an interruption is dropped when the file is reopened.
    """

    def __init__(self, path: Path | None, header: dict[str, Any]):
        self.path = path
        self.header = header

    def _entries(self, complete: bytes) -> dict[str, SensitivityEntry] | None:
        """The entries of the whole lines ``complete``; None when they are not of this key."""
        lines = complete.decode("utf-8").splitlines()
        if not lines or json.loads(lines[0]) != self.header:
            return None
        entries = (SensitivityEntry(**json.loads(line)) for line in lines[1:])
        return {Trial(e.layer, e.target, e.bits).key(): e for e in entries}

    def read(self) -> dict[str, SensitivityEntry]:
        """The complete entries of a file another process writes (left as it is); {} when it is
        missing or of another key."""
        if self.path is None or not self.path.is_file():
            return {}
        raw = self.path.read_bytes()
        return self._entries(raw[: raw.rfind(b"\n") + 1]) or {}

    def load(self) -> dict[str, SensitivityEntry]:
        """This process's own file, repaired: a partial last line is cut, a file of another key
        removed."""
        if self.path is None or not self.path.is_file():
            return {}
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # drop a partial last line
        if len(complete) != len(raw):
            self.path.write_bytes(complete)
        done = self._entries(complete)
        if done is None:
            self.path.unlink()
            return {}
        return done

    def append(self, entry: SensitivityEntry) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps(self.header) + "\n")
            f.write(json.dumps(entry.__dict__) + "\n")
            f.flush()
            os.fsync(f.fileno())


# --- the verb -------------------------------------------------------------------------------------


def _trials(
    candidates: Mapping[str, Sequence[int]], act_layers: Sequence[str], config: SensitivityConfig
) -> list[Trial]:
    out = [Trial(n, "weight", b) for n, bits in candidates.items() for b in sorted(bits) if b < 16]
    out += [Trial(n, "act", b) for n in act_layers for b in config.act_candidates]
    return out


def analyze_sensitivity(
    model: Any,
    stats: CalibrationStats,
    base_plan: Plan,
    roles: Mapping[str, LayerRole],
    sims: Mapping[str, LayerSim],
    candidates: Mapping[str, Sequence[int]],
    config: SensitivityConfig,
    reload: Callable[[], Any] | None = None,
    on_result: Callable[[SensitivityEntry], None] | None = None,
    inputs: Any = None,
) -> SensitivityTable:
    """Measure each layer's sensitivity to each candidate bit-width, resuming cached results.

    Args:
        model: the FP pipeline or bare module (left unchanged).
        stats: its calibration statistics (inputs, seeds, steps, guidance are reused).
        base_plan: the W8A8 plan whose activation grids, smoothing and BOS rows the trials use.
        roles: layer -> content or quality group (:func:`diffkiln.optimizer.roles.layer_roles`).
        sims: layer -> simulation inputs (:func:`diffkiln.optimizer.simulate.layer_sims`).
        candidates: layer -> weight bit-widths to score (16 is skipped: it costs nothing).
            Activations are scored for the layers that have a LayerSim.
        config: the measurement settings.
        reload: builds a fresh copy of the model in a worker process (picklable); needed when
            ``config.workers`` > 1.
        on_result: called with each new measurement, after it is saved. Default None.
        inputs: a bare module's calibration calls (the workload drives it with them). Default None.

    Raises:
        ValueError: workers > 1 without ``reload``.
    """
    if config.workers > 1 and reload is None:
        raise ValueError("sensitivity workers load the model themselves: pass a picklable reload callable")
    settings = stats.settings
    act_layers = [n for n in candidates if n in sims]
    trials = _trials(candidates, act_layers, config)
    header = {
        "format": SENSITIVITY_FORMAT,
        "version": SENSITIVITY_VERSION,
        "model": stats.model_hash,
        "calibration": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
        "plan": hashlib.sha256(base_plan.to_json().encode()).hexdigest()[:16],
        "roles": hashlib.sha256(json.dumps({n: r.value for n, r in roles.items()}).encode()).hexdigest()[:16],
        **config.key_fields(),
    }
    key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]
    rank, world = rank_world()
    folder = config.cache_dir / "sensitivity" if config.cache_dir else None
    name = f"sens-{key}.jsonl" if world == 1 else f"sens-{key}.shard-{rank}.jsonl"
    log = _ResultLog(folder / name if folder else None, header)
    done = log.load()
    if folder is not None:  # what other processes or an earlier sharded run finished
        for other in sorted(folder.glob(f"sens-{key}*.jsonl")):
            if other.name != name:
                done.update(_ResultLog(other, header).read())
    barrier()  # every rank has read the shards before any appends to its own
    reused = sum(t.key() in done for t in trials)
    todo = [t for t in trials if t.key() not in done][rank::world]
    bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc="mixed search: sensitivity", unit="trial",
               disable=not config.progress)  # fmt: skip
    ctx_args = (dict(roles), dict(sims), config.prompts, config.quality_steps, config.group_size)
    try:
        for entry in _run(model, stats, todo, ctx_args, config.workers, reload, inputs):
            log.append(entry)
            done[Trial(entry.layer, entry.target, entry.bits).key()] = entry
            bar.update(1)
            if on_result is not None:
                on_result(entry)
    finally:
        bar.close()
    if world > 1:  # every rank takes the others' results
        mine = [done[t.key()] for t in todo]
        for entries_of_rank in all_gather_objects(mine):
            for e in entries_of_rank:
                done[Trial(e.layer, e.target, e.bits).key()] = e
    entries = tuple(done[t.key()] for t in trials)
    params = {lp.name: lp.params for lp in base_plan.layers if lp.name in candidates}
    info = {**header, "trials": len(trials)}
    return SensitivityTable({n: roles[n] for n in candidates}, params, entries, info, reused, world)


def _run(
    model: Any,
    stats: CalibrationStats,
    todo: list[Trial],
    ctx_args: tuple[Any, ...],
    workers: int,
    reload: Callable[[], Any] | None,
    inputs: Any,
) -> Iterator[SensitivityEntry]:
    if not todo:
        return
    roles, sims, prompts, quality_steps, group_size = ctx_args
    if workers <= 1 or reload is None:
        trials = _Trials(build_workload(model, stats, prompts, quality_steps, inputs), roles, sims, group_size)
        for trial in todo:
            yield trials.measure(trial)
        return
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    init: Callable[..., None] = _worker_init
    with ProcessPoolExecutor(workers, mp_context=mp, initializer=init, initargs=(reload, stats, ctx_args)) as pool:
        yield from pool.map(_worker_measure, todo, chunksize=1)
