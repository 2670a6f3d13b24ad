"""The sweep page plots what the sweep varied: weight bits, a cache's compute fraction or the
attention density, on rows as ``evaluate_sweep`` writes them."""

from __future__ import annotations

from typing import Any

import pytest

from diffkiln.report.sweep import _render, _swept


def _row(name: str, bits: float, fraction: float | None = None, density: float | None = None) -> dict[str, Any]:
    return {"name": name, "avg_weight_bits": bits, "cache_compute_fraction": fraction, "attention_density": density,
            "fidelity": {"latent_sqnr_db": 20.0 + bits}, "bits": {}}  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "swept", "label"),
    [
        ([_row("fp", 16), _row("mixed-w4", 4), _row("w8a8", 8)], "avg_weight_bits", "average weight bits"),
        # a cache sweep: its uncached bundle has no fraction (it counts as 1); masks beside it do not matter
        ([_row("uncached", 8, None, 0.35), _row("cache-0.5", 8, 0.5, 0.35), _row("cache-0.7", 8, 0.7, 0.35)],
         "cache_compute_fraction", "compute fraction"),
        ([_row("fp", 16), _row("sparse-0.5", 16, None, 0.5), _row("sparse-0.3", 16, None, 0.3)],
         "attention_density", "attention density"),
        # one cache bundle beside the uncached one is still a cache sweep
        ([_row("uncached", 8), _row("cache-0.6", 8, 0.6)], "cache_compute_fraction", "compute fraction"),
    ],
)  # fmt: skip
def test_the_plot_takes_the_axis_the_sweep_varied(rows: list[dict[str, Any]], swept: str, label: str) -> None:
    assert _swept(rows) == swept
    page = _render({"target": "t", "eval_prompts": 2, "layers": [], "rows": rows, "swept": swept})
    assert f">{label}" in page and page.count("<circle") == len(rows)
