"""The report's cache section: what the bundle's frozen cache schedule did, counted by its hooks,
and the same bundle run without it on the same prompts and seeds.

``report.json`` gets ``cache``: ``mechanism``, ``schedule`` (one letter per step: C computes, r
reuses), ``reused_blocks``, ``compute_fraction`` (block evaluations the hooks counted over the
uncached denoiser's, over the whole evaluation) and ``planned_compute_fraction``, and ``uncached``:
the bundle without its schedule (quality, fidelity against FP, denoiser ms/step), with the cached
run's fidelity against it. report.html draws the schedule as a step x block picture.
"""

from __future__ import annotations

import html
from typing import Any

from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.generation import generate
from diffkiln.runtime import load

__all__ = ["cache_html", "cache_section"]


def cache_section(pipe: Any, resolved: Any, result: Any, base_result: Any, gen_cfg: Any,
                  evaluated: tuple[int, int], judge: Any) -> dict[str, Any]:  # fmt: skip
    """The ``cache`` entry of report.json for a bundle ``pipe`` with a schedule.

    Args:
        pipe: the cached bundle's pipeline, after the evaluation ran.
        resolved: its resolved target.
        result: the evaluation's generation on ``pipe``.
        base_result: the FP baseline's generation on the same prompts and seeds.
        gen_cfg: the generation settings used (steps, guidance, denoiser as the evaluation's).
        evaluated: (block evaluations run, uncached block evaluations) counted over the evaluation.
        judge: ``(generation) -> quality dict or None`` for the model's judge.
    """
    from diffkiln.report.compare import fidelity

    schedule = CacheSchedule.from_dict(pipe.diffkiln_manifest["cache"])
    run, uncached_run = evaluated
    uncached = load(resolved.path, device=str(getattr(pipe, "device", "cpu")), cache=False)
    plain = generate(uncached, result.prompts, gen_cfg, resolved, measure=True, samples=len(result.prompts))
    return {
        "mechanism": schedule.mechanism.value,
        "schedule": schedule.pattern,
        "reused_blocks": list(schedule.blocks[schedule.start : schedule.end]),
        "blocks": list(schedule.blocks),
        "extrapolate": schedule.extrapolate,
        "compute_fraction": run / uncached_run if uncached_run else None,
        "planned_compute_fraction": schedule.compute_fraction,
        "counted_by": "the runtime's cache hooks, over every denoiser call of the evaluation",
        "uncached": {
            "quality": judge(plain),
            "fidelity_vs_fp": fidelity(base_result, plain),
            "ms_per_step": plain.extras["denoiser_ms_per_step"],
        },
        "fidelity_vs_uncached": fidelity(plain, result),
    }


def _picture(cache: dict[str, Any]) -> str:
    """Steps across, blocks down: a filled cell runs, an empty one is reused."""
    blocks, schedule = cache["blocks"], cache["schedule"]
    reused = set(cache["reused_blocks"])
    cell, left = 12, 160
    width, height = left + cell * len(schedule) + 4, cell * len(blocks) + 20
    parts = [f"<svg width={width} height={height} xmlns='http://www.w3.org/2000/svg' font-size=10>"]
    for b, name in enumerate(blocks):
        y = 16 + b * cell
        parts.append(f"<text x=0 y={y + 9}>{html.escape(name[-26:])}</text>")
        for s, flag in enumerate(schedule):
            runs = flag == "C" or name not in reused
            fill = "#1a9850" if runs else "#ffffff"
            parts.append(f"<rect x={left + s * cell} y={y} width={cell - 1} height={cell - 1} fill='{fill}' "
                         "stroke='#888' stroke-width=0.5/>")  # fmt: skip
    for s in range(0, len(schedule), 5):
        parts.append(f"<text x={left + s * cell} y=10>{s}</text>")
    parts.append("</svg>")
    return "".join(parts)


def cache_html(cache: dict[str, Any], fmt: Any, table: Any) -> list[str]:
    """The report.html section for ``cache`` (``fmt`` and ``table`` are the page's helpers)."""
    plain = cache["uncached"]
    q, pq = cache.get("quality_cached") or {}, plain.get("quality") or {}
    rows: list[tuple[Any, ...]] = [
        ("mechanism", cache["mechanism"] + (" (extrapolated)" if cache["extrapolate"] else "")),
        ("schedule (C computes, r reuses)", cache["schedule"]),
        ("compute fraction: counted / planned",
         f"{fmt(cache['compute_fraction'])} / {fmt(cache['planned_compute_fraction'])}"),
        ("latent SQNR vs FP: cached / uncached (dB)",
         f"{fmt(cache.get('fidelity_vs_fp', {}).get('latent_sqnr_db'))} / "
         f"{fmt(plain['fidelity_vs_fp'].get('latent_sqnr_db'))}"),
        ("latent SQNR cached vs uncached bundle (dB)", cache["fidelity_vs_uncached"].get("latent_sqnr_db")),
        ("denoiser ms/step: uncached", plain["ms_per_step"]),
    ]  # fmt: skip
    if pq:
        for key in ("content_accuracy", "content_accuracy_heldout", "content_accuracy_pairs"):
            rows.append((f"{key}: cached / uncached", f"{fmt(q.get(key))} / {fmt(pq.get(key))}"))
    return ["<h2>Cache schedule (frozen in the bundle; green blocks run, white are reused)</h2>", _picture(cache),
            table(rows)]  # fmt: skip
