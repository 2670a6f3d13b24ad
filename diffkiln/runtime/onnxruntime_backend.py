"""``load(..., backend="onnxruntime")``: an ONNX export folder as a diffusers pipeline whose model
components run in onnxruntime.

The folder is what ``diffkiln export BUNDLE --format onnx`` writes. Its manifest is checked
(format, version, every file's size and sha256) before anything is used. The pipeline is the
bundle's own diffusers class; its text encoders, denoiser and VAE (``decode``, and ``encode``
where exported: :mod:`~diffkiln.runtime.onnxruntime_vae`) are stand-ins
(:mod:`~diffkiln.runtime.onnxruntime_component`) that feed onnxruntime sessions and return what
the torch modules return (``ModelOutput`` objects, tuples with ``return_dict=False``), so the
scheduler loop and the caller's code are unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule, CacheScheduleError
from diffkiln.core.errors import BundleError
from diffkiln.core.onnx_manifest_schema import validate_onnx_manifest
from diffkiln.core.schema import BUNDLE_FORMAT, MANIFEST_NAME, ONNX_FORMAT, ONNX_VERSION, read_json, verify_files
from diffkiln.core.tokenizer_print import check_tokenizer_prints
from diffkiln.nn.cache import CacheRun, apply_cache_schedule
from diffkiln.runtime.onnxruntime_component import OUTPUT_MODULES, OrtComponent
from diffkiln.runtime.onnxruntime_configs import component_config, fill_own_tensors, meta_model
from diffkiln.runtime.onnxruntime_session import open_session
from diffkiln.runtime.onnxruntime_vae import OrtVaeDecoder

__all__ = [
    "OUTPUT_MODULES",  # re-exported from onnxruntime_component
    "OrtComponent",  # re-exported from onnxruntime_component
    "OrtDenoiser",
    "OrtTextEncoder",
    "OrtVaeDecoder",  # re-exported from onnxruntime_vae
    "load_onnx_pipeline",
    "open_session",  # re-exported from onnxruntime_session
    "read_onnx_manifest",
]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}
log = logging.getLogger(__name__)


def read_onnx_manifest(folder: Path) -> dict[str, Any]:
    """Read and check an ONNX export's manifest (JSON, format, version, the strict schema of
    :mod:`diffkiln.core.onnx_manifest_schema`) and its files.

    Raises:
        BundleError: the folder is not an ONNX export, or a file is missing, truncated or altered.
    """
    path = folder / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{folder} has no manifest.json; run `diffkiln export BUNDLE --format onnx --out DIR` first")
    manifest = read_json(path)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == BUNDLE_FORMAT:
        raise BundleError(
            f"{folder} is a bundle, not an ONNX export; run `diffkiln export {folder} --format onnx --out DIR` "
            "and load DIR with backend='onnxruntime' (or load the bundle with backend='torch')"
        )
    if fmt != ONNX_FORMAT:
        raise BundleError(f"{path} is not a diffkiln ONNX export manifest (format must be {ONNX_FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= ONNX_VERSION:
        raise BundleError(f"ONNX export version {version!r} is not one this runtime reads ({ONNX_VERSION})")
    validate_onnx_manifest(manifest, str(path))
    verify_files(folder, manifest)
    return manifest


class OrtDenoiser(OrtComponent):
    """The denoiser: ``forward(sample, timestep, encoder_hidden_states, ..., return_dict=True)``,
    returning its prediction, or each of several (the manifest's ``output_fields``: LTX-2's
    ``sample`` and ``audio_sample``) in the torch class's output object or, with
    ``return_dict=False``, a tuple. A call runs the graph whose fixed options it has: the
    denoiser's, or one of its ``variants`` (LTX-2's modality-isolation call).

    With a block-range cache schedule (:meth:`follow_cache`), a computing step runs the fill graph
    and keeps its extra outputs; a reusing step runs the reuse graph on them.
    """

    cache_run: CacheRun | None = None

    def __init__(self, folder: Path, name: str, entry: dict[str, Any], config: Any, providers: list[str],
                 optimize: bool):  # fmt: skip
        super().__init__(folder, name, entry, config, providers, optimize)
        self.fields = [str(field) for field, count in entry["output_fields"] if count is None] or ["sample"]
        self.variants = [
            OrtComponent(folder, f"{name} (variant {k})", variant, config, providers, optimize)
            for k, variant in enumerate(entry.get("variants") or [], 1)
        ]
        for graph in [self, *self.variants]:
            expected = len(self.fields) + int(graph.entry.get("cache_outputs") or 0)
            if len(self.fields) != len(entry["output_fields"]) or len(graph.session.get_outputs()) != expected:
                raise BundleError(
                    f"{graph.entry.get('file')}: the manifest gives the denoiser {len(entry['output_fields'])} output "
                    f"fields and {graph.entry.get('cache_outputs') or 0} cached values, one tensor each; the graph has "
                    f"{len(graph.session.get_outputs())} outputs"
                )

    def _graph_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[OrtComponent, dict[str, torch.Tensor]]:
        """The graph that takes this call (the denoiser's, else the variant whose options it has)
        and its feeds; one whose inputs are the call's tensors before one the call lacks some for.

        Raises:
            ValueError: no graph takes the call (the denoiser's own reason, and how many variants).
        """
        tensors, rest = self.split_call(args, kwargs)
        taken: list[tuple[OrtComponent, dict[str, torch.Tensor]]] = []
        reason = ""
        for graph in [self, *self.variants]:
            try:
                feeds = graph.feeds_of(tensors, rest)
            except ValueError as exc:
                reason = reason or str(exc)
                continue
            if set(feeds) == set(graph.inputs):  # every input given: no later graph is a better fit
                return graph, feeds
            taken.append((graph, feeds))
        if not taken:
            variants = f"; nor does any of its {len(self.variants)} variants take the call" if self.variants else ""
            raise ValueError(reason + variants)
        return taken[0]

    def follow_cache(self, reuse: OrtComponent, values: list[str], run: CacheRun) -> None:
        """Run ``run``'s schedule with the reuse graph ``reuse``, which takes the denoiser's inputs
        and the cached ``values`` (named as in its graph)."""
        self.reuse_graph = reuse
        self.cache_values = values
        self.cache_run = run

    def _predictions(self, graph: OrtComponent, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        run, count = self.cache_run, len(self.fields)
        if graph is not self:  # a variant: never with a block-range schedule (the export refuses both)
            return graph.run(feeds)[:count]
        computes = run.step_computes if run is not None else None
        if run is None or computes is None:
            return self.run(feeds)[:count]
        if computes:
            outputs = self.run(feeds)
            run.store(outputs[count:])
            return outputs[:count]
        cached = dict(zip(self.cache_values, run.cached(), strict=True))
        return self.reuse_graph.run({**feeds, **cached})[:count]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return_dict = kwargs.pop("return_dict", True)
        graph, feeds = self._graph_for(args, kwargs)
        # A scalar timestep where the export took one per batch row (or the reverse).
        for key, value in feeds.items():
            shape = graph.inputs[key]["shape"]
            if shape is not None and len(shape) == 1 and value.dim() == 0:
                feeds[key] = value.reshape(1).expand(next(iter(feeds.values())).shape[0])
            elif shape == [] and value.dim() == 1:
                feeds[key] = value[0]
        predictions = self._predictions(graph, feeds)
        if not return_dict:
            return tuple(predictions)
        if len(predictions) == 1:
            return Transformer2DModelOutput(sample=predictions[0])
        # Several predictions without a recorded class: the torch module returned a tuple.
        cls = self.output_class
        return cls(**dict(zip(self.fields, predictions, strict=True))) if cls is not None else tuple(predictions)


class OrtTextEncoder(OrtComponent):
    """A text encoder: returns the same ``ModelOutput`` class as the exported one."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", None)
        flat = self.run(self.feeds_of_call(args, kwargs))
        fields: dict[str, Any] = {}
        index = 0
        for name, count in self.entry["output_fields"]:
            if count is None:
                fields[name] = flat[index]
                index += 1
            else:
                fields[name] = tuple(flat[index : index + count])
                index += count
        cls = self.output_class
        if cls is None:
            return flat[0]
        output = cls(**fields)
        return output.to_tuple() if return_dict is False else output


_CLASSES: dict[str, type[OrtComponent]] = {
    "denoiser": OrtDenoiser,
    "text_encoder": OrtTextEncoder,
    "vae_decoder": OrtVaeDecoder,
}


def load_onnx_pipeline(folder: Path, device: torch.device, optimize: bool = False, cache: bool = True) -> Any:
    """Build the pipeline of an ONNX export folder (see the module docstring).

    Args:
        folder: the export folder.
        device: where the sessions run: cpu (CPUExecutionProvider), cuda (CUDAExecutionProvider),
            npu (CANNExecutionProvider).
        optimize: let onnxruntime optimize the graphs. Default False: it then runs the QDQ graph
            as written, the same integers as the torch runtime (its fused int8 kernels saturate
            u8 x s8 pair sums on x86 CPUs without VNNI).
        cache: follow the export's frozen cache schedule, when it has one. Default True.

    Raises:
        BundleError: the folder fails its checks.
        ValueError: onnxruntime lacks the device's execution provider.
    """
    import onnxruntime as ort

    from diffkiln.core.pipelines import assemble_pipeline

    manifest = read_onnx_manifest(folder)
    skipped = manifest.get("skipped_components") or {}
    if skipped:
        name, reason = next(iter(skipped.items()))
        raise BundleError(
            f"{folder} holds no ONNX graph for {sorted(skipped)} (e.g. {name}: {reason}); run this pipeline with the "
            "torch runtime, or use the exported denoiser graph on its own"
        )
    provider = _PROVIDERS[device.type]
    if provider not in ort.get_available_providers():
        raise ValueError(
            f"onnxruntime here has no {provider} (available: {ort.get_available_providers()}); "
            "install the onnxruntime build for that device or load with device='cpu'"
        )
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    overrides: dict[str, Any] = {}
    try:
        for name, entry in manifest["components"].items():
            kind = entry["kind"]
            if kind not in _CLASSES:
                raise BundleError(f"component {name}: unknown kind {kind!r}; valid: {sorted(_CLASSES)}")
            config = component_config(folder, name, kind)
            # diffusers models: pipelines read their attributes. The skeleton comes first: building
            # it imports the model's module, where its output class lives (LTX-2's
            # AudioVisualModelOutput), which the component resolves.
            skeleton = meta_model(folder, name, config) if kind in ("denoiser", "vae_decoder") else None
            component: OrtComponent = _CLASSES[kind](folder, name, entry, config, providers, optimize)
            if skeleton is not None:
                if entry.get("own_tensors"):
                    fill_own_tensors(skeleton, folder, entry["own_tensors"], name)
                component.attach_skeleton(skeleton)
            overrides[name] = component
        pipe = assemble_pipeline(folder, overrides)
    except BundleError:
        raise
    except Exception as exc:  # the diffusers and transformers loaders raise many types on bad files
        raise BundleError(f"cannot assemble the pipeline from {folder}: {type(exc).__name__}: {exc}") from None
    check_tokenizer_prints(pipe.components, manifest.get("tokenizers") or {}, str(folder))
    pipe.diffkiln_manifest = manifest
    pipe.diffkiln_cache = None
    if cache and manifest.get("cache"):
        name = manifest["pipeline"]["denoiser"]
        pipe.diffkiln_cache = _follow_schedule(folder, manifest, overrides[name], pipe.scheduler, providers, optimize)
    return pipe


def _follow_schedule(
    folder: Path, manifest: dict[str, Any], denoiser: OrtDenoiser, scheduler: Any, providers: list[str], optimize: bool
) -> CacheRun:
    """Apply the manifest's cache schedule to the onnxruntime denoiser: a ``whole`` schedule on its
    output; a block-range one through the export's graph pair (``cache_graph``).

    Raises:
        BundleError: the schedule is invalid, or a block-range schedule has no reuse graph.
    """
    try:
        schedule = CacheSchedule.from_dict(manifest["cache"])
    except CacheScheduleError as exc:
        raise BundleError(f"{folder}: the manifest's cache schedule: {exc}") from None
    if schedule.mechanism is CacheMechanism.WHOLE:
        return apply_cache_schedule(denoiser, schedule, scheduler, check_blocks=False)
    graph = manifest.get("cache_graph")
    ok = isinstance(graph, dict) and isinstance(graph.get("file"), str) and graph["file"] in manifest["files"]
    values = graph.get("cache_values") if ok and isinstance(graph, dict) else None
    if not ok or not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BundleError(
            f"{folder}: its '{schedule.mechanism.value}' cache schedule needs the reuse graph the export writes "
            "(manifest 'cache_graph' naming one of its files); re-export the bundle, or load with cache=False"
        )
    assert isinstance(graph, dict)
    reuse = OrtComponent(folder, f"{denoiser.component_name} (reuse)", graph, denoiser.config, providers, optimize)
    run = apply_cache_schedule(denoiser, schedule, scheduler, check_blocks=False, graph=True)
    denoiser.follow_cache(reuse, list(values), run)
    return run
