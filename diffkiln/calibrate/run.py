"""The ``calibrate`` verb: run the FP pipeline (or drive a bare module) and record its statistics.

For a pipeline: the denoiser is found (:func:`diffkiln.core.pipelines.choose_denoiser`), the
per-sample inputs come from a source (:mod:`diffkiln.calibrate.sources`: prompts, images, class
labels, or none), and the user's call arguments go to every call. Before the run, the sampler's
first denoiser call is captured (the pipeline stops there) and its data flow traced
(:mod:`diffkiln.calibrate.dataflow`); for text pipelines, two long probe prompts are captured the
same way, so that only text positions that stay the same when every position holds a real token
count as prompt-invariant (BOS), never padding. Results are cached on disk, keyed by a hash of
the weights, the inputs and the settings.

For a bare module: the calls are the user's (a list of keyword-argument dicts, or a callable that
drives the module); nothing is cached and no text position is verified (no tokens to probe).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffkiln.calibrate.attention_stats import AttentionRecorder, attention_recording
from diffkiln.calibrate.blocks import find_blocks
from diffkiln.calibrate.cache_stats import CacheRecorder, cache_recording
from diffkiln.calibrate.config import CalibrationConfig
from diffkiln.calibrate.dataflow import (
    DataflowGraph,
    batch_size,
    bind_call,
    nan_padded,
    sequence_tensor,
    trace_dataflow,
)
from diffkiln.calibrate.pipeline_calls import call_pipeline
from diffkiln.calibrate.prompts import PROBE_PROMPTS
from diffkiln.calibrate.recorder import Recorder, recording
from diffkiln.calibrate.sources import (
    CallSource,
    PromptSource,
    pipeline_call_hints,
    source_for,
)
from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.calibrate.token_grids import find_token_grids
from diffkiln.core.distributed import all_gather_objects, rank_world
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.pipelines import (
    DenoiserChoice,
    accepted_call_kwargs,
    choose_denoiser,
    denoiser_by_calls,
    pipeline_weight_hash,
    step_callback_kwargs,
)

__all__ = ["ModuleInputs", "calibrate", "pipeline_call_kwargs"]

ModuleInputs = Sequence[dict[str, Any]] | Callable[[nn.Module], Any]
"""A bare module's calibration calls: keyword-argument dicts, one per call, or a callable that
drives the module (e.g. the user's own sampling loop)."""

_REL_TOL = 1e-6


class _Captured(Exception):
    """Raised by a pre-hook to stop a pipeline at the denoiser's first call, carrying its inputs."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("first denoiser call captured")
        self.args, self.kwargs = args, kwargs


def _capture_first_call(denoiser: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of the denoiser's first call when ``run()`` runs; ``run`` stops right there."""

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, dict(kwargs))

    with scoped_hooks() as hooks, torch.no_grad():
        hooks.add_forward_pre_hook("diffkiln.calib.capture", denoiser, stop)
        try:
            run()
        except _Captured as cap:
            return cap.args, cap.kwargs
    raise InvalidInputError(f"the run never called the denoiser ({type(denoiser).__name__}); name it with --denoiser")


def pipeline_call_kwargs(pipe: Any, config: CalibrationConfig, output_type: str = "latent") -> dict[str, Any]:
    """The arguments every calibration call of ``pipe`` gets besides its samples and generators:
    steps, guidance and output type where the pipeline takes them, and the user's call arguments
    (each must be one the pipeline takes).

    Raises:
        InvalidInputError: a call argument the pipeline does not take.
    """
    defaults: dict[str, Any] = {"num_inference_steps": config.steps, "output_type": output_type}
    if config.guidance is not None:
        defaults["guidance_scale"] = config.guidance
    return {**accepted_call_kwargs(pipe, defaults), **accepted_call_kwargs(pipe, dict(config.call_kwargs), strict=True)}


