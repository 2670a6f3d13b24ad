"""The FP model's reference run that searches measure candidates against.

A workload runs the model on a few calibration samples and keeps two things: the *final output*
of each sample (a pipeline's images, video frames or audio; a bare module's outputs) and a few of
the denoiser calls it made (evenly spaced over the run), to replay. A search then scores a change
(a layer quantized alone, a whole candidate plan) by the final outputs (SSIM for images and
frames, SQNR for audio and module outputs) or by the replayed denoiser outputs (SQNR).

* :class:`PipelineWorkload`: the calibration samples re-created from the statistics' recorded
  source (prompts, synthetic images, class labels) with their seeds;
* :class:`ModuleWorkload`: a bare module driven by the user's own calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.calibrate.config import CalibrationConfig
from diffkiln.calibrate.pipeline_calls import call_pipeline
from diffkiln.calibrate.run import ModuleInputs, pipeline_call_kwargs
from diffkiln.calibrate.sources import source_from_description
from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.hooks import output_sample, output_tensors, recording_calls, scoped_hooks
from diffkiln.core.metrics import sqnr_db, ssim
from diffkiln.core.pipelines import find_denoiser, pipeline_media

__all__ = ["CalibrationCalls", "ModuleWorkload", "PipelineWorkload", "Workload", "build_workload", "output_tensor"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


def output_tensor(out: Any) -> torch.Tensor:
    """A denoiser output as one detached float tensor (:func:`diffkiln.core.hooks.output_sample`)."""
    return output_sample(out).detach().float()


def _predictions(out: Any) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in output_tensors(out)])


@dataclass(frozen=True)
class CalibrationCalls:
    """Calibration samples of a pipeline's statistics, re-created with their seeds.

    Attributes:
        samples: the per-sample inputs (prompts, images, class labels).
        common: the other call arguments the calibration used, with the requested output type.
        seed: the base seed; sample i is generated with seed + i.
    """

    samples: list[dict[str, Any]]
    common: dict[str, Any]
    seed: int

    @classmethod
    def of(cls, pipe: Any, stats: CalibrationStats, samples: int, output_type: str,
           fresh_noise: bool = False, first: int = 0) -> CalibrationCalls:  # fmt: skip
        """From the statistics' recorded settings and source: samples ``first`` onwards, at most
        ``samples`` of them. ``fresh_noise``: seeds that calibration did not use (the same inputs,
        other initial noise), to measure what the statistics were not fitted on.

        Raises:
            InvalidInputError: statistics of a bare module (no recorded pipeline inputs), or
                ``first`` not one of the source's samples.
        """
        settings = stats.settings
        if "source" not in settings:
            raise InvalidInputError("the calibration statistics record no pipeline inputs; calibrate a pipeline")
        config = CalibrationConfig.from_key_fields(settings)
        source = source_from_description(settings["source"], files=True)  # this calibration's own record
        if not 0 <= first < len(source):
            raise InvalidInputError(f"calibration sample {first} does not exist: the calibration has {len(source)}")
        picked = [source.sample(i) for i in range(first, min(first + samples, len(source)))]
        # Calibration seeded sample i with seed + i; fresh noise starts past every seed it used.
        seed = (config.seed + len(source) if fresh_noise else config.seed) + first
        return cls(picked, pipeline_call_kwargs(pipe, config, output_type=output_type), seed)

    def run(self, pipe: Any) -> Any:
        """One pipeline call on every sample, seeded as calibration seeded it; returns its output."""
        gens = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.samples))]
        with torch.no_grad():
            return call_pipeline(pipe, self.samples, gens, self.common)


@dataclass
class Workload:
    """A reference run: final outputs per sample and replayable denoiser calls.

    Attributes:
        denoiser: the denoiser the calls go to.
        metric: how final outputs are scored: ``"ssim"`` (images, frames) or ``"sqnr_db"``.
        reference: the FP final output of each sample.
        calls: the replayed denoiser calls.
        reference_calls: the FP denoiser output of each replayed call.
    """

    denoiser: nn.Module
    metric: str
    reference: list[np.ndarray] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    reference_calls: list[torch.Tensor] = field(default_factory=list)

    def final(self, model: Any | None = None) -> list[np.ndarray]:
        """The final output of each sample, run on ``model`` (default: the workload's own)."""
        raise NotImplementedError

    def replay(self, denoiser: nn.Module | None = None) -> list[torch.Tensor]:
        """The recorded calls run again on ``denoiser`` (default: the workload's own): each call's
        output tensors flattened into one (every prediction of a model that denoises several
        latents, as LTX-2's video and audio, counts)."""
        den = denoiser or self.denoiser
        with torch.no_grad():
            return [_predictions(den(*a, **k)) for a, k in self.calls]

    def replay_sqnr(self, denoiser: nn.Module | None = None) -> float:
        """SQNR (dB) of the replayed calls' outputs against the FP ones, pooled."""
        got = self.replay(denoiser)
        ref = torch.cat([o.flatten() for o in self.reference_calls]).numpy()
        return sqnr_db(ref, torch.cat([o.flatten() for o in got]).numpy())

    def scores(self, got: list[np.ndarray]) -> np.ndarray:
        """Per-sample similarity of ``got`` to the reference, higher is better (``metric``)."""
        if self.metric == "ssim":
            vals = [float(np.mean([ssim(r, g) for r, g in zip(rs, gs, strict=True)]))
                    for rs, gs in zip(self.reference, got, strict=True)]  # fmt: skip
        else:
            vals = [min(sqnr_db(r, g), 200.0) for r, g in zip(self.reference, got, strict=True)]
        return np.asarray(vals, dtype=np.float64)

    def _pick(self, recorded: list[Call], count: int) -> None:
        picks = sorted({round(i * (len(recorded) - 1) / max(count - 1, 1)) for i in range(count)})
        self.calls = [recorded[i] for i in picks]
        self.reference_calls = self.replay()


class PipelineWorkload(Workload):
    """A pipeline run on the first ``samples`` calibration samples, with their seeds."""

    def __init__(self, pipe: Any, stats: CalibrationStats, samples: int, replay_calls: int) -> None:
        self.pipe = pipe
        # Final outputs decoded as arrays: the media the metrics compare.
        self.sampling = CalibrationCalls.of(pipe, stats, samples, output_type="np")
        self.n = len(self.sampling.samples)
        pipe.set_progress_bar_config(disable=True)
        denoiser = find_denoiser(pipe, stats.denoiser or None)
        with recording_calls("diffkiln.workload.record", denoiser) as recorded:
            media = self._run(pipe)
        super().__init__(denoiser, "sqnr_db" if media.kind == "audios" else "ssim")
        self.reference = self._split(media)
        self._pick(recorded, replay_calls)

    def _run(self, pipe: Any) -> Any:
        return pipeline_media(self.sampling.run(pipe))

    def _split(self, media: Any) -> list[np.ndarray]:
        if media.kind == "audios":
            return media.items()
        arr = media.image_array()
        per = arr.shape[0] // self.n
        return [arr[i * per : (i + 1) * per] for i in range(self.n)]

    def final(self, model: Any | None = None) -> list[np.ndarray]:
        return self._split(self._run(model if model is not None else self.pipe))


class ModuleWorkload(Workload):
    """A bare module driven by the user's calibration inputs; its final outputs are its call outputs."""

    def __init__(self, module: nn.Module, inputs: ModuleInputs, replay_calls: int) -> None:
        self.module = module
        self.drive: Callable[[nn.Module], Any]
        if callable(inputs):
            self.drive = inputs
        else:
            calls = list(inputs)

            def drive(m: nn.Module) -> None:
                for kw in calls:
                    m(**kw)

            self.drive = drive
        super().__init__(module, "sqnr_db")
        self.reference = self.final()
        with recording_calls("diffkiln.workload.record", module) as recorded, torch.no_grad():
            self.drive(module)
        self._pick(recorded, replay_calls)

    def final(self, model: Any | None = None) -> list[np.ndarray]:
        target = model if model is not None else self.module
        outs: list[np.ndarray] = []

        def keep(_m: nn.Module, _a: Any, _k: Any, out: Any) -> None:
            outs.append(output_tensor(out).cpu().numpy())

        with scoped_hooks() as hooks, torch.no_grad():
            hooks.add_forward_hook("diffkiln.workload.outputs", target, keep)
            self.drive(target)
        return outs


def build_workload(
    model: Any, stats: CalibrationStats, samples: int, replay_calls: int, inputs: Any = None
) -> Workload:
    """The reference run of a pipeline, or of a bare module with its calibration ``inputs``.

    Raises:
        InvalidInputError: a bare module without inputs.
    """
    if isinstance(model, nn.Module):
        if inputs is None:
            raise InvalidInputError("searching a bare module needs its calibration inputs (SearchContext.inputs)")
        return ModuleWorkload(model, inputs, replay_calls)
    return PipelineWorkload(model, stats, samples, replay_calls)
