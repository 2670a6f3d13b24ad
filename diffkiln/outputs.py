"""Writing generated samples to files: PNG images, animated GIF clips beside a strip of their
frames, 16-bit WAV audio."""

from __future__ import annotations

import os
import re
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from diffkiln.generation import GenerationResult

__all__ = ["frame_strip", "input_picture", "save_outputs"]


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "sample"


def _write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    data = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0)
    if data.ndim == 1:
        data = data[None]
    pcm = (data.T * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(data.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def frame_strip(frames: list[Image.Image], every: int = 2, gap: int = 2) -> Image.Image:
    """The frames of a clip side by side (every ``every``-th one, the last always included),
    separated by ``gap`` grey pixels: what a report or ``generate`` shows of a clip in one image."""
    if not frames:
        raise ValueError("frame_strip needs at least one frame")
    picks = list(range(0, len(frames), max(1, every)))
    if picks[-1] != len(frames) - 1:
        picks.append(len(frames) - 1)
    w, h = frames[0].size
    strip = Image.new("RGB", (len(picks) * (w + gap) - gap, h), (96, 96, 96))
    for k, i in enumerate(picks):
        strip.paste(frames[i].convert("RGB"), (k * (w + gap), 0))
    return strip


def save_outputs(result: GenerationResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write each sample under ``out_dir`` as ``NNNN_<slug>``: ``.png`` images, animated ``.gif``
    videos (each beside a ``.strip.png`` of its frames), 16-bit ``.wav`` audio.

    Returns:
        The paths written (a video's strip right after its GIF).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(result.prompts):
        stem = out / f"{i:04d}_{_slug(label)}"
        if result.audios is not None:
            path = stem.with_suffix(".wav")
            _write_wav(path, result.audios[i], result.sample_rate or 44100)
        elif result.videos is not None:
            frames = result.videos[i]
            path = stem.with_suffix(".gif")
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
            frame_strip(frames).save(stem.with_suffix(".strip.png"))
            paths += [path, stem.with_suffix(".strip.png")]
            continue
        else:
            path = stem.with_suffix(".png")
            result.images[i].save(path)
        paths.append(path)
    return paths


def input_picture(sample: dict[str, Any]) -> Image.Image | None:
    """What a sample starts from, to show beside what it gave: its ``image`` (a ``video``'s first
    frame) in RGB, with a ``mask_image``'s repainted region tinted red; None for a sample with
    neither."""
    image = sample.get("image")
    if image is None and isinstance(sample.get("video"), list) and sample["video"]:
        image = sample["video"][0]
    if not isinstance(image, Image.Image):
        return None
    picture = image.convert("RGB")
    mask = sample.get("mask_image")
    if isinstance(mask, Image.Image):
        repaint = np.asarray(mask.convert("L").resize(picture.size)) > 127
        pixels = np.asarray(picture).astype(np.float32)
        pixels[repaint] = 0.5 * pixels[repaint] + 0.5 * np.array([230.0, 30.0, 30.0])
        picture = Image.fromarray(pixels.round().astype(np.uint8))
    return picture
