"""The bundle manifest's strict schema (pydantic v2): every field the runtime acts on has its type,
range and cross-field rule, and no field is unknown.

Strict models (``extra="forbid"``, no coercion between types): a version is an int, a bit width one
of the supported ones, a layer's ``weight_shape`` has the rank of its kind, a convolution's
``stride``/``dilation`` are >= 1 and ``padding`` >= 0 per spatial axis, a file entry is a sha256 and
a size, ``quant.weights_file`` is a listed file, and a manifest with a cache schedule or sparse
masks has the version that introduced them. Sections the runtime reads through their own strict
readers (``cache``: :class:`~diffkiln.core.cache_schedule.CacheSchedule`, ``sparsity``:
:class:`~diffkiln.core.sparse_plan.SparsePlan`, ``quant.derived_buffers``) and informational
ones (``source``, ``bos``, ``toolchain``, ``build_metrics``) are objects here; ``plan``, when
present, must parse as a :class:`~diffkiln.core.plan.Plan`. The rules
are listed in docs/bundle-format.md. :func:`validate_manifest` raises a BundleError naming the
field and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffkiln.core.errors import BundleError
from diffkiln.core.plan import Plan, PlanError

__all__ = ["Manifest", "TokenizerPrint", "checked_against", "validate_manifest"]

Dim = Annotated[int, Field(ge=1, le=1 << 20)]
Name = Annotated[str, Field(min_length=1, max_length=512)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
_RANK = {"linear": 2, "conv1d": 3, "conv": 4, "conv3d": 5}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class FileEntry(_Strict):
    """One listed file: its sha256 (64 lowercase hex digits) and size in bytes."""

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(ge=0)]


class ActEntry(_Strict):
    """A layer's activation quantization: bits and mode."""

    bits: Literal[7, 8]
    mode: Literal["static", "dynamic"]


class LayerMeta(_Strict):
    """A quantized layer's construction metadata (:func:`diffkiln.nn.freeze.layer_meta`)."""

    kind: Literal["linear", "conv1d", "conv", "conv3d"]
    weight_shape: list[Dim]
    act_mode: Literal["static", "dynamic"] | None = "static"
    act_bits: Literal[7, 8] | None = None
    weight_bits: Literal[2, 3, 4, 7, 8] | None = None
    weight_packed: bool = False
    group_size: Annotated[int, Field(ge=1)] | None = None
    output_bits: Literal[8] | None = None
    stride: list[Annotated[int, Field(ge=1, le=1 << 16)]] | None = None
    padding: list[Annotated[int, Field(ge=0, le=1 << 16)]] | None = None
    dilation: list[Annotated[int, Field(ge=1, le=1 << 16)]] | None = None
    groups: Literal[1] | None = None

    @model_validator(mode="after")
    def _geometry(self) -> LayerMeta:
        rank = _RANK[self.kind]
        if len(self.weight_shape) != rank:
            raise ValueError(f"a {self.kind} layer's weight_shape has {rank} dimensions, got {len(self.weight_shape)}")
        conv = (self.stride, self.padding, self.dilation)
        if self.kind == "linear" and any(v is not None for v in conv):
            raise ValueError("a linear layer has no stride, padding or dilation")
        if self.kind != "linear" and any(v is None or len(v) != rank - 2 for v in conv):
            raise ValueError(f"a {self.kind} layer lists stride, padding and dilation, {rank - 2} per spatial axis")
        k = 1
        for d in self.weight_shape[1:]:
            k *= d
        if self.group_size is not None and k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the input width {k}")
        return self


class LayerEntry(_Strict):
    """A quantized layer's manifest entry."""

    bits: Literal[2, 3, 4, 7, 8, 16]
    meta: LayerMeta
    tensors: list[Name]
    granularity: str | None = None
    group_size: Annotated[int, Field(ge=1)] | None = None
    symmetric: bool | None = None
    packed: bool = False
    scale_dtype: Literal["float32", "float16"] | None = None
    act: ActEntry | None = None
    bos_positions: list[Annotated[int, Field(ge=0, le=1 << 20)]] = Field(default_factory=list)


