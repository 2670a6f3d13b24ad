"""Audio in a self-contained report: a WAV player and a waveform plot per sample, as data URIs."""

from __future__ import annotations

import base64
import html
import io
import wave

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["audio_cells"]


def _wav_uri(audio: np.ndarray, rate: int) -> str:
    data = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0)
    data = data[None] if data.ndim == 1 else data
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(data.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((data.T * 32767.0).round().astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _waveform_uri(audio: np.ndarray, width: int = 256, height: int = 64) -> str:
    """Each channel's min/max envelope per pixel column, drawn as a PNG."""
    data = np.asarray(audio, dtype=np.float64)
    data = data[None] if data.ndim == 1 else data
    img = Image.new("RGB", (width, height * data.shape[0]), "white")
    draw = ImageDraw.Draw(img)
    for c, channel in enumerate(data):
        top = c * height
        bins = np.array_split(channel, min(width, max(channel.size, 1)))
        for x, chunk in enumerate(bins):
            if chunk.size == 0:
                continue
            lo, hi = float(chunk.min()), float(chunk.max())
            y0 = top + int((1 - (hi + 1) / 2) * (height - 1))
            y1 = top + int((1 - (lo + 1) / 2) * (height - 1))
            draw.line([(x, y0), (x, y1)], fill="#1f77b4")
        draw.line([(0, top + height // 2), (width, top + height // 2)], fill="#ccc")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def audio_cells(items: list[tuple[str, np.ndarray]], rate: int) -> str:
    """A grid of cells, each a label, a waveform plot and a player."""
    cells = [
        f"<div class=cell style='width:272px'><img src='{_waveform_uri(a)}' width=256>"
        f"<audio controls src='{_wav_uri(a, rate)}'></audio><div>{html.escape(label)}</div></div>"
        for label, a in items
    ]
    return "<div class=grid>" + "".join(cells) + "</div>"
