"""The sensitivity analysis as a text table, sensitivity.json and a self-contained sensitivity.html."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from diffkiln.optimizer.sensitivity import SensitivityTable
from diffkiln.report.html import STYLE, bar_chart

__all__ = ["format_sensitivity_table", "render_sensitivity_html", "write_sensitivity"]


def _worst_error(table: SensitivityTable, layer: str) -> float:
    return max((e.error for e in table.entries if e.layer == layer and e.target == "weight"), default=0.0)


def _columns(table: SensitivityTable) -> list[str]:
    cols = sorted({f"w{e.bits}" for e in table.entries if e.target == "weight"}, key=lambda c: int(c[1:]))
    return cols + sorted({f"a{e.bits}" for e in table.entries if e.target == "act"})


def _value(v: float | None, role: str) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "exact"
    return f"{v:.4f}" if role == "content" else f"{v:.1f} dB"


def format_sensitivity_table(table: SensitivityTable, top: int = 20) -> str:
    """The ``top`` most sensitive layers (largest error at their lowest candidate), as text.

    Args:
        table: the measured sensitivities.
        top: rows to show (0: all). Default 20.
    """
    rows = sorted(table.rows(), key=lambda r: -_worst_error(table, r["layer"]))
    if top:
        rows = rows[:top]
    cols = _columns(table)
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'role':<7} {'params':>9}  " + "  ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        vals = "  ".join(f"{_value(r.get(c), r['role']):>10}" for c in cols)
        lines.append(f"{r['layer']:<{width}}  {r['role']:<7} {r['params']:>9}  {vals}")
    n_content = sum(r.value == "content" for r in table.roles.values())
    lines.append(
        f"{len(table.roles)} layers ({n_content} content: SSIM of final images; {len(table.roles) - n_content} "
        f"quality: denoiser-output SQNR); {len(table.entries)} trials, simulated (fake-quant)"
    )
    return "\n".join(lines)


def render_sensitivity_html(table: SensitivityTable, model: str, seconds: float | None = None) -> str:
    """A self-contained page: one chart per group at the lowest common weight width, then the table.

    Args:
        table: the measured sensitivities.
        model: the model's name, for the title.
        seconds: how long the analysis took, when it ran. Default None.
    """
    weight_bits = sorted({e.bits for e in table.entries if e.target == "weight"})
    shown = 4 if 4 in weight_bits else (weight_bits[0] if weight_bits else 8)
    content = {
        e.layer: e.value for e in table.entries if e.target == "weight" and e.bits == shown and e.role == "content"
    }
    quality = {
        e.layer: e.value for e in table.entries if e.target == "weight" and e.bits == shown and e.role == "quality"
    }
    cols = _columns(table)
    head = "".join(f"<th>{c}</th>" for c in ["layer", "role", "params", *cols])
    body = "".join(
        "<tr>"
        + f"<td>{html.escape(r['layer'])}</td><td>{r['role']}</td><td class=num>{r['params']}</td>"
        + "".join(f"<td class=num>{_value(r.get(c), r['role'])}</td>" for c in cols)
        + "</tr>"
        for r in table.rows()
    )
    took = f" It took {seconds:.0f} s." if seconds is not None else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>diffkiln sensitivity: {html.escape(model)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Layer sensitivity: {html.escape(model)}</h1>"
        f"<p>Each layer quantized alone ({len(table.entries)} trials, <b>simulated</b> with fake-quant).{took} "
        "Content layers (cross-attention, feed-forward) are scored by SSIM of the final images against "
        "FP on the same prompts and seeds; quality layers by SQNR of the denoiser output. "
        "Columns w<i>b</i>: weights at <i>b</i> bits; a8: activations at 8 bits.</p>"
        f"<h2>Content layers: SSIM with weights at {shown} bits (red: below 0.95)</h2>"
        + bar_chart(content, "", good=0.95)
        + f"<h2>Quality layers: SQNR with weights at {shown} bits (red: below 20 dB)</h2>"
        + bar_chart(quality, "dB", good=20.0)
        + f"<h2>All trials</h2><table><tr>{head}</tr>{body}</table></body></html>"
    )


def write_sensitivity(
    table: SensitivityTable, out_dir: Path, model: str, seconds: float | None = None
) -> tuple[Path, Path]:
    """Write ``out_dir/sensitivity.json`` and ``out_dir/sensitivity.html``.

    Returns:
        (the JSON path, the HTML path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "sensitivity.json", out_dir / "sensitivity.html"
    data = {**table.to_dict(), "model": model, "seconds": seconds}
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    html_path.write_text(render_sensitivity_html(table, model, seconds), encoding="utf-8")
    return json_path, html_path
