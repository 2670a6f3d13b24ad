"""The catalog of tiny random-weight architecture pipelines: pure data, importable without diffusers.

Their builders live in :mod:`diffkiln.zoo.architectures`; the registry lists them as built-in
models from this catalog so that ``diffkiln models`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TINY_CATALOG", "TINY_IMAGE_SIZE", "TINY_T5_LENGTH", "TinyEntry"]

TINY_IMAGE_SIZE = 32
"""Image side of the tiny image pipelines (16x16 latents)."""

TINY_T5_LENGTH = 32
"""Padded T5 prompt length of the tiny pipelines (passed as ``max_sequence_length``)."""

_IMAGE = (("height", TINY_IMAGE_SIZE), ("width", TINY_IMAGE_SIZE))
_T5 = (("max_sequence_length", TINY_T5_LENGTH),)


@dataclass(frozen=True)
class TinyEntry:
    """One tiny architecture pipeline.

    Attributes:
        name: the built-in model name, e.g. ``"tiny-sd15"``.
        description: one line for ``diffkiln models``.
        pipeline_class: the diffusers pipeline class.
        call_kwargs: extra pipeline-call arguments its size needs (height, width, frames, ...).
    """

    name: str
    description: str
    pipeline_class: str
    call_kwargs: tuple[tuple[str, Any], ...]


TINY_CATALOG: tuple[TinyEntry, ...] = (
    TinyEntry("tiny-sd15", "random SD1.5-class pipeline (CLIP, UNet, VAE)", "StableDiffusionPipeline", _IMAGE),
    TinyEntry("tiny-sdxl", "random SDXL-class pipeline (two CLIPs, UNet)", "StableDiffusionXLPipeline", _IMAGE),
    TinyEntry("tiny-sd3", "random SD3 pipeline (two CLIPs + T5, MMDiT)", "StableDiffusion3Pipeline", _IMAGE + _T5),
    TinyEntry("tiny-flux", "random FLUX pipeline (CLIP + T5, double/single-stream DiT)", "FluxPipeline", _IMAGE + _T5),
    TinyEntry(
        "tiny-pixart",
        "random PixArt-alpha pipeline (T5, adaLN-single DiT)",
        "PixArtAlphaPipeline",
        # PixArt's aspect-ratio bins assume 256+ pixels; its caption cleaning needs bs4 and ftfy.
        _IMAGE + _T5 + (("use_resolution_binning", False), ("clean_caption", False)),
    ),
    TinyEntry(
        "tiny-wan",
        "random Wan 2.1 text-to-video pipeline (UMT5, 3D transformer, video VAE)",
        "WanPipeline",
        (("height", 16), ("width", 16), ("num_frames", 5), *_T5),
    ),
)
