"""What diffkiln needs to know about a diffusers pipeline, found from its components and signatures.

* :func:`find_denoiser`: the denoiser is found by what the pipeline's components *are*, never by
  attribute names: the diffusers models (``ModelMixin``) that are not autoencoders (no
  ``encode``/``decode`` pair) and not transformers models (text and image encoders, vocoders);
  of several, :func:`denoiser_by_calls` picks the one called at every sampler step in two short
  runs (calibration does; without a run, the largest).
* :func:`accepted_call_kwargs`: only the arguments a pipeline's ``__call__`` takes are passed.
* :func:`step_callback_kwargs`: the per-step callback in whatever form the pipeline takes.
* :func:`pipeline_media`: the generated images, video frames or audio of a pipeline output.
* :func:`resolve_component_class` and :func:`assemble_pipeline`: a pipeline rebuilt from a folder's
  ``model_index.json`` with some components given, importing classes only from diffusers,
  transformers and diffusers' own pipeline modules (``["stable_audio", ...]`` entries).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core.errors import InvalidInputError

__all__ = [
    "DenoiserChoice",
    "Media",
    "accepted_call_kwargs",
    "assemble_pipeline",
    "call_parameters",
    "choose_denoiser",
    "denoiser_by_calls",
    "denoiser_candidates",
    "find_denoiser",
    "is_autoencoder",
    "model_weight_hash",
    "pipeline_media",
    "pipeline_weight_hash",
    "resolve_component_class",
    "step_callback_kwargs",
]

log = logging.getLogger(__name__)


def _is_transformers_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def is_autoencoder(module: Any) -> bool:
    """True for a model with an ``encode``/``decode`` pair (a VAE)."""
    return callable(getattr(module, "encode", None)) and callable(getattr(module, "decode", None))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def denoiser_candidates(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's components that may be its denoiser: diffusers models that are neither
    autoencoders nor transformers models, by component name."""
    out: dict[str, nn.Module] = {}
    for name, comp in getattr(pipe, "components", {}).items():
        if isinstance(comp, nn.Module) and not _is_transformers_model(comp) and not is_autoencoder(comp):
            out[str(name)] = comp
    return out


@dataclass(frozen=True)
class DenoiserChoice:
    """The denoiser of a pipeline and why it was chosen.

    Attributes:
        name: the component's name in the pipeline (``""`` for a bare module).
        module: the denoiser.
        evidence: one line saying how it was found.
        experts: other components of the denoiser's own class that the sampler loop also runs (an
            expert for other noise levels, as Wan 2.2's ``transformer_2`` below its boundary step);
            each is calibrated and quantized on its own. Empty unless the choice was made by calls.
    """

    name: str
    module: nn.Module
    evidence: str
    experts: tuple[str, ...] = ()


def choose_denoiser(pipe: Any, name: str | None = None) -> DenoiserChoice:
    """The pipeline's denoiser (a bare ``nn.Module`` is its own denoiser).

    Args:
        pipe: a diffusers pipeline, or a denoiser module.
        name: the component to use, overriding the choice (e.g. from ``--denoiser``). Default None.

    Raises:
        InvalidInputError: ``name`` is not a module component, or the pipeline has no candidate;
            the message lists the components.
    """
    if isinstance(pipe, nn.Module):  # pipelines are not modules; a denoiser passed on its own is
        return DenoiserChoice("", pipe, "a bare module is its own denoiser")
    components = getattr(pipe, "components", None)
    if not isinstance(components, Mapping):
        raise InvalidInputError(f"{type(pipe).__name__} is neither a diffusers pipeline nor an nn.Module")
    modules = {k: v for k, v in components.items() if isinstance(v, nn.Module)}
    if name is not None:
        if name not in modules:
            raise InvalidInputError(
                f"--denoiser {name!r} is not a model component; model components: {sorted(modules)}"
            )
        return DenoiserChoice(name, modules[name], f"named by the user ({name})")
    candidates = denoiser_candidates(pipe)
    if not candidates:
        raise InvalidInputError(
            f"{type(pipe).__name__} has no denoiser candidate (a diffusers model that is not an autoencoder); "
            f"model components: {sorted(modules)}; name one with --denoiser"
        )
    sizes = {k: _params(v) for k, v in candidates.items()}
    chosen = max(sizes, key=lambda k: sizes[k])
    listing = ", ".join(f"{k} ({sizes[k] / 1e6:.2f}M)" for k in sorted(sizes, key=lambda k: -sizes[k]))
    evidence = (
        "the only diffusers model that is not an autoencoder"
        if len(sizes) == 1
        else f"the largest diffusers model that is not an autoencoder, of: {listing}"
    )
    return DenoiserChoice(chosen, candidates[chosen], evidence)


