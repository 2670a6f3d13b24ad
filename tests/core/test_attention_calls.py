"""AttentionCalls scoped to named layers: active only while they run, and left on an exception."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkiln.core.attention import AttentionCalls


class _Attn(nn.Module):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(x, x, x)
        if self.fail:
            raise RuntimeError("inside the layer")
        return out


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _Attn(), _Attn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + F.scaled_dot_product_attention(x, x, x)  # the last call: outside any layer


def _modes() -> int:
    return int(torch._C._len_torch_function_stack())


def test_scoped_calls_see_only_the_named_layers_and_no_mode_outside_them() -> None:
    model, seen, depth = _Model(), [], {}
    x = torch.randn(1, 2, 8, 4)
    with AttentionCalls(model, lambda call: seen.append(call.layer), only={"b"}):
        # Registered after the scoped hooks, so they run inside b's mode and after a's forward.
        h1 = model.b.register_forward_pre_hook(lambda *_: depth.__setitem__("in b", _modes()))
        h2 = model.a.register_forward_hook(lambda *_: depth.__setitem__("after a", _modes()))
        h3 = model.register_forward_hook(lambda *_: depth.__setitem__("after model", _modes()))
        out = model(x)
        for h in (h1, h2, h3):
            h.remove()
    assert seen == ["b"] and depth == {"in b": 1, "after a": 0, "after model": 0}
    assert torch.allclose(out, _Model.forward(model, x))


def test_the_mode_is_left_when_a_named_layer_raises() -> None:
    model = _Model()
    model.b.fail = True
    before = _modes()
    with AttentionCalls(model, lambda call: None, only={"b"}):
        with pytest.raises(RuntimeError, match="inside the layer"):
            model(torch.randn(1, 2, 8, 4))
        assert _modes() == before
    assert _modes() == before
