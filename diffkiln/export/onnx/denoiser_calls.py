"""What a denoiser's calls return, and how its calls in one sampler run differ: the two things its
ONNX graphs must follow besides their inputs.

* **Predictions.** A denoiser returns one prediction, or one per latent it denoises (LTX-2's video
  and audio). Each is a graph output, in the order the torch module returns them, and the manifest
  records the torch output class's fields, so that the onnxruntime backend returns what the torch
  module returns.
* **Call forms.** A graph fixes the call's non-tensor options. Some samplers call their denoiser
  with other options at some calls of a step: LTX-2's modality-isolation call passes
  ``isolate_modalities=True`` and its spatio-temporal guidance call
  ``spatio_temporal_guidance_blocks``; SD3's skip-layer guidance passes ``skip_layers``. Each form
  (the options, and which tensors the call passes) gets a graph of its own, a *variant*, and the
  backend runs the one whose options a call has.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.core.arguments import bind_call, flatten_arguments, json_form
from diffkiln.export.onnx.modules import OnnxExportError

__all__ = [
    "MAX_CALL_FORMS",
    "CallForm",
    "call_forms",
    "form_matcher",
    "prediction_layout",
    "the_prediction",
]

MAX_CALL_FORMS = 4
"""The most forms of one denoiser's calls the export writes a graph for. A sampler that changes an
option at every step (a step index passed as an int) would otherwise get a graph per step."""


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a non-empty list of them (per-sample predictions)."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(t, torch.Tensor) for t in value)
    return isinstance(value, torch.Tensor)


def _prediction_entries(out: Any) -> list[Any]:
    """The entries of a ``return_dict=False`` tuple that hold tensors: a denoiser's predictions
    (None and FLUX.2's key-value cache object are none)."""
    return [o for o in out if _holds_tensors(o)] if isinstance(out, tuple) else [out]


def the_prediction(out: Any) -> Any:
    """A denoiser call's prediction (``return_dict=False``: the tuple's first entry; Z-Image's is
    a list of per-sample tensors), or a tuple of its predictions where it returns several (LTX-2's
    video and audio latents), each a graph output in that order.

    Raises:
        OnnxExportError: several predictions, one of them a list of per-sample tensors (a graph's
            outputs would not say where one prediction ends).
    """
    if not isinstance(out, tuple):
        return out
    found = _prediction_entries(out)
    if len(found) <= 1:
        return out[0]
    if not all(isinstance(o, torch.Tensor) for o in found):
        raise OnnxExportError(
            f"the denoiser returns {len(found)} predictions, some of them lists of per-sample tensors; the ONNX "
            "export takes several predictions only as tensors"
        )
    return tuple(found)


def _values(out: Any) -> tuple[Any, ...]:
    """An output's entries: a ``BaseOutput``'s set fields (an ordered dict), a tuple's, or itself."""
    return tuple(out.values()) if isinstance(out, dict) else out if isinstance(out, tuple) else (out,)


def prediction_layout(
    denoiser: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]], out: Any
) -> tuple[list[tuple[str, int | None]], str | None]:
    """The output layout (``[field, None]`` per prediction) and output class (``module:qualname``,
    None for a tensor or a tuple) of a denoiser whose recorded ``call`` returned ``out``.

    One prediction is ``sample``. For several, the torch output class's fields: the call is
    repeated with ``return_dict=True`` where it returned a tuple, to learn them (LTX-2's
    ``AudioVisualModelOutput`` of ``sample`` and ``audio_sample``); a module without such a class
    gets ``sample``, ``sample_1``, ...
    """
    if len(_prediction_entries(_values(out))) <= 1:
        return [("sample", None)], None
    if isinstance(out, tuple) and "return_dict" in inspect.signature(denoiser.forward).parameters:
        with torch.no_grad():
            out = denoiser(**{**bind_call(denoiser, *call), "return_dict": True})
    fields = [(str(k), v) for k, v in out.items()] if isinstance(out, dict) else list(enumerate(_values(out)))
    found = [(name, value) for name, value in fields if _holds_tensors(value)]
    if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for _, v in found):
        cls = type(out)
        return [(str(name), None) for name, _ in found], f"{cls.__module__}:{cls.__qualname__}"
    return [("sample" if i == 0 else f"sample_{i}", None) for i in range(len(found))], None


@dataclass(frozen=True)
class CallForm:
    """The form of one denoiser call: which tensors it passes (flattened names) and its options
    (canonical JSON)."""

    tensors: tuple[str, ...]
    options: str

    @classmethod
    def of(cls, tensors: Sequence[str], options: dict[str, Any]) -> CallForm:
        """The form of a call with flattened ``tensors`` and plain ``options``."""
        return cls(tuple(sorted(tensors)), json.dumps(json_form(options), sort_keys=True))


def call_forms(calls: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> tuple[list[int], tuple[str, ...], bool]:
    """The first call of each form, in order, among ``calls`` (flattened tensor names and options
    each); the options whose values differ between forms; and whether the forms differ in their
    tensors.

    Raises:
        OnnxExportError: more than :data:`MAX_CALL_FORMS` forms (the message names what changes).
    """
    firsts: dict[CallForm, int] = {}
    for i, (tensors, options) in enumerate(calls):
        firsts.setdefault(CallForm.of(tensors, options), i)
    chosen = list(firsts.values())
    each = [calls[i][1] for i in chosen]
    keys = tuple(sorted(k for k in {k for o in each for k in o}
                        if len({json.dumps(json_form(o.get(k)), sort_keys=True) for o in each}) > 1))  # fmt: skip
    tensors_differ = len({form.tensors for form in firsts}) > 1
    if len(chosen) > MAX_CALL_FORMS:
        raise OnnxExportError(
            f"the sampler calls the denoiser in {len(chosen)} forms (changing: {list(keys)}"
            f"{' and the tensors it passes' if tensors_differ else ''}); the ONNX export writes a graph per form, "
            f"at most {MAX_CALL_FORMS}"
        )
    return chosen, keys, tensors_differ


def form_matcher(
    module: nn.Module, keys: Sequence[str], options: dict[str, Any], tensors: Sequence[str] | None
) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    """A test of a call of ``module`` ``(args, kwargs)``: it has the form whose ``options`` (those
    of ``keys``) and, where given, flattened ``tensors`` these are; to find that form's call at
    another shape."""
    wanted = {k: _option(options.get(k)) for k in keys}

    def matches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        named, rest = flatten_arguments(bind_call(module, args, kwargs))
        if any(_option(rest.get(k)) != v for k, v in wanted.items()):
            return False
        return tensors is None or sorted(named) == sorted(tensors)

    return matches


def _option(value: Any) -> Any:
    """An option as the export records it: None for an absent or empty one (the export leaves
    those out), else its JSON form."""
    return None if value is None or (isinstance(value, (dict, tuple, list)) and not value) else json_form(value)
