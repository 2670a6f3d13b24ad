"""onnxscript's graph optimizer, as ``torch.onnx.export(optimize=True)`` runs it, without the
rewrite rules that match several output nodes.

torch.onnx's exporter runs ``onnxscript.optimizer.optimize_ir`` (constant folding, the default
rewrite rules, cleanup) and then ``onnxscript.rewriter.onnx_fusions.fuse``. For a pattern with more
than one output node (``SlicesSplit``: two ``Slice`` nodes of one tensor into one ``Split``),
onnxscript's matcher lists every node of the graph for each candidate node, so that one rule costs
time quadratic in the graph's size. On the exports compared in docs/onnx-export.md it rewrote
nothing; tests/export/test_graph_optimize.py checks this pass against the full optimizer.

The rule list is onnxscript's own default set, read from the installed package. Where that package
no longer exposes it, the pass runs the full optimizer (slower, same result).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["GraphOptimizePass", "single_output_rules"]

log = logging.getLogger(__name__)

_FOLD_FAILED = "Error during constant folding for node"
"""How onnxscript's folding words an evaluator's failure on one node (a RuntimeError)."""


def single_output_rules() -> list[Any] | None:
    """onnxscript's default rewrite rules whose pattern ends in one node, or None where the installed
    onnxscript does not expose its default set (or its rules' patterns) as this module expects."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not rules:
        return None
    kept = []
    for rule in rules:
        pattern = getattr(rule, "_target_pattern", None)
        single = getattr(pattern, "has_single_output_node", None)
        if not isinstance(single, bool):
            return None
        if single:
            kept.append(rule)
    return kept


def _optimize(model: ir.Model, rules: list[Any]) -> None:
    """``onnxscript.optimizer.optimize_ir``'s passes, in its order, with ``rules`` as the rewrite set."""
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    def fold(m: ir.Model) -> ir.passes.PassResult:
        # Folding evaluates with numpy both sides of a select: T5's relative-position bucket takes
        # log(0) (and casts the -inf) on the positions its Where then discards. numpy's warnings
        # there name no fault, and the export's own check measures the graph that results.
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                return ir.passes.PassResult(m, bool(optimizer.fold_constants(m, onnx_shape_inference=True).modified))
            except RuntimeError as exc:
                if not str(exc).startswith(_FOLD_FAILED):
                    raise
                # onnxscript's SplitToSequence evaluator reads the value of a chunk size the graph
                # computes (torch.split by a size from a dynamic axis: LTX-2's) and fails. The nodes
                # folded before it were replaced whole, the rest stay as exported: the graph is
                # complete, only less folded, and the export's check runs it.
                log.warning("%s: %s; the nodes after it stay unfolded", exc, exc.__cause__)
                return ir.passes.PassResult(m, True)

    loop = ir.passes.PassManager(
        [
            _FunctionPass(fold),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        loop,
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


class _FunctionPass(ir.passes.InPlacePass):
    """A function ``model -> PassResult`` as an in-place pass (onnxscript's folding is a function)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result: ir.passes.PassResult = self.fn(model)
        return result


class GraphOptimizePass(ir.passes.InPlacePass):
    """Constant folding, onnxscript's single-output rewrite rules and its ONNX fusions (see the module
    docstring); the full ``onnxscript.optimizer.optimize`` where the rule set cannot be read."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript import optimizer
        from onnxscript.rewriter import onnx_fusions

        rules = single_output_rules()
        if rules is None:
            log.info("onnxscript's default rewrite rules are not readable here: running its full optimizer")
            optimizer.optimize(model)
        else:
            _optimize(model, rules)
        onnx_fusions.fuse(model)
        return ir.passes.PassResult(model, modified=True)
