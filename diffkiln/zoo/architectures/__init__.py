"""Random-weight builders of real diffusion architectures.

* Tiny pipelines (``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-pixart``,
  ``tiny-wan``): the real diffusers pipeline and model classes at toy widths, with tokenizers
  diffkiln writes itself. They exist so every stage (calibrate, plan, export, runtime) is tested
  on each architecture in seconds; their images are noise.
* Full-size denoisers (``sd15-unet``, ``sdxl-unet``, ``pixart-alpha``, ``sd3-medium``,
  ``wan2.1-1.3b``): the published configs with random weights, for speed and memory benchmarks.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkiln.zoo.architectures.dits import (
    full_pixart_transformer,
    full_sd3_transformer,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)
from diffkiln.zoo.architectures.unets import full_sd15_unet, full_sdxl_unet, tiny_sd15, tiny_sdxl
from diffkiln.zoo.architectures.video import full_wan_transformer, tiny_wan
from diffkiln.zoo.catalog import TINY_CATALOG, TinyEntry

__all__ = [
    "FULL_SIZE_DENOISERS",
    "TINY_ARCHITECTURES",
    "build_full_denoiser",
    "build_tiny_pipeline",
    "full_denoiser_inputs",
    "save_tiny_pipeline",
]

_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "tiny-sd15": tiny_sd15,
    "tiny-sdxl": tiny_sdxl,
    "tiny-sd3": tiny_sd3,
    "tiny-flux": tiny_flux,
    "tiny-pixart": tiny_pixart,
    "tiny-wan": tiny_wan,
}

TINY_ARCHITECTURES: dict[str, TinyEntry] = {e.name: e for e in TINY_CATALOG}
"""The tiny architecture pipelines, by built-in model name (see :mod:`diffkiln.zoo.catalog`)."""

FULL_SIZE_DENOISERS: dict[str, Callable[[], Any]] = {
    "sd15-unet": full_sd15_unet,
    "sdxl-unet": full_sdxl_unet,
    "pixart-alpha": full_pixart_transformer,
    "sd3-medium": full_sd3_transformer,
    "wan2.1-1.3b": full_wan_transformer,
}
"""Full-size denoisers with random weights, by name (for benchmarks)."""


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def build_tiny_pipeline(name: str, scratch: Path, seed: int = 0) -> Any:
    """Build a tiny random pipeline, deterministically for a seed.

    Args:
        name: a key of :data:`TINY_ARCHITECTURES`.
        scratch: folder for its tokenizer files.
        seed: weight-initialisation seed. Default 0.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    build = _lookup(_BUILDERS, name, "tiny architecture")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(scratch)


def save_tiny_pipeline(name: str, folder: Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder, atomically (temp dir, then rename).

    Args:
        name: a key of :data:`TINY_ARCHITECTURES`.
        folder: the diffusers folder to create; if it already exists it is left as it is.
        seed: weight-initialisation seed. Default 0.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipe = build_tiny_pipeline(name, tmp / "scratch", seed)
        pipe.save_pretrained(tmp / "pipeline")
        try:
            (tmp / "pipeline").rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a concurrent builder's success
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_full_denoiser(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """A full-size denoiser with random weights (``device="meta"`` builds it without memory).

    Args:
        name: a key of :data:`FULL_SIZE_DENOISERS`.
        device: where to allocate the weights. Default "cpu".

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    factory = _lookup(FULL_SIZE_DENOISERS, name, "full-size denoiser")
    with torch.device(device):
        return factory().eval()


def full_denoiser_inputs(name: str, batch: int, latent: int, timestep: float, seed: int = 0) -> dict[str, Any]:
    """Forward keyword arguments of one call of a full-size denoiser: random latents and text
    embeddings of the published shapes (for benchmarks; calibrate with several).

    Args:
        name: a key of :data:`FULL_SIZE_DENOISERS`.
        batch: the batch (2 for classifier-free guidance).
        latent: the latent side (64 for SD1.5 at 512 px); for Wan, the height and width of each frame.
        timestep: the sampler timestep of the call.
        seed: seed of the random tensors. Default 0.

    Raises:
        KeyError: unknown name; the message lists the valid ones.
    """
    _lookup(FULL_SIZE_DENOISERS, name, "full-size denoiser")
    g = torch.Generator().manual_seed(seed)
    t = torch.full((batch,), timestep)
    if name in ("sd15-unet", "sdxl-unet"):
        width = 768 if name == "sd15-unet" else 2048
        kw: dict[str, Any] = {
            "sample": torch.randn(batch, 4, latent, latent, generator=g),
            "timestep": t,
            "encoder_hidden_states": torch.randn(batch, 77, width, generator=g),
        }
        if name == "sdxl-unet":
            size = float(latent * 8)
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 1280, generator=g),
                "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch),
            }
        return kw
    if name == "pixart-alpha":
        return {
            "hidden_states": torch.randn(batch, 4, latent, latent, generator=g),
            "encoder_hidden_states": torch.randn(batch, 120, 4096, generator=g),
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if name == "sd3-medium":
        return {
            "hidden_states": torch.randn(batch, 16, latent, latent, generator=g),
            "encoder_hidden_states": torch.randn(batch, 154, 4096, generator=g),
            "pooled_projections": torch.randn(batch, 2048, generator=g),
            "timestep": t,
        }
    return {  # wan2.1-1.3b: 5 latent frames
        "hidden_states": torch.randn(batch, 16, 5, latent, latent, generator=g),
        "timestep": t,
        "encoder_hidden_states": torch.randn(batch, 512, 4096, generator=g),
    }
