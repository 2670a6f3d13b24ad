"""The ``calibrate`` verb: run the FP pipeline and record per-layer, per-timestep activation stats.

For every Linear and Conv2d of the denoiser (found by type, never by name) and every sampler
step, it records the input activation's min, max, per-channel absmax, and a seeded random sample
of values (from which percentiles, histograms and error-minimising clipping are computed); for
every Conv2d, the output's min, max and sample too (for convolutions whose output is
requantized, ``QuantizeConfig.requantize_conv_outputs``). It
also records the text embeddings the denoiser receives, to find the token positions that do not
vary across prompts (CLIP's BOS under its causal mask). Results are cached on disk, keyed by a
hash of the weights, the prompts and the settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.pipelines import find_denoiser, pipeline_weight_hash, step_callback_kwargs

__all__ = [
    "CalibrationConfig",
    "CalibrationStats",
    "LayerStats",
    "calibrate",
    "calibrate_denoiser",
    "find_denoiser",
    "find_quantizable_layers",
    "pipeline_weight_hash",
]

STATS_VERSION = 3
# Versions whose settings (CalibrationConfig.key_fields) mean what this version's do; 3 added
# the convolutions' output statistics to the same settings.
_COMPATIBLE_SETTINGS = (2, 3)
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


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate.

    Attributes:
        prompts: calibration prompts (non-empty).
        steps: sampler steps, as at inference. Default 20.
        guidance: classifier-free guidance scale, as at inference. Default 5.0.
        seed: base seed; prompt i uses seed + i. Default 0.
        batch_size: prompts per pipeline call. Default 8.
        samples_per_step: activation values kept per (layer, step). Default 1024.
        cache_dir: where stats are cached; None disables the cache. Default None.
        progress: show a progress bar. Default True.
        call_kwargs: extra pipeline-call arguments as (name, value) pairs, e.g. height and width.
            Default none.
    """

    prompts: tuple[str, ...]
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 8
    samples_per_step: int = 1024
    cache_dir: Path | None = None
    progress: bool = True
    call_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("calibration needs at least one prompt, and no empty prompt")
        for name in ("steps", "batch_size", "samples_per_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    @classmethod
    def from_key_fields(
        cls, d: dict[str, Any], cache_dir: Path | None = None, progress: bool = False
    ) -> CalibrationConfig:
        """Rebuild the config whose :meth:`key_fields` gave ``d`` (e.g. from a plan's notes).

        Raises:
            ValueError: ``d`` was written by another statistics version.
        """
        if d.get("version") not in _COMPATIBLE_SETTINGS:
            raise ValueError(f"calibration settings of version {d.get('version')}; this diffkiln uses {STATS_VERSION}")
        kw = {k: v for k, v in d.items() if k != "version"}
        kw["prompts"] = tuple(kw["prompts"])
        kw["call_kwargs"] = tuple(kw.get("call_kwargs", {}).items())
        return cls(**kw, cache_dir=cache_dir, progress=progress)

    def key_fields(self) -> dict[str, Any]:
        """The settings that change the statistics (the cache key's inputs besides the weights)."""
        d = asdict(self)
        d.pop("cache_dir")
        d.pop("progress")
        d["prompts"] = list(self.prompts)
        d["call_kwargs"] = {k: v for k, v in self.call_kwargs}
        d["version"] = STATS_VERSION
        return d


@dataclass
class LayerStats:
    """Input-activation statistics of one layer; the first dimension indexes sampler steps.

    Attributes:
        kind: "linear" or "conv".
        min: (T,) minimum per step.
        max: (T,) maximum per step.
        channel_absmax: (T, C) absolute maximum per input channel per step.
        samples: (T, S) random sample of values per step.
        sample_positions: (T, S) sequence position of each sample, for layers whose input is a
            sequence of the text's length; empty for other layers.
        text_spread: (L,) largest spread across the batch of the input row at each position, for
            layers whose input is a sequence of the text's length (0: same row for every prompt);
            empty for other layers.
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

        Only layers whose input is a text-length sequence that varies with the prompt elsewhere
        qualify (cross-attention keys/values, text projections), so an image-token sequence that
        happens to have the text's length is not mistaken for text.

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
        text_embeds: (B, L, D) text embeddings the denoiser received (conditional and unconditional).
        model_hash: hash of the pipeline's weights.
        settings: the calibration settings.
    """

    layers: dict[str, LayerStats]
    timesteps: list[float]
    text_embeds: torch.Tensor
    model_hash: str
    settings: dict[str, Any] = field(default_factory=dict)

    def invariant_positions(self, rel_tol: float = 1e-6) -> list[int]:
        """Text positions whose embedding is the same for every prompt (variance ~ 0).

        Args:
            rel_tol: a position is invariant when its variance across prompts is below
                ``rel_tol`` times the mean variance of all positions. Default 1e-6.
        """
        var = self.text_embeds.float().var(dim=0).mean(dim=-1)
        threshold = rel_tol * float(var.mean()) if float(var.mean()) > 0 else 0.0
        return [i for i, v in enumerate(var.tolist()) if v <= threshold]

    def save(self, path: Path) -> None:
        """Write as one safetensors file (tensors) with JSON metadata; no pickle."""
        tensors = {"text_embeds": self.text_embeds.contiguous()}
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
            "version": STATS_VERSION,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"diffkiln": json.dumps(meta)})
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        """Read a file written by :meth:`save`."""
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
        return cls(layers, meta["timesteps"], tensors["text_embeds"], meta["model_hash"], meta["settings"])