class Quant(_Strict):
    """The ``quant`` section."""

    recipe: Name
    weights_file: Name
    layers: dict[Name, LayerEntry]
    fp_layers: dict[Name, str] = Field(default_factory=dict)
    derived_buffers: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    avg_weight_bits: float | None = None
    avg_stored_weight_bits: float | None = None
    avg_act_bits: float | None = None
    simulated: bool = False
    float_storage: Literal["lossless", "float16"] | None = None


class PipelineInfo(_Strict):
    """The ``pipeline`` section: the pipeline class and its denoiser component."""

    class_name: Identifier | None = Field(default=None, alias="class")
    denoiser: Identifier
    denoiser_class: Identifier
    components: list[Identifier] = Field(default_factory=list)


class ExpertEntry(_Strict):
    """An ``experts`` entry: a quantized component of the denoiser's class that the sampler runs at
    other steps (Wan 2.2's ``transformer_2``), with its own weights file and plan."""

    denoiser_class: Identifier
    quant: Quant
    plan: dict[str, Any] = Field(default_factory=dict)
    bos: dict[str, Any] = Field(default_factory=dict)


class TokenizerPrint(_Strict):
    """A tokenizer's fingerprint (:mod:`diffkiln.core.tokenizer_print`)."""

    vocab: Annotated[int, Field(ge=1, le=1 << 24)]
    model_max_length: Annotated[int, Field(ge=1)] | None
    special_ids: dict[Annotated[str, Field(max_length=64)], int | None]


class Manifest(_Strict):
    """A bundle's ``manifest.json``."""

    format: Literal["diffkiln.bundle"]
    version: Annotated[int, Field(ge=1, le=9)]
    kind: Literal["pipeline", "module"] = "pipeline"
    source: dict[str, Any]
    pipeline: PipelineInfo
    quant: Quant
    bos: dict[str, Any]
    plan: dict[str, Any] = Field(default_factory=dict)
    sparsity: dict[str, Any]
    cache: dict[str, Any]
    toolchain: dict[str, Any] = Field(default_factory=dict)
    build_metrics: dict[str, Any] = Field(default_factory=dict)
    tokenizers: dict[Identifier, TokenizerPrint] = Field(default_factory=dict)
    experts: dict[Identifier, ExpertEntry] = Field(default_factory=dict)
    files: dict[Name, FileEntry]

    @model_validator(mode="after")
    def _cross(self) -> Manifest:
        if self.quant.weights_file not in self.files:
            raise ValueError(f"quant.weights_file {self.quant.weights_file!r} is not a listed file")
        if self.sparsity and self.version < 8:
            raise ValueError("sparse-attention masks need bundle version 8")
        if self.cache and self.version < 7:
            raise ValueError("a cache schedule needs bundle version 7")
        if self.experts and self.version < 9:
            raise ValueError("quantized experts need bundle version 9")
        for name, expert in self.experts.items():
            if name == self.pipeline.denoiser or self.kind != "pipeline" or name not in self.pipeline.components:
                raise ValueError(f"experts.{name}: not a component of the pipeline besides its denoiser")
            if expert.quant.weights_file not in self.files:
                raise ValueError(f"experts.{name}.quant.weights_file {expert.quant.weights_file!r} is not listed")
        for where, plan in [("plan", self.plan), *((f"experts.{n}.plan", e.plan) for n, e in self.experts.items())]:
            if plan:  # informational, but tools (``diffkiln inspect``) read it: it must parse
                try:
                    Plan.from_dict(plan)
                except PlanError as exc:
                    raise ValueError(f"{where}: {exc}") from None
        return self


def validate_manifest(manifest: Any, source: str = "manifest.json") -> Manifest:
    """The manifest checked against :class:`Manifest`.

    Raises:
        BundleError: naming the first offending field (dotted path) and the rule.
    """
    return checked_against(Manifest, manifest, source)


ModelT = TypeVar("ModelT", bound=BaseModel)


def checked_against(model: type[ModelT], data: Any, source: str) -> ModelT:
    """``data`` validated as ``model``.

    Raises:
        BundleError: naming ``source``, the first offending field (dotted path) and the rule.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BundleError(f"{source}: {where}: {first['msg']}{more}") from None