def denoiser_by_calls(pipe: Any, run: Callable[[int], Any]) -> DenoiserChoice:
    """The candidate whose calls grow with the number of sampler steps: the denoiser runs at every
    step, conditioning models (text projections, image encoders) a fixed number of times.
    ``run(steps)`` makes one short pipeline call; it is called with 2 and with 3 steps. Ties go to
    the larger model.

    A pipeline with one candidate is not run (:func:`choose_denoiser`).

    Raises:
        InvalidInputError: no candidate's calls grow with the steps.
    """
    from diffkiln.core.hooks import scoped_hooks

    candidates = denoiser_candidates(pipe)
    if len(candidates) <= 1:
        return choose_denoiser(pipe)
    counts: dict[int, dict[str, int]] = {}
    for steps in (2, 3):
        counts[steps] = dict.fromkeys(candidates, 0)

        def counter(name: str, tally: dict[str, int] = counts[steps]) -> Callable[..., None]:
            def count(*_a: Any) -> None:
                tally[name] += 1

            return count

        with scoped_hooks() as hooks:
            for name, module in candidates.items():
                hooks.add_forward_pre_hook(f"diffkiln.denoiser_probe.{name}", module, counter(name))
            run(steps)
    growth = {n: counts[3][n] - counts[2][n] for n in candidates}
    chosen = max(candidates, key=lambda n: (growth[n], _params(candidates[n])))
    if growth[chosen] <= 0:
        raise InvalidInputError(
            f"none of {sorted(candidates)} is called once more per extra sampler step; name it with --denoiser"
        )
    calls = ", ".join(f"{n} {counts[2][n]} -> {counts[3][n]}" for n in sorted(candidates))
    # Another model the sampler loop runs: one that also grows with the steps (a ControlNet), or
    # one of the denoiser's own class called at all (an expert for other noise levels, as Wan
    # 2.2's transformer_2, which runs only below a boundary step). Experts are quantized too, each
    # from statistics of its own; the others stay in floating point.
    others = sorted(n for n in candidates if n != chosen and (growth[n] > 0 or (
        type(candidates[n]) is type(candidates[chosen]) and counts[2][n] + counts[3][n] > 0)))  # fmt: skip
    experts = tuple(n for n in others if type(candidates[n]) is type(candidates[chosen]))
    # An expert split (Wan 2.2) calls each expert at only some of the steps: the denoiser is the one
    # whose calls grow most.
    who = "whose calls grow most with the sampler's steps" if experts else "called at every sampler step"
    evidence = f"the model {who} (calls at 2 -> 3 steps: {calls})"
    if experts:
        evidence += f"; experts of its class run in the sampler loop too, each quantized: {', '.join(experts)}"
    floating = [n for n in others if n not in experts]
    if floating:
        evidence += f"; also run in the sampler loop, kept in floating point: {', '.join(floating)}"
    return DenoiserChoice(chosen, candidates[chosen], evidence, experts)


def find_denoiser(pipe: Any, name: str | None = None) -> nn.Module:
    """The pipeline's denoiser module (see :func:`choose_denoiser`)."""
    return choose_denoiser(pipe, name).module


