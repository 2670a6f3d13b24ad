"""report.html: one self-contained page (images inline as base64 PNG, no external assets)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from diffkiln.report.audio_html import audio_cells

if TYPE_CHECKING:
    from diffkiln.report.evaluate import JudgedImage, Report

__all__ = ["STYLE", "bar_chart", "image_data_uri", "render_html"]

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f4f4f4} .num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.cell{width:136px;font-size:11px;line-height:1.25}
.cell img{width:128px;height:128px;image-rendering:pixelated;border:4px solid #2a2;display:block}
.cell.miss img{border-color:#d22} .cell.unjudged img{border-color:#999}
.cell.strip{width:auto} .cell.strip img{width:auto;height:96px}
.why{color:#d22} .legend span{display:inline-block;padding:2px 8px;margin-right:8px;color:#fff}
"""


def image_data_uri(image: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URI for embedding an image in HTML."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _speed_rows(speed: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The attention-alone timing rows of the sparse-attention table."""
    if not speed:
        return []
    return [(f"attention alone: dense / masked time ({speed['kernel']} kernel, {speed['layouts_timed']} layouts)",
             f"{speed['speedup']}x ({speed['dense_seconds']} s / {speed['masked_seconds']} s)")]  # fmt: skip


def _table(rows: list[tuple[Any, ...]]) -> str:
    """Rows of (label, value, ...): the label a header cell, each value a number cell."""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th>" + "".join(f"<td class=num>{_fmt(v)}</td>" for v in vals) + "</tr>"
        for k, *vals in rows
    )
    return f"<table>{body}</table>"


def _is_strip(image: Any) -> bool:
    """A clip's frame strip (much wider than tall) rather than one image."""
    return bool(image.width > 2 * image.height)


def _cell(j: JudgedImage) -> str:
    cls = "unjudged" if j.correct is None else ("" if j.correct else "miss")
    cls += " strip" if _is_strip(j.image) else ""
    why = ""
    if j.verdict is not None and not j.verdict.correct:
        why = f"<div class=why>{html.escape(j.verdict.reason)}</div>"
    return (
        f"<div class='cell {cls}'><img src='{image_data_uri(j.image)}' alt='{html.escape(j.prompt)}'>"
        f"{html.escape(j.prompt)}{why}</div>"
    )


_SET_TITLES = {
    "single": "Single objects, seen compositions",
    "single_heldout": "Single objects, held-out compositions",
    "pairs": "Two objects, seen compositions",
    "pairs_heldout": "Two objects, held-out compositions",
    None: "Not judged",
}


def bar_chart(values: Mapping[str, float | None], unit: str, good: float) -> str:
    """A horizontal SVG bar chart (inline, no scripts); bars under ``good`` are drawn red.

    An infinite value, or None (report.json's stand-in for one: JSON has no infinity), is an exact
    layer: drawn at 99 and labelled ``exact``. NaN (a non-finite output) is drawn empty and labelled
    ``not finite``.
    """
    if not values:
        return "<p>no data</p>"

    def drawn(v: float | None) -> tuple[float, str]:
        if v is None or v == math.inf:  # an exact layer: at 99 dB, so the scale stays readable
            return 99.0, "exact"
        return (0.0, "not finite") if math.isnan(v) else (v, f"{v:.1f} {unit}")

    shown = {k: drawn(v) for k, v in values.items()}
    top = max(max(v for v, _ in shown.values()), 1.0)
    row, label_w, bar_w = 14, 420, 360
    rows = []
    for i, (name, (v, text)) in enumerate(shown.items()):
        w = max(1.0, bar_w * max(v, 0.0) / top)
        color = "#2a2" if v >= good else "#d22"
        y = i * row
        rows.append(
            f"<text x='{label_w - 6}' y='{y + 10}' text-anchor='end' font-size='10'>{html.escape(name)}</text>"
            f"<rect x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{row - 4}' fill='{color}'/>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 10}' font-size='10'>{text}</text>"
        )
    height = row * len(shown) + 4
    return f"<svg width='{label_w + bar_w + 80}' height='{height}'>{''.join(rows)}</svg>"


