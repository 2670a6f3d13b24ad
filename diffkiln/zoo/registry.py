"""Built-in models and resolution of a user's TARGET (a built-in name or a diffusers folder)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from diffkiln.core.errors import BundleError, ModelNotFoundError

__all__ = [
    "BUILTIN_MODELS",
    "SHAPES_VIDEO",
    "WEIGHTS_DIR",
    "BuiltinModel",
    "JudgeKind",
    "ResolvedTarget",
    "default_cache_dir",
    "get_builtin",
    "resolve_target",
]

TINY_VERSION = 2
"""Bumped whenever a tiny architecture's config changes, so cached folders are rebuilt."""


def default_cache_dir() -> Path:
    """diffkiln's cache (calibration statistics, materialized tiny models): $DIFFKILN_CACHE or ~/.cache/diffkiln."""
    return Path(os.environ.get("DIFFKILN_CACHE", Path.home() / ".cache" / "diffkiln"))


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the committed weights of the trained built-in models live."""


class JudgeKind(str, Enum):
    """Which content judge can score a model's images."""

    NONE = "none"
    SHAPES = "shapes"
    SHAPES_VIDEO = "shapes-video"

    @property
    def scores(self) -> bool:
        """True for a judge that scores content (every kind but NONE)."""
        return self is not JudgeKind.NONE


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
        call_kwargs: extra pipeline-call arguments the model needs (e.g. a tiny model's height
            and width), as (name, value) pairs. Default none.
        random_weights: True for the tiny random-weight architecture pipelines, which are built
            on first use into the cache rather than shipped. Default False.
    """

    name: str
    description: str
    pipeline_class: str
    default_steps: int
    default_guidance: float
    judge: JudgeKind
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    random_weights: bool = False

    @property
    def path(self) -> Path:
        """The model's diffusers folder: inside the package, or (random-weight models) in the cache."""
        if self.random_weights:
            return default_cache_dir() / "zoo" / f"{self.name}-v{TINY_VERSION}"
        return WEIGHTS_DIR / self.name

    def calibration_prompts(self, n: int) -> list[str] | None:
        """``n`` prompts from the model's own world (shapes-world scenes in seen compositions for
        the shapes models, moving-shapes scenes for shapes-video), or None when it has none (the
        caller uses generic captions). Half are single objects, half pairs.

        Raises:
            ValueError: ``n`` is not positive.
        """
        if n <= 0:
            raise ValueError(f"calibration size must be positive, got {n}")
        if not self.judge.scores:
            return None
        from diffkiln.zoo.shapes import PromptSet, eval_scenes
        from diffkiln.zoo.shapes.video import eval_video_scenes

        pick = eval_video_scenes if self.judge is JudgeKind.SHAPES_VIDEO else eval_scenes
        half = (n + 1) // 2
        return [s.prompt for s in (*pick(PromptSet.SINGLE, half, seed=7), *pick(PromptSet.PAIRS, n - half, seed=7))]

    def materialize(self) -> Path:
        """The model's folder, built first if it is a random-weight model not yet in the cache.

        Under torch.distributed every rank calls this, and rank 0 alone builds: transformers'
        ``save_pretrained`` writes weights on rank 0 only once a process group exists, so a folder
        another rank saved would hold no text-encoder weights.
        """
        if not self.random_weights:
            return self.path
        from diffkiln.core.distributed import all_gather_objects, rank_zero_first

        missing = any(all_gather_objects(not (self.path / "model_index.json").is_file()))
        if missing:
            from diffkiln.zoo.architectures import save_tiny_pipeline

            with rank_zero_first():
                save_tiny_pipeline(self.name, self.path)  # rank 0 builds; the others find it built
        return self.path


def _tiny_models() -> tuple[BuiltinModel, ...]:
    # Described here without importing diffusers; the builders live in zoo.architectures.
    from diffkiln.zoo.catalog import TINY_CATALOG

    return tuple(
        BuiltinModel(
            name=entry.name,
            description=entry.description,
            pipeline_class=entry.pipeline_class,
            default_steps=4,
            default_guidance=4.0,
            judge=JudgeKind.NONE,
            call_kwargs=entry.call_kwargs,
            random_weights=True,
        )
        for entry in TINY_CATALOG
    )


