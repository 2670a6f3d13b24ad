"""A pipeline's VAE as export-ready modules, from the ``decode`` and ``encode`` calls the
pipeline made (recorded by a named pre-hook on each method).

* ``decode``: its first argument is the graph input ``latents``; its other tensors are inputs by
  name (LTX's decode timestep); its ints are int64 inputs (SVD's ``num_frames``: the frames of one
  decoded chunk, which the pipeline sets per chunk); a generator is left out (a decode draws no
  noise from it); other JSON-able arguments are fixed options.
* ``encode``: its first argument is the graph input ``sample``, the others as for ``decode``. A
  call that encoded nothing (text to image) gets one on what its ``decode`` returned
  (:func:`encode_call_from_decode`), so that an image-to-image pipeline built from the same
  components (``from_pipe``) runs from the folder too, as optimum's exports hold a VAE encoder. Its
  output (``AutoencoderKLOutput``) is flattened field by field; a distribution field
  (``latent_dist``: a ``DiagonalGaussianDistribution``, or Stable Audio's Oobleck one,
  :mod:`diffkiln.core.vae_distributions`) goes into the graph as its parameters, from which the
  onnxruntime backend rebuilds it, so that the pipeline samples it, or takes its mode, in torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from diffkiln.core.arguments import is_generator, is_int_argument, unflatten_arguments
from diffkiln.core.vae_distributions import DISTRIBUTIONS, distribution_name
from diffkiln.export.onnx.components import (
    Component,
    ComponentKind,
    _output_layout,
    _Positional,
    batch_inputs,
    flatten_kwargs,
    with_ints,
)

__all__ = ["FIRST_INPUT", "encode_call_from_decode", "vae_component"]

FIRST_INPUT = {"decode": "latents", "encode": "sample"}
"""The graph input that takes each method's first argument, whatever the class names it."""


def _field_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if distribution_name(value) is not None:
        parameters: torch.Tensor = value.parameters
        return parameters
    raise ValueError(f"encode's output field {name!r} is a {type(value).__name__}, not a tensor or one of the "
                     f"distributions {sorted(DISTRIBUTIONS)}: no ONNX output form")  # fmt: skip


class _VaeMethod(_Positional):
    """``vae.<method>(first, **other arguments)`` as a module: the first input positionally, the
    other tensors by name, the ``int_inputs`` as ints (symbolic in a trace), ``options`` fixed.
    ``decode`` returns its sample; ``encode`` its output's fields as tensors (:func:`_field_tensor`)."""

    def __init__(self, vae: Any, method: str, names: list[str], options: dict[str, Any],
                 tied: Sequence[int] = (), int_inputs: Sequence[str] = ()):  # fmt: skip
        super().__init__(names, tied)
        self.vae = vae
        self.method = method
        self.options = options
        self.int_inputs = tuple(int_inputs)

    def forward(self, *tensors: torch.Tensor) -> Any:
        named = with_ints(self.named(tensors), self.int_inputs)
        first = named.pop(FIRST_INPUT[self.method])
        call = getattr(self.vae, self.method)
        if self.method == "decode":
            return call(first, **unflatten_arguments(named), **self.options, return_dict=False)[0]
        output = call(first, **unflatten_arguments(named), **self.options)
        return tuple(_field_tensor(k, v) for k, v in output.items())


def vae_component(name: str, vae: Any, method: str, call: tuple[tuple[Any, ...], dict[str, Any]],
                  own_tensors: dict[str, torch.Tensor] | None = None) -> Component:  # fmt: skip
    """The component of one recorded ``vae.decode`` or ``vae.encode`` call (see the module docstring).

    Raises:
        ValueError: an argument or an ``encode`` output field has no ONNX form (the message names it).
    """
    signature = inspect.signature(getattr(vae, method))
    bound = dict(signature.bind_partial(*call[0], **call[1]).arguments)
    first = bound.pop(next(iter(signature.parameters)))
    rest = {k: v for k, v in bound.items() if k != "return_dict" and not is_generator(v)}
    tensors, options = flatten_kwargs(rest)
    ints = [k for k, v in options.items() if is_int_argument(v)]
    head = {FIRST_INPUT[method]: first, **tensors}
    example = {**head, **{k: torch.tensor(options.pop(k), dtype=torch.int64) for k in ints}}
    module = _VaeMethod(vae, method, list(example), options, batch_inputs(head), ints)
    distributions: tuple[str, ...] = ()
    distribution_class: str | None = None
    if method == "decode":
        layout: list[tuple[str, int | None]] = [("sample", None)]
        output_class = None
    else:
        with torch.no_grad():
            output = getattr(vae, method)(first, **unflatten_arguments(tensors), **options)
        for key, value in output.items():
            _field_tensor(key, value)  # refuse an output with no ONNX form before the export
        output_class = _output_layout(output)[1]
        layout = [(str(k), None) for k in output]
        classes = {str(k): distribution_name(v) for k, v in output.items()}
        distributions = tuple(k for k, c in classes.items() if c is not None)
        if len({classes[k] for k in distributions}) > 1:
            raise ValueError(f"encode returns distributions of several classes ({classes}): the manifest names one")
        distribution_class = classes[distributions[0]] if distributions else None
    return Component(
        name,
        ComponentKind.VAE_DECODER if method == "decode" else ComponentKind.VAE_ENCODER,
        module,
        example,
        options,
        layout,
        output_class,
        call_order=list(signature.parameters),
        int_inputs=tuple(ints),
        own_tensors=own_tensors or {},
        distribution_fields=distributions,
        distribution_class=distribution_class,
    )


def encode_call_from_decode(
    vae: Any, decode_call: tuple[tuple[Any, ...], dict[str, Any]]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An ``encode`` call on one sample of what the recorded ``decode`` call returned: an image (a
    video, an audio clip) of the size and layout this VAE produces, which is what an image-to-image
    pipeline built from the same components encodes."""
    args, kwargs = decode_call
    with torch.no_grad():
        out = vae.decode(*args, **{**kwargs, "return_dict": False})
    sample = out[0] if isinstance(out, tuple) else out.sample
    return (sample[:1].clone(),), {}