class _Recorder:
    """Accumulates statistics from forward hooks; one instance per calibration run."""

    def __init__(self, steps: int, samples_per_step: int, seed: int) -> None:
        self.steps = steps
        self.samples = samples_per_step
        self.calls = 0
        self.gen = torch.Generator().manual_seed(seed)
        # Output samples draw from their own generator, so the input samples (and every plan made
        # from them) are the same as when outputs were not recorded.
        self.out_gen = torch.Generator().manual_seed(seed + 1)
        self.acc: dict[str, dict[str, Any]] = {}
        self.text: list[torch.Tensor] = []
        self.text_len = 0

    @property
    def step(self) -> int:
        return (self.calls - 1) % self.steps

    def on_denoiser(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        ehs = kwargs.get("encoder_hidden_states")
        if isinstance(ehs, torch.Tensor):
            self.text_len = ehs.shape[1]
            if self.step == 0:
                self.text.append(ehs.detach().float().cpu())

    def on_layer(self, name: str, kind: str, x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = x.detach().float()
        channel_dim = 1 if kind == "conv" else x.dim() - 1
        dims = [d for d in range(x.dim()) if d != channel_dim]
        a = self.acc.setdefault(
            name,
            {
                "kind": kind,
                "min": {},
                "max": {},
                "absmax": {},
                "samples": {},
                "pos": {},
                "chan": {},
                "spread": None,
                "rows": None,
                "out_min": {},
                "out_max": {},
                "out_samples": {},
            },
        )
        t = self.step
        flat = x.flatten()
        idx = torch.randint(0, flat.numel(), (self.samples,), generator=self.gen)
        stride = 1
        for d in range(channel_dim + 1, x.dim()):
            stride *= x.shape[d]
        a["chan"].setdefault(t, []).append(((idx // stride) % x.shape[channel_dim]).to(torch.int32))
        if kind == "linear" and x.dim() == 3 and self.text_len and x.shape[1] == self.text_len:
            # A text-token sequence: remember which position each sample came from, how much each
            # position's row varies across prompts, and the rows themselves (for BOS precompute).
            a["pos"].setdefault(t, []).append((idx // x.shape[2]) % x.shape[1])
            spread = (x.amax(0) - x.amin(0)).abs().amax(-1).cpu()
            a["spread"] = spread if a["spread"] is None else torch.maximum(a["spread"], spread)
            if a["rows"] is None:
                a["rows"] = x[0].cpu().clone()
        mn, mx = float(flat.min()), float(flat.max())
        cab = x.abs().amax(dim=dims).cpu()
        a["min"][t] = min(mn, a["min"].get(t, mn))
        a["max"][t] = max(mx, a["max"].get(t, mx))
        a["absmax"][t] = torch.maximum(cab, a["absmax"][t]) if t in a["absmax"] else cab
        a["samples"].setdefault(t, []).append(flat[idx.to(flat.device)].cpu())
        if out is not None:
            y = out.detach().float().flatten()
            oidx = torch.randint(0, y.numel(), (self.samples,), generator=self.out_gen)
            omn, omx = float(y.min()), float(y.max())
            a["out_min"][t] = min(omn, a["out_min"].get(t, omn))
            a["out_max"][t] = max(omx, a["out_max"].get(t, omx))
            a["out_samples"].setdefault(t, []).append(y[oidx.to(y.device)].cpu())

    def finish(self) -> dict[str, LayerStats]:
        out = {}
        g = torch.Generator().manual_seed(0)
        out_g = torch.Generator().manual_seed(1)
        for name, a in self.acc.items():
            steps = sorted(a["min"])
            samples, positions, channels, out_samples = [], [], [], []
            for t in steps:
                pool = torch.cat(a["samples"][t])
                keep = torch.randperm(pool.numel(), generator=g)[: self.samples]
                samples.append(pool[keep])
                channels.append(torch.cat(a["chan"][t])[keep])
                if a["pos"]:
                    positions.append(torch.cat(a["pos"][t])[keep].to(torch.int32))
                if a["out_samples"]:
                    opool = torch.cat(a["out_samples"][t])
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
                text_rows=a["rows"] if a["rows"] is not None else empty,
                sample_channels=torch.stack(channels),
                out_min=torch.tensor([a["out_min"][t] for t in steps]) if out_samples else empty,
                out_max=torch.tensor([a["out_max"][t] for t in steps]) if out_samples else empty,
                out_samples=torch.stack(out_samples) if out_samples else empty,
            )
        return out


@contextlib.contextmanager
def _recording(denoiser: nn.Module, rec: _Recorder) -> Iterator[None]:
    """Named hooks that feed ``rec`` from the denoiser and each of its layers; always removed."""
    with scoped_hooks() as hooks:
        hooks.add_forward_pre_hook("diffkiln.calib.denoiser", denoiser, rec.on_denoiser)
        for name, module in find_quantizable_layers(denoiser).items():
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"

            def hook(
                _m: nn.Module,
                args: tuple[Any, ...],
                _kw: dict[str, Any],
                out: Any,
                name: str = name,
                kind: str = kind,
            ) -> None:
                rec.on_layer(name, kind, args[0], out if kind == "conv" else None)

            hooks.add_forward_hook(f"diffkiln.calib.{name}", module, hook)
        yield


def calibrate_denoiser(
    denoiser: nn.Module, step_inputs: Sequence[dict[str, Any]], samples_per_step: int = 1024, seed: int = 0
) -> CalibrationStats:
    """Record activation statistics from direct denoiser calls, one call per "step".

    For a denoiser without its pipeline (benchmarks of full-size architectures with random
    weights): each element of ``step_inputs`` is the keyword arguments of one forward call. Not
    cached. Use :func:`calibrate` for real models: it runs the sampler's own trajectory.

    Args:
        denoiser: a diffusers UNet or transformer.
        step_inputs: forward keyword arguments, one dict per step.
        samples_per_step: activation values kept per (layer, step). Default 1024.
        seed: sampling seed. Default 0.
    """
    if not step_inputs:
        raise ValueError("calibrate_denoiser needs at least one call's inputs")
    rec = _Recorder(len(step_inputs), samples_per_step, seed)
    with _recording(denoiser, rec), torch.no_grad():
        for kwargs in step_inputs:
            denoiser(**kwargs)
    return CalibrationStats(
        layers=rec.finish(),
        timesteps=[float(i) for i in range(len(step_inputs))],
        text_embeds=torch.cat(rec.text) if rec.text else torch.zeros(0),
        model_hash="",
        settings={"direct_calls": len(step_inputs), "samples_per_step": samples_per_step, "seed": seed},
    )


def calibrate(pipe: Any, config: CalibrationConfig) -> CalibrationStats:
    """Run the FP pipeline on the calibration prompts and record activation statistics.

    Args:
        pipe: a loaded diffusers text-to-image pipeline.
        config: calibration settings.

    Returns:
        The statistics, from the disk cache when the same weights, prompts and settings were
        calibrated before.
    """
    model_hash = pipeline_weight_hash(pipe)
    key = hashlib.sha256(json.dumps({"model": model_hash, **config.key_fields()}, sort_keys=True).encode())
    cache_path = config.cache_dir / f"calib-{key.hexdigest()[:32]}.safetensors" if config.cache_dir else None
    if cache_path is not None and cache_path.is_file():
        return CalibrationStats.load(cache_path)

    denoiser = find_denoiser(pipe)
    rec = _Recorder(config.steps, config.samples_per_step, config.seed)
    pipe.set_progress_bar_config(disable=True)
    n = len(config.prompts)
    bar = tqdm(total=n * config.steps, desc="calibrating", unit="img-step", disable=not config.progress)
    timesteps: list[float] = []
    with _recording(denoiser, rec), torch.no_grad():
        for start in range(0, n, config.batch_size):
            chunk = list(config.prompts[start : start + config.batch_size])
            gens = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(chunk))]

            def on_step(_p: Any, _i: int, t: Any, kwargs: dict[str, Any], size: int = len(chunk)) -> dict[str, Any]:
                bar.update(size)
                if len(timesteps) < config.steps:
                    timesteps.append(float(t))
                return kwargs

            pipe(
                prompt=chunk,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                generator=gens,
                output_type="latent",
                **step_callback_kwargs(pipe, on_step),
                **dict(config.call_kwargs),
            )
    bar.close()
    stats = CalibrationStats(
        layers=rec.finish(),
        timesteps=timesteps,
        text_embeds=torch.cat(rec.text) if rec.text else torch.zeros(0),
        model_hash=model_hash,
        settings=config.key_fields(),
    )
    if cache_path is not None:
        stats.save(cache_path)
    return stats
