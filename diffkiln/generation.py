"""Load a TARGET as a diffusers pipeline and generate from it, deterministically, whatever it makes.

Determinism: sample ``i`` of a call is drawn from its own generator seeded ``seed + i``, so a sample
depends only on (model, input, seed, index, settings), never on how samples are batched. Inputs
come from the pipeline's own signature (:mod:`diffkiln.calibrate.sources`): prompts, synthetic
images for image-to-video pipelines, class labels, or none; outputs are images, video frames or
audio (:func:`diffkiln.core.pipelines.pipeline_media`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffkiln.calibrate.pipeline_calls import call_pipeline
from diffkiln.calibrate.sources import (
    CallSource,
    InputFiles,
    PromptSource,
    pipeline_call_hints,
    source_for,
)
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.pipeline_folder import check_pipeline_folder
from diffkiln.core.pipelines import (
    accepted_call_kwargs,
    call_parameters,
    find_denoiser,
    pipeline_media,
    step_callback_kwargs,
)
from diffkiln.outputs import frame_strip, input_picture, save_outputs
from diffkiln.zoo.registry import ResolvedTarget, resolve_target

__all__ = [
    "GenerateConfig",
    "GenerationResult",
    "PeakMemory",
    "enable_vae_tiling",
    "frame_strip",
    "generate",
    "load_pipeline",
    "read_prompts",
    "save_outputs",
]

_DEFAULT_STEPS = 20
_DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True)
class GenerateConfig:
    """How to sample.

    Attributes:
        steps: denoising steps; None takes the model's documented default (20 for built-ins), or
            for a bundle with a cache schedule or sparse-attention masks the step count they are for.
        guidance: classifier-free guidance scale; None takes the model's default (5.0 for built-ins).
        seed: base seed; sample i uses seed + i. Default 0.
        batch_size: samples per pipeline call. Default 50.
        progress: show a progress bar over denoising steps. Default True.
        call_kwargs: pipeline-call arguments for every call (height, num_frames, ...), as
            (name, value) pairs; they override a built-in model's own. Default none.
        denoiser: the pipeline component timed as denoiser; None finds it. Default None.
        label: what the progress bar calls the run (a report says ``evaluation: bundle``).
            Default ``"denoising"``.
        vae_tiling: decode in tiles: turn on tiled decoding (``enable_tiling()``) in every pipeline
            component that offers it (diffusers' autoencoders) before sampling. Needed by a VAE that
            decodes only in tiles (Allegro's); saves memory on large images and clips. Default False.
    """

    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 50
    progress: bool = True
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    denoiser: str | None = None
    label: str = "denoising"
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise InvalidInputError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        if self.batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.seed < 0:
            raise InvalidInputError(f"seed must be >= 0, got {self.seed}")

    def resolved(self, target: ResolvedTarget | None) -> tuple[int, float]:
        """(steps, guidance) with the target's defaults filled in."""
        b = target.builtin if target else None
        steps = self.steps or (b.default_steps if b else _DEFAULT_STEPS)
        guidance = self.guidance if self.guidance is not None else (b.default_guidance if b else _DEFAULT_GUIDANCE)
        return steps, guidance


@dataclass
class GenerationResult:
    """What a pipeline generated and the settings that made it.

    Attributes:
        prompts: one label per sample: its prompt, or ``"sample i"`` for pipelines without text.
        images: one image per sample (a video's first frame); empty for audio.
        videos: every frame of each clip, for video pipelines.
        audios: each sample's waveform (channels, samples) in [-1, 1], for audio pipelines.
        sample_rate: the audio's sampling rate, when the pipeline records one.
        inputs: each sample's input image (a clip's first frame), its mask shown in red
            (:func:`diffkiln.outputs.input_picture`), at most 256 px a side; empty for pipelines
            that start from none.
    """

    prompts: list[str]
    images: list[Image.Image]
    steps: int
    guidance: float
    seed: int
    scheduler: str
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    videos: list[list[Image.Image]] | None = None
    audios: list[np.ndarray] | None = None
    sample_rate: int | None = None
    inputs: list[Image.Image] = field(default_factory=list)


def _quiet_libraries() -> None:
    # Loading prints per-component progress bars and hub warnings; a CLI user needs neither.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_pipeline(target: str | os.PathLike[str] | ResolvedTarget, device: str = "cpu") -> Any:
    """Load a built-in model, a local diffusers folder (offline, float32), a diffkiln bundle, or an
    ONNX export (run in onnxruntime).

    Args:
        target: a built-in name, a folder path, a bundle directory, or an already resolved target.
        device: torch device to move the pipeline to ("auto" is allowed for bundles). Default "cpu".

    Raises:
        ModelNotFoundError: the target does not resolve, or a folder lacks a component.
        BundleError: a bundle fails its checks.
        InvalidInputError: a folder's weights are truncated or diffusers cannot load it; an
            unknown or absent device.
    """
    from diffusers import DiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    if resolved.bundle:
        from diffkiln.runtime import load

        return load(resolved.path, device=device, backend="onnxruntime" if resolved.onnx else "torch")
    from diffkiln.runtime import resolve_device

    target_device = resolve_device(device)
    check_pipeline_folder(Path(resolved.path))
    try:
        pipe = DiffusionPipeline.from_pretrained(resolved.path, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # diffusers/transformers raise all of these
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(f"diffusers cannot load the folder {resolved.path}: {first}") from exc
    return pipe.to(target_device)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read prompts, one per line; blank lines and lines starting with '#' are skipped.

    Raises:
        InvalidInputError: the file is missing, unreadable, or holds no prompt.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidInputError(f"prompts file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read prompts file {p}: {exc}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise InvalidInputError(f"prompts file {p} holds no prompt; write one prompt per line")
    return prompts


def _source(
    pipe: Any, prompts: Sequence[str], samples: int | None, seed: int, call_kwargs: dict[str, Any], files: InputFiles
) -> Any:
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise InvalidInputError(f"prompt(s) at position {blank} are empty; every prompt needs text")
    takes_text = "prompt" in call_parameters(pipe)
    count = (
        len(prompts)
        if takes_text and prompts
        else (samples or len(files.images) or len(files.videos) or len(prompts) or 1)
    )
    source = source_for(pipe, prompts or ["."], count, seed, call_kwargs, files)
    if isinstance(source, PromptSource) and not prompts:
        raise InvalidInputError("no prompts given; pass --prompt TEXT or --prompts FILE")
    return source


def _sample_rate(pipe: Any) -> int | None:
    for comp in getattr(pipe, "components", {}).values():
        rate = getattr(getattr(comp, "config", None), "sampling_rate", None)
        if isinstance(rate, int):
            return rate
    return None


def enable_vae_tiling(pipe: Any) -> list[str]:
    """Turn on tiled decoding in every component of ``pipe`` that offers it (diffusers'
    autoencoders: ``enable_tiling()``); returns their names.

    Raises:
        InvalidInputError: no component offers tiled decoding.
    """
    names = [n for n, c in getattr(pipe, "components", {}).items() if callable(getattr(c, "enable_tiling", None))]
    if not names:
        raise InvalidInputError(f"{type(pipe).__name__} has no component with tiled decoding (enable_tiling()); "
                                "leave out --vae-tiling")  # fmt: skip
    for name in names:
        pipe.components[name].enable_tiling()
    return names


def _denoiser_name(pipe: Any, config: GenerateConfig) -> str | None:
    manifest = getattr(pipe, "diffkiln_manifest", None)
    return config.denoiser or (manifest["pipeline"]["denoiser"] if manifest else None)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    config: GenerateConfig,
    target: ResolvedTarget | None = None,
    measure: bool = False,
    samples: int | None = None,
    source: CallSource | None = None,
    inputs: InputFiles | None = None,
) -> GenerationResult:
    """Generate one sample per prompt (or ``samples`` samples for pipelines without text).

    Args:
        pipe: a loaded diffusers pipeline.
        prompts: the prompts (for pipelines that take text).
        config: sampling settings.
        target: where the pipeline came from, for its defaults and call arguments.
        measure: also record, in ``extras``, the final latents (``latents``), the denoiser's time
            per call (``denoiser_ms_per_step``, median), their sum (``denoiser_loop_ms``) and the peak
            memory (``peak_bytes``). Default False.
        samples: how many samples for pipelines without text; None: one per prompt (or per image, or 1).
        source: the per-sample inputs; None: from the pipeline's signature.
        inputs: the user's own input images, masks, control images or clips for a pipeline that
            starts from an image or a clip, taken in turn (:class:`diffkiln.calibrate.InputFiles`).
            None: such a pipeline gets seeded synthetic ones (:func:`diffkiln.calibrate.source_for`).

    Raises:
        InvalidInputError: a text pipeline without prompts, an empty prompt, a call argument the
            pipeline does not take, or image files that do not fit it.
    """
    steps, guidance = config.resolved(target)
    cache_run = getattr(pipe, "diffkiln_cache", None)
    sparse_run = getattr(pipe, "diffkiln_sparse", None)
    if cache_run is not None and config.steps is None:
        steps = cache_run.schedule.steps  # a bundle's frozen cache schedule is for its own step count
    elif sparse_run is not None and config.steps is None:
        steps = sparse_run.plan.steps  # so are its sparse-attention masks
    call_kwargs = {**(target.call_kwargs if target else {}), **dict(config.call_kwargs)}
    source = source or _source(pipe, prompts, samples, config.seed, call_kwargs, inputs or InputFiles())
    n = len(source)
    labels: list[str] = []
    pictures: list[Image.Image] = []  # thumbnails, so that a long run holds no full-size copies
    for i in range(n):
        sample = source.sample(i)
        labels.append(sample["prompt"] if isinstance(sample.get("prompt"), str) else f"sample {i}")
        picture = input_picture(sample)
        if picture is not None:
            picture.thumbnail((256, 256))
            pictures.append(picture)
    common = {
        **accepted_call_kwargs(pipe, {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}),
        **accepted_call_kwargs(pipe, call_kwargs, strict=True),
    }
    if config.vae_tiling:
        enable_vae_tiling(pipe)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=steps * n, desc=config.label, unit="sample-step", disable=not config.progress)
    arrays: list[np.ndarray] = []
    kind = "images"
    latents: list[torch.Tensor] = []
    last: list[torch.Tensor] = []  # the current call's latest step latents
    denoiser = find_denoiser(pipe, _denoiser_name(pipe, config))
    timer = _DenoiserTimer(denoiser, getattr(pipe, "device", torch.device("cpu"))) if measure else None
    peak = PeakMemory(getattr(pipe, "device", torch.device("cpu"))) if measure else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)  # closed on a failure too, so that an error line starts a line of its own
        if timer is not None:
            stack.enter_context(timer.hooks())
        for start in range(0, n, config.batch_size):
            chunk = [source.sample(i) for i in range(start, min(start + config.batch_size, n))]
            gens = [torch.Generator(device="cpu").manual_seed(config.seed + start + i) for i in range(len(chunk))]

            size = [len(chunk)]  # samples in the running call (one, for a pipeline that takes one input per call)

            def on_step(_p: Any, i: int, _t: Any, kwargs: dict[str, Any], size: list[int] = size) -> dict[str, Any]:
                bar.update(size[0])
                # The last step's, whatever its index: an image-to-image call runs only its strength's share.
                if measure and isinstance(kwargs.get("latents"), torch.Tensor):
                    last[:] = [kwargs["latents"].detach().float().cpu()]
                return kwargs

            def before_each(count: int, size: list[int] = size) -> None:
                size[0] = count
                latents.extend(last)  # the previous call's final latents, when one call per sample runs
                last.clear()

            with torch.no_grad(), pipeline_call_hints(pipe, chunk, steps, common):
                kwargs = {**common, **step_callback_kwargs(pipe, on_step)}
                out = call_pipeline(pipe, chunk, gens, kwargs, before_each)
            latents.extend(last)
            last.clear()
            media = pipeline_media(out)
            kind = media.kind
            arrays.extend(media.items())
        bar.total = bar.n  # an image-to-image call runs only its strength's share of the steps
    result = GenerationResult(labels, [], steps, guidance, config.seed, type(pipe.scheduler).__name__,
                              time.perf_counter() - t0, inputs=pictures)  # fmt: skip
    if kind == "audios":
        result.audios = [np.clip(a, -1.0, 1.0) for a in arrays]
        result.sample_rate = _sample_rate(pipe)
    elif kind == "frames":
        result.videos = [[_to_pil(f) for f in clip] for clip in arrays]
        result.images = [clip[0] for clip in result.videos]
    else:
        result.images = [_to_pil(im) for im in arrays]
    if timer is not None and peak is not None:
        result.extras = {
            "latents": torch.cat(latents) if latents and all(t.shape[1:] == latents[0].shape[1:] for t in latents)
            else None,
            "denoiser_ms_per_step": timer.median_ms(),
            "denoiser_loop_ms": timer.total_ms(),
            "peak_bytes": peak.read(),
        }  # fmt: skip
    return result


def _to_pil(array: np.ndarray) -> Image.Image:
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # channels first
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


class _DenoiserTimer:
    """Wall time of each denoiser call, from a named pre/post hook pair."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device) -> None:
        self.denoiser = denoiser
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, *_a: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_a: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    @contextlib.contextmanager
    def hooks(self) -> Any:
        with scoped_hooks() as hooks:
            hooks.add_forward_pre_hook("diffkiln.generate.timer.pre", self.denoiser, self._pre)
            hooks.add_forward_hook("diffkiln.generate.timer.post", self.denoiser, self._post)
            yield

    def total_ms(self) -> float:
        """The summed ms of every denoiser call: the denoising loop's time in the denoiser."""
        return float(np.sum(self.times) * 1000.0)

    def median_ms(self) -> float:
        """The median ms per denoiser call (one sampler step, CFG batch included)."""
        return float(np.median(self.times) * 1000.0) if self.times else float("nan")


class PeakMemory:
    """Peak memory from construction to :meth:`read`.

    CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``). CPU: the process's peak
    resident set (Linux VmHWM), reset at construction through /proc/self/clear_refs; None where
    that is unavailable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int | None:
        """Peak bytes, or None when the platform gives no reading."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None
