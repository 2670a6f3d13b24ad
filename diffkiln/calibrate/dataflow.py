"""The denoiser's data flow, traced from one real call: which layer reads what, and what it feeds.

Layer roles must come from the model and its data, never from class or attribute names. One
denoiser call (the sampler's first, recorded during calibration) is replayed under a
``TorchFunctionMode`` that tags every tensor with

* ``deps``: the denoiser inputs it derives from (``sample``, ``timestep``, ``encoder_hidden_states``,
  ... by the names of the forward's parameters), and
* ``sources``: what feeds it directly, with no quantizable layer in between: an input
  (``input:<name>``), a layer's output (``layer:<name>``) or an attention (``attention:<k>``).

Every torch function unites its arguments' tags into its outputs; a quantizable layer's output
starts afresh as ``layer:<name>``. From that:

* the **latents** are the inputs the model denoises: the forward's first tensor argument (the
  latent for every diffusers denoiser), and for each of the call's further outputs the first
  input of its shape (a model that denoises several latents jointly returns a prediction for each:
  LTX-2's audio latent beside its video latent);
* a layer reading a latent input directly is an **input projection**;
* a layer whose output reaches a prediction (the first output, or one of a latent's shape)
  directly is an **output projection**;
* a layer whose input derives from conditioning only (no latent) and whose output feeds other
  layers before it ever meets latent data is a **conditioning embedder** (timestep and text
  embedders; adaptive-norm modulation layers, whose outputs meet the latent, are not);
* a layer whose ``weight``/``bias`` a torch function touches outside the layer's own forward (a
  parent reading ``.weight.dtype``, or computing with the weight itself) is **read by its
  parent**: replacing it by an integer module would break that parent;
* each ``scaled_dot_product_attention`` call records the layers feeding its query, key and value,
  and the layers reading its output; attentions whose key/value come from another tensor than
  the query (cross and joint text-image attention) are where text meets image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from diffkiln.calibrate.sequence_forms import batch_size, nan_padded, sequence_tensor, stacked_layers
from diffkiln.core.arguments import bind_call
from diffkiln.core.hooks import layer_input, output_tensors, scoped_hooks
from diffkiln.core.layers import find_quantizable_layers, layer_kind

__all__ = [
    "AttentionFlow",
    "DataflowGraph",
    "LayerFlow",
    "batch_size",
    "bind_call",
    "nan_padded",
    "sequence_tensor",
    "trace_dataflow",
]

_Tag = tuple[frozenset[str], frozenset[str]]
_EMPTY: _Tag = (frozenset(), frozenset())
_INPLACE_EXTRA = ("__setitem__", "copy_", "index_put_", "masked_fill_", "scatter_")
# Functions whose other tensor arguments lend only a dtype, device or shape: the output carries the
# data of the first argument alone (Z-Image casts its timestep embedding ``t.type_as(x)``; that
# makes no adaptive-norm layer a reader of the latent), or of no argument at all.
_FIRST_ARGUMENT_DATA = ("type_as", "expand_as", "view_as", "reshape_as", "to")
_NO_DATA = ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros",
            "new_ones", "new_empty", "new_full")  # fmt: skip


@dataclass(frozen=True)
class LayerFlow:
    """One layer's place in the traced call.

    Attributes:
        name: the layer's qualified name.
        kind: its kind (:func:`diffkiln.core.layers.layer_kind`).
        calls: how many times it ran in the traced call (0: never).
        deps: the denoiser inputs its input derives from.
        sources: what feeds its input directly (``input:``, ``layer:``, ``attention:`` tags).
        input_group: layers reading the very same input tensor share this number.
        feeds_output: its output reaches the denoiser's output with no quantizable layer between.
        meets_latent: its output meets latent data (:attr:`DataflowGraph.latent_inputs`) before
            passing another quantizable layer.
        reads: torch functions that used its weight or bias outside its own forward.
        input_shape: the shape of its first input in the traced call.
    """

    name: str
    kind: str
    calls: int = 0
    deps: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    input_group: int = -1
    feeds_output: bool = False
    meets_latent: bool = False
    reads: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class AttentionFlow:
    """One ``scaled_dot_product_attention`` call: the layers feeding query, key and value."""

    index: int
    query: tuple[str, ...]
    key: tuple[str, ...]
    value: tuple[str, ...]
    query_deps: tuple[str, ...]
    key_deps: tuple[str, ...]


@dataclass(frozen=True)
class DataflowGraph:
    """The traced call's data flow (JSON-serialisable with :meth:`to_dict`).

    Attributes:
        main_input: the forward parameter taken as the latent input (its first tensor argument).
        inputs: every tensor input by name (``parent.key`` inside dict arguments): its shape.
        timestep_input: the input taken as the timestep (the first 0-D/1-D tensor after the main
            input; where there is none, the first 2-D one whose values reach a sine or cosine
            before any layer, as a per-token timestep does (Wan 2.2 TI2V's), on its way to the
            sinusoidal embedding), or "" when none.
        layers: every quantizable layer's flow, by name, in module order.
        attentions: the attention calls, in call order.
        notes: free-form facts recorded beside the graph.
        latent_inputs: the inputs the model denoises, the main input first (see the module
            docstring); empty is read as the main input alone.
    """

    main_input: str
    inputs: dict[str, list[int]]
    timestep_input: str
    layers: dict[str, LayerFlow]
    attentions: tuple[AttentionFlow, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    latent_inputs: tuple[str, ...] = ()

    @property
    def latents(self) -> tuple[str, ...]:
        """The latent inputs' names, the main input first."""
        return self.latent_inputs or (self.main_input,)

    @property
    def sequence_inputs(self) -> list[str]:
        """Inputs other than the latents that are token sequences: (batch, length, width), or
        several hidden layers of one encoder stacked in front, (layers, batch, length, width) with
        the main input's batch second (HiDream's Llama states)."""
        batch = (self.inputs.get(self.main_input) or [0])[0]
        others = [(n, s) for n, s in self.inputs.items() if n not in self.latents]
        return [n for n, s in others if len(s) == 3 or stacked_layers(s, batch)]

    def consumers(self, layer: str) -> set[str]:
        """The layers whose input ``layer`` feeds directly."""
        tag = f"layer:{layer}"
        return {n for n, f in self.layers.items() if tag in f.sources}

    def attention_outputs(self, index: int) -> list[str]:
        """The layers reading attention ``index``'s output directly."""
        tag = f"attention:{index}"
        return [n for n, f in self.layers.items() if tag in f.sources]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "main_input": self.main_input,
            "inputs": self.inputs,
            "timestep_input": self.timestep_input,
            "layers": {n: asdict(f) for n, f in self.layers.items()},
            "attentions": [asdict(a) for a in self.attentions],
            "notes": self.notes,
            "latent_inputs": list(self.latent_inputs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataflowGraph:
        """Rebuild from :meth:`to_dict` output."""

        def tuples(record: Mapping[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}

        layers = {n: LayerFlow(**tuples(f)) for n, f in d["layers"].items()}
        attentions = tuple(AttentionFlow(**tuples(a)) for a in d["attentions"])
        notes = dict(d.get("notes", {}))
        latents = tuple(d.get("latent_inputs", ()))
        return cls(d["main_input"], dict(d["inputs"]), d["timestep_input"], layers, attentions, notes, latents)


def _named_inputs(bound: Mapping[str, Any]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Every tensor argument by name: a tensor; a list or tuple of tensors, as one input (Z-Image
    takes its latents and its text embeddings as lists, one tensor per sample); tensors inside
    dicts as ``parent.key``."""
    out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[name] = list(value)
        elif isinstance(value, Mapping):
            out.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


def _input_shape(value: torch.Tensor | list[torch.Tensor]) -> list[int]:
    """An input's shape as the graph records it: a tensor's own; a list of per-sample tensors of
    one rank as ``[len(list), *shape of the first]`` (the list is the batch)."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    return [len(value), *value[0].shape] if len({v.dim() for v in value}) == 1 else [len(value)]


def _function_name(func: Any) -> str:
    """A readable name of a torch function: ``torch.matmul``, ``Tensor.t``, or ``Tensor.dtype`` for a
    property read."""
    attribute: Any = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and hasattr(attribute, "__name__"):
        return f"Tensor.{attribute.__name__} (read)"
    name = getattr(func, "__name__", repr(func))
    return f"Tensor.{name}" if getattr(func, "__objclass__", None) is not None else f"torch.{name}"


class _Tracer(TorchFunctionMode):
    """Propagates (deps, sources) tags through every torch function of one call."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.tags: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.layer_in: dict[str, _Tag] = {}
        self.calls: dict[str, int] = {}
        self.groups: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.group_of: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        # Layer -> the inputs whose data its output met before passing another layer. Kept for every
        # input: which of them are latents is known only from the call's outputs.
        self.met: dict[str, set[str]] = {}
        self.stack: list[str] = []
        self.owner = {id(p): name for name, m in layers.items() for p in m.parameters(recurse=False)}
        self.reads: dict[str, set[str]] = {}
        self.attentions: list[AttentionFlow] = []
        self.sinusoid: set[str] = set()  # inputs whose values reach sin/cos before any layer

    def tag(self, t: torch.Tensor) -> _Tag:
        return self.tags.get(t, _EMPTY)

    def _note_reads(self, func: Any, tensors: list[torch.Tensor]) -> None:
        top = self.stack[-1] if self.stack else None
        for t in tensors:
            owner = self.owner.get(id(t))
            if owner is not None and owner != top:
                self.reads.setdefault(owner, set()).add(_function_name(func))

    def _note_meetings(self, tags: list[_Tag]) -> None:
        if len(tags) < 2:
            return
        present = frozenset().union(*(deps for deps, _ in tags))
        for deps, sources in tags:
            missing = present - deps
            if not missing:
                continue
            for s in sources:
                if s.startswith("layer:") and (new := missing - self.layer_in.get(s[6:], _EMPTY)[0]):
                    self.met.setdefault(s[6:], set()).update(new)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        self._note_reads(func, tensors)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _FIRST_ARGUMENT_DATA:
            tensors = tensors[:1]
        if not tensors or name in _NO_DATA:
            return out
        tags = [self.tag(t) for t in tensors]
        self._note_meetings(tags)
        deps = frozenset().union(*(d for d, _ in tags))
        sources = frozenset().union(*(s for _, s in tags))
        if name in ("sin", "cos") and not any(x.startswith("layer:") for x in sources):
            self.sinusoid.update(d[6:] for d in deps)
        if name == "scaled_dot_product_attention":
            sources = frozenset({self._attention(args, kwargs)})
        targets = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_EXTRA:
            targets.append(tensors[0])
        for t in targets:
            old_deps, old_sources = self.tag(t)
            self.tags[t] = (old_deps | deps, old_sources | sources)
        return out

    def _attention(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        names = ("query", "key", "value")
        qkv = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        tags = [self.tag(t) if isinstance(t, torch.Tensor) else _EMPTY for t in qkv]

        def layers(tag: _Tag) -> tuple[str, ...]:
            return tuple(sorted(s[6:] for s in tag[1] if s.startswith("layer:")))

        index = len(self.attentions)
        self.attentions.append(
            AttentionFlow(
                index,
                layers(tags[0]),
                layers(tags[1]),
                layers(tags[2]),
                tuple(sorted(tags[0][0])),
                tuple(sorted(tags[1][0] | tags[2][0])),
            )
        )
        return f"attention:{index}"

    def enter_layer(self, name: str, x: Any) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if isinstance(x, torch.Tensor) and name not in self.layer_in:
            self.layer_in[name] = self.tag(x)
            self.group_of[name] = self.groups.setdefault(x, len(self.groups))
            self.shapes[name] = tuple(x.shape)
        self.stack.append(name)

    def leave_layer(self, name: str, out: Any) -> None:
        self.stack.pop()
        if isinstance(out, torch.Tensor):
            self.tags[out] = (self.layer_in.get(name, _EMPTY)[0], frozenset({f"layer:{name}"}))


def _timestep_input(named: Mapping[str, torch.Tensor | list[torch.Tensor]], main: str, sinusoid: set[str]) -> str:
    """See :attr:`DataflowGraph.timestep_input`."""
    candidates = [(n, v) for n, v in named.items() if n != main and "." not in n and isinstance(v, torch.Tensor)]
    for name, value in candidates:
        if value.dim() <= 1:
            return name
    for name, value in candidates:
        if value.dim() == 2 and name in sinusoid:
            return name
    return ""


def _shape(value: torch.Tensor | list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _latents_beside(
    named: Mapping[str, torch.Tensor | list[torch.Tensor]], main: str, further: list[torch.Tensor]
) -> list[str]:
    """The inputs other than ``main`` denoised beside it: for each further output (the prediction
    a jointly denoising model returns for each of its latents), the first input of its shape in
    the forward's order (latents come before the conditioning that could share a shape)."""
    out: list[str] = []
    for o in further:
        shape = tuple(o.shape) if o.dim() >= 2 else None
        free = [n for n in named if n not in (main, *out) and "." not in n]
        first = next((n for n in free if _shape(named[n]) == shape), None)
        if first is not None:
            out.append(first)
    return out


def trace_dataflow(denoiser: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> DataflowGraph:
    """Replay one denoiser call and trace its data flow (see the module docstring).

    Args:
        denoiser: the model (left unchanged; its hooks are removed on exit).
        args: the call's positional arguments.
        kwargs: the call's keyword arguments.

    Raises:
        ValueError: the call has no tensor argument.
    """
    layers = find_quantizable_layers(denoiser)
    bound = bind_call(denoiser, args, kwargs)
    named = _named_inputs(bound)
    if not named:
        raise ValueError(f"{type(denoiser).__name__} was called without a tensor argument; nothing to trace")
    main = next(iter(named))
    tracer = _Tracer(layers)
    with scoped_hooks() as hooks:
        for name, module in layers.items():

            def pre(_m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], name: str = name) -> None:
                tracer.enter_layer(name, layer_input(a, k))

            def post(_m: nn.Module, _a: tuple[Any, ...], _k: dict[str, Any], out: Any, name: str = name) -> None:
                tracer.leave_layer(name, out)

            hooks.add_forward_pre_hook(f"diffkiln.dataflow.pre.{name}", module, pre)
            hooks.add_forward_hook(f"diffkiln.dataflow.post.{name}", module, post)
        with tracer, torch.no_grad():
            for name, value in named.items():
                for t in [value] if isinstance(value, torch.Tensor) else value:
                    tracer.tags[t] = (frozenset({f"input:{name}"}), frozenset({f"input:{name}"}))
            out = denoiser(*args, **kwargs)
    outputs = output_tensors(out)
    latents = (main, *_latents_beside(named, main, outputs[1:]))
    predictions = outputs[:1] + [o for o in outputs[1:] if any(tuple(o.shape) == _shape(named[n]) for n in latents)]
    out_sources = frozenset().union(*(tracer.tag(o)[1] for o in predictions))
    latent_tags = {f"input:{n}" for n in latents}
    flows = {}
    for name, module in layers.items():
        deps, sources = tracer.layer_in.get(name, _EMPTY)
        flows[name] = LayerFlow(
            name=name,
            kind=layer_kind(module) or "",
            calls=tracer.calls.get(name, 0),
            deps=tuple(sorted(d[6:] for d in deps)),
            sources=tuple(sorted(sources)),
            input_group=tracer.group_of.get(name, -1),
            feeds_output=f"layer:{name}" in out_sources,
            meets_latent=bool(tracer.met.get(name, set()) & latent_tags),
            reads=tuple(sorted(tracer.reads.get(name, ()))),
            input_shape=tracer.shapes.get(name, ()),
        )
    return DataflowGraph(
        main_input=main,
        inputs={n: _input_shape(value) for n, value in named.items()},
        timestep_input=_timestep_input(named, main, tracer.sinusoid),
        layers=flows,
        attentions=tuple(tracer.attentions),
        latent_inputs=latents,
    )