def model_weight_hash(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over every parameter and buffer of the given modules (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for comp_name in sorted(modules):
        for name, t in modules[comp_name].state_dict().items():
            h.update(f"{comp_name}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            # reshape(-1): a 0-d tensor (LTX's timestep-conditioned VAE holds a 0-d scale) has no
            # byte view; the bytes of every other tensor are unchanged by it.
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pipeline_weight_hash(pipe: Any) -> str:
    """sha256 over the weights of a pipeline's model components, or of a bare module."""
    if isinstance(pipe, nn.Module):
        return model_weight_hash({"": pipe})
    return model_weight_hash({k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)})


def call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    """The parameters of a pipeline's ``__call__`` (or a module's ``forward``), by name."""
    fn = pipe.forward if isinstance(pipe, nn.Module) else pipe.__call__
    return dict(inspect.signature(fn).parameters)


def accepted_call_kwargs(pipe: Any, kwargs: Mapping[str, Any], strict: bool = False) -> dict[str, Any]:
    """The entries of ``kwargs`` that the pipeline's ``__call__`` accepts.

    Args:
        pipe: the pipeline.
        kwargs: candidate arguments.
        strict: raise for an argument the pipeline does not take (a user's ``--call-arg``), instead
            of dropping it (diffkiln's own defaults, e.g. ``guidance_scale`` for a pipeline that
            has none). Default False.

    Raises:
        InvalidInputError: ``strict`` and an argument is not accepted; the message lists the
            pipeline's parameters.
    """
    params = call_parameters(pipe)
    unknown = [k for k in kwargs if k not in params]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for name in unknown if strict else []:
            _warn_once(f"{type(pipe).__name__} has no parameter {name!r}: it goes to the call's **kwargs, which the "
                       "pipeline may ignore; check the spelling against its __call__")  # fmt: skip
        return dict(kwargs)
    if strict and unknown:
        valid = ", ".join(sorted(k for k in params if k != "self"))
        raise InvalidInputError(f"{type(pipe).__name__} takes no argument {unknown[0]!r}; it takes: {valid}")
    return {k: v for k, v in kwargs.items() if k in params}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` once per process: the calls it concerns repeat every batch."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def step_callback_kwargs(pipe: Any, on_step: StepCallback) -> dict[str, Any]:
    """Pipeline-call arguments that run ``on_step(pipe, i, t, {"latents": ...})`` after every step.

    Most diffusers pipelines take ``callback_on_step_end``; older ones take ``callback`` with
    ``callback_steps``. A pipeline with neither gets no callback (``{}``).
    """
    params = call_parameters(pipe)
    if "callback_on_step_end" in params:
        return {"callback_on_step_end": on_step}
    if "callback" in params:

        def legacy(i: int, t: Any, latents: torch.Tensor) -> None:
            on_step(pipe, i, t, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1} if "callback_steps" in params else {"callback": legacy}
    return {}


@dataclass(frozen=True)
class Media:
    """What a pipeline generated, as float arrays in [0, 1] (audio in [-1, 1]).

    Attributes:
        kind: ``"images"`` (N, H, W, C), ``"frames"`` (N, F, H, W, C) or ``"audios"`` (N, C, T).
        data: the array.
    """

    kind: str
    data: np.ndarray

    def items(self) -> list[np.ndarray]:
        """One array per generated sample."""
        return list(self.data)

    def image_array(self) -> np.ndarray:
        """(N', H, W, C) in [0, 255] for image metrics: images, or every frame of every clip.

        Raises:
            ValueError: the media is audio.
        """
        if self.kind == "audios":
            raise ValueError("audio has no image form")
        arr = self.data.reshape(-1, *self.data.shape[-3:]) if self.kind == "frames" else self.data
        return np.clip(arr.astype(np.float64) * 255.0, 0.0, 255.0)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], (np.ndarray, torch.Tensor)):
        return np.stack([np.asarray(v, dtype=np.float32) / 255.0 for v in x])  # PIL images
    if isinstance(x, (list, tuple)):
        return np.stack([_as_array(v) for v in x])
    return np.asarray(x, dtype=np.float32)


def pipeline_media(out: Any) -> Media:
    """The media of a pipeline output (``.frames``, ``.audios`` or ``.images``), called with
    ``output_type="np"`` (or PIL).

    Raises:
        ValueError: the output holds none of them.
    """
    for attr, kind in (("frames", "frames"), ("audios", "audios"), ("images", "images")):
        value = getattr(out, attr, None)
        if value is not None:
            data = _as_array(value)
            if kind == "frames" and data.ndim == 4:  # a single clip
                data = data[None]
            return Media(kind, data)
    raise ValueError(f"{type(out).__name__} holds no images, frames or audios")


_PIPELINE_MODULE = re.compile(r"[a-z][a-z0-9_]*")


def resolve_component_class(library: str, class_name: str) -> type:
    """The class a ``model_index.json`` entry ``[library, class_name]`` names.

    Only diffusers, transformers and diffusers' own pipeline modules (e.g. ``"stable_audio"``,
    where components such as ``StableAudioProjectionModel`` live) are imported: a folder's index
    never makes diffkiln import arbitrary code.

    Raises:
        InvalidInputError: another library, or no such class there.
    """
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    elif _PIPELINE_MODULE.fullmatch(library) and importlib.util.find_spec(f"diffusers.pipelines.{library}"):
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    else:
        raise InvalidInputError(
            f"component library {library!r} is neither diffusers, transformers nor a diffusers pipeline module; "
            "diffkiln imports nothing else"
        )
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise InvalidInputError(f"{library} has no class {class_name!r} (installed: {module.__name__})")
    return cls


def assemble_pipeline(path: Path, overrides: Mapping[str, Any]) -> Any:
    """Build the pipeline of ``path/model_index.json``: the components in ``overrides`` as given,
    every other one loaded from its subfolder (float32 for models).

    ``DiffusionPipeline.from_pretrained(path, transformer=...)`` would also do, except for
    pipelines whose denoiser is an optional component (Wan): those still load it from disk.

    Raises:
        InvalidInputError: the pipeline class is not in the installed diffusers, or a component's
            class cannot be resolved (:func:`resolve_component_class`).
    """
    import diffusers

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    pipeline_cls: Any = getattr(diffusers, str(index.get("_class_name")), None)
    if not isinstance(pipeline_cls, type):
        raise InvalidInputError(
            f"pipeline class {index.get('_class_name')!r} is not in diffusers {diffusers.__version__}"
        )
    accepted = set(inspect.signature(pipeline_cls).parameters)
    kwargs: dict[str, Any] = dict(overrides)
    for name, value in index.items():
        if name.startswith("_") or name in overrides or name not in accepted:
            continue
        if isinstance(value, list) and len(value) == 2:
            library, cls_name = value
            if library is None:
                kwargs[name] = None
                continue
            cls = resolve_component_class(library, cls_name)
            # float32 like the rest of diffkiln; only model classes take a dtype.
            # Models load from safetensors only: a pickled weight file is refused, never unpickled.
            extra = {"dtype": torch.float32, "use_safetensors": True} if issubclass(cls, nn.Module) else {}
            kwargs[name] = cls.from_pretrained(path / name, local_files_only=True, **extra)  # type: ignore[attr-defined]
        else:
            kwargs[name] = value  # a plain config value of the pipeline (e.g. requires_safety_checker)
    return pipeline_cls(**kwargs)