def _verified_positions(rows: torch.Tensor, probes: torch.Tensor | None) -> list[int]:
    """Positions whose row is the same in every calibration row and every probe row, in an input
    that does vary with the prompt elsewhere (text; not a prompt-independent conditioning row).
    A NaN row is a position its sample does not have (per-sample sequences of other lengths): a
    position counts where the full-length probe rows all have it, compared over the rows that do."""
    if rows.numel() == 0 or probes is None or probes.shape[2:] != rows.shape[2:]:
        return []
    allrows = nan_padded([rows, probes])
    present = ~allrows.isnan().any(-1)  # (row, position)
    full = present[rows.shape[0] :].all(1)  # the probe prompts' rows (not a shorter negative prompt's)
    if not bool(full.any()):
        return []
    covered = present[rows.shape[0] :][full].all(0) & present[: rows.shape[0]].any(0)
    high = torch.where(present.unsqueeze(-1), allrows, -torch.inf).amax(0)
    low = torch.where(present.unsqueeze(-1), allrows, torch.inf).amin(0)
    spread = torch.where(present.sum(0) > 1, (high - low).abs().amax(-1), 0.0)
    tol = _REL_TOL * (float(allrows.nan_to_num(0.0).abs().amax()) or 1.0)
    if float(spread.max()) <= tol:
        return []  # nothing varies with the prompt: not a text sequence
    return [i for i, (v, ok) in enumerate(zip(spread.tolist(), covered.tolist(), strict=True)) if ok and v <= tol]


