"""The ONNX export manifest's strict schema (pydantic v2), as :mod:`diffkiln.core.manifest_schema`
is for bundles: every field the onnxruntime loader acts on has its type, range and cross-field rule,
and no field is unknown.

What the loader acts on: each component's ``kind``, ``file``, graph ``inputs`` (name, element type,
shape with symbolic axes as names), ``call_order`` (to name positional arguments), ``options`` (the
non-tensor arguments the export was called with), a VAE's ``encoder`` graph and its
``distribution_fields``, ``own_tensors`` (the safetensors file of the
torch module's own top-level tensors), ``output_fields`` and ``output_class`` (to rebuild
a ``ModelOutput`` from the graph's outputs; the class must be named ``module:qualname`` inside
transformers or diffusers; a denoiser's several predictions, version 5), a denoiser's ``variants``
(a graph per form of its calls, version 5), and the cache graph's ``file`` and ``cache_values``. Every file named is
a listed file. Informational fields (``bundle``, ``kept_fp``, checks, reasons) are typed loosely.
:func:`validate_onnx_manifest` raises a BundleError naming the field and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffkiln.core.manifest_schema import FileEntry, TokenizerPrint, checked_against
from diffkiln.core.schema import ONNX_VERSION

__all__ = ["OnnxManifest", "validate_onnx_manifest"]

Name = Annotated[str, Field(min_length=1, max_length=512)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
# ``package.module:Qualname``, inside the two libraries whose output classes the loader rebuilds
OutputClass = Annotated[
    str, Field(pattern=r"^(transformers|diffusers)(\.[A-Za-z_][A-Za-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_]*$", max_length=256)
]
Axis = Annotated[int, Field(ge=0, le=1 << 24)] | Annotated[str, Field(min_length=1, max_length=128)]
Count = Annotated[int, Field(ge=1, le=1024)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class ValueSpec(_Strict):
    """One graph input or output: its name, ONNX element type (lower case) and shape."""

    name: Name
    dtype: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=32)] | None
    shape: Annotated[list[Axis], Field(max_length=16)] | None


class GraphEntry(_Strict):
    """An exported graph's entry: what the loader needs to feed it and read it back."""

    kind: Literal["denoiser", "text_encoder", "vae_decoder", "vae_encoder"]
    file: Name
    inputs: Annotated[list[ValueSpec], Field(min_length=1, max_length=256)]
    outputs: Annotated[list[ValueSpec], Field(min_length=1, max_length=256)]
    options: dict[Name, Any]
    output_fields: list[Annotated[list[Identifier | Count | None], Field(min_length=2, max_length=2)]]
    """``[field name, graph outputs it takes (None: one tensor, n: a tuple of n)]`` per field."""
    output_class: OutputClass | None
    call_order: Annotated[list[Identifier], Field(max_length=256)]
    dynamic_axes: dict[Name, list[Annotated[int, Field(ge=0, le=16)]]]
    dynamic: bool
    static_reason: str | None = None
    check: dict[str, Any] | None = None
    unverified_axes: dict[Name, list[int]] = Field(default_factory=dict)
    wider_axes_failed: list[str] = Field(default_factory=list)
    cache_outputs: Annotated[int, Field(ge=0, le=4096)] | None = None
    distribution_fields: list[Identifier] = Field(default_factory=list)
    """Output fields the loader rebuilds as a latent distribution of the graph's tensor (a VAE's
    ``latent_dist``), of class ``distribution_class``."""
    distribution_class: Literal["DiagonalGaussianDistribution", "OobleckDiagonalGaussianDistribution"] = (
        "DiagonalGaussianDistribution"
    )
    """Which of :data:`diffkiln.core.vae_distributions.DISTRIBUTIONS` (no other class is built)."""
    encoder: GraphEntry | None = None
    """A VAE's ``encode`` graph (kind ``vae_encoder``), beside its decoder."""
    encoder_skipped: Annotated[str, Field(max_length=2000)] | None = None
    """Why a VAE's ``encode``, which the recorded call did not use, was not exported."""
    own_tensors: Name | None = None
    """A listed safetensors file of the torch module's own top-level buffers and parameters, for
    the loader's skeleton (LTX's VAE ``latents_mean``); each must be one the skeleton has, in its shape."""
    variants: Annotated[list[GraphEntry], Field(max_length=8)] = Field(default_factory=list)
    """A denoiser's graphs for the further forms of its calls (other fixed ``options``: LTX-2's
    ``isolate_modalities=True``), each a denoiser entry of the same outputs, without variants or
    cached values of its own."""

    @model_validator(mode="after")
    def _consistent(self) -> GraphEntry:
        names = {i.name for i in self.inputs}
        if len(names) != len(self.inputs):
            raise ValueError("two graph inputs share a name")
        unknown = sorted(set(self.dynamic_axes) - names)
        if unknown:
            raise ValueError(f"dynamic_axes names {unknown}, which are not graph inputs")
        if len(set(self.call_order)) != len(self.call_order):
            raise ValueError("call_order names a parameter twice")
        if not all(isinstance(name, str) and not isinstance(count, str) for name, count in self.output_fields):
            raise ValueError("an output field is [name, count or null]")
        unknown = sorted(set(self.distribution_fields) - {str(name) for name, _ in self.output_fields})
        if unknown:
            raise ValueError(f"distribution_fields names {unknown}, which are not output fields")
        if self.encoder is not None and (self.kind != "vae_decoder" or self.encoder.kind != "vae_encoder"):
            raise ValueError("only a vae_decoder entry holds an encoder, and it is of kind vae_encoder")
        for variant in self.variants:
            if self.kind != "denoiser" or variant.kind != "denoiser" or variant.variants or variant.cache_outputs:
                raise ValueError("only a denoiser entry holds variants, each a denoiser entry without variants or "
                                 "cached values")  # fmt: skip
            if variant.output_fields != self.output_fields:
                raise ValueError("a variant's output_fields differ from its denoiser's")
        if self.variants and self.cache_outputs:
            raise ValueError("a denoiser with variants has no cache graph pair (cache_outputs)")
        width = sum(1 if count is None else int(count) for _, count in self.output_fields)
        if self.output_fields and width > len(self.outputs):
            raise ValueError(f"output_fields take {width} graph outputs, the graph has {len(self.outputs)}")
        return self


