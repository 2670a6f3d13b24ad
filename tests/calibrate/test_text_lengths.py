"""Text of another length at each call: a pipeline that pads each batch's prompts to the longest of
them only (Kandinsky 5 packs its text so) hands the denoiser sequences whose length changes from
call to call. The per-position spread of a text layer's input is kept over the longest."""

from __future__ import annotations

import torch
from torch import nn

import diffkiln.api as dk


class _TextConditioned(nn.Module):
    """A latent projected in, text projected and pooled into it, projected out."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_in, self.text_in, self.out = nn.Linear(4, 8), nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.out(self.latent_in(x) * t[:, None, None] + self.text_in(text).mean(1, keepdim=True))


def test_calls_with_text_of_other_lengths_are_recorded_over_the_longest() -> None:
    torch.manual_seed(0)
    lengths = (5, 9, 7)
    calls = [{"x": torch.randn(2, 3, 4), "t": torch.tensor([0.5, 0.5]), "text": torch.randn(2, n, 6)} for n in lengths]
    stats = dk.calibrate(_TextConditioned(), inputs=calls)
    spread = stats.layers["text_in"].text_spread
    assert spread.shape == (max(lengths),)
    # Position 8 is in the second call only: its spread is that call's.
    assert float(spread[8]) == float((calls[1]["text"][0, 8] - calls[1]["text"][1, 8]).abs().max())
