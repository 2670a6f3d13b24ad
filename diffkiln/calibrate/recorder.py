"""Accumulate per-layer, per-step activation statistics from named forward hooks.

Steps are told apart by the denoiser's timestep input (the data flow names it): within one
pipeline call, each new timestep value starts the next step, so pipelines that call the denoiser
twice per step (conditional and unconditional apart) or once per step both index right. A
denoiser without a timestep input counts its calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.dataflow import DataflowGraph, batch_size, bind_call, nan_padded, sequence_tensor
from diffkiln.calibrate.stats import LayerStats
from diffkiln.core.errors import NonFiniteError
from diffkiln.core.hooks import layer_input, scoped_hooks
from diffkiln.core.layers import CONV_KINDS, find_quantizable_layers, layer_kind

__all__ = ["Recorder", "recording"]


def _timestep_value(value: Any) -> float | None:
    """A call's noise level: its largest timestep (as :class:`diffkiln.nn.timestep.StepSelector` reads it)."""
    if isinstance(value, torch.Tensor) and value.numel() > 0:
        return float(value.detach().amax())
    if isinstance(value, (int, float)):
        return float(value)
    return None


def text_layers(graph: DataflowGraph) -> set[str]:
    """Layers whose input is a text sequence: 3-D and derived from sequence inputs only."""
    seq = set(graph.sequence_inputs)
    return {n for n, f in graph.layers.items() if f.deps and set(f.deps) <= seq and len(f.input_shape) == 3}


def _non_finite(layer: str, where: str, step: int, values: torch.Tensor, component: str = "") -> str:
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    finite = values[torch.isfinite(values)]
    peak = f"{float(finite.abs().max()):.3g}" if finite.numel() else "none"
    of = f" of {component}" if component else ""  # which expert, where a sampler runs several (Wan 2.2)
    return (
        f"calibration{of}: layer {layer}'s {where} at step {step} holds {nan} NaN and {inf} infinite values (largest "
        f"finite magnitude {peak}): the model overflows float32 there. Check that layer's weights and the layers "
        "feeding it (a checkpoint loaded in the wrong dtype or scale), or the pipeline's inputs"
    )