class CacheGraphEntry(GraphEntry):
    """The cache schedule's reuse graph: a graph entry, its mechanism and the cached values' names
    (graph inputs, in the order the fill graph's extra outputs come)."""

    mechanism: Identifier
    cache_values: Annotated[list[Name], Field(max_length=4096)]

    @model_validator(mode="after")
    def _values_are_inputs(self) -> CacheGraphEntry:
        missing = sorted(set(self.cache_values) - {i.name for i in self.inputs})
        if missing:
            raise ValueError(f"cache_values {missing[:4]} are not inputs of the reuse graph")
        return self


class OnnxPipelineInfo(_Strict):
    """The ``pipeline`` section: the pipeline class, its denoiser component and (version 4) the
    experts of the denoiser's class the sampler runs at other steps, each a graph of its own."""

    class_name: Identifier | None = Field(default=None, alias="class")
    denoiser: Identifier
    experts: Annotated[list[Identifier], Field(max_length=8)] = Field(default_factory=list)


class OnnxManifest(_Strict):
    """An ONNX export's ``manifest.json``."""

    format: Literal["diffkiln.onnx"]  # diffkiln.core.schema.ONNX_FORMAT
    version: Annotated[int, Field(ge=1, le=ONNX_VERSION)]
    opset: Annotated[int, Field(ge=7, le=64)]
    compute: Literal["qdq", "integer"] = "qdq"
    matmulnbits: bool = False
    pipeline: OnnxPipelineInfo
    components: Annotated[dict[Identifier, GraphEntry], Field(max_length=64)]
    skipped_components: dict[Name, str] = Field(default_factory=dict)
    kept_fp: dict[Name, str] = Field(default_factory=dict)
    bundle: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    cache_graph: CacheGraphEntry | None = None
    sparsity_not_exported: str | None = None
    tokenizers: dict[Identifier, TokenizerPrint] = Field(default_factory=dict)
    files: dict[Name, FileEntry]

    @model_validator(mode="after")
    def _cross(self) -> OnnxManifest:
        graphs = [(f"components.{n}", e) for n, e in self.components.items()]
        if self.cache_graph is not None:
            graphs.append(("cache_graph", self.cache_graph))
        graphs += [(f"{where}.encoder", e.encoder) for where, e in graphs if e.encoder is not None]
        graphs += [(f"{where}.variants.{k}", v) for where, e in graphs for k, v in enumerate(e.variants)]
        for where, entry in graphs:
            if entry.file not in self.files:
                raise ValueError(f"{where}.file {entry.file!r} is not a listed file")
            if entry.own_tensors is not None and entry.own_tensors not in self.files:
                raise ValueError(f"{where}.own_tensors {entry.own_tensors!r} is not a listed file")
        kinds = [e.kind for e in self.components.values()]
        if "vae_encoder" in kinds:
            raise ValueError("a vae_encoder graph is a vae_decoder entry's encoder, not a component")
        experts = self.pipeline.experts
        if experts and self.version < 4:
            raise ValueError("experts need ONNX export version 4")
        if self.pipeline.denoiser in experts or len(set(experts)) != len(experts):
            raise ValueError("pipeline.experts repeats a component or names the denoiser")
        if kinds.count("denoiser") > 1 + len(experts):
            raise ValueError("more components are denoisers than the denoiser and its experts")
        for name in [self.pipeline.denoiser, *experts]:
            named = self.components.get(name)
            if named is not None and named.kind != "denoiser":
                raise ValueError(f"pipeline: {name!r} is a {named.kind} component, not a denoiser")
        missing = [e for e in experts if e not in self.components]
        if missing:
            raise ValueError(f"pipeline.experts {missing} have no graph")
        several = any(e.variants or len(e.output_fields) > 1 for e in self.components.values() if e.kind == "denoiser")
        if several and self.version < 5:
            raise ValueError("a denoiser's variants or several predictions need ONNX export version 5")
        denoiser = self.components.get(self.pipeline.denoiser)
        if self.cache_graph is not None and denoiser is not None and denoiser.variants:
            raise ValueError("a cache graph pair follows one call form; the denoiser has variants")
        return self


def validate_onnx_manifest(manifest: Any, source: str = "manifest.json") -> OnnxManifest:
    """The ONNX export manifest checked against :class:`OnnxManifest` (format ``ONNX_FORMAT``,
    versions 1 to ``ONNX_VERSION``).

    Raises:
        BundleError: naming the first offending field (dotted path) and the rule.
    """
    return checked_against(OnnxManifest, manifest, source)


GraphEntry.model_rebuild()
