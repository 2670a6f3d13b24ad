"""How to calibrate: the settings that determine the statistics (and key their disk cache)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from diffkiln.calibrate.media_sources import InputFiles
from diffkiln.core.errors import InvalidInputError

__all__ = ["STATS_VERSION", "CalibrationConfig"]

STATS_VERSION = 7
"""4 added the traced data flow, the verified BOS positions and the sequence inputs by name; 5 draws
each batch's value samples from generators seeded by the batch (so ranks that run different
batches merge into one process's statistics); 6 records the experts of the denoiser's class that the
sampler also runs (``settings["experts"]``), which ``optimize`` quantizes too; 7 records every latent
the denoiser denoises (``latent_inputs``), verifies BOS rows with longer probes, and subsamples the
cache search's tensors by element count."""


def _json_ready(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except TypeError:
        raise InvalidInputError(
            f"{what} must be JSON data (numbers, strings, lists), got {type(value).__name__}; "
            "pass objects such as images through a CallSource"
        ) from None
    return value


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate a pipeline.

    Attributes:
        prompts: calibration prompts, for pipelines that take text; ignored by others.
        samples: how many samples to calibrate on; None: one per prompt. For pipelines without
            text it is the number of synthetic images, class labels or seeds. Default None.
        steps: sampler steps, as at inference. Default 20.
        guidance: classifier-free guidance scale, as at inference; None leaves the pipeline's own
            default (and pipelines without ``guidance_scale`` never get one). Default 5.0.
        seed: base seed; sample i uses seed + i. Default 0.
        batch_size: samples per pipeline call. Default 8.
        samples_per_step: activation values kept per (layer, step). Default 1024.
        cache_dir: where stats are cached; None disables the cache. Default None.
        progress: show a progress bar. Default True.
        call_kwargs: extra pipeline-call arguments as (name, value) pairs: height, width,
            num_frames, max_sequence_length, audio_end_in_s, ...; JSON values. Default none.
        denoiser: the pipeline component to calibrate; None finds it
            (:func:`diffkiln.core.pipelines.choose_denoiser`). Default None.
        bos_probe: verify prompt-invariant text positions with two long probe prompts (a
            position is kept only if it stays the same when every position holds a real token).
            Default True.
        cache_stats: also record what a cache-schedule search needs (the blocks and, for the
            first batch, each step's block inputs and outputs; :mod:`diffkiln.calibrate.cache_stats`).
            Default False.
        attention_stats: also record what a sparse-attention mask search needs (per attention
            layer, step, head and block pair, for the first batch: the attention mass and the error
            of dropping the block; :mod:`diffkiln.calibrate.attention_stats`). Default False.
        attention_block: tokens per block of those statistics. Default 64.
        inputs: the user's own input images, masks, control images or clips, for a pipeline
            that starts from an image or a clip (:class:`~diffkiln.calibrate.media_sources.InputFiles`);
            empty: seeded synthetic images and clips where the pipeline needs them. Default empty.
    """

    prompts: tuple[str, ...] = ()
    samples: int | None = None
    steps: int = 20
    guidance: float | None = 5.0
    seed: int = 0
    batch_size: int = 8
    samples_per_step: int = 1024
    cache_dir: Path | None = None
    progress: bool = True
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    denoiser: str | None = None
    bos_probe: bool = True
    cache_stats: bool = False
    attention_stats: bool = False
    attention_block: int = 64
    inputs: InputFiles = field(default_factory=InputFiles)

    def __post_init__(self) -> None:
        if any(not p.strip() for p in self.prompts):
            raise InvalidInputError("calibration prompts must not be empty")
        if not self.prompts and self.samples is None:
            raise InvalidInputError("calibration needs prompts, or a number of samples for pipelines without text")
        for name in ("steps", "batch_size", "samples_per_step", "attention_block"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.samples is not None and self.samples <= 0:
            raise InvalidInputError(f"samples must be a positive integer, got {self.samples}")
        if self.guidance is not None and self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        for k, v in self.call_kwargs:
            _json_ready(v, f"call argument {k!r}")

    @property
    def count(self) -> int:
        """The number of samples calibrated on."""
        return self.samples if self.samples is not None else len(self.prompts)

    @classmethod
    def from_key_fields(
        cls, d: dict[str, Any], cache_dir: Path | None = None, progress: bool = False
    ) -> CalibrationConfig:
        """Rebuild the config whose :meth:`key_fields` gave ``d`` (e.g. from a plan's notes).

        Raises:
            ValueError: ``d`` was written by another statistics version.
        """
        if d.get("version") != STATS_VERSION:
            raise ValueError(f"calibration settings of version {d.get('version')}; this diffkiln uses {STATS_VERSION}")
        names = {f.name for f in fields(cls)} - {"cache_dir", "progress"}
        kw = {k: v for k, v in d.items() if k in names}  # recorded extras (the source, evidence) are not settings
        kw["prompts"] = tuple(kw["prompts"])
        kw["call_kwargs"] = tuple(kw.get("call_kwargs", {}).items())
        kw["inputs"] = InputFiles.of(**kw.get("inputs", {}))
        return cls(**kw, cache_dir=cache_dir, progress=progress)

    def key_fields(self) -> dict[str, Any]:
        """The settings that change the statistics (the cache key's inputs besides the weights)."""
        d = asdict(self)
        d.pop("cache_dir")
        d.pop("progress")
        d["prompts"] = list(self.prompts)
        d["call_kwargs"] = dict(self.call_kwargs)
        d.pop("inputs")
        if self.inputs:  # only where given: the keys of other calibrations stay as they were
            d["inputs"] = self.inputs.to_dict()
        d["version"] = STATS_VERSION
        return d
