"""Measuring and rendering the Pareto sweep (built by :func:`diffkiln.api.sweep.build_sweep`).

``diffkiln optimize MODEL --recipe mixed --sweep 3,4,5,6,8 --out DIR`` builds one bundle per
average (``DIR/mixed-w4`` ...) and the two uniform reference bundles (``DIR/uniform-w4a8``,
``DIR/w8a8``); :func:`evaluate_sweep` then writes ``DIR/sweep.json`` + ``DIR/sweep.html``: average
bits against content accuracy (when the model has a judge), latent SQNR against FP, stored size
and resident memory, plus a per-layer bit map.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from diffkiln.api.sweep import SweepBuild
from diffkiln.core.pipelines import find_denoiser
from diffkiln.generation import GenerateConfig, generate, load_pipeline
from diffkiln.report.compare import fidelity
from diffkiln.report.evaluate import ReportConfig
from diffkiln.report.html import STYLE
from diffkiln.report.judging import judge_all, prompt_list, quality
from diffkiln.runtime.inspect import denoiser_sizes
from diffkiln.runtime.memory import resident_bytes
from diffkiln.zoo.registry import JudgeKind, resolve_target

__all__ = ["evaluate_sweep", "format_sweep_rows"]

_BIT_COLORS = {2: "#d7301f", 4: "#fc8d59", 7: "#91cf60", 8: "#1a9850", 16: "#bbbbbb"}


def _measured_fraction(pipe: Any) -> float | None:
    """The block evaluations the cache hooks counted over the uncached denoiser's, or None."""
    run = getattr(pipe, "diffkiln_cache", None)
    return round(run.compute_fraction, 4) if run is not None and run.compute_fraction is not None else None


def _measured_density(pipe: Any) -> float | None:
    """The attention FLOPs the sparse kernels kept over dense, on the masked layers, or None."""
    run = getattr(pipe, "diffkiln_sparse", None)
    return round(run.kept / run.dense, 4) if run is not None and run.dense else None


# What a sweep can vary: the row field, the plot's axis label, and the axis range.
_AXES = {
    "avg_weight_bits": ("average weight bits", 2.0, 16.0),
    "cache_compute_fraction": ("compute fraction (block evaluations over the uncached run's)", 0.0, 1.0),
    "attention_density": ("attention density (kept attention FLOPs of the masked layers)", 0.0, 1.0),
}


def _swept(rows: list[dict[str, Any]]) -> str:
    """The field the sweep varied: the cache's compute fraction or the attention density where the
    bundles differ in it (a cache sweep's ``uncached``, an attention sweep's ``dense`` bundle count
    as 1), else the average weight bits."""
    bundles = [r for r in rows if r["name"] != "fp"]
    for key in ("cache_compute_fraction", "attention_density"):
        if any(r.get(key) is not None for r in bundles) and len({r.get(key) for r in bundles}) > 1:
            return key
    return "avg_weight_bits"


