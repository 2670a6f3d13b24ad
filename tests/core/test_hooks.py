"""Method pre-hooks: named, recorded, and always removed, leaving the class's method to answer."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from diffkiln.core.hooks import HookRegistry, recording_method_calls, scoped_hooks


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
