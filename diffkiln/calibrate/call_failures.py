"""Who raised inside a pipeline call: the pipeline's own code (diffusers, transformers, a user's
pipeline class) or diffkiln's. A failure in the pipeline's code becomes a
:class:`~diffkiln.core.errors.PipelineCallError` naming the component that raised and the fix
where one is known; a failure in diffkiln's own code is left as it is, a bug to report with its
traceback.

The component is found from the traceback: the innermost frame whose ``self`` is one of the
pipeline's modules (a component or a module inside one), matched by identity.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from diffkiln.core.errors import DiffkilnError, PipelineCallError

__all__ = ["pipeline_failure"]

_PACKAGE = Path(__file__).resolve().parent.parent
_MESSAGE_CHARS = 300


def _frames(tb: TracebackType | None) -> list[Any]:
    """The traceback's frames, innermost first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def _in_diffkiln(frame: Any) -> bool:
    try:
        return Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def _raised_by_diffkiln(frames: list[Any]) -> bool:
    """Whether diffkiln's code holds the innermost frame that is diffkiln's or the pipeline's
    (frames in torch and the standard library belong to whoever called them). The pipeline call
    itself is made from diffkiln, so only frames inside the call count: those after the first one
    outside diffkiln, counted from the outermost."""
    outer = frames[::-1]
    start = next((i for i, f in enumerate(outer) if not _in_diffkiln(f)), len(outer))
    inside = outer[start:][::-1]
    for frame in inside:
        if _in_diffkiln(frame) and not _passes_through(frame):
            return True
        if not _is_library(frame) and not _in_diffkiln(frame):
            return False
    return False


def _passes_through(frame: Any) -> bool:
    """A torch-function mode's frame (the data-flow tracer's): it only forwards the model's own
    call, so a failure there is the model's, as one in torch's frames is."""
    return frame.f_code.co_name == "__torch_function__"


def _is_library(frame: Any) -> bool:
    """torch's and the standard library's frames, which act for whoever called them."""
    name = frame.f_globals.get("__name__", "")
    return name.split(".")[0] in {"torch", "contextlib", "functools"}


def _component(pipe: Any, frames: list[Any]) -> tuple[str, Any, str] | None:
    """(component name, component, function) of the innermost frame whose ``self`` is a module of
    the pipeline (the innermost in the model's own code, where one is), or None."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, Mapping):
        return None
    owner: dict[int, tuple[str, Any]] = {}
    for name, comp in components.items():
        if isinstance(comp, torch.nn.Module):
            for module in comp.modules():
                owner.setdefault(id(module), (name, comp))
    # The model's own code first (a diffusers method), then torch's (a Conv2d's forward).
    for frame in [f for f in frames if not _is_library(f)] + frames:
        me = frame.f_locals.get("self")
        if me is not None and id(me) in owner:
            name, comp = owner[id(me)]
            return name, comp, f"{type(me).__name__}.{frame.f_code.co_name}"
    return None


def pipeline_failure(
    pipe: Any, exc: BaseException, call_kwargs: Mapping[str, Any], samples: int = 1
) -> PipelineCallError | None:
    """The typed error for ``exc``, raised inside a call of ``pipe`` on ``samples`` samples with
    ``call_kwargs``, or None where it is to stay as it is: diffkiln's own errors and code, the
    system's (``OSError``: the CLI names those), and memory exhaustion (whose message says what it
    is)."""
    if isinstance(exc, (DiffkilnError, OSError, MemoryError, torch.OutOfMemoryError)) or not isinstance(exc, Exception):
        return None
    frames = _frames(exc.__traceback__)
    if _raised_by_diffkiln(frames):
        return None
    name = type(pipe).__name__
    found = _component(pipe, frames)
    where = f" in its {found[0]} ({found[2]})" if found else ""
    message = str(exc).rstrip(".")
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + " ..."
    comp = found[1] if found else None
    missing = getattr(exc, "name", None) if isinstance(exc, NameError) else None
    if missing and importlib.util.find_spec(missing) is None:
        # A module-level optional import that did not happen (diffusers imports ftfy only when it
        # is installed, and some pipelines call it regardless).
        fix = f"the pipeline's code uses the package {missing!r}, which is not installed here: pip install {missing}"
    elif comp is None and isinstance(exc, TypeError) and "required positional argument" in message:
        # The call never started: the pipeline requires an input diffkiln makes no sample of.
        fix = ("diffkiln makes a pipeline's prompts, input images or clips, masks and class labels from its "
               "signature, and passes plain values given with --call-arg KEY=VALUE; a tensor input (another "
               "pipeline's output, as the image embeddings Kandinsky 2.2's decoder takes from its prior) is not "
               "supported")  # fmt: skip
    elif comp is not None and callable(getattr(comp, "enable_tiling", None)) and not getattr(comp, "use_tiling", False):
        fix = ("if it decodes only in tiles, turn its tiled decoding on: --vae-tiling (generate, report; optimize for "
               "its sweep's evaluation), GenerateConfig(vae_tiling=True) in Python; ONNX export: "
               "--denoiser-only")  # fmt: skip
        if samples > 1:  # HunyuanVideo 1.5's VAE (diffusers 0.42) decodes one clip per call only
            fix += (f"; if it fails only on several samples at once (this call had {samples}), decode one per call: "
                    "--batch-size 1 (generate, report), GenerateConfig(batch_size=1) in Python")  # fmt: skip
    else:
        passed = ", ".join(sorted(call_kwargs))
        fix = (f"this is the pipeline's own code; check the call arguments diffkiln passed ({passed}) against the "
               "pipeline's documentation, and give others with --call-arg KEY=VALUE")  # fmt: skip
    return PipelineCallError(f"{name} failed{where}: {type(exc).__name__}: {message}; {fix}")