def _bundle_sections(rep: Report) -> list[str]:
    d = rep.data
    b = d.get("baseline", {})
    rows: list[tuple[str, Any]] = []
    if "quality" in d and "quality" in b:
        for key, label in (
            ("content_accuracy", "single, seen"),
            ("content_accuracy_heldout", "single, held-out"),
            ("content_accuracy_pairs", "pairs"),
        ):
            rows.append(
                (f"content accuracy {label}: bundle / FP", f"{_fmt(d['quality'][key])} / {_fmt(b['quality'][key])}")
            )
    f, sz = d["fidelity"], d["size"]
    rows += [
        ("latent SQNR vs FP (dB), all prompts pooled", f["latent_sqnr_db"]),
        (
            "latent SQNR, median prompt / worst prompt (dB)",
            f"{_fmt(f.get('latent_sqnr_db_median_prompt'))} / {_fmt(f.get('latent_sqnr_db_worst_prompt'))}",
        ),
        ("prompts below 10 dB (sample left the FP layout)", f.get("prompts_below_10db")),
        *(
            [("image PSNR vs FP (dB)", f.get("image_psnr_db")), ("image SSIM vs FP", f.get("image_ssim"))]
            if "image_psnr_db" in f
            else [("audio SNR vs FP (dB)", f.get("audio_snr_db"))]
        ),
        ("denoiser bytes (stored; its experts too)" if d["plan"].get("experts") else "denoiser bytes (stored)",
         sz["denoiser_bytes"]),
        ("denoiser bytes (FP16)", sz["denoiser_fp16_bytes"]),
        ("stored / FP16", sz["denoiser_ratio_vs_fp16"]),
        ("bundle bytes", sz["bundle_bytes"]),
        ("denoiser ms/step: bundle / FP", f"{d['latency']['ms_per_step']:.2f} / {b['latency']['ms_per_step']:.2f}"),
        ("peak memory bytes: bundle / FP", f"{d['memory']['peak_bytes']} / {b['memory']['peak_bytes']}"),
        ("avg weight bits / act bits", _bits(d["plan"])),
        *[(f"expert {name}: avg weight bits / act bits", _bits(e)) for name, e in d["plan"].get("experts", {}).items()],
        ("integer kernels (not simulated)", not d["plan"]["simulated"]),
        ("device", d["device"]),
    ]
    out = ["<h2>Bundle against its FP baseline (" + html.escape(str(b.get("target"))) + ")</h2>", _table(rows)]
    bos = d.get("bos", {})
    if bos.get("positions"):
        out.append("<h2>BOS-aware text rows</h2>")
        out.append(
            _table(
                [
                    ("invariant positions", bos["positions"]),
                    ("|BOS| max", bos.get("bos_absmax")),
                    ("other tokens |x| max", bos.get("other_tokens_absmax")),
                    ("other tokens |x| median of per-position max", bos.get("other_tokens_absmax_median")),
                ]
            )
        )
    cmp = d.get("bos_comparison", {})
    if "bos_aware" in cmp:
        out.append("<h2>W8A8 with and without BOS-awareness (same prompts, seeds and calibration)</h2>")
        labels = {
            "latent_sqnr_db": "latent SQNR, pooled (dB)",
            "latent_sqnr_db_median_prompt": "latent SQNR, median prompt (dB)",
            "prompts_below_10db": "prompts below 10 dB (left the FP layout)",
            "image_psnr_db": "image PSNR (dB)",
            "content_accuracy": "content accuracy, single seen",
            "content_accuracy_heldout": "content accuracy, single held-out",
            "content_accuracy_pairs": "content accuracy, pairs",
        }
        off = cmp.get("smoothing_off")
        header = ("", "BOS-aware / plain") + (("BOS-aware / plain, SmoothQuant off",) if off else ())
        cmp_rows: list[tuple[str, ...]] = []
        for k, label in labels.items():
            if k not in cmp["bos_aware"]:
                continue
            row: tuple[str, ...] = (label, f"{_fmt(cmp['bos_aware'].get(k))} / {_fmt(cmp['no_bos'].get(k))}")
            if off:
                row += (f"{_fmt(off['bos_aware'].get(k))} / {_fmt(off['no_bos'].get(k))}",)
            cmp_rows.append(row)
        out.append(_table([header, *cmp_rows]))
    elif cmp.get("skipped"):
        out.append(f"<p>BOS comparison skipped: {html.escape(cmp['skipped'])}</p>")
    if d.get("attention"):
        att = d["attention"]
        out += ["<h2>Sparse attention (block-sparse kernel)</h2>", _table([
            ("density measured (kept attention FLOPs of the masked layers)", att["density"]),
            ("density planned", att["planned_density"]), ("masked layers", att["masked_layers"]),
            ("block (tokens)", att["block"]), ("families", ", ".join(att["families"])),
            *_speed_rows(att.get("speed_alone"))])]  # fmt: skip
        from diffkiln.report.sparse import masks_html

        out.append(masks_html(att.get("pictures", [])))
    if d.get("cache"):
        from diffkiln.report.cache import cache_html

        out += cache_html(d["cache"], _fmt, _table)
    out.append("<h2>Per-layer SQNR (isolated: each layer fed its FP input, middle step)</h2>")
    out.append(bar_chart(d.get("per_layer_sqnr_db", {}), "dB", good=20.0))
    for name, sqnr in d.get("experts_per_layer_sqnr_db", {}).items():
        out.append(f"<h2>Per-layer SQNR of the expert {html.escape(name)} (isolated, its first call)</h2>")
        out.append(bar_chart(sqnr, "dB", good=20.0))
    if rep.baseline_audio:
        out.append("<h2>FP audio, same prompts and seeds</h2>" + audio_cells(rep.baseline_audio, rep.sample_rate))
    if rep.baseline_images:
        # Clips' frame strips are too wide to sit side by side: FP above, bundle below.
        strips = _is_strip(rep.images[0].image) if rep.images else False
        where, pair = ("above", "column") if strips else ("left", "row")
        out.append(f"<h2>FP ({where}) vs bundle, same prompt and seed</h2><div class=grid>")
        for fp_img, q_img in list(zip(rep.baseline_images, rep.images, strict=True))[:48]:
            out.append(
                f"<div class=cell style='width:{'auto' if strips else '272px'}'>"
                f"<div style='display:flex;flex-direction:{pair};gap:4px'>{_cell(fp_img)}{_cell(q_img)}</div></div>"
            )
        out.append("</div>")
    return out


