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
