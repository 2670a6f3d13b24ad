"""The report page's bar chart on the values a per-layer SQNR can take: finite, infinite (an exact
layer), None (report.json's stand-in for infinity, which the page is rendered from) and NaN."""

from __future__ import annotations

import math
import re

from diffkiln.report.html import bar_chart


def test_exact_and_non_finite_layers_are_labelled_not_drawn_as_numbers() -> None:
    svg = bar_chart({"a": 31.25, "b": None, "c": math.inf, "d": math.nan, "e": 12.0}, "dB", good=20.0)
    labels = re.findall(r"font-size='10'>([^<]*)</text>", svg)
    assert labels == ["a", "31.2 dB", "b", "exact", "c", "exact", "d", "not finite", "e", "12.0 dB"]
    widths = [float(w) for w in re.findall(r"<rect [^>]*width='([\d.]+)'", svg)]
    # Exact layers at 99 dB, the longest bar; a non-finite one empty (the 1-px floor); others to scale.
    assert widths[1] == widths[2] == 360.0 and widths[3] == 1.0
    assert math.isclose(widths[0], 360 * 31.25 / 99, abs_tol=0.05)
    colors = re.findall(r"fill='(#[0-9a-f]+)'", svg)
    assert colors == ["#2a2", "#2a2", "#2a2", "#d22", "#d22"]


def test_no_values_say_so() -> None:
    assert bar_chart({}, "dB", good=20.0) == "<p>no data</p>"
