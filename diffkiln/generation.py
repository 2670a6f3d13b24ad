"""Load a TARGET as a diffusers pipeline and generate images from prompts, deterministically.

Determinism: image ``i`` of a call is drawn from its own generator seeded ``seed + i``, so an
image depends only on (model, prompt, seed, index, settings), never on how prompts are batched.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffkiln.core.errors import InvalidInputError
from diffkiln.core.pipelines import step_callback_kwargs
from diffkiln.zoo.registry import ResolvedTarget, resolve_target

__all__ = [
    "GenerateConfig",
    "GenerationResult",
    "PeakMemory",
    "generate",
    "load_pipeline",
    "read_prompts",
    "save_images",
]

_DEFAULT_STEPS = 20
_DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True)
class GenerateConfig:
    """How to sample images.

    Attributes:
        steps: denoising steps; None takes the model's documented default (20 for built-ins).
        guidance: classifier-free guidance scale; None takes the model's default (5.0 for built-ins).
        seed: base seed; image i uses seed + i. Default 0.
        batch_size: prompts per pipeline call. Default 50.
        progress: show a progress bar over denoising steps. Default True.
    """

    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise InvalidInputError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        if self.batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.seed < 0:
            raise InvalidInputError(f"seed must be >= 0, got {self.seed}")

    def resolved(self, target: ResolvedTarget) -> tuple[int, float]:
        """(steps, guidance) with the target's defaults filled in."""
        b = target.builtin
        steps = self.steps or (b.default_steps if b else _DEFAULT_STEPS)
        guidance = self.guidance if self.guidance is not None else (b.default_guidance if b else _DEFAULT_GUIDANCE)
        return steps, guidance


@dataclass
class GenerationResult:
    """Images and the settings that made them."""

    prompts: list[str]
    images: list[Image.Image]
    steps: int
    guidance: float
    seed: int
    scheduler: str
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)
    videos: list[list[Image.Image]] | None = None
    """For video pipelines, every frame of each clip; ``images`` then holds each clip's first frame."""


def _quiet_libraries() -> None:
    # Loading prints per-component progress bars and hub warnings; a CLI user needs neither.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_pipeline(target: str | os.PathLike[str] | ResolvedTarget, device: str = "cpu") -> Any:
    """Load a built-in model, a local diffusers folder (offline, float32) or a diffkiln bundle.

    Args:
        target: a built-in name, a folder path, a bundle directory, or an already resolved target.
        device: torch device to move the pipeline to ("auto" is allowed for bundles). Default "cpu".

    Raises:
        ModelNotFoundError: the target does not resolve.
        BundleError: a bundle fails its checks.
    """
    from diffusers import DiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    if resolved.bundle:
        from diffkiln.runtime import load

        return load(resolved.path, device=device)
    pipe = DiffusionPipeline.from_pretrained(resolved.path, dtype=torch.float32, local_files_only=True)
    return pipe.to(device)


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


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if not prompts:
        raise InvalidInputError("no prompts given; pass --prompt TEXT or --prompts FILE")
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise InvalidInputError(f"prompt(s) at position {blank} are empty; every prompt needs text")
    return list(prompts)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    config: GenerateConfig,
    target: ResolvedTarget | None = None,
    measure: bool = False,
) -> GenerationResult:
    """Generate one image per prompt.

    Args:
        pipe: a loaded diffusers text-to-image pipeline.
        prompts: the prompts, non-empty.
        config: sampling settings.
        target: where the pipeline came from, for its default steps and guidance.
        measure: also record, in ``extras``, the final latents (``latents``), the denoiser's
            time per call (``denoiser_ms_per_step``) and the peak memory (``peak_bytes``).
            Default False.

    Raises:
        InvalidInputError: no prompts, or an empty prompt.
    """
    import time

    prompts = _check_prompts(prompts)
    steps, guidance = (
        config.resolved(target)
        if target
        else (
            config.steps or _DEFAULT_STEPS,
            _DEFAULT_GUIDANCE if config.guidance is None else config.guidance,
        )
    )
    device = getattr(pipe, "device", torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=steps * len(prompts), desc="denoising", unit="img-step", disable=not config.progress)
    images: list[Image.Image] = []
    videos: list[list[Image.Image]] = []
    latents: list[torch.Tensor] = []
    timer = _DenoiserTimer(pipe) if measure else None
    peak = PeakMemory(getattr(pipe, "device", torch.device("cpu"))) if measure else None
    t0 = time.perf_counter()
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(config.seed + start + i) for i in range(len(chunk))]

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any], n: int = len(chunk)) -> dict[str, Any]:
            bar.update(n)
            if measure and i == steps - 1 and "latents" in kwargs:
                latents.append(kwargs["latents"].detach().float().cpu())
            return kwargs

        out = pipe(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            **step_callback_kwargs(pipe, on_step),
            **(target.call_kwargs if target else {}),
        )
        if getattr(out, "frames", None) is not None:  # video pipelines: (batch, frames, H, W, C)
            clips = [[_to_pil(f) for f in clip] for clip in out.frames]
            videos.extend(clips)
            images.extend(clip[0] for clip in clips)
        else:
            images.extend(_to_pil(im) for im in out.images)
    bar.close()
    del device
    extras: dict[str, Any] = {}
    if timer is not None and peak is not None:
        extras = {
            "latents": torch.cat(latents) if latents else None,
            "denoiser_ms_per_step": timer.close(),
            "peak_bytes": peak.read(),
        }
    return GenerationResult(
        prompts=prompts,
        images=images,
        steps=steps,
        guidance=guidance,
        seed=config.seed,
        scheduler=type(pipe.scheduler).__name__,
        seconds=time.perf_counter() - t0,
        extras=extras,
        videos=videos or None,
    )


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


class _DenoiserTimer:
    """Wall time of each denoiser call, by a pre/post hook pair removed by :meth:`close`."""

    def __init__(self, pipe: Any) -> None:
        import time

        den = getattr(pipe, "transformer", None) or pipe.unet
        self.times: list[float] = []
        self._clock = time.perf_counter
        self._start = 0.0
        self._device = getattr(pipe, "device", torch.device("cpu"))
        self._handles = [den.register_forward_pre_hook(self._pre), den.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _pre(self, *_a: Any) -> None:
        self._sync()
        self._start = self._clock()

    def _post(self, *_a: Any) -> None:
        self._sync()
        self.times.append(self._clock() - self._start)

    def close(self) -> float:
        """Remove the hooks; the median ms per denoiser call (one sampler step, CFG batch included)."""
        for h in self._handles:
            h.remove()
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


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def save_images(result: GenerationResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write each image as ``NNNN_<prompt-slug>.png`` (each video as an animated ``.gif``) under ``out_dir``.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, image) in enumerate(zip(result.prompts, result.images, strict=True)):
        stem = out / f"{i:04d}_{_slug(prompt)}"
        if result.videos is not None:
            frames = result.videos[i]
            path = stem.with_suffix(".gif")
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
        else:
            path = stem.with_suffix(".png")
            image.save(path)
        paths.append(path)
    return paths
