"""Calibration statistics: per-layer, per-step activation statistics, the traced data flow and
the verified prompt-invariant text positions; saved as one safetensors file (no pickle).

For every quantizable layer of the denoiser and every sampler step: the input activation's min,
max, per-channel absmax and a seeded random sample of values (from which percentiles, histograms
and error-minimising clipping are computed); for convolutions, the output's min, max and sample
too (``QuantizeConfig.requantize_conv_outputs``). Layers whose input is a text sequence (by the
data flow: it derives from sequence inputs only) also keep the position of each sample, each
position's spread across prompts and one prompt's rows, for BOS-aware planning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffkiln.calibrate.attention_stats import AttentionStats
from diffkiln.calibrate.cache_stats import CacheStats
from diffkiln.calibrate.config import STATS_VERSION
from diffkiln.calibrate.dataflow import DataflowGraph

__all__ = ["CalibrationStats", "LayerStats"]

_LAYER_TENSORS = (
    "min",
    "max",
    "channel_absmax",
    "samples",
    "sample_positions",
    "text_spread",
    "text_rows",
    "sample_channels",
    "out_min",
    "out_max",
    "out_samples",
)


@dataclass
class LayerStats:
    """Input-activation statistics of one layer; the first dimension indexes sampler steps.

    Attributes:
        kind: the layer kind (:func:`diffkiln.core.layers.layer_kind`).
        min: (T,) minimum per step.
        max: (T,) maximum per step.
        channel_absmax: (T, C) absolute maximum per input channel per step.
        samples: (T, S) random sample of values per step.
        sample_positions: (T, S) sequence position of each sample, for layers whose input is a
            text sequence (by the data flow, it derives from sequence inputs only); empty for others.
        text_spread: (L,) largest spread across the batch of the input row at each position, for
            the same layers (0: the same row for every prompt); empty for other layers.
        text_rows: (L, D) the input rows of the first calibration prompt, for the same layers.
        sample_channels: (T, S) input channel of each sample (for per-channel smoothing).
        out_min: convolutions: (T,) minimum of the output per step; empty for other layers.
        out_max: convolutions: (T,) maximum of the output per step; empty for other layers.
        out_samples: convolutions: (T, S) random sample of output values per step; empty for
            other layers.
    """

    kind: str
    min: torch.Tensor
    max: torch.Tensor
    channel_absmax: torch.Tensor
    samples: torch.Tensor
    sample_positions: torch.Tensor
    text_spread: torch.Tensor
    text_rows: torch.Tensor
    sample_channels: torch.Tensor
    out_min: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    out_max: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    out_samples: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def has_output(self) -> bool:
        """True when the output was recorded (convolutions, statistics version 3 and later)."""
        return self.out_samples.numel() > 0

    def invariant_rows(self, positions: list[int], rel_tol: float = 1e-6) -> list[int]:
        """Which of ``positions`` this layer reads as the same row for every prompt.

        Only layers whose input is a text sequence that varies with the prompt elsewhere qualify
        (cross-attention keys/values, text projections).

        Args:
            positions: candidate positions, e.g. :meth:`CalibrationStats.invariant_positions`.
            rel_tol: a row is invariant when its spread is below ``rel_tol`` times the largest.
        """
        if self.text_spread.numel() == 0 or float(self.text_spread.max()) == 0.0:
            return []
        tol = rel_tol * float(self.text_spread.max())
        return [p for p in positions if p < self.text_spread.numel() and float(self.text_spread[p]) <= tol]

    def percentile(self, q: float, step: int | None = None) -> float:
        """The q-th percentile (0..100) of the sampled values, at one step or over all steps."""
        s = self.samples if step is None else self.samples[step]
        return float(torch.quantile(s.flatten().float(), q / 100.0))


@dataclass
class CalibrationStats:
    """Everything calibration measured.

    Attributes:
        layers: per-layer statistics, keyed by the module's qualified name in the denoiser.
        timesteps: the sampler's timesteps, one per step.
        model_hash: hash of the pipeline's (or module's) weights.
        settings: the calibration settings (:meth:`CalibrationConfig.key_fields`).
        sequences: per sequence input of the denoiser (a (batch, length, width) input besides the
            latent, e.g. text embeddings), its rows at the first step of every calibration call.
        graph: the traced data flow (:mod:`diffkiln.calibrate.dataflow`), or None.
        bos: per sequence input, the verified prompt-invariant positions and their evidence:
            ``{"positions": [...], "evidence": "..."}``.
        denoiser: the calibrated pipeline component's name ("" for a bare module).
        cache: what a cache-schedule search needs, when recorded
            (``CalibrationConfig.cache_stats``); else None.
        attention: what a sparse-attention mask search needs, when recorded
            (``CalibrationConfig.attention_stats``); else None.
    """

    layers: dict[str, LayerStats]
    timesteps: list[float]
    model_hash: str
    settings: dict[str, Any] = field(default_factory=dict)
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)
    graph: DataflowGraph | None = None
    bos: dict[str, dict[str, Any]] = field(default_factory=dict)
    denoiser: str = ""
    cache: CacheStats | None = None
    attention: AttentionStats | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        """Components of the denoiser's class the sampler also ran, for other noise levels (Wan 2.2's
        ``transformer_2``): each is calibrated and quantized on its own. Empty where the denoiser
        was named, or no such component ran."""
        return tuple(self.settings.get("experts") or ())

    @property
    def text_embeds(self) -> torch.Tensor:
        """The first sequence input's rows (for summaries), or an empty tensor."""
        return next(iter(self.sequences.values()), torch.zeros(0))

    def invariant_positions(self, sequence: str | None = None) -> list[int]:
        """Verified prompt-invariant positions of one sequence input (default: the first one that has any).

        Args:
            sequence: the input's name; None takes the first input with positions.
        """
        if sequence is not None:
            return list(self.bos.get(sequence, {}).get("positions", []))
        for entry in self.bos.values():
            if entry.get("positions"):
                return list(entry["positions"])
        return []

    def layer_bos_positions(self, layer: str) -> list[int]:
        """The verified invariant positions a layer's input rows may hold: those of the one
        sequence input its input derives from (by the data flow), among the rows that layer read
        identically for every prompt."""
        st = self.layers.get(layer)
        if st is None or self.graph is None or layer not in self.graph.layers:
            return []
        deps = set(self.graph.layers[layer].deps)
        inputs = [s for s in self.bos if s in deps]
        if len(inputs) != 1 or deps - set(self.graph.sequence_inputs):
            return []
        return st.invariant_rows(self.invariant_positions(inputs[0]))

    def save(self, path: Path) -> None:
        """Write as one safetensors file (tensors) with JSON metadata; no pickle."""
        tensors = {f"seq::{k}": v.contiguous() for k, v in self.sequences.items()}
        kinds = {}
        for name, st in self.layers.items():
            kinds[name] = st.kind
            for f in _LAYER_TENSORS:
                tensors[f"{name}::{f}"] = getattr(st, f).contiguous()
        meta = {
            "timesteps": self.timesteps,
            "model_hash": self.model_hash,
            "settings": self.settings,
            "kinds": kinds,
            "graph": self.graph.to_dict() if self.graph is not None else None,
            "bos": self.bos,
            "denoiser": self.denoiser,
            "cache": self.cache.to_meta() if self.cache is not None else None,
            "attention": self.attention.to_meta() if self.attention is not None else None,
            "version": STATS_VERSION,
        }
        if self.cache is not None:
            tensors["cache::distances"] = self.cache.distances.contiguous()
        if self.attention is not None:
            tensors.update(self.attention.tensors())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"diffkiln": json.dumps(meta)})
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: written by another statistics version (recalibrate).
        """
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["diffkiln"])
        if meta.get("version") != STATS_VERSION:
            raise ValueError(f"{path}: statistics of version {meta.get('version')}; this diffkiln uses "
                             f"{STATS_VERSION}: recalibrate (delete the file)")  # fmt: skip
        tensors = load_file(str(path))
        layers = {
            name: LayerStats(kind, *(tensors[f"{name}::{f}"] for f in _LAYER_TENSORS))
            for name, kind in meta["kinds"].items()
        }
        sequences = {k[5:]: v for k, v in tensors.items() if k.startswith("seq::")}
        graph = DataflowGraph.from_dict(meta["graph"]) if meta.get("graph") else None
        cache = CacheStats.from_meta(meta["cache"], tensors["cache::distances"]) if meta.get("cache") else None
        attention = AttentionStats.from_meta(meta["attention"], tensors) if meta.get("attention") else None
        return cls(layers, meta["timesteps"], meta["model_hash"], meta["settings"], sequences, graph,
                   meta.get("bos", {}), meta.get("denoiser", ""), cache, attention)  # fmt: skip