SHAPES_VIDEO = BuiltinModel(
    name="shapes-video",
    description="trained 17-frame 64x64 text-to-video on the moving-shapes world; Wan 2.1-class "
    "(UMT5, WanTransformer3DModel, AutoencoderKLWan, flow-matching Euler)",
    pipeline_class="WanPipeline",
    default_steps=20,
    default_guidance=8.0,
    judge=JudgeKind.SHAPES_VIDEO,
    # Wan rounds num_frames up to 1 + a multiple of the VAE's temporal factor (1 here): 16 -> 17;
    # prompts are padded to zoo.shapes_video_model.VIDEO_TEXT_LENGTH tokens.
    call_kwargs=(("height", 64), ("width", 64), ("num_frames", 16), ("max_sequence_length", 24)),
)
"""The trained text-to-video model of the moving-shapes world. Listed in :data:`BUILTIN_MODELS` once
its weights are in the package (it is still being trained: docs/models.md)."""

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
            # Trained with T5 prompts padded to 32 tokens (zoo.shapes_models.DIT_T5_LENGTH).
            call_kwargs=(("max_sequence_length", 32),),
        ),
        *((SHAPES_VIDEO,) if (WEIGHTS_DIR / SHAPES_VIDEO.name / "model_index.json").is_file() else ()),
        *_tiny_models(),
    )
}


@dataclass(frozen=True)
class ResolvedTarget:
    """A TARGET resolved to a folder on disk.

    Attributes:
        name: what the user typed (a built-in name, or the folder path).
        path: the diffusers pipeline folder, or the bundle directory.
        builtin: the built-in model entry (for a bundle: of its source model), or None.
        bundle: True when the path is a diffkiln bundle or ONNX export (holds manifest.json).
        onnx: True when the path is an ONNX export (``diffkiln export --format onnx``), run in
            onnxruntime.
    """

    name: str
    path: Path
    builtin: BuiltinModel | None
    bundle: bool = False
    onnx: bool = False

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Extra pipeline-call arguments of the (source) built-in model; empty for other targets."""
        return dict(self.builtin.call_kwargs) if self.builtin else {}


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


def _bundle_source(path: Path) -> tuple[BuiltinModel | None, bool]:
    """(the built-in model a bundle or ONNX export was built from, if any; whether it is an ONNX
    export), read without verifying the folder: the verified load reports any real problem."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if not isinstance(manifest, dict):
        return None, False
    onnx = manifest.get("format") == "diffkiln.onnx"
    origin = manifest.get("bundle", {}) if onnx else manifest
    source = origin.get("source", {}) if isinstance(origin, dict) else {}
    builtin = BUILTIN_MODELS.get(str(source.get("id", ""))) if isinstance(source, dict) else None
    return builtin, onnx


def _refuse_bundle_without_manifest(path: Path) -> None:
    """A bundle whose manifest.json was deleted still looks like a diffusers folder; its denoiser
    config's diffkiln guard gives it away, so say so instead of letting diffusers fail on the guard."""
    from diffkiln.core.schema import carries_bundle_guard

    if carries_bundle_guard(path):
        raise BundleError(
            f"{path} is a diffkiln bundle without its manifest.json (deleted, or copied incompletely), "
            "so it cannot be verified or loaded; rebuild it with `diffkiln optimize` or copy it again whole"
        )


def resolve_target(target: str | os.PathLike[str], build: bool = True) -> ResolvedTarget:
    """Resolve a built-in model name or a local diffusers folder.

    Args:
        target: a name from ``diffkiln models``, a path to a folder with model_index.json, or a
            diffkiln bundle directory.
        build: build a random-weight built-in model's folder where the cache lacks it. False only
            checks the name (the CLI's early check): ``path`` may then not exist yet.

    Raises:
        ModelNotFoundError: neither a built-in name nor a diffusers folder; the message lists the
            valid built-in names, or says what the folder lacks.
        BundleError: a bundle folder whose manifest.json is missing.
    """
    text = os.fspath(target)
    if text in BUILTIN_MODELS:
        model = BUILTIN_MODELS[text]
        if not build and model.random_weights:
            return ResolvedTarget(text, model.path, model)
        model.materialize()
        if not (model.path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the weights of built-in model {text!r} are missing from {model.path}; "
                "reinstall diffkiln from a full checkout (they are committed in diffkiln/zoo/weights)"
            )
        return ResolvedTarget(text, model.path, model)
    path = Path(text)
    if path.is_dir() and (path / "manifest.json").is_file():
        builtin, onnx = _bundle_source(path)
        return ResolvedTarget(text, path, builtin, bundle=True, onnx=onnx)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers pipeline folder (it has no model_index.json); "
                "pass a folder written by DiffusionPipeline.save_pretrained"
            )
        _refuse_bundle_without_manifest(path)
        return ResolvedTarget(text, path, None)
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a diffusers pipeline folder")
    hint = "folder not found" if (os.sep in text or text.startswith(".")) else "unknown model"
    raise ModelNotFoundError(
        f"{hint}: {text!r}; valid built-in names: {', '.join(sorted(BUILTIN_MODELS))}, "
        "or a path to a local diffusers folder"
    )
