"""The pipeline's model components as export-ready modules, with example inputs recorded from one
sampler call.

* the denoiser: called with keyword tensors (dict arguments such as SDXL's ``added_cond_kwargs``
  are flattened to ``name__key`` inputs), returning its prediction (or each of several, as LTX-2's
  video and audio latents, with the torch output class's fields recorded);
* each text encoder: called as the pipeline calls it, its output (a transformers ``ModelOutput``)
  flattened to tensors in field order; the field layout is recorded so the onnxruntime backend
  rebuilds the same output object;
* the VAE: ``vae.decode`` as the pipeline called it, recorded by a named pre-hook on the method
  (:mod:`diffkiln.export.onnx.vae_components`), and ``vae.encode`` where the call encoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffkiln.core.arguments import bind_call, flatten_arguments, unflatten_arguments
from diffkiln.core.hooks import recording_calls, recording_method_calls, scoped_hooks
from diffkiln.core.pipelines import is_autoencoder
from diffkiln.export.onnx.denoiser_calls import call_forms, form_matcher, prediction_layout, the_prediction
from diffkiln.export.onnx.modules import OnnxExportError

__all__ = [
    "Component",
    "ComponentKind",
    "batch_inputs",
    "call_matcher",
    "compared_outputs",
    "flatten_kwargs",
    "own_tensors",
    "record_components",
    "repeated_batch",
    "tie_batch",
    "with_int_inputs",
    "with_ints",
]


log = logging.getLogger(__name__)


class ComponentKind:
    """The kinds of exported components (plain strings in the ONNX manifest)."""

    DENOISER = "denoiser"
    TEXT_ENCODER = "text_encoder"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    """The VAE's ``encode``, exported beside its decoder (the ``encoder`` of its manifest entry)."""


@dataclass
class Component:
    """One model component to export.

    Attributes:
        name: the pipeline attribute (``unet``, ``text_encoder_2``, ``vae``).
        kind: a :class:`ComponentKind` value.
        module: the export-ready module (its forward takes the flattened keyword tensors).
        example: flattened keyword tensors from the recorded call.
        options: the recorded call's non-tensor arguments (e.g. ``output_hidden_states``), fixed
            in the exported graph.
        outputs: the output layout: ``[field, count]`` pairs (count None for a single tensor).
        output_class: ``module:qualname`` of the output object to rebuild, or None for a tensor.
        call_order: the torch module's forward parameters in order (to name positional arguments).
        int_inputs: int arguments of the call taken as graph inputs (int64 scalars) instead of
            options, in ``example`` as 0-d int64 tensors: LTX's latent ``height``, ``width`` and
            ``num_frames``, which change with the video's size (:func:`with_int_inputs`).
    """

    name: str
    kind: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    outputs: list[tuple[str, int | None]] = field(default_factory=list)
    output_class: str | None = None
    call_order: list[str] = field(default_factory=list)
    int_inputs: tuple[str, ...] = ()
    own_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The torch module's own tensors (:func:`own_tensors`), written beside the graph for the
    loader's skeleton."""
    encoder_skipped: str | None = None
    """A VAE decoder's: why its ``encode``, which the recorded call did not use, has no graph."""
    optional: bool = False
    """Not used by the recorded call (a text-to-image call's VAE ``encode``): an export failure
    leaves it out, with the reason in the manifest, instead of refusing the folder."""
    distribution_fields: tuple[str, ...] = ()
    """Output fields that are a latent distribution (a VAE's ``latent_dist``), in the graph as its
    parameters (the mean and a second statistic, concatenated)."""
    distribution_class: str | None = None
    """The class of those fields, a key of :data:`diffkiln.core.vae_distributions.DISTRIBUTIONS`."""
    variants: list[Component] = field(default_factory=list)
    """A denoiser's: the first call of each further form of its calls in the recorded sampler run
    (other options: LTX-2's ``isolate_modalities=True``), each exported as a graph of its own."""
    form_keys: tuple[str, ...] = ()
    """A denoiser's with variants: the options whose values tell its call forms apart."""
    form_tensors: tuple[str, ...] | None = None
    """A denoiser's with variants that pass other tensors: the flattened tensors of this form."""