def render_html(rep: Report) -> str:
    """Render a report as one HTML page: settings, metrics, and the image grid with misses marked."""
    d = rep.data
    s = d["settings"]
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>diffkiln report: {html.escape(d['target'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>diffkiln report: {html.escape(d['target'])}</h1>",
        f"<p>{html.escape(d['pipeline_class'])} at {html.escape(d['target_path'])}</p>",
        "<h2>Settings</h2>",
        _table([(k, v) for k, v in s.items()]),
    ]
    q = d.get("quality")
    if q:
        rows: list[tuple[str, Any]] = [
            ("content accuracy (single, seen)", q["content_accuracy"]),
            ("content accuracy (single, held-out)", q["content_accuracy_heldout"]),
            ("content accuracy (pairs, seen)", q["content_accuracy_pairs"]),
        ]
        if q.get("content_accuracy_pairs_heldout") is not None:
            rows.append(("content accuracy (pairs, held-out)", q["content_accuracy_pairs_heldout"]))
        rows += [(f"{k} accuracy (all objects)", v) for k, v in q.get("attribute_accuracy", {}).items()]
        rows.append(("prompts judged", q["n_prompts"]))
        parts += ["<h2>Quality</h2>", _table(rows)]
    parts += ["<h2>Timing</h2>", _table(list(d["timing"].items()))]
    if "fidelity" in d:
        parts += _bundle_sections(rep)
    if rep.audio:
        parts.append("<h2>Audio</h2>" + audio_cells(rep.audio, rep.sample_rate))
    if rep.inputs:
        cells = "".join(f"<div class=cell><img src='{image_data_uri(p)}' alt='{html.escape(label)}'>"
                        f"<div>{html.escape(label)}</div></div>" for label, p in rep.inputs[:48])  # fmt: skip
        parts.append(f"<h2>Inputs (the region an inpainting mask repaints in red)</h2><div class=grid>{cells}</div>")
    parts.append(
        "<h2>Images</h2><p class=legend><span style='background:#2a2'>judged correct</span>"
        "<span style='background:#d22'>judge's miss</span><span style='background:#999'>not judged</span></p>"
    )
    order = ["single", "single_heldout", "pairs", "pairs_heldout", None]
    for set_name in order:
        members = [j for j in rep.images if j.prompt_set == set_name]
        if not members:
            continue
        misses = sum(1 for j in members if j.correct is False)
        kind = "clips" if _is_strip(members[0].image) else "images"
        parts.append(f"<h2>{_SET_TITLES[set_name]} ({len(members)} {kind}, {misses} misses)</h2>")
        parts.append("<div class=grid>" + "".join(_cell(j) for j in members) + "</div>")
    parts.append("<h2>report.json</h2><pre>" + html.escape(json.dumps(d, indent=2)) + "</pre></body></html>")
    return "\n".join(parts)


def _bits(plan: dict[str, Any]) -> str:
    """A bundle's average weight/activation bits; an ONNX export's runtime (it keeps the bundle's recipe)."""
    if plan.get("avg_weight_bits") is None:
        return f"recipe {plan.get('recipe')}; {plan.get('runtime', '')}"
    return f"{plan['avg_weight_bits']:.2f} / {plan['avg_act_bits']:.2f}"
