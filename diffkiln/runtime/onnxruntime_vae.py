"""The onnxruntime backend's VAE: ``decode`` and, where the export holds the graph, ``encode``,
called as the torch class's and answered in the torch class's output types."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.arguments import is_generator
from diffkiln.core.vae_distributions import rebuild_distribution
from diffkiln.runtime.onnxruntime_component import OrtComponent

__all__ = ["OrtVaeDecoder"]


class OrtVaeDecoder(OrtComponent):
    """The VAE's ``decode`` and, where the export holds its graph (the entry's ``encoder``: the
    pipeline's call encoded an image), its ``encode``, called as the torch class's.

    Arguments are named by the torch method's signature (the export's ``call_order``; for a
    ``decode`` exported before the call was recorded, the skeleton's). The first is the graph's
    ``latents`` or ``sample``; the others are fed as the export recorded them: tensors and ints the
    graph takes (LTX's decode timestep, SVD's ``num_frames``), other values equal to the recorded
    options. A tensor the graph does not take is refused, not dropped. ``encode`` answers the
    exported output class, its ``latent_dist`` the manifest's ``distribution_class`` rebuilt from
    the graph's parameters, so the pipeline samples it or takes its mode in torch.
    """

    def __init__(self, folder: Path, name: str, entry: dict[str, Any], config: Any, providers: list[str],
                 optimize: bool):  # fmt: skip
        super().__init__(folder, name, entry, config, providers, optimize)
        encoder = entry.get("encoder")
        self.encode_graph = (
            OrtComponent(folder, f"{name}.encode", encoder, config, providers, optimize) if encoder else None
        )

    def decode(self, z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        feeds, return_dict = _feeds(self, "decode", args, {"return_dict": return_dict, **kwargs})
        (sample,) = self.run({"latents": z, **feeds})[:1]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, x: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if self.encode_graph is None:
            why = self.entry.get("encoder_skipped") or "it predates encode graphs: re-export the bundle"
            raise NotImplementedError(
                f"{self.component_name}: this ONNX export holds no encode graph ({why}); "
                "run the pipeline with the torch runtime"
            )
        feeds, return_dict = _feeds(self.encode_graph, "encode", args, {"return_dict": return_dict, **kwargs})
        outputs = self.encode_graph.run({"sample": x, **feeds})
        entry = self.encode_graph.entry
        distributions = set(entry.get("distribution_fields") or [])
        kind = entry.get("distribution_class", "DiagonalGaussianDistribution")
        fields = {
            str(name): rebuild_distribution(kind, t) if name in distributions else t
            for (name, _), t in zip(entry["output_fields"], outputs, strict=False)
        }
        if not return_dict:
            return tuple(fields.values())
        return self.encode_graph.output_class(**fields) if self.encode_graph.output_class else fields

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "the ONNX export holds the VAE's decode (and encode) graphs; call vae.decode(latents)"
        )


def _feeds(
    component: OrtComponent, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """The feeds besides the first input of a ``decode``/``encode`` call, and its ``return_dict``."""
    skeleton = component.__dict__.get("_skeleton")
    names = component.entry["call_order"] or (
        list(inspect.signature(getattr(skeleton, method)).parameters) if skeleton is not None else []
    )
    if len(args) > len(names[1:]):
        raise TypeError(f"{component.component_name}: {method} takes {len(names[1:])} arguments after the first")
    kwargs = {**kwargs, **dict(zip(names[1:], args, strict=False))}  # a positional return_dict wins
    return_dict = bool(kwargs.pop("return_dict", True))
    # A generator draws no noise in the graph (the export left it out).
    kwargs = {k: v for k, v in kwargs.items() if not is_generator(v)}
    return component.feeds_of_call((), kwargs), return_dict  # refuses a tensor the graph does not take