def _x(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None else (16.0 if key == "avg_weight_bits" else 1.0)


def evaluate_sweep(build: SweepBuild, eval_size: int = 50, progress: bool = True,
                   vae_tiling: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """Measure every bundle of a sweep against FP on the same samples and seeds, and write
    ``sweep.json`` and ``sweep.html`` into the sweep's folder.

    Args:
        build: the built sweep (:func:`diffkiln.api.sweep.build_sweep`).
        eval_size: evaluation prompts per set (judged built-in models; others: the calibration
            prompts). Default 50.
        progress: show progress bars. Default True.
        vae_tiling: decode in tiles (:attr:`diffkiln.generation.GenerateConfig.vae_tiling`). Default False.

    Returns:
        (sweep.json, sweep.html).
    """
    prep = build.prepared
    judge_kind = prep.resolved.builtin.judge if prep.resolved.builtin else JudgeKind.NONE
    prompts = (
        prompt_list(ReportConfig(eval_size=eval_size), judge_kind)
        if judge_kind.scores
        else list(prep.stats.settings["prompts"])
    )
    # The calls the bundles were calibrated with (steps, a user folder's size and frames): cache
    # schedules and sparse masks are searched for them.
    recorded = prep.stats.settings.get("call_kwargs") or {}
    gen_cfg = GenerateConfig(steps=prep.stats.settings.get("steps"), progress=progress,
                             call_kwargs=tuple(recorded.items()), vae_tiling=vae_tiling)  # fmt: skip
    fp = generate(prep.pipe, prompts, gen_cfg, prep.resolved, measure=True)
    rows: list[dict[str, Any]] = []
    if judge_kind.scores:
        rows.append({"name": "fp", "avg_weight_bits": 16.0, "cache_compute_fraction": None, "attention_density": None,
                     "quality": quality(judge_all(fp, judge_kind))})  # fmt: skip
    for name, path in build.bundles.items():
        resolved = resolve_target(str(path))
        pipe = load_pipeline(resolved)
        result = generate(pipe, prompts, gen_cfg, resolved, measure=True)
        manifest = pipe.diffkiln_manifest
        stored, fp16 = denoiser_sizes(path, manifest)
        denoiser = find_denoiser(pipe, manifest["pipeline"]["denoiser"])
        row: dict[str, Any] = {
            "name": name,
            "bundle": str(path),
            "avg_weight_bits": manifest["quant"]["avg_weight_bits"],
            "avg_stored_weight_bits": manifest["quant"].get("avg_stored_weight_bits"),
            "avg_act_bits": manifest["quant"]["avg_act_bits"],
            "fidelity": fidelity(fp, result),
            "denoiser_bytes": stored,
            "denoiser_fp16_bytes": fp16,
            "size_ratio_vs_fp16": stored / fp16,
            "resident_bytes": resident_bytes(denoiser),
            "resident_ratio_vs_fp16": resident_bytes(denoiser) / fp16,
            "ms_per_step": result.extras["denoiser_ms_per_step"],
            "cache_compute_fraction": _measured_fraction(pipe),
            "attention_density": _measured_density(pipe),
            "bits": {n: info["bits"] for n, info in manifest["quant"]["layers"].items()},
        }
        if judge_kind.scores:
            row["quality"] = quality(judge_all(result, judge_kind))
        rows.append(row)
    data = {"target": prep.resolved.name, "eval_prompts": len(prompts), "layers": build.layers, "rows": rows,
            "swept": _swept(rows)}  # fmt: skip
    out = Path(next(iter(build.bundles.values()))).parent
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "sweep.json", out / "sweep.html"
    json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    html_path.write_text(_render(data), encoding="utf-8")
    return json_path, html_path


def format_sweep_rows(data: dict[str, Any]) -> list[str]:
    """One line per bundle of a ``sweep.json``: average bits, content accuracy, SQNR, size."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = []
    for row in data["rows"]:
        acc = (row.get("quality") or {}).get("content_accuracy")
        sqnr = (row.get("fidelity") or {}).get("latent_sqnr_db")
        lines.append(
            f"{row['name']:<22} avg W bits {row['avg_weight_bits']:5.2f}  content acc {fmt(acc)}  "
            f"latent SQNR {fmt(sqnr)} dB  stored/FP16 {fmt(row.get('size_ratio_vs_fp16'))}"
            + (f"  compute {fmt(row['cache_compute_fraction'])}" if row.get("cache_compute_fraction") else "")
            + (f"  attention density {fmt(row['attention_density'])}" if row.get("attention_density") else "")
        )
    return lines


def _accuracy(row: dict[str, Any]) -> float | None:
    q = row.get("quality")
    return None if not q else q.get("content_accuracy")


def _pareto_svg(rows: list[dict[str, Any]], swept: str = "avg_weight_bits") -> str:
    """What the sweep varied (x: :data:`_AXES`) against content accuracy, or latent SQNR without a judge (y)."""
    x_label, x_lo, x_hi = _AXES[swept]
    pts = []
    for r in rows:
        y = _accuracy(r)
        label = "content accuracy (single objects)"
        if y is None:
            y = (r.get("fidelity") or {}).get("latent_sqnr_db")
            label = "latent SQNR vs FP (dB)"
        if y is not None:
            pts.append((_x(r, swept), float(y), r["name"]))
    if not pts:
        return "<p>no data</p>"
    w, h, pad = 560, 300, 50
    ymax = max(p[1] for p in pts) * 1.1 or 1.0
    ymin = min(0.0, min(p[1] for p in pts))

    def sx(x: float) -> float:
        return pad + (x - x_lo) / (x_hi - x_lo) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - ymin) / (ymax - ymin) * (h - 2 * pad)

    items = [
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#444'/>",
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#444'/>",
        f"<text x='{w / 2}' y='{h - 10}' text-anchor='middle' font-size='12'>{html.escape(x_label)}</text>",
        f"<text x='12' y='{pad - 14}' font-size='12'>{html.escape(label)}</text>",
    ]
    ticks = (2, 4, 6, 8, 10, 12, 14, 16) if swept == "avg_weight_bits" else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    for b in ticks:
        items.append(f"<text x='{sx(b):.0f}' y='{h - pad + 16}' text-anchor='middle' font-size='10'>{b:g}</text>")
    for x, y, name in pts:
        color = "#1f77b4" if name.startswith("mixed") else ("#444" if name == "fp" else "#d62728")
        items.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='5' fill='{color}'/>")
        items.append(f"<text x='{sx(x) + 7:.1f}' y='{sy(y) - 6:.1f}' font-size='10'>{html.escape(name)} {y:.3f}</text>")
    return f"<svg width='{w}' height='{h}'>{''.join(items)}</svg>"


def _bitmap_svg(layers: list[str], rows: list[dict[str, Any]]) -> str:
    """One row per bundle, one cell per layer in module order, coloured by its weight bits."""
    cell, label_w = max(2, min(8, 900 // max(len(layers), 1))), 120
    items = []
    bundles = [r for r in rows if "bits" in r]
    for i, r in enumerate(bundles):
        y = i * 16
        items.append(
            f"<text x='{label_w - 6}' y='{y + 11}' text-anchor='end' font-size='10'>{html.escape(r['name'])}</text>"
        )
        for j, layer in enumerate(layers):
            bits = r["bits"].get(layer, 16)
            items.append(
                f"<rect x='{label_w + j * cell}' y='{y + 2}' width='{cell}' height='12' "
                f"fill='{_BIT_COLORS.get(bits, '#000')}'><title>{html.escape(layer)}: {bits} bits</title></rect>"
            )
    legend = " ".join(f"<span style='background:{c}'>{b} bits</span>" for b, c in _BIT_COLORS.items())
    svg = f"<svg width='{label_w + cell * len(layers) + 10}' height='{16 * len(bundles) + 4}'>{''.join(items)}</svg>"
    return f"<p class=legend>{legend}</p>{svg}"


def _render(data: dict[str, Any]) -> str:
    swept = data.get("swept", "avg_weight_bits")
    head = (
        "<tr><th>bundle</th><th>avg W bits</th><th>avg A bits</th><th>content acc.</th><th>held-out</th>"
        "<th>pairs</th><th>latent SQNR dB</th><th>stored / FP16</th><th>resident / FP16</th><th>ms/step</th>"
        "<th>compute fraction</th><th>attention density</th></tr>"
    )
    body = []
    for r in data["rows"]:
        q = r.get("quality") or {}
        f = r.get("fidelity") or {}

        def fmt(v: Any, spec: str = ".3f") -> str:
            return "-" if v is None else format(v, spec)

        body.append(
            f"<tr><td>{html.escape(r['name'])}</td><td class=num>{fmt(r['avg_weight_bits'], '.2f')}</td>"
            f"<td class=num>{fmt(r.get('avg_act_bits'), '.2f')}</td><td class=num>{fmt(q.get('content_accuracy'))}</td>"
            f"<td class=num>{fmt(q.get('content_accuracy_heldout'))}</td>"
            f"<td class=num>{fmt(q.get('content_accuracy_pairs'))}</td>"
            f"<td class=num>{fmt(f.get('latent_sqnr_db'), '.1f')}</td>"
            f"<td class=num>{fmt(r.get('size_ratio_vs_fp16'))}</td>"
            f"<td class=num>{fmt(r.get('resident_ratio_vs_fp16'))}</td>"
            f"<td class=num>{fmt(r.get('ms_per_step'), '.1f')}</td>"
            f"<td class=num>{fmt(r.get('cache_compute_fraction'))}</td>"
            f"<td class=num>{fmt(r.get('attention_density'))}</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>diffkiln sweep: {html.escape(data['target'])}</title><style>{STYLE}</style></head><body>"
        f"<h1>Sweep: {html.escape(data['target'])}</h1>"
        f"<p>{data['eval_prompts']} evaluation prompts, same seeds for every bundle and for FP. Blue: mixed "
        "plans (ILP from measured sensitivities); red: the other bundles; compute fraction and attention "
        "density as the bundles ran. Integer runtime, not simulated.</p>"
        f"<h2>{html.escape(_AXES[swept][0].split(' (')[0].capitalize())} against quality</h2>"
        f"{_pareto_svg(data['rows'], swept)}"
        f"<h2>All bundles</h2><table>{head}{''.join(body)}</table>"
        f"<h2>Per-layer weight bits</h2>{_bitmap_svg(data['layers'], data['rows'])}</body></html>"
    )
