"""Built-in models and resolution of a user's TARGET (a built-in name or a diffusers folder)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from diffkiln.errors import ModelNotFoundError

__all__ = [
    "BUILTIN_MODELS",
    "WEIGHTS_DIR",
    "BuiltinModel",
    "JudgeKind",
    "ResolvedTarget",
    "get_builtin",
    "resolve_target",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the committed weights of the trained built-in models live."""


class JudgeKind(str, Enum):
    """Which content judge can score a model's images."""

    NONE = "none"
    SHAPES = "shapes"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships with diffkiln.

    Attributes:
        name: the name users type, e.g. ``"shapes-unet"``.
        description: one line for ``diffkiln models``.
        pipeline_class: the diffusers pipeline class recorded in its model_index.json.
        default_steps: documented number of denoising steps.
        default_guidance: documented classifier-free guidance scale.
        judge: the content judge that scores its images.
    """

    name: str
    description: str
    pipeline_class: str
    default_steps: int
    default_guidance: float
    judge: JudgeKind

    @property
    def path(self) -> Path:
        """The model's diffusers folder inside the installed package."""
        return WEIGHTS_DIR / self.name


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="shapes-unet",
            description="trained 64x64 text-to-image on the shapes world; SD1.5-class "
            "(CLIP text encoder, cross-attention UNet, AutoencoderKL, DPM-Solver++)",
            pipeline_class="StableDiffusionPipeline",
            default_steps=20,
            default_guidance=5.0,
            judge=JudgeKind.SHAPES,
        ),
        BuiltinModel(
            name="shapes-dit",
            description="trained 64x64 text-to-image on the shapes world; SD3-class "
            "(two CLIP encoders + T5, MMDiT transformer, AutoencoderKL, flow-matching Euler)",
            pipeline_class="StableDiffusion3Pipeline",
            default_steps=20,
            default_guidance=5.0,
            judge=JudgeKind.SHAPES,
        ),
    )
}


@dataclass(frozen=True)
class ResolvedTarget:
    """A TARGET resolved to a folder on disk.

    Attributes:
        name: what the user typed (a built-in name, or the folder path).
        path: the diffusers pipeline folder, or the bundle directory.
        builtin: the built-in model entry (for a bundle: of its source model), or None.
        bundle: True when the path is a diffkiln bundle (holds manifest.json).
    """

    name: str
    path: Path
    builtin: BuiltinModel | None
    bundle: bool = False


def get_builtin(name: str) -> BuiltinModel:
    """Look up a built-in model by name.

    Raises:
        ModelNotFoundError: unknown name; the message lists the valid names.
    """
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown built-in model {name!r}; valid names: {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None


def _bundle_source(path: Path) -> BuiltinModel | None:
    """The built-in model a bundle was built from, if any (read without verifying the bundle)."""
    try:
        source = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("source", {})
    except (OSError, ValueError):
        return None  # the runtime's verified load reports the real problem
    return BUILTIN_MODELS.get(source.get("id", "")) if isinstance(source, dict) else None


def resolve_target(target: str | os.PathLike[str]) -> ResolvedTarget:
    """Resolve a built-in model name or a local diffusers folder.

    Args:
        target: a name from ``diffkiln models``, a path to a folder with model_index.json, or a
            diffkiln bundle directory.

    Raises:
        ModelNotFoundError: neither a built-in name nor a diffusers folder; the message lists the
            valid built-in names, or says what the folder lacks.
    """
    text = os.fspath(target)
    if text in BUILTIN_MODELS:
        model = BUILTIN_MODELS[text]
        if not (model.path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the weights of built-in model {text!r} are missing from {model.path}; "
                "reinstall diffkiln from a full checkout (they are committed in diffkiln/zoo/weights)"
            )
        return ResolvedTarget(text, model.path, model)
    path = Path(text)
    if path.is_dir() and (path / "manifest.json").is_file():
        return ResolvedTarget(text, path, _bundle_source(path), bundle=True)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers pipeline folder (it has no model_index.json); "
                "pass a folder written by DiffusionPipeline.save_pretrained"
            )
        return ResolvedTarget(text, path, None)
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a diffusers pipeline folder")
    hint = "folder not found" if (os.sep in text or text.startswith(".")) else "unknown model"
    raise ModelNotFoundError(
        f"{hint}: {text!r}; valid built-in names: {', '.join(sorted(BUILTIN_MODELS))}, "
        "or a path to a local diffusers folder"
    )
