"""CLIP's BOS outlier written into a text encoder's weights (the built-in shapes-unet's encoder has it)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffkiln.zoo.outliers import BosMassiveActivation, impose_bos_massive_activation
from diffkiln.zoo.shapes_models import build_text_encoder, build_tokenizer

PROMPTS = ["a red circle on the left", "a blue square at the top", "", "a green triangle below a yellow circle"]


@pytest.fixture(scope="module")
def encoder_and_ids(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    te = build_text_encoder(tok, 64).eval()
    ids = tok(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    return te, ids


@pytest.mark.parametrize("spec", [BosMassiveActivation(), BosMassiveActivation(channel=37, residual=50.0, gain=20.0)],
                         ids=["default", "ch37-r50-g20"])  # fmt: skip
def test_bos_row_is_an_outlier_and_only_bos(encoder_and_ids, spec):
    te, ids = encoder_and_ids
    te = copy.deepcopy(te)
    impose_bos_massive_activation(te, spec)
    with torch.no_grad():
        h = te(ids).last_hidden_state
    width = h.shape[-1]
    bos, others = h[:, 0], h[:, 1:]
    # The BOS row is prompt-invariant (causal mask) and dominated by the channel: about gain*sqrt(width).
    assert torch.equal(bos, bos[:1].expand_as(bos))
    expected = spec.gain * width**0.5
    assert 0.9 * expected < bos[0, spec.channel].item() <= expected * 1.0001
    others_max = others.abs().max().item()
    assert bos.abs().max().item() > 20 * others_max, "the BOS row must be a CLIP-like outlier"
    # The channel is silent in the residual stream of the other tokens: their value there is only the
    # final LayerNorm's -gain*mean/std.
    assert others[..., spec.channel].abs().max().item() < spec.gain * 0.5


def test_projection_is_idempotent_and_exact(encoder_and_ids):
    te, _ = encoder_and_ids
    once = copy.deepcopy(te)
    impose_bos_massive_activation(once, BosMassiveActivation())
    twice = copy.deepcopy(once)
    impose_bos_massive_activation(twice, BosMassiveActivation())
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert once.state_dict()["embeddings.position_embedding.weight"][0, 0].item() == 100.0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"channel": -1}, "channel"), ({"residual": 0.0}, "positive"), ({"gain": -1.0}, "positive")],
    ids=["negative-channel", "zero-residual", "negative-gain"],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BosMassiveActivation(**kwargs)


def test_channel_outside_width_and_wrong_model(encoder_and_ids):
    te, _ = encoder_and_ids
    with pytest.raises(ValueError, match="outside the encoder's width 64"):
        impose_bos_massive_activation(copy.deepcopy(te), BosMassiveActivation(channel=64))
    with pytest.raises(ValueError, match="not a CLIP text encoder"):
        impose_bos_massive_activation(torch.nn.Linear(4, 4), BosMassiveActivation())