class Recorder:
    """Accumulates statistics from forward hooks; one instance per calibration run.

    Args:
        graph: the denoiser's data flow (names the timestep and sequence inputs, and the layers
            that read text).
        samples_per_step: activation values kept per (layer, step).
        seed: sampling seed.
        component: the pipeline component recorded, named in errors ("" for a bare module).
    """

    def __init__(self, graph: DataflowGraph, samples_per_step: int, seed: int, component: str = "") -> None:
        self.graph = graph
        self.component = component
        self.samples = samples_per_step
        self.seed = seed
        self.gen = torch.Generator()
        # Output samples draw from their own generator, so the input samples (and every plan made
        # from them) do not depend on whether outputs are recorded.
        self.out_gen = torch.Generator()
        self.acc: dict[str, dict[str, Any]] = {}
        # Every recorded list entry is tagged (batch, order within the batch), so that the
        # recorders of ranks that ran different batches merge into the single-process lists.
        self.sequences: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
        self.batch = 0
        self._order = 0
        self.text_layers = text_layers(graph)
        self.timesteps: list[float] = []
        self.calls = 0
        self._call_steps: list[float] = []
        self._call_count = 0
        self.step = 0

    def start_call(self, batch: int = 0) -> None:
        """Pipeline call ``batch`` begins: its steps count from 0 again, and its value samples draw
        from generators seeded by the batch, so a batch draws the same values whichever rank runs
        it and whatever ran before."""
        self._call_steps = []
        self._call_count = 0
        self.batch = batch
        self._order = 0
        self.gen.manual_seed(self.seed * 1_000_003 + 2 * batch)
        self.out_gen.manual_seed(self.seed * 1_000_003 + 2 * batch + 1)

    def _tag(self) -> tuple[int, int]:
        self._order += 1
        return (self.batch, self._order)

    def on_denoiser(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        self._call_count += 1
        bound = bind_call(module, args, kwargs)
        t = _timestep_value(bound.get(self.graph.timestep_input)) if self.graph.timestep_input else None
        if t is None:
            self.step = self._call_count - 1
        else:
            if t not in self._call_steps:
                self._call_steps.append(t)
            self.step = self._call_steps.index(t)
        if len(self.timesteps) <= self.step:
            self.timesteps.append(t if t is not None else float(self.step))
        if self.step == 0:
            batch = batch_size(bound.get(self.graph.main_input))
            for name in self.graph.sequence_inputs:
                value = sequence_tensor(bound.get(name), batch)
                if value is not None:
                    self.sequences.setdefault(name, []).append((self._tag(), value.detach().float().cpu()))

    def on_layer(self, name: str, kind: str, x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = x.detach().float()
        channel_dim = 1 if kind in CONV_KINDS else x.dim() - 1
        dims = [d for d in range(x.dim()) if d != channel_dim]
        a = self.acc.get(name) or self.acc.setdefault(name, _accumulator(kind))
        t = self.step
        tag = self._tag()
        flat = x.flatten()
        idx = torch.randint(0, flat.numel(), (self.samples,), generator=self.gen)
        stride = 1
        for d in range(channel_dim + 1, x.dim()):
            stride *= x.shape[d]
        a["chan"].setdefault(t, []).append((tag, ((idx // stride) % x.shape[channel_dim]).to(torch.int32)))
        if name in self.text_layers and x.dim() == 3:
            # A text sequence: remember which position each sample came from, how much each
            # position's row varies across prompts, and the rows themselves (for BOS rows).
            a["pos"].setdefault(t, []).append((tag, (idx // x.shape[2]) % x.shape[1]))
            spread = (x.amax(0) - x.amin(0)).abs().amax(-1).cpu()
            a["spread"] = _longest_max(a["spread"], spread)
            if a["rows"] is None or tag < a["rows"][0]:
                a["rows"] = (tag, x[0].cpu().clone())  # the first call's: the earliest tag
        mn, mx = float(flat.min()), float(flat.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise NonFiniteError(_non_finite(name, "input", t, flat, self.component))
        cab = x.abs().amax(dim=dims).cpu()
        a["min"][t] = min(mn, a["min"].get(t, mn))
        a["max"][t] = max(mx, a["max"].get(t, mx))
        a["absmax"][t] = torch.maximum(cab, a["absmax"][t]) if t in a["absmax"] else cab
        a["samples"].setdefault(t, []).append((tag, flat[idx.to(flat.device)].cpu()))
        if out is not None:
            y = out.detach().float().flatten()
            oidx = torch.randint(0, y.numel(), (self.samples,), generator=self.out_gen)
            omn, omx = float(y.min()), float(y.max())
            if not (math.isfinite(omn) and math.isfinite(omx)):
                raise NonFiniteError(_non_finite(name, "output", t, y, self.component))
            a["out_min"][t] = min(omn, a["out_min"].get(t, omn))
            a["out_max"][t] = max(omx, a["out_max"].get(t, omx))
            a["out_samples"].setdefault(t, []).append((tag, y[oidx.to(y.device)].cpu()))

    def state(self) -> dict[str, Any]:
        """What this recorder accumulated, for :meth:`merge` on another rank. Each tagged list
        travels as (tags, sizes, one concatenated tensor): pickling thousands of small tensors
        costs far more than their bytes."""
        acc = {
            name: {k: ({t: _pack(entries) for t, entries in v.items()} if k in _TAGGED else v) for k, v in a.items()}
            for name, a in self.acc.items()
        }
        return {"acc": acc, "sequences": self.sequences, "timesteps": self.timesteps, "calls": self.calls}

    def merge(self, states: list[dict[str, Any]]) -> None:
        """Take in the recorders of every rank (this one's included, as :meth:`state`): extrema
        combine exactly, tagged lists are put back in (batch, order) order, the first call's rows
        are the earliest's. The result is the recorder of one process that ran every batch."""
        merged: dict[str, dict[str, Any]] = {}
        for st in states:
            for name, a in st["acc"].items():
                m = merged.get(name) or merged.setdefault(name, _accumulator(a["kind"]))
                for key, pick in (("min", min), ("max", max), ("out_min", min), ("out_max", max)):
                    for t, v in a[key].items():
                        m[key][t] = pick(v, m[key][t]) if t in m[key] else v
                for t, v in a["absmax"].items():
                    m["absmax"][t] = torch.maximum(v, m["absmax"][t]) if t in m["absmax"] else v
                for key in _TAGGED:
                    for t, packed in a[key].items():
                        m[key].setdefault(t, []).extend(_unpack(packed))
                if a["spread"] is not None:
                    m["spread"] = _longest_max(m["spread"], a["spread"])
                if a["rows"] is not None and (m["rows"] is None or a["rows"][0] < m["rows"][0]):
                    m["rows"] = a["rows"]
        for m in merged.values():
            for key in _TAGGED:
                for entries in m[key].values():
                    entries.sort(key=lambda e: e[0])
        sequences: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
        for st in states:
            for name, entries in st["sequences"].items():
                sequences.setdefault(name, []).extend(entries)
        for entries in sequences.values():
            entries.sort(key=lambda e: e[0])
        self.acc, self.sequences = merged, sequences
        self.timesteps = max((st["timesteps"] for st in states), key=len)
        self.calls = sum(st["calls"] for st in states)

    def sequence_tensors(self) -> dict[str, torch.Tensor]:
        """Each sequence input's step-0 values over every call, in batch order."""
        return {k: nan_padded([v for _, v in entries]) for k, entries in self.sequences.items()}

    def finish(self) -> dict[str, LayerStats]:
        """The accumulated statistics, one LayerStats per layer that ran."""
        out = {}
        g = torch.Generator().manual_seed(0)
        out_g = torch.Generator().manual_seed(1)
        for name, a in self.acc.items():
            steps = sorted(a["min"])
            samples, positions, channels, out_samples = [], [], [], []
            for t in steps:
                pool = _values(a["samples"][t])
                keep = torch.randperm(pool.numel(), generator=g)[: self.samples]
                samples.append(pool[keep])
                channels.append(_values(a["chan"][t])[keep])
                if a["pos"]:
                    positions.append(_values(a["pos"][t])[keep].to(torch.int32))
                if a["out_samples"]:
                    opool = _values(a["out_samples"][t])
                    out_samples.append(opool[torch.randperm(opool.numel(), generator=out_g)[: self.samples]])
            empty = torch.zeros(0)
            out[name] = LayerStats(
                kind=a["kind"],
                min=torch.tensor([a["min"][t] for t in steps]),
                max=torch.tensor([a["max"][t] for t in steps]),
                channel_absmax=torch.stack([a["absmax"][t] for t in steps]),
                samples=torch.stack(samples),
                sample_positions=torch.stack(positions) if positions else empty.to(torch.int32),
                text_spread=a["spread"] if a["spread"] is not None else empty,
                text_rows=a["rows"][1] if a["rows"] is not None else empty,
                sample_channels=torch.stack(channels),
                out_min=torch.tensor([a["out_min"][t] for t in steps]) if out_samples else empty,
                out_max=torch.tensor([a["out_max"][t] for t in steps]) if out_samples else empty,
                out_samples=torch.stack(out_samples) if out_samples else empty,
            )
        return out


def _longest_max(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of two per-position spreads, the longer one's tail kept: a pipeline that
    pads each batch's text to its longest prompt only (Kandinsky 5) gives calls of other lengths."""
    if a is None:
        return b
    short, long = (a, b) if a.numel() <= b.numel() else (b, a)
    return torch.cat([torch.maximum(short, long[: short.numel()]), long[short.numel() :]])


def _accumulator(kind: str) -> dict[str, Any]:
    """A layer's empty accumulator: per-step extrema and tagged sample lists, text spread and rows."""
    return {"kind": kind, "min": {}, "max": {}, "absmax": {}, "samples": {}, "pos": {}, "chan": {}, "spread": None,
            "rows": None, "out_min": {}, "out_max": {}, "out_samples": {}}  # fmt: skip


_TAGGED = ("samples", "pos", "chan", "out_samples")
"""The per-step lists of a layer's accumulator whose entries are tagged (batch, order)."""


def _pack(entries: list[tuple[tuple[int, int], torch.Tensor]]) -> tuple[Any, ...]:
    values = torch.cat([v for _, v in entries])
    dtype = values.dtype
    if not values.is_floating_point() and values.numel() and -32768 <= int(values.min()) <= int(values.max()) < 32768:
        values = values.to(torch.int16)  # channel and position indices: exact in 16 bits, a quarter of int64's bytes
    return [tag for tag, _ in entries], [v.numel() for _, v in entries], values, dtype


def _unpack(packed: tuple[Any, ...]) -> list[tuple[tuple[int, int], torch.Tensor]]:
    tags, sizes, values, dtype = packed
    return [(tuple(tag), v) for tag, v in zip(tags, torch.split(values.to(dtype), sizes), strict=True)]


def _values(entries: list[tuple[tuple[int, int], torch.Tensor]]) -> torch.Tensor:
    """The tensors of tagged entries, concatenated in their (batch, order) order."""
    return torch.cat([v for _, v in entries])


@contextlib.contextmanager
def recording(denoiser: nn.Module, rec: Recorder) -> Iterator[None]:
    """Named hooks that feed ``rec`` from the denoiser and each of its layers; always removed."""
    with scoped_hooks() as hooks:
        hooks.add_forward_pre_hook("diffkiln.calib.denoiser", denoiser, rec.on_denoiser)
        for name, module in find_quantizable_layers(denoiser).items():
            kind = layer_kind(module) or ""

            def hook(
                _m: nn.Module, args: tuple[Any, ...], _kw: dict[str, Any], out: Any, name: str = name, kind: str = kind
            ) -> None:
                rec.on_layer(name, kind, layer_input(args, _kw), out if kind in CONV_KINDS else None)

            hooks.add_forward_hook(f"diffkiln.calib.{name}", module, hook)
        yield
