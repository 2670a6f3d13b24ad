"""One model component to one ONNX file: ``torch.onnx.export(dynamo=True)`` with dynamic axes
(``Dim.AUTO``), the custom-op and aten translations, then :func:`~diffkiln.export.onnx.write.finish_model`.

Which axes the graph really takes is established by its caller, which runs the graph at a second
shape (:mod:`diffkiln.export.onnx.check`); this module only exports and describes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkiln.export.onnx.aten_fixes import ATEN_FIXES
from diffkiln.export.onnx.complex_layout import computes_in_complex, lower_complex_layout
from diffkiln.export.onnx.components import Component, ComponentKind, batch_inputs, repeated_batch
from diffkiln.export.onnx.config import OnnxExportConfig
from diffkiln.export.onnx.modules import OnnxExportError
from diffkiln.export.onnx.ops import TRANSLATIONS
from diffkiln.export.onnx.trace_modes import DataAsDetach
from diffkiln.export.onnx.write import error_summary, finish_model, io_spec, save_model

__all__ = ["TRACE_BATCH", "dynamic_shapes", "export_component", "export_program", "pin_inputs", "trace_example"]

log = logging.getLogger(__name__)


def dynamic_shapes(
    component: Component, batch_only: bool = False, varied: Mapping[str, Sequence[int]] | None = None
) -> tuple[tuple[Any, ...]]:
    """The axes to export as ``Dim.AUTO`` (dynamic where the model allows, static where it
    constrains them: channels a weight fixes, a position table): every axis of every input, but a
    text encoder's token axis and an axis of size 1; with ``batch_only``, the batch axis of the
    inputs that share the main input's batch. Which axes really vary is established by running the
    graph at a second shape; ``varied`` (per input, the axes a second shape changes) limits the
    dynamic axes to those and the batch axis.

    A size-1 axis would be specialized to 1 anyway (torch.export's 0/1 specialization); declared
    ``Dim.AUTO``, it makes the decomposition pass re-evaluate a guard on it to the opposite of its
    hint (``AssertionError: True != False``) wherever the model squeezes or broadcasts it: Stable
    Audio's global states, ``(batch, 1, dim)``, failed the whole export. The batch axis is exempt:
    the trace repeats a batch of 1 (:data:`TRACE_BATCH`). An int input
    (:attr:`~diffkiln.export.onnx.components.Component.int_inputs`) is ``Dim.AUTO`` itself."""
    from torch.export import Dim

    tensors = list(component.example.values())
    batched = {0, *batch_inputs(component.example)} if tensors and tensors[0].dim() else set()
    spec: list[Any] = []
    for i, (name, t) in enumerate(component.example.items()):
        if name in component.int_inputs:
            spec.append(Dim.AUTO)
            continue
        if batch_only or component.kind == ComponentKind.TEXT_ENCODER:
            dims = [0] if i in batched else []
        else:
            dims = [d for d in range(t.dim()) if t.shape[d] != 1 or (d == 0 and i in batched)]
            if varied is not None:
                dims = [d for d in dims if d in varied.get(name, ()) or (d == 0 and i in batched)]
        spec.append({d: Dim.AUTO for d in dims} or None)
    return (tuple(spec),)  # the wrappers take ``*tensors``: one tuple argument


TRACE_BATCH = 3
"""The batch a dynamic export traces at where the recorded call's batch is 1. torch.export
specializes an example axis of size 1 and guards relations on it (FLUX's rotary reshape became
``(8 // batch) * 2``), so a batch-1 trace runs at batch 1 only. Not the check's batch
(:func:`diffkiln.export.onnx.check.bundle_call` at 2), so the check runs at a batch the trace did not see."""


def trace_example(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example a dynamic export traces: the recorded one, its batch of 1 repeated to :data:`TRACE_BATCH`."""
    first = next(iter(example.values()), None)
    if first is None or not first.dim() or first.shape[0] != 1:
        return example
    return repeated_batch(example, TRACE_BATCH)


def export_program(
    component: Component,
    opset: int,
    dynamic: bool,
    batch_only: bool = False,
    fallback: bool = True,
    varied: Mapping[str, Sequence[int]] | None = None,
) -> tuple[Any, str | None]:
    """torch.onnx.export with dynamic axes (:func:`dynamic_shapes`, ``batch_only`` and ``varied`` as
    there); on failure, again with the recorded shapes (with ``fallback``; else the failure is
    raised)."""
    kwargs: dict[str, Any] = {
        "input_names": list(component.example),
        "dynamo": True,
        "opset_version": opset,
        "custom_translation_table": {**TRANSLATIONS, **ATEN_FIXES},
        "verbose": False,
        # finish_model optimizes the graph (GraphOptimizePass: the exporter's optimizer, minus its
        # rules whose matching is quadratic in the graph's size).
        "optimize": False,
    }
    module = component.module.eval()

    def fresh(example: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        # A failed dynamic attempt leaves dynamic-dimension marks on its input tensors. Int inputs
        # are traced as ints: torch.export makes them symbols, torch.onnx int64 scalar inputs.
        return tuple(int(t) if n in component.int_inputs else t.clone() for n, t in example.items())

    # DataAsDetach: a write through ``tensor.data`` (CogVideoX's position table) stays in the graph.
    with torch.no_grad(), DataAsDetach():
        if dynamic:
            try:
                shapes = dynamic_shapes(component, batch_only, varied)
                return _to_onnx(module, lambda: fresh(trace_example(component.example)), shapes, kwargs), None
            except Exception as exc:  # torch.export raises many types; the reason goes to the manifest
                if not fallback or isinstance(exc, OnnxExportError):  # a refusal holds at any shape
                    raise
                reason = f"{type(exc).__name__}: {error_summary(exc)}"
                log.warning("%s: dynamic axes failed (%s); exporting the recorded shapes", component.name, reason)
        else:
            reason = "dynamic axes not requested"
        return _to_onnx(module, lambda: fresh(component.example), None, kwargs), reason


def _refusal(exc: BaseException) -> OnnxExportError | None:
    """diffkiln's own refusal (raised from the traced model's wrapper) among the causes of an
    exporter error, which torch.export wraps in its own types."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OnnxExportError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _to_onnx(module: nn.Module, example: Callable[[], tuple[Any, ...]], shapes: Any, kwargs: dict[str, Any]) -> Any:
    """:func:`_traced`, with a refusal of diffkiln's own raised as it is, whatever wrapped it."""
    try:
        return _traced(module, example, shapes, kwargs)
    except Exception as exc:  # torch.export wraps what the traced code raises
        refusal = _refusal(exc)
        if refusal is None:
            raise
        raise refusal from None


def _traced(module: nn.Module, example: Callable[[], tuple[Any, ...]], shapes: Any, kwargs: dict[str, Any]) -> Any:
    """``torch.onnx.export``; where it fails on a complex tensor through a layout op it cannot
    translate (a complex rotary table), again from our own ``torch.export`` capture with those ops
    rewritten on the real view (:mod:`diffkiln.export.onnx.complex_layout`). ``example`` gives
    fresh inputs for each try."""
    try:
        return torch.onnx.export(module, example(), dynamic_shapes=shapes, **kwargs)
    except Exception as exc:  # torch.onnx raises many types; only the complex failure is retried
        if not computes_in_complex(exc):
            raise
    args = example()
    # Decomposed first: composite ops (Z-Image's pad_sequence, zeros_like) decompose into layout
    # ops and factories on complex tensors, which the pass must see.
    program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False).run_decompositions()
    rewritten = lower_complex_layout(program.graph_module)
    log.info("complex tensors: %d layout op(s) rewritten on their real view", rewritten)
    return torch.onnx.export(program, args, **kwargs)


def wrapper_prefix(module: Any) -> str | None:
    """``"<attribute>."`` of the model an export wrapper holds (its only child module), or None."""
    children = [name for name, _ in module.named_children()]
    return f"{children[0]}." if len(children) == 1 else None


def pin_inputs(program: Any) -> None:
    """Write into the graph's input shapes each axis torch.export pinned to one value.

    ``Dim.AUTO`` over an axis the model fixes (a VAE's latent channels, read by a convolution of
    fixed width) can leave a symbol whose range is one value (``VR[4, 4]``) where a plain size
    would say the same. torch.onnx names it as a symbolic input axis, so the manifest listed the
    channels among the dynamic axes and a wrong size failed deep in onnxruntime; pinned, the graph
    says what it takes and the onnxruntime backend names a wrong size at the input."""
    import onnx_ir as ir

    exported = getattr(program, "exported_program", None)
    if exported is None:
        return
    pinned = {str(s): int(r.lower) for s, r in exported.range_constraints.items() if r.lower == r.upper}
    for value in program.model.graph.inputs:
        if value.shape is None:
            continue
        # A "symbol" named by a number is a size the trace fixed (a program exported again after
        # its decompositions, as the complex-tensor retry does, names a specialized axis "2").
        dims = [d if isinstance(d, int) else int(str(d)) if str(d).isdigit() else pinned.get(str(d), d)
                for d in value.shape]  # fmt: skip
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)


def fold_weight_norms(module: nn.Module) -> list[str]:
    """Fold each old-style weight norm in ``module`` (``torch.nn.utils.weight_norm``: a forward
    pre-hook that sets ``weight`` from ``weight_g`` and ``weight_v`` at every call, as Stable
    Audio's Oobleck VAE has) into a plain parameter, in place; returns the weights folded.

    torch.export does not follow the hook's attribute assignment (it warns, naming every weight);
    folded, each weight is one initializer holding the values the hook computes."""
    from torch.nn.utils import remove_weight_norm
    from torch.nn.utils.weight_norm import WeightNorm

    folded = []
    for name, sub in module.named_modules():
        for hook in [h for h in sub._forward_pre_hooks.values() if isinstance(h, WeightNorm)]:
            remove_weight_norm(sub, hook.name)
            folded.append(f"{name}.{hook.name}")
    return folded


def export_component(
    component: Component,
    path: Path,
    config: OnnxExportConfig,
    sub_byte: set[str],
    float16: bool = True,
    batch_only: bool = False,
    fallback: bool = True,
    varied: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Export ``component`` to ``path`` (:func:`export_program`, :func:`pin_inputs`, the passes of
    :func:`~diffkiln.export.onnx.write.finish_model`, the full checker) and return its manifest
    entry: inputs and outputs, options, output layout, and ``dynamic_axes`` (the input axes the
    graph leaves symbolic), ``dynamic``, and ``static_reason`` where the dynamic export failed."""
    fold_weight_norms(component.module)
    program, static_reason = export_program(component, config.opset, config.dynamic, batch_only, fallback, varied)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    pin_inputs(program)
    model = finish_model(program, sub_byte, config.opset, float16, wrapper_prefix(component.module))
    save_model(model, path)
    entry: dict[str, Any] = {
        "kind": component.kind,
        "file": path.name,
        "inputs": io_spec(model.graph.inputs),
        "outputs": io_spec(model.graph.outputs),
        "options": component.options,
        "output_fields": [list(f) for f in component.outputs],
        "output_class": component.output_class,
        "call_order": component.call_order,
        # What the graph really takes: Dim.AUTO may still have fixed an axis the model constrains.
        "dynamic_axes": {
            i["name"]: [axis for axis, d in enumerate(i["shape"] or []) if isinstance(d, str)]
            for i in io_spec(model.graph.inputs)
        },
    }
    # An int input the trace fixed to its example value is no graph input: the call must repeat
    # that value, which the runtime checks as it checks any option.
    fixed = [n for n in component.int_inputs if n not in {i["name"] for i in entry["inputs"]}]
    entry["options"] = {**component.options, **{n: int(component.example[n]) for n in fixed}}
    if component.distribution_fields:
        entry["distribution_fields"] = list(component.distribution_fields)
        entry["distribution_class"] = component.distribution_class
    entry["dynamic"] = any(entry["dynamic_axes"].values())
    if static_reason is not None:
        entry["static_reason"] = static_reason
    return entry
