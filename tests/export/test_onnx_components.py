"""Recording a component's call for export: every argument has an input form or is named."""

from __future__ import annotations

import pytest
import torch

from diffkiln.export.onnx.components import flatten_kwargs


def test_an_argument_without_an_input_form_is_named_not_dropped() -> None:
    # A tuple of tensors used to be dropped silently: the graph then ran without rotary embeddings.
    tensors, options = flatten_kwargs({"x": torch.ones(1), "scale": (1.0, 2.0), "added": {"r": None}, "c": None})
    assert list(tensors) == ["x"] and options == {"scale": (1.0, 2.0), "added": {"r": None}}
    with pytest.raises(ValueError, match="'state'"):
        flatten_kwargs({"x": torch.ones(1), "state": object()})



def test_old_style_weight_norms_are_folded_into_the_weights_they_compute() -> None:
    from torch import nn
    from torch.nn.utils import weight_norm

    from diffkiln.export.onnx.program import fold_weight_norms

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(2, 4, 3)), nn.SiLU(), weight_norm(nn.Conv1d(4, 4, 1), dim=None),
                          nn.Conv1d(4, 4, 1))  # fmt: skip
    x = torch.randn(2, 2, 8)
    with torch.no_grad():
        expected = model(x)
    assert fold_weight_norms(model) == ["0.weight", "2.weight"]
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == {f"{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # the values the hook computed at every call
    assert fold_weight_norms(model) == []
