"""GraphOptimizePass against the optimizer torch.onnx.export runs itself (``optimize=True``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from diffkiln.export.onnx.passes import GraphOptimizePass
from diffkiln.export.onnx.passes import graph_optimize as module


class _Block(nn.Module):
    """What a denoiser's export holds for the optimizer to fold and fuse: a GELU MLP, LayerNorm,
    attention heads split by reshape/transpose, a chunk, slices of one tensor, shape arithmetic on a
    dynamic batch axis."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, 2, c // 2).transpose(1, 2) for t in (q, k, v))
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + h
        head, tail = x[:, :3], x[:, 3:]  # two Slice nodes of one tensor (what SlicesSplit looks for)
        return torch.cat([tail, head], dim=1) + self.mlp(x)


def _block() -> _Block:
    torch.manual_seed(0)
    return _Block().eval()


def _exported() -> Any:
    x = torch.randn(2, 8, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        _block(), (x,), dynamo=True, optimize=False, dynamic_shapes=({0: batch},), input_names=["x"]
    )
    return program.model


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _torch_optimized(model: ir.Model) -> ir.Model:
    """What ``torch.onnx.export(optimize=True)`` does to the graph (onnxscript's torch 2.8 API)."""
    from onnxscript import optimizer
    from onnxscript.rewriter import onnx_fusions

    optimizer.optimize(model)
    onnx_fusions.fuse(model)
    return model


def _ops(model: ir.Model) -> list[tuple[str, str, dict[str, Any]]]:
    return [(n.domain, n.op_type, {k: repr(a.value) for k, a in n.attributes.items()}) for n in model.graph]


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.fixture(scope="module")
def exported() -> ir.Model:
    return _exported()


def test_the_rule_set_is_onnxscripts_default_less_the_multi_output_patterns() -> None:
    from onnxscript import rewriter

    kept = module.single_output_rules()
    assert kept is not None, "the installed onnxscript no longer exposes its default rules: the pass runs the full one"
    default = list(rewriter._DEFAULT_REWRITE_RULES)
    dropped = [r for r in default if r not in kept]
    assert all(r._target_pattern.has_single_output_node for r in kept)
    assert dropped and all(not r._target_pattern.has_single_output_node for r in dropped)
    assert len(kept) + len(dropped) == len(default)


def test_the_pass_gives_the_exporters_graph_and_its_outputs(exported: ir.Model) -> None:
    ours = GraphOptimizePass()(_copy(exported)).model
    theirs = _torch_optimized(_copy(exported))
    assert len(list(ours.graph)) < len(list(exported.graph))  # it folded and fused something
    assert _ops(ours) == _ops(theirs)
    for batch in (2, 5):  # the dynamic axis still runs after folding
        x = np.random.default_rng(batch).standard_normal((batch, 8, 16)).astype(np.float32)
        np.testing.assert_array_equal(_run(ours, x), _run(theirs, x))


def test_the_graph_matches_torch_on_the_dynamic_axis(exported: ir.Model) -> None:
    block = _block()
    ours = GraphOptimizePass()(_copy(exported)).model
    for batch in (1, 3):
        x = torch.randn(batch, 8, 16)
        with torch.no_grad():
            want = block(x).numpy()
        np.testing.assert_allclose(_run(ours, x.numpy()), want, rtol=1e-4, atol=1e-5)


def test_without_readable_rules_the_pass_runs_the_full_optimizer(
    exported: ir.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "single_output_rules", lambda: None)
    ours = GraphOptimizePass()(_copy(exported)).model
    assert _ops(ours) == _ops(_torch_optimized(_copy(exported)))


class _SplitBySize(nn.Module):
    """``torch.split`` by a chunk size read from a dynamic axis (LTX-2 splits so): a SplitToSequence
    whose split is a 0-D value the graph computes. onnxscript's folding of it fails (it reads the
    value it does not have); so did every dynamic LTX-2 export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, x.shape[1] // 2, dim=1)
        return torch.cat([parts[1], parts[0]], dim=1) * 2


def test_a_node_the_folding_cannot_take_leaves_a_complete_graph() -> None:
    model = _SplitBySize().eval()
    axes = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim.DYNAMIC},)
    program = torch.onnx.export(model, (torch.randn(2, 8, 4),), dynamo=True, optimize=False, dynamic_shapes=axes,
                                input_names=["x"])  # fmt: skip
    ours = GraphOptimizePass()(program.model).model
    assert "SplitToSequence" in [op for _, op, _ in _ops(ours)]
    for shape in ((1, 6, 4), (3, 10, 4)):  # both dynamic axes still run, as torch computes them
        x = torch.randn(*shape)
        np.testing.assert_array_equal(_run(ours, x.numpy()), model(x).numpy())
