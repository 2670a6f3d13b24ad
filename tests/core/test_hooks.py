"""Method pre-hooks: named, recorded, and always removed, leaving the class's method to answer."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.models.modeling_outputs import AutoencoderKLOutput, Transformer2DModelOutput
from torch import nn

from diffkiln.core.hooks import (
    HookRegistry,
    map_output_tensors,
    output_tensors,
    recording_method_calls,
    scoped_hooks,
)


class _Vae(nn.Module):
    def decode(self, z: torch.Tensor, num_frames: int = 1, return_dict: bool = True) -> torch.Tensor:
        return z * num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_recorded_method_keeps_its_signature_and_is_restored() -> None:
    vae, z = _Vae(), torch.ones(2)
    with recording_method_calls("rec", vae, "decode") as calls:
        assert list(inspect.signature(vae.decode).parameters) == ["z", "num_frames", "return_dict"]
        assert torch.equal(vae.decode(z, num_frames=3), z * 3)
    assert len(calls) == 1 and torch.equal(calls[0][0][0], z) and calls[0][1] == {"num_frames": 3}
    assert "decode" not in vars(vae)  # the class's method answers again
    with pytest.raises(RuntimeError, match="boom"), recording_method_calls("rec", vae, "decode"):
        raise RuntimeError("boom")
    assert "decode" not in vars(vae)


def test_a_method_hook_refuses_forward_a_taken_name_or_a_second_wrapper() -> None:
    vae = _Vae()
    with scoped_hooks() as hooks:
        with pytest.raises(ValueError, match="not a method to hook here"):
            hooks.add_method_pre_hook("a", vae, "forward", lambda *a: None)
        hooks.add_method_pre_hook("a", vae, "decode", lambda *a: None)
        with pytest.raises(ValueError, match="already registered"):
            hooks.add_method_pre_hook("a", vae, "decode", lambda *a: None)
        with pytest.raises(ValueError, match="already holds its own 'decode'"):
            hooks.add_method_pre_hook("b", vae, "decode", lambda *a: None)
        assert hooks.names == ["a"]
    registry = HookRegistry()
    registry.add_method_pre_hook("c", vae, "decode", lambda *a: None)
    registry.remove("c")
    assert "decode" not in vars(vae) and registry.names == []


def test_every_output_tensor_is_read_and_replaced_in_its_structure() -> None:
    video, audio, mask = torch.randn(2, 4), torch.randn(2, 3), torch.ones(2)
    # LTX-2's tuple of two predictions, Z-Image's per-sample list inside a tuple, an output object.
    for out, n in (((video, audio), 2), (([video, audio], None), 2), (Transformer2DModelOutput(sample=video), 1),
                   (video, 1), ({"a": video, "b": [audio, mask]}, 3)):  # fmt: skip
        got = output_tensors(out)
        assert len(got) == n and got[0] is video, out
        doubled = map_output_tensors(out, lambda t: t * 2)
        assert type(doubled) is type(out)
        assert all(torch.equal(a * 2, b) for a, b in zip(got, output_tensors(doubled), strict=True))
    assert map_output_tensors((video, None, "x"), torch.zeros_like)[1:] == (None, "x")  # other values kept
    assert isinstance(map_output_tensors(AutoencoderKLOutput(latent_dist=video), torch.zeros_like), AutoencoderKLOutput)
