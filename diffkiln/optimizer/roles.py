"""Layer roles, read from the traced data flow (:mod:`diffkiln.calibrate.dataflow`), never from names.

Two kinds of role:

* **structural** (:func:`structural_roles`): why a layer stays in floating point by default or
  always: it reads the latent input directly (input projection), writes the denoiser's output
  directly (output projection), embeds conditioning only (timestep and text embedders: its input
  carries no latent and its output feeds other layers before it meets the latent), has its weight
  read by its parent, never ran, or has no integer kernel here. Each comes with its evidence.
* **MixDQ's sensitivity groups** (:func:`sensitivity_groups`): *content* layers, where text meets
  image (the query, key, value and output layers of attentions whose projections read more than
  one tensor: cross and joint attention) and the two layers of each feed-forward
  pair (a Linear whose output feeds exactly one Linear that reads nothing else), are scored by
  final-image SSIM; every other layer is a *quality* layer, scored by denoiser-output SQNR.

:func:`qkv_ties` groups the projections of one attention that read the same tensor (the ones a
runtime fuses into one GEMM).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from torch import nn

from diffkiln.calibrate.dataflow import DataflowGraph
from diffkiln.core.layers import find_quantizable_layers, unsupported_reason

__all__ = ["LayerRole", "RoleFinding", "StructuralRole", "qkv_ties", "sensitivity_groups", "structural_roles"]


class StructuralRole(str, Enum):
    """Why a layer is kept in floating point (by default, or always)."""

    INPUT_PROJECTION = "input_projection"
    OUTPUT_PROJECTION = "output_projection"
    CONDITIONING = "conditioning_embedder"
    READ_BY_PARENT = "weight_read_by_parent"
    UNUSED = "unused"
    UNSUPPORTED = "unsupported"

    @property
    def always_fp(self) -> bool:
        """True for roles ``--include`` cannot override: quantizing would break the model or has no kernel."""
        return self in (StructuralRole.READ_BY_PARENT, StructuralRole.UNUSED, StructuralRole.UNSUPPORTED)


@dataclass(frozen=True)
class RoleFinding:
    """A layer's structural role and the data-flow evidence for it."""

    role: StructuralRole
    evidence: str

    @property
    def reason(self) -> str:
        """The plan's reason text: role and evidence."""
        return f"{self.role.value.replace('_', ' ')}: {self.evidence}"


def _layer_sources(sources: tuple[str, ...]) -> list[str]:
    return [s.split(":", 1)[1] for s in sources if s.startswith("layer:")]


def structural_roles(denoiser: nn.Module, graph: DataflowGraph | None) -> dict[str, RoleFinding]:
    """The layers with a structural role, with evidence; layers without one are left out.

    Args:
        denoiser: the model (for layers without an integer kernel).
        graph: its traced data flow; None (statistics without one) finds only unsupported layers.
    """
    out: dict[str, RoleFinding] = {}
    for name, module in find_quantizable_layers(denoiser).items():
        why = unsupported_reason(module)
        if why is not None:
            out[name] = RoleFinding(StructuralRole.UNSUPPORTED, why)
    if graph is None:
        return out
    latents = graph.latents
    for name, flow in graph.layers.items():
        if name in out:
            continue
        if flow.reads:
            ran = "" if flow.calls else "; its own forward never runs"
            out[name] = RoleFinding(
                StructuralRole.READ_BY_PARENT,
                f"its weight is used outside its own forward ({', '.join(flow.reads)}){ran}; an integer module has "
                "no float weight",
            )
        elif flow.calls == 0:
            out[name] = RoleFinding(StructuralRole.UNUSED, "never ran in the traced denoiser call")
        elif read := [n for n in latents if f"input:{n}" in flow.sources]:
            out[name] = RoleFinding(
                StructuralRole.INPUT_PROJECTION,
                f"reads the latent input '{read[0]}' with no quantizable layer between",
            )
        elif flow.feeds_output:
            out[name] = RoleFinding(
                StructuralRole.OUTPUT_PROJECTION, "writes the denoiser's output with no quantizable layer between"
            )
        elif flow.deps and not set(latents) & set(flow.deps) and not flow.meets_latent:
            fed = sorted(graph.consumers(name))
            out[name] = RoleFinding(
                StructuralRole.CONDITIONING,
                f"reads only {', '.join(flow.deps)} (no latent) and feeds "
                f"{', '.join(fed[:3]) + (' ...' if len(fed) > 3 else '') if fed else 'no layer'} "
                "before meeting the latent",
            )
    return out


class LayerRole(str, Enum):
    """A layer's sensitivity group (MixDQ's metric decoupling)."""

    CONTENT = "content"  # scored by SSIM of final images against FP
    QUALITY = "quality"  # scored by SQNR of the denoiser output against FP


def _text_meets_image(graph: DataflowGraph) -> set[str]:
    """Query, key, value and output layers of attentions whose projections read more than one
    tensor: cross attention (query from one, key/value from another) and joint attention (each
    projected from both and concatenated); a self-attention's projections all read one tensor."""
    out: set[str] = set()
    for att in graph.attentions:
        groups = {graph.layers[n].input_group for n in (*att.query, *att.key, *att.value) if n in graph.layers}
        if len(groups) > 1:
            out.update(att.query, att.key, att.value, graph.attention_outputs(att.index))
    return out


def _feed_forward_pairs(graph: DataflowGraph) -> set[str]:
    out: set[str] = set()
    latents = set(graph.latents)
    for name, flow in graph.layers.items():
        feeders = _layer_sources(flow.sources)
        if flow.kind != "linear" or len(feeders) != 1 or len(flow.sources) != 1:
            continue
        first = graph.layers.get(feeders[0])
        if first is None or first.kind != "linear" or not latents & set(first.deps):
            continue
        if graph.consumers(first.name) == {name} and not first.feeds_output:
            out.update({first.name, name})
    return out


def sensitivity_groups(
    graph: DataflowGraph, layers: Mapping[str, object], content: tuple[str, ...] = (), quality: tuple[str, ...] = ()
) -> dict[str, LayerRole]:
    """The sensitivity group of each of ``layers`` (in their order).

    Args:
        graph: the traced data flow.
        layers: the layers to group (e.g. the quantizable ones), by name.
        content: globs of layer names forced into the content group. Default none.
        quality: globs forced into the quality group (applied after ``content``). Default none.
    """
    structural = _text_meets_image(graph) | _feed_forward_pairs(graph)
    roles: dict[str, LayerRole] = {}
    for name in layers:
        role = LayerRole.CONTENT if name in structural else LayerRole.QUALITY
        if any(fnmatch.fnmatchcase(name, g) for g in content):
            role = LayerRole.CONTENT
        if any(fnmatch.fnmatchcase(name, g) for g in quality):
            role = LayerRole.QUALITY
        roles[name] = role
    return roles


def qkv_ties(graph: DataflowGraph) -> dict[str, str]:
    """Layer -> tie key for the query/key/value projections of one attention that read the same
    tensor (two or more of them); other layers are left out."""
    ties: dict[str, str] = {}
    for att in graph.attentions:
        by_group: dict[int, set[str]] = {}
        for n in (*att.query, *att.key, *att.value):
            if n in graph.layers:
                by_group.setdefault(graph.layers[n].input_group, set()).add(n)
        for group, names in by_group.items():
            if len(names) > 1:
                for n in names:
                    ties.setdefault(n, f"qkv:{att.index}:{group}")
    return ties