def _bos(graph: DataflowGraph, sequences: dict[str, torch.Tensor], probes: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rows in sequences.items():
        positions = _verified_positions(rows, probes.get(name))
        out[name] = {
            "positions": positions,
            "evidence": (
                f"rows identical across {rows.shape[0]} calibration rows and {probes[name].shape[0]} rows of two "
                "full-length probe prompts (every position a real token)"
                if name in probes
                else "not verified: no probe prompts"
            ),
        }
    return out


@dataclass
class _Subject:
    """One model recorded in a pipeline run: the denoiser, or an expert of its class."""

    choice: DenoiserChoice
    graph: DataflowGraph
    probes: dict[str, torch.Tensor]
    rec: Recorder
    config: CalibrationConfig  # the settings its statistics record (an expert's name its own denoiser)


def _subject(
    choice: DenoiserChoice, config: CalibrationConfig, source: CallSource, first_batch: list[dict[str, Any]],
    call: Callable[..., Any], hints: Callable[[], Any],
) -> tuple[_Subject, tuple[Any, ...], dict[str, Any]]:
    """Trace ``choice``'s model at its first call and set up its recorder (and BOS probes); also
    that first call's arguments."""
    module = choice.module
    args, kwargs = _capture_first_call(module, lambda: call(first_batch, config.seed))
    # The capture stops before the model runs: its first run is the trace's, which names a
    # failure in the model's code (a size the model cannot take) as a pipeline call does.
    with hints():
        graph = trace_dataflow(module, args, kwargs)
    probes: dict[str, torch.Tensor] = {}
    if config.bos_probe and isinstance(source, PromptSource) and graph.sequence_inputs:
        probe_samples = [{**first_batch[0], "prompt": p} for p in PROBE_PROMPTS]
        pargs, pkwargs = _capture_first_call(module, lambda: call(probe_samples, config.seed))
        bound = bind_call(module, pargs, pkwargs)
        batch = batch_size(bound.get(graph.main_input))
        stacked = {k: sequence_tensor(bound.get(k), batch) for k in graph.sequence_inputs}
        probes = {k: t.detach().float().cpu() for k, t in stacked.items() if t is not None}
    rec = Recorder(graph, config.samples_per_step, config.seed, choice.name)
    return _Subject(choice, graph, probes, rec, config), args, kwargs


def _run_pipeline(
    pipe: Any, source: CallSource, config: CalibrationConfig, model_hash: str
) -> list[CalibrationStats]:
    """The denoiser's statistics and, where the sampler runs experts of its class (Wan 2.2's
    ``transformer_2``), each expert's, recorded in the same calls (as each would be alone)."""
    common = pipeline_call_kwargs(pipe, config)
    pipe.set_progress_bar_config(disable=True)
    n = len(source)

    def call(samples: list[dict[str, Any]], first_seed: int, before_each: Any = None, **extra: Any) -> Any:
        gens = [torch.Generator().manual_seed(first_seed + i) for i in range(len(samples))]
        kwargs = {**common, **extra}
        with pipeline_call_hints(pipe, samples, int(kwargs.get("num_inference_steps", config.steps)), kwargs):
            return call_pipeline(pipe, samples, gens, kwargs, before_each)

    first_batch = [source.sample(i) for i in range(min(config.batch_size, n))]
    if config.denoiser is not None:
        choice = choose_denoiser(pipe, config.denoiser)
    else:

        def short(steps: int) -> Any:
            # Every step, whatever the strength of an image-to-image call: the counts must grow with the steps.
            probe = {"num_inference_steps": steps, "strength": 1.0}
            return call(first_batch[:1], config.seed, **accepted_call_kwargs(pipe, probe))

        choice = denoiser_by_calls(pipe, short)
    if choice.experts and (config.cache_stats or config.attention_stats):
        raise InvalidInputError(
            f"{choice.name} runs only some of the sampler steps and {', '.join(choice.experts)} the others (an expert "
            "split, as Wan 2.2's); cache schedules and sparse masks are searched for a denoiser that runs at every "
            "step: build without --cache-budget and --attn-density"
        )
    denoiser = choice.module

    def hints() -> Any:
        return pipeline_call_hints(pipe, first_batch, config.steps or 0, common)

    main, args, kwargs = _subject(choice, config, source, first_batch, call, hints)
    subjects = [main] + [
        _subject(choose_denoiser(pipe, name), replace(config, denoiser=name), source, first_batch, call, hints)[0]
        for name in choice.experts
    ]
    rank, world = rank_world()
    # The cache and attention proxies come from the first batch, which rank 0 runs.
    cache_rec = CacheRecorder(find_blocks(denoiser, args, kwargs), config.seed) if config.cache_stats else None
    attn_rec = AttentionRecorder(config.attention_block) if config.attention_stats else None
    for first_batch_only in (cache_rec, attn_rec) if rank != 0 else ():
        if first_batch_only is not None:
            first_batch_only.active = False
    batches = list(range(0, n, config.batch_size))
    mine = [b for i, b in enumerate(batches) if i % world == rank]  # batches dealt over the ranks
    total = sum(min(config.batch_size, n - b) for b in mine)
    bar = tqdm(total=total * config.steps, desc="calibration", unit="sample-step", disable=not config.progress)
    with (
        bar,  # closed on a failure too, so that an error line starts a line of its own
        ExitStack() as recordings,
        _maybe_cache_recording(denoiser, cache_rec),
        _maybe_attention_recording(denoiser, attn_rec),
        torch.no_grad(),
    ):
        for subject in subjects:
            recordings.enter_context(recording(subject.choice.module, subject.rec))
        for start in mine:
            samples = [source.sample(i) for i in range(start, min(start + config.batch_size, n))]
            for subject in subjects:
                subject.rec.start_call(start // config.batch_size)

            size = [len(samples)]  # samples in the running call (one, for a pipeline that takes one input per call)

            def on_step(_p: Any, _i: int, _t: Any, kw: dict[str, Any], size: list[int] = size) -> dict[str, Any]:
                bar.update(size[0])
                return kw

            def before_each(count: int, size: list[int] = size) -> None:
                size[0] = count

            call(samples, config.seed + start, before_each, **step_callback_kwargs(pipe, on_step))
            for first_batch_only in (cache_rec, attn_rec):
                if first_batch_only is not None:
                    first_batch_only.active = False  # the first batch is enough for the proxies
        bar.total = bar.n  # an image-to-image call runs only its strength's share of the steps
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    steps_run = len(timesteps) if timesteps is not None else config.steps
    cache, attention = None, None
    if rank == 0:
        cache = cache_rec.finish(steps_run) if cache_rec is not None else None
        if attn_rec is not None:

            def noise_only(seed: int) -> Any:  # the same conditioning, other initial noise
                return call(
                    first_batch[:1], seed, **accepted_call_kwargs(pipe, {"num_inference_steps": 2, "strength": 1.0})
                )

            attention = attn_rec.finish(steps_run, find_token_grids(denoiser, noise_only))
    if world > 1:  # every rank takes in every rank's batches; rank 0's proxies
        gathered = all_gather_objects(([sub.rec.state() for sub in subjects], cache, attention))
        for i, subject in enumerate(subjects):
            subject.rec.merge([g[0][i] for g in gathered])
        cache, attention = gathered[0][1], gathered[0][2]
    out = []
    for subject in subjects:
        if subject.rec.calls == 0:
            name = subject.choice.name or "the denoiser"
            raise InvalidInputError(f"the sampler never called {name}; name the denoiser with --denoiser")
        sequences = subject.rec.sequence_tensors()
        main_one = subject is main
        out.append(CalibrationStats(
            layers=subject.rec.finish(),
            timesteps=subject.rec.timesteps,
            model_hash=model_hash,
            settings={**subject.config.key_fields(), "source": source.describe(),
                      "denoiser_evidence": subject.choice.evidence, "experts": list(subject.choice.experts)},
            sequences=sequences,
            graph=subject.graph,
            bos=_bos(subject.graph, sequences, subject.probes),
            denoiser=subject.choice.name,
            cache=cache if main_one else None,
            attention=attention if main_one else None,
        ))  # fmt: skip
    return out


@contextmanager
def _maybe_attention_recording(denoiser: nn.Module, recorder: AttentionRecorder | None) -> Iterator[None]:
    if recorder is None:
        yield
        return
    with attention_recording(denoiser, recorder):
        yield


@contextmanager
def _maybe_cache_recording(denoiser: nn.Module, recorder: CacheRecorder | None) -> Iterator[None]:
    if recorder is None:
        yield
        return
    with cache_recording(denoiser, recorder):
        yield


def _run_module(module: nn.Module, inputs: ModuleInputs, config: CalibrationConfig) -> CalibrationStats:
    if callable(inputs):
        drive = inputs
        args, kwargs = _capture_first_call(module, lambda: drive(module))
    else:
        calls = list(inputs)
        if not calls or not all(isinstance(c, dict) for c in calls):
            raise InvalidInputError("module calibration needs a non-empty list of keyword-argument dicts, one per call")

        def drive(m: nn.Module) -> None:
            for kw in calls:
                m(**kw)

        args, kwargs = (), dict(calls[0])
    graph = trace_dataflow(module, args, kwargs)
    rec = Recorder(graph, config.samples_per_step, config.seed)
    rec.start_call()
    with recording(module, rec), torch.no_grad():
        drive(module)
    if rec.calls == 0:
        raise InvalidInputError("the calibration inputs never called the module")
    return CalibrationStats(
        layers=rec.finish(),
        timesteps=rec.timesteps,
        model_hash="",
        settings={"module_calls": rec.calls, "samples_per_step": config.samples_per_step, "seed": config.seed},
        sequences=rec.sequence_tensors(),
        graph=graph,
        bos={},
        denoiser="",
    )


def calibrate(
    target: Any,
    config: CalibrationConfig | None = None,
    *,
    inputs: ModuleInputs | None = None,
    source: CallSource | None = None,
) -> CalibrationStats:
    """Record the activation statistics of a pipeline's denoiser, or of a bare module.

    Args:
        target: a diffusers pipeline, or an ``nn.Module`` (with ``inputs``).
        config: calibration settings; for a module, only ``samples_per_step`` and ``seed`` apply
            (default: those defaults).
        inputs: a module's calls (:data:`ModuleInputs`); pipelines take none.
        source: a pipeline's per-sample inputs; None picks them from its signature
            (:func:`diffkiln.calibrate.sources.source_for`) with ``config.prompts``.

    Returns:
        The statistics; for a pipeline, from the disk cache when the same weights, inputs and
        settings were calibrated before. Under torch.distributed every rank calls this: the
        batches are dealt over the ranks, each rank gets the merged statistics (those of one
        process that ran every batch), and rank 0 writes the cache.

    Raises:
        InvalidInputError: bad inputs or settings, a call argument the pipeline does not take, or
            a denoiser the sampler never calls.
    """
    if isinstance(target, nn.Module):
        if inputs is None:
            raise InvalidInputError("calibrating a bare module needs inputs: a list of forward kwargs or a callable")
        return _run_module(target, inputs, config or CalibrationConfig(samples=1))
    if inputs is not None:
        raise InvalidInputError("a pipeline is calibrated from its own calls; pass a source, not inputs")
    if config is None:
        raise InvalidInputError("calibrating a pipeline needs a CalibrationConfig (prompts or samples)")
    source = source or source_for(
        target,
        config.prompts,
        config.count,
        config.seed,
        dict(config.call_kwargs),
        config.inputs,
    )
    model_hash = pipeline_weight_hash(target)
    cache_path = _cache_path(config, model_hash, source)
    # Under torch.distributed the ranks agree: all read the cache, or all run (each its share of
    # the batches) and rank 0 writes it.
    if cache_path is not None and all(all_gather_objects(cache_path.is_file())):
        return CalibrationStats.load(cache_path)
    stats, *experts = _run_pipeline(target, source, config, model_hash)
    if cache_path is not None and rank_world()[0] == 0:
        stats.save(cache_path)
        # The experts recorded in the same run are cached as a calibration of each alone would be:
        # ``calibrate`` with ``denoiser=`` an expert then reads them instead of running again.
        for expert in experts:
            path = _cache_path(replace(config, denoiser=expert.denoiser), model_hash, source)
            if path is not None:
                expert.save(path)
    return stats


def _cache_path(config: CalibrationConfig, model_hash: str, source: CallSource) -> Path | None:
    """Where the statistics of ``config`` on these weights and inputs are cached; None without a cache."""
    key_data = {"model": model_hash, **config.key_fields(), "source": source.describe()}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return config.cache_dir / f"calib-{key}.safetensors" if config.cache_dir else None