def _plain(value: Any) -> bool:
    """JSON-able: a number, string, bool or None, or a non-empty tuple, list or string-keyed dict of
    them (LTX's ``rope_interpolation_scale``, PixArt's ``added_cond_kwargs`` of Nones)."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_plain(v) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def flatten_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a call's keyword arguments into flattened tensors (named as the onnxruntime backend
    names them) and JSON-able options (fixed in the graph); Nones and empty containers are left out.

    Raises:
        OnnxExportError: an argument is neither tensors nor a plain option (it would be silently
            dropped from the graph, which then computes something else); the message names it.
    """
    tensors, rest = flatten_arguments(kwargs)
    options: dict[str, Any] = {}
    for key, value in rest.items():
        if value is not None and _plain(value):
            options[key] = value
        elif value is not None and not (isinstance(value, (dict, tuple, list)) and not value):
            raise OnnxExportError(
                f"argument {key!r} ({type(value).__name__}) is neither tensors nor a plain option and has "
                "no ONNX input form; export a call without it"
            )
    return tensors, options


def batch_inputs(example: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The positions of the inputs, after the first, whose axis 0 has the first input's size in the
    recorded call: the batch they share (diffusers' convention: per-sample inputs lead with it)."""
    tensors = list(example.values())
    if not tensors or not tensors[0].dim():
        return ()
    batch = tensors[0].shape[0]
    return tuple(i for i, t in enumerate(tensors[1:], 1) if t.dim() and t.shape[0] == batch)


def repeated_batch(example: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """``example`` with its batch repeated ``times``: the first input and the inputs that share its
    batch (:func:`batch_inputs`); the others as they are."""
    names = list(example)
    batched = {names[i] for i in batch_inputs(example)} | ({names[0]} if names and example[names[0]].dim() else set())
    return {n: torch.cat([t] * times) if n in batched else t for n, t in example.items()}


def tie_batch(tensors: Sequence[torch.Tensor], tied: Sequence[int]) -> None:
    """Declare that the ``tied`` inputs share the first input's batch axis.

    torch.export gives each input's dynamic axis its own symbol. A model that views one input by
    another's batch (an attention mask viewed by the text states' batch; FLUX's rotary reshape
    against its pooled projections) then leaves expressions such as ``s42 // s95`` that torch.export
    cannot prove, or that bake the example's batch into the graph: the export fails, or the graph
    runs at the recorded batch only. The checks make them one symbol (in eager, a cheap assert)."""
    for i in tied:
        torch._check(tensors[i].shape[0] == tensors[0].shape[0])


class _Positional(nn.Module):
    """Takes its input tensors positionally, in the order of ``names``; ``tied``: the positions of
    the inputs that share the first one's batch (:func:`batch_inputs`).

    torch.export's dynamic shapes do not work through a ``**kwargs`` signature (torch 2.13), so
    the export wrappers take ``*tensors`` and name them here; the ONNX inputs get these names.
    """

    def __init__(self, names: list[str], tied: Sequence[int] = ()):
        super().__init__()
        self.names = names
        self.tied = tuple(tied)

    def named(self, tensors: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        tie_batch(tensors, self.tied)
        return dict(zip(self.names, tensors, strict=True))


class _Denoiser(_Positional):
    """The denoiser called with flattened keyword tensors, returning its prediction (a tuple of
    them where it makes several: :func:`the_prediction`); the inputs
    named in ``int_inputs`` are passed to it as ints (a 0-d tensor in eager, an int, symbolic under
    torch.export, in a trace)."""

    def __init__(self, denoiser: nn.Module, names: list[str], options: dict[str, Any], tied: Sequence[int] = (),
                 int_inputs: Sequence[str] = ()):  # fmt: skip
        super().__init__(names, tied)
        self.denoiser = denoiser
        self.options = {k: v for k, v in options.items() if k != "return_dict"}
        self.int_inputs = tuple(int_inputs)

    def forward(self, *tensors: torch.Tensor) -> Any:
        named = with_ints(self.named(tensors), self.int_inputs)
        return the_prediction(self.denoiser(**unflatten_arguments(named), **self.options, return_dict=False))

    def taking_ints(self, names: list[str], options: dict[str, Any], int_inputs: Sequence[str]) -> _Denoiser:
        """This wrapper with the inputs ``names`` (``int_inputs`` among them) and ``options``; a
        subclass returns its own kind (a cache schedule's fill graph keeps its extra outputs)."""
        return _Denoiser(self.denoiser, names, options, self.tied, int_inputs)


def compared_outputs(component: Component) -> int:
    """How many leading graph outputs the export's check compares with torch: a denoiser's
    predictions, each of them; another component's first output."""
    return len(component.outputs) if component.kind == ComponentKind.DENOISER and component.outputs else 1


def with_ints(named: dict[str, Any], int_inputs: Sequence[str]) -> dict[str, Any]:
    """``named`` with each of ``int_inputs`` passed as an int: a 0-d tensor in eager becomes its
    value; under torch.export it already is an int (a symbol)."""
    return {k: int(v) if k in int_inputs and isinstance(v, torch.Tensor) else v for k, v in named.items()}


def with_int_inputs(component: Component, names: Sequence[str]) -> Component | None:
    """``component`` taking the int options ``names`` as graph inputs (:attr:`Component.int_inputs`),
    or None where its module is no denoiser wrapper (:meth:`_Denoiser.taking_ints`)."""
    module = component.module
    if not isinstance(module, _Denoiser) or not names:
        return None
    example = {**component.example, **{n: torch.tensor(component.options[n], dtype=torch.int64) for n in names}}
    options = {k: v for k, v in component.options.items() if k not in names}
    wrapper = module.taking_ints(list(example), options, names)
    return dataclasses.replace(component, module=wrapper, example=example, options=options, int_inputs=tuple(names))


def _output_layout(output: Any) -> tuple[list[tuple[str, int | None]], str | None]:
    if isinstance(output, torch.Tensor):
        return [("output", None)], None
    items = output.items() if hasattr(output, "items") else enumerate(output)
    layout: list[tuple[str, int | None]] = []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            layout.append((str(key), None))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            layout.append((str(key), len(value)))
    cls = type(output)
    return layout, f"{cls.__module__}:{cls.__qualname__}"


class _TextEncoder(_Positional):
    """A text encoder called as the pipeline called it, its output flattened to a tuple of tensors."""

    def __init__(self, encoder: nn.Module, names: list[str], options: dict[str, Any], tied: Sequence[int] = ()):
        super().__init__(names, tied)
        self.encoder = encoder
        self.options = options

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.encoder(**self.named(tensors), **self.options)
        if isinstance(output, torch.Tensor):
            return (output,)
        flat: list[torch.Tensor] = []
        for value in output.values() if hasattr(output, "values") else output:
            if isinstance(value, torch.Tensor):
                flat.append(value)
            elif isinstance(value, (tuple, list)):
                flat.extend(v for v in value if isinstance(v, torch.Tensor))
        return tuple(flat)


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers and parameters registered on ``module`` itself, not on a submodule: what a
    pipeline reads off the component rather than through its forward (LTX's VAE
    ``latents_mean``/``latents_std``, with which the pipeline denormalizes before decoding). The
    graph does not carry them when the forward never reads them, and a meta skeleton has no data."""
    own = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
    return {k: v.detach().contiguous() for k, v in own.items() if v is not None and v.device.type != "meta"}


def _denoiser_component(
    name: str, denoiser: nn.Module, calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], out: Any
) -> Component:
    """The denoiser (or an expert of its class) as its first recorded call gave it its inputs and
    returned ``out`` (its output layout: :func:`~diffkiln.export.onnx.denoiser_calls.prediction_layout`),
    with a variant for the first call of each further form among ``calls``
    (:func:`~diffkiln.export.onnx.denoiser_calls.call_forms`)."""
    flat = [flatten_kwargs(bind_call(denoiser, *call)) for call in calls]
    # ``return_dict`` changes what the torch module returns, not what it computes: no form of its own.
    forms = [(list(tensors), {k: v for k, v in options.items() if k != "return_dict"}) for tensors, options in flat]
    chosen, keys, tensors_differ = call_forms(forms)
    layout, output_class = prediction_layout(denoiser, calls[0], out)

    def component(i: int) -> Component:
        tensors, options = flat[i]
        return Component(
            name,
            ComponentKind.DENOISER,
            _Denoiser(denoiser, list(tensors), options, batch_inputs(tensors)),
            tensors,
            options,
            list(layout),
            output_class,
            call_order=list(inspect.signature(denoiser.forward).parameters),
            own_tensors=own_tensors(denoiser),
            form_keys=keys,
            form_tensors=tuple(tensors) if tensors_differ else None,
        )

    return dataclasses.replace(component(chosen[0]), variants=[component(i) for i in chosen[1:]])


def call_matcher(component: Component, module: nn.Module) -> Callable[[tuple[Any, ...], dict[str, Any]], bool] | None:
    """A test that a call of ``module`` ``(args, kwargs)`` has ``component``'s form, where the
    denoiser's calls take several (:attr:`Component.variants`); None where any call does."""
    if not component.form_keys and component.form_tensors is None:
        return None
    return form_matcher(module, component.form_keys, component.options, component.form_tensors)


@contextlib.contextmanager
def _first_output(name: str, module: nn.Module) -> Iterator[list[Any]]:
    """Within the block, the yielded list gets ``module``'s first output (through a named forward
    hook, removed on exit): a denoiser's, for its layout (:func:`prediction_layout`)."""
    outputs: list[Any] = []

    def keep(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
        if not outputs:
            outputs.append(out)

    with scoped_hooks() as hooks:
        hooks.add_forward_hook(name, module, keep)
        yield outputs


def record_components(
    pipe: Any, denoiser_name: str, call: dict[str, Any], experts: Sequence[str] = ()
) -> list[Component]:
    """Run ``pipe(**call)`` once and record every model component's inputs.

    Args:
        pipe: the loaded pipeline.
        denoiser_name: the pipeline component that is the denoiser.
        call: the full pipeline-call arguments (a short, decoded call).
        experts: components of the denoiser's class that the sampler runs at other steps (Wan
            2.2's ``transformer_2``). Default none.

    Returns:
        The denoiser, its experts, each transformers encoder the call used (text encoders, image
        encoders), the VAE decoder (the first autoencoder whose ``decode`` the call ran) and its
        encoder, in that order.

    Raises:
        OnnxExportError: the call never ran an expert (too few steps to reach its noise levels).
    """
    from transformers import PreTrainedModel

    # vae_components builds on this module's Component: imported here, not at the top.
    from diffkiln.export.onnx.vae_components import encode_call_from_decode, vae_component

    encoders = {name: comp for name, comp in pipe.components.items() if isinstance(comp, PreTrainedModel)}
    vaes = {n: c for n, c in pipe.components.items() if isinstance(c, nn.Module) and is_autoencoder(c)}
    denoiser = getattr(pipe, denoiser_name)
    pipe.set_progress_bar_config(disable=True)
    with contextlib.ExitStack() as stack, torch.no_grad():
        record = {
            name: stack.enter_context(recording_calls(f"diffkiln.onnx.{name}", m)) for name, m in encoders.items()
        }
        record[denoiser_name] = stack.enter_context(recording_calls("diffkiln.onnx.denoiser", denoiser))
        for name in experts:
            record[name] = stack.enter_context(recording_calls(f"diffkiln.onnx.{name}", getattr(pipe, name)))
        outputs = {
            name: stack.enter_context(_first_output(f"diffkiln.onnx.{name}.output", getattr(pipe, name)))
            for name in (denoiser_name, *experts)
        }
        coding = {
            (name, method): stack.enter_context(recording_method_calls(f"diffkiln.onnx.{name}.{method}", vae, method))
            for name, vae in vaes.items()
            for method in ("decode", "encode")
        }
        pipe(**call)
    components = [_denoiser_component(denoiser_name, denoiser, record[denoiser_name], outputs[denoiser_name][0])]
    for name in experts:
        if not record[name]:
            raise OnnxExportError(f"the recorded call never ran the expert {name}: give the export call more steps")
        components.append(_denoiser_component(name, getattr(pipe, name), record[name], outputs[name][0]))
    for name, encoder in encoders.items():
        if not record[name]:
            continue
        tensors, options = flatten_kwargs(bind_call(encoder, *record[name][0]))
        with torch.no_grad():
            output = encoder(**tensors, **options)
        layout, output_class = _output_layout(output)
        components.append(
            Component(
                name,
                ComponentKind.TEXT_ENCODER,
                _TextEncoder(encoder, list(tensors), options, batch_inputs(tensors)),
                tensors,
                options,
                layout,
                output_class,
                call_order=list(inspect.signature(encoder.forward).parameters),
            )
        )
    # The autoencoder the call decoded with, and its encode: as the call encoded (an image to video
    # or image to image pipeline encodes its conditioning image), else on what it decoded.
    decoded = next((name for (name, method), calls in coding.items() if method == "decode" and calls), None)
    if decoded is not None:
        vae = vaes[decoded]
        decode = vae_component(decoded, vae, "decode", coding[decoded, "decode"][0], own_tensors(vae))
        components.append(decode)
        recorded = coding[decoded, "encode"]
        try:
            encoding = recorded[0] if recorded else encode_call_from_decode(vae, coding[decoded, "decode"][0])
            encode = vae_component(decoded, vae, "encode", encoding)
        except Exception as exc:  # a VAE's encode raises its own types; only a recorded one is needed
            if recorded:
                raise
            decode.encoder_skipped = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("%s.encode is not exported: %s", decoded, decode.encoder_skipped)
        else:
            components.append(dataclasses.replace(encode, optional=not recorded))
    return components
