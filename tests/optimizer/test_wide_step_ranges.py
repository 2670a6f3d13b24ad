"""A layer whose input range differs widely between sampler steps loses most of its grid at the
quieter steps under one static range: the W8A8 plan names such layers and the option that gives
each step its own range."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import diffkiln.api as dk


class _StepScaled(nn.Module):
    """A latent projected in and out; the hidden state grows with the timestep before the output
    projection's neighbour reads it, so that layer's input range follows the step."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.mid, self.proj_out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x) * t[:, None, None]
        return self.proj_out(torch.relu(self.mid(h)))


def _calls(scales: tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [{"x": torch.randn(2, 5, 4), "t": torch.full((2,), s)} for s in scales]


@pytest.mark.parametrize(("scales", "wide"), [((1.0, 100.0), ["mid"]), ((1.0, 3.0), [])])
def test_layers_whose_ranges_differ_widely_between_steps_are_named(
    scales: tuple[float, ...], wide: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = _StepScaled().eval()
    stats = dk.calibrate(model, inputs=_calls(scales))
    with caplog.at_level(logging.WARNING, logger="diffkiln.optimizer.w8a8"):
        plan = dk.make_plan(model, stats, dk.W8A8Config())
    assert plan.notes["wide_step_ranges"] == wide
    assert ("--timestep-aware" in caplog.text) == bool(wide)
    # Timestep-aware ranges give each step its own: nothing left to name.
    assert dk.make_plan(model, stats, dk.W8A8Config(timestep_aware=True)).notes["wide_step_ranges"] == []
