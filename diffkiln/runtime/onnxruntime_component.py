"""One exported model component behind an onnxruntime session: the stand-in each component kind
of :mod:`diffkiln.runtime.onnxruntime_backend` builds on (feeds named as the ONNX inputs, the
manifest's options checked, the torch class's attributes answered from a meta skeleton)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core.arguments import feed_array, flatten_arguments, is_int_argument, json_form
from diffkiln.core.confine import confined_file
from diffkiln.core.errors import BundleError
from diffkiln.runtime.onnxruntime_session import open_session, session_options

__all__ = ["OUTPUT_MODULES", "OrtComponent", "check_graph_inputs"]

# Output objects are rebuilt only from these libraries' classes (named in the manifest).
_OUTPUT_LIBRARIES = ("transformers.", "diffusers.")
OUTPUT_MODULES = (
    "transformers.modeling_outputs",
    "transformers.models.clip.modeling_clip",
    "diffusers.models.modeling_outputs",
    "diffusers.models.autoencoders.vae",
)
"""Modules the onnxruntime loader may import to rebuild a component's output (the text encoders of
diffusers pipelines return their classes); another module's class resolves only if already imported."""


class OrtComponent(nn.Module):
    """One exported model component behind an onnxruntime session.

    Args:
        folder: the export folder.
        name: the pipeline attribute (``unet``, ``text_encoder``, ``vae``).
        entry: its manifest entry (file, inputs, outputs, options, output layout).
        config: the component's config (``.config`` of the torch module it replaces).
        providers: onnxruntime execution providers.
        optimize: let onnxruntime optimize the graph (fuse QDQ into integer kernels).
    """

    def __init__(self, folder: Path, name: str, entry: dict[str, Any], config: Any, providers: list[str],
                 optimize: bool):  # fmt: skip
        super().__init__()
        self.component_name = name
        self.entry = entry
        self.config = config
        # Optimized on the CPU provider, convolution weights are dequantized once (the provider has
        # no integer convolution with a float output; see FoldConvWeightDequantizePass).
        fold = optimize and providers[0] == "CPUExecutionProvider"
        file = confined_file(folder, entry.get("file"), f"components.{name}.file")
        try:
            self.session = open_session(file, session_options(optimize), providers, fold)
        except Exception as exc:  # onnxruntime raises its own types for a malformed graph
            raise BundleError(f"{entry.get('file')}: onnxruntime cannot load it: {type(exc).__name__}: {exc}") from None
        self.inputs = {i["name"]: i for i in entry["inputs"]}
        check_graph_inputs(entry, self.session.get_inputs())
        # resolved (and checked) at load, not at the first call
        self.output_class = self.resolve_output_class(entry.get("output_class"))
        self.__dict__["_skeleton"] = None
        # Pipelines read a model's dtype as ``next(model.parameters()).dtype`` (SVD's image
        # encoder): a zero-size parameter answers what ``dtype`` answers.
        self.dtype_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @staticmethod
    def resolve_output_class(spec: str | None) -> Any:
        """The output class a manifest names: an existing ``ModelOutput`` (transformers) or
        ``BaseOutput`` (diffusers) subclass from a module of :data:`OUTPUT_MODULES` (imported by
        that fixed name, never by the bundle's string) or one already imported; never another
        callable of those libraries."""
        import sys

        if spec is None:
            return None
        from diffusers.utils import BaseOutput
        from transformers.utils import ModelOutput

        module_name, _, qualname = spec.partition(":")
        if not module_name.startswith(_OUTPUT_LIBRARIES):
            raise BundleError(f"output class {spec!r} is not from transformers or diffusers")
        # import only by our own fixed name, never by the bundle's string
        known = next((name for name in OUTPUT_MODULES if name == module_name), None)
        module = importlib.import_module(known) if known is not None else sys.modules.get(module_name)
        if module is None:
            raise BundleError(f"output class {spec!r}: its module is not one of {sorted(OUTPUT_MODULES)}")
        cls = getattr(module, qualname, None)
        if not (isinstance(cls, type) and issubclass(cls, (ModelOutput, BaseOutput))):
            raise BundleError(f"output class {spec!r} is not a transformers ModelOutput or a diffusers BaseOutput")
        return cls

    def attach_skeleton(self, skeleton: nn.Module) -> None:
        """Answer attribute reads this stand-in lacks from ``skeleton``: the torch class built on
        the meta device (no weights), for pipelines that read e.g. SDXL's
        ``unet.add_embedding.linear_1.in_features`` or call FLUX's ``transformer.cache_context``.
        Kept out of the module tree, so ``pipe.to(...)`` never moves it. The stand-in's
        ``forward`` then reports the torch class's signature: pipelines inspect it (SVD passes its
        VAE ``num_frames`` only where ``vae.forward`` names it)."""
        self.__dict__["_skeleton"] = skeleton
        forward = type(self).forward

        def answered(*args: Any, **kwargs: Any) -> Any:
            return forward(self, *args, **kwargs)

        answered.__signature__ = inspect.signature(skeleton.forward)  # type: ignore[attr-defined]
        self.__dict__["forward"] = answered

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            skeleton = self.__dict__.get("_skeleton")
            if skeleton is None:
                raise
            return getattr(skeleton, name)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run(self, feeds: dict[str, Any]) -> list[torch.Tensor]:
        """Run the session on torch tensors named as the ONNX inputs; return torch tensors.

        Raises:
            ValueError: an input is missing or unexpected, or its shape is not one the export
                accepts (the message names the input and the exported shape).
        """
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise ValueError(
                f"{self.component_name}: the ONNX model takes {sorted(self.inputs)}; "
                f"missing {missing}, unexpected {extra}"
            )
        arrays: dict[str, np.ndarray] = {}
        for key, value in feeds.items():
            spec = self.inputs[key]
            array = feed_array(value, spec["dtype"] or "float")
            shape = spec["shape"]
            if shape is not None and (
                len(shape) != array.ndim
                or any(isinstance(d, int) and d != n for d, n in zip(shape, array.shape, strict=True))
            ):
                raise ValueError(
                    f"{self.component_name}: input {key!r} has shape {list(array.shape)}, the export takes {shape} "
                    "(re-export with dynamic axes, or call with the exported batch and size)"
                )
            arrays[key] = array
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, arrays)]

    def feeds_of_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The ONNX feeds of a torch-style call (``return_dict`` already removed): positionals
        named, dict arguments flattened, int arguments the graph takes as inputs (LTX's latent
        ``height``) as int64 scalars, other non-tensor arguments checked against the export.

        Raises:
            ValueError: a tensor argument the graph does not take (the export was called without
                it, so the graph would compute without it), or an option that differs.
        """
        return self.feeds_of(*self.split_call(args, kwargs))

    def split_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A torch-style call's flattened tensors and its other arguments, positionals named."""
        return flatten_arguments({**kwargs, **self.name_positionals(args, kwargs)})

    def feeds_of(self, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This graph's feeds of a call split by :meth:`split_call` (see :meth:`feeds_of_call`).

        Raises:
            ValueError: as :meth:`feeds_of_call`.
        """
        tensors, rest = dict(tensors), dict(rest)
        for key in [k for k, v in rest.items() if k in self.inputs and is_int_argument(v)]:
            tensors[key] = torch.tensor(rest.pop(key), dtype=torch.int64)
        extra = sorted(set(tensors) - set(self.inputs))
        if extra:
            raise ValueError(
                f"{self.component_name}: the exported graph takes {sorted(self.inputs)}, not {extra}; "
                "re-export calling it with them"
            )
        self._check_options(rest)
        return tensors

    def name_positionals(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments named after the torch module's forward parameters."""
        names = [n for n in self.entry["call_order"] if n not in kwargs]
        if len(args) > len(names):
            raise TypeError(f"{self.component_name}: {len(args)} positional arguments, it takes {len(names)}")
        return dict(zip(names, args, strict=False))  # fewer positionals than parameters

    def _check_options(self, kwargs: dict[str, Any]) -> None:
        for key, value in kwargs.items():
            # Absent in effect: None, and dicts without a value (FLUX's joint_attention_kwargs={},
            # PixArt's added_cond_kwargs={"resolution": None, ...}); the export dropped them too.
            empty = isinstance(value, dict) and all(v is None for v in value.values())
            if value is None or empty or key == "return_dict":
                continue
            if key not in self.entry["options"] or self.entry["options"][key] != json_form(value):
                raise ValueError(
                    f"{self.component_name}: argument {key}={value!r} differs from the exported call "
                    f"(options {self.entry['options']}); re-export calling it that way"
                )


def check_graph_inputs(entry: dict[str, Any], graph_inputs: list[Any]) -> None:
    """The manifest's inputs are the graph's: the same names in order, and each axis the manifest
    fixes fixed to the same size in the graph (a symbolic axis is named in both)."""
    file = entry.get("file")
    listed = [i["name"] for i in entry["inputs"]]
    actual = [i.name for i in graph_inputs]
    if listed != actual:
        raise BundleError(f"{file}: the manifest lists inputs {listed}, the graph takes {actual}")
    for spec, graph in zip(entry["inputs"], graph_inputs, strict=True):
        shape, dims = spec["shape"], list(graph.shape)
        if shape is None:
            continue
        if len(shape) != len(dims) or any(isinstance(a, int) != isinstance(d, int) or (isinstance(a, int) and a != d)
                                          for a, d in zip(shape, dims, strict=True)):  # fmt: skip
            raise BundleError(f"{file}: the manifest gives input {spec['name']!r} the shape {shape}, the graph {dims}")
