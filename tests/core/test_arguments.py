"""The flat naming of call arguments that the ONNX export and its onnxruntime backend share."""

from __future__ import annotations

import json

import pytest
import torch

from diffkiln.core.arguments import feed_array, flatten_arguments, json_form, unflatten_arguments


def test_dicts_and_tuples_of_tensors_round_trip() -> None:
    cos, sin, ids = torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 3)
    call = {"x": ids, "image_rotary_emb": (cos, sin), "added": {"text_embeds": ids}, "steps": 3, "none": None}
    tensors, rest = flatten_arguments(call)
    assert list(tensors) == ["x", "image_rotary_emb__0", "image_rotary_emb__1", "added__text_embeds"]
    assert rest == {"steps": 3, "none": None}
    back = unflatten_arguments(tensors)
    assert isinstance(back["image_rotary_emb"], tuple) and back["image_rotary_emb"][1] is sin
    assert back["added"] == {"text_embeds": ids}


def test_nested_containers_of_tensors_round_trip_level_by_level() -> None:
    # Allegro's rotary argument: ((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)), each freqs
    # a (cos, sin) pair; and a tuple of more than ten, whose indices do not sort as strings.
    freqs = tuple((torch.randn(3, 4), torch.randn(3, 4)) for _ in range(3))
    grids = tuple(torch.arange(6).reshape(1, 6) + i for i in range(3))
    many = tuple(torch.full((1,), float(i)) for i in range(12))
    mixed = (torch.ones(1), None)  # not all tensors: one option, left whole
    tensors, rest = flatten_arguments({"image_rotary_emb": (freqs, grids), "many": many, "mixed": mixed})
    assert list(tensors)[:3] == ["image_rotary_emb__0__0__0", "image_rotary_emb__0__0__1", "image_rotary_emb__0__1__0"]
    assert "image_rotary_emb__1__2" in tensors and "many__11" in tensors and rest == {"mixed": mixed}
    back = unflatten_arguments(tensors)
    assert list(back) == ["image_rotary_emb", "many"]
    rebuilt = back["image_rotary_emb"]
    assert isinstance(rebuilt, tuple) and len(rebuilt) == 2 and all(isinstance(p, tuple) for p in rebuilt[0])
    assert all(a is b for pair, orig in zip(rebuilt[0], freqs, strict=True) for a, b in zip(pair, orig, strict=True))
    assert all(a is b for a, b in zip(rebuilt[1], grids, strict=True))
    assert [float(t) for t in back["many"]] == [float(i) for i in range(12)]


@pytest.mark.parametrize(
    ("onnx_type", "dtype"),
    [("tensor(bool)", "bool"), ("int64", "int64"), ("tensor(int32)", "int32"), ("float16", "float16"), ("", "float32")],
)
def test_feeds_take_the_graph_input_type(onnx_type: str, dtype: str) -> None:
    assert str(feed_array(torch.tensor([1, 0]), onnx_type).dtype) == dtype


def test_an_option_compares_equal_to_its_manifest_form() -> None:
    # LTX passes rope_interpolation_scale as a tuple; the ONNX manifest stores it as JSON (a list).
    call = {"rope_interpolation_scale": (0.16, 4, 4), "nested": {"a": ((1, 2), [3])}, "n": 3, "s": "x"}
    stored = json.loads(json.dumps(call))
    assert call != stored and json_form(call) == stored
