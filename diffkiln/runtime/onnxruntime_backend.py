"""``load(..., backend="onnxruntime")``: an ONNX export folder as a diffusers pipeline whose model
components run in onnxruntime.

The folder is what ``diffkiln export BUNDLE --format onnx`` writes. Its manifest is checked
(format, version, every file's size and sha256) before anything is used. The pipeline is the
bundle's own diffusers class; its text encoders, denoiser and VAE decoder are stand-ins that feed
onnxruntime sessions and return what the torch modules return (``ModelOutput`` objects, tuples
with ``return_dict=False``), so the scheduler loop and the caller's code are unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core.arguments import feed_array, flatten_arguments, is_int_argument, json_form
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule, CacheScheduleError
from diffkiln.core.confine import confined_file
from diffkiln.core.errors import BundleError
from diffkiln.core.onnx_manifest_schema import validate_onnx_manifest
from diffkiln.core.schema import BUNDLE_FORMAT, MANIFEST_NAME, ONNX_FORMAT, ONNX_VERSION, read_json, verify_files
from diffkiln.core.tokenizer_print import check_tokenizer_prints
from diffkiln.nn.cache import CacheRun, apply_cache_schedule
from diffkiln.runtime.onnxruntime_configs import component_config, fill_own_tensors, meta_model
from diffkiln.runtime.onnxruntime_session import open_session, session_options

__all__ = [
    "OrtComponent",
    "OrtDenoiser",
    "OrtTextEncoder",
    "OrtVaeDecoder",
    "load_onnx_pipeline",
    "open_session",  # re-exported from onnxruntime_session
    "read_onnx_manifest",
]

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
        _check_inputs(entry, self.session.get_inputs())
        # resolved (and checked) at load, not at the first call
        self.output_class = self.resolve_output_class(entry.get("output_class"))
        self.__dict__["_skeleton"] = None

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
        Kept out of the module tree, so ``pipe.to(...)`` never moves it."""
        self.__dict__["_skeleton"] = skeleton

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
        ``height``) as int64 scalars, other non-tensor arguments checked against the export."""
        kwargs = {**kwargs, **self.name_positionals(args, kwargs)}
        tensors, rest = flatten_arguments(kwargs)
        for key in [k for k, v in rest.items() if k in self.inputs and is_int_argument(v)]:
            tensors[key] = torch.tensor(rest.pop(key), dtype=torch.int64)
        self._check_options(rest)
        return {k: v for k, v in tensors.items() if k in self.inputs}

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


class OrtDenoiser(OrtComponent):
    """The denoiser: ``forward(sample, timestep, encoder_hidden_states, ..., return_dict=True)``.

    With a block-range cache schedule (:meth:`follow_cache`), a computing step runs the fill graph
    and keeps its extra outputs; a reusing step runs the reuse graph on them.
    """

    cache_run: CacheRun | None = None

    def follow_cache(self, reuse: OrtComponent, values: list[str], run: CacheRun) -> None:
        """Run ``run``'s schedule with the reuse graph ``reuse``, which takes the denoiser's inputs
        and the cached ``values`` (named as in its graph)."""
        self.reuse_graph = reuse
        self.cache_values = values
        self.cache_run = run

    def _sample(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        run = self.cache_run
        computes = run.step_computes if run is not None else None
        if run is None or computes is None:
            return self.run(feeds)[0]
        if computes:
            sample, *values = self.run(feeds)
            run.store(values)
            return sample
        cached = dict(zip(self.cache_values, run.cached(), strict=True))
        return self.reuse_graph.run({**feeds, **cached})[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return_dict = kwargs.pop("return_dict", True)
        feeds = self.feeds_of_call(args, kwargs)
        # A scalar timestep where the export took one per batch row (or the reverse).
        for key, value in feeds.items():
            shape = self.inputs[key]["shape"]
            if shape is not None and len(shape) == 1 and value.dim() == 0:
                feeds[key] = value.reshape(1).expand(next(iter(feeds.values())).shape[0])
            elif shape == [] and value.dim() == 1:
                feeds[key] = value[0]
        sample = self._sample(feeds)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


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


class OrtVaeDecoder(OrtComponent):
    """The VAE as far as text-to-image needs it: ``decode(latents, return_dict=True)``. Other
    arguments are named by the torch class's own ``decode`` (LTX's VAE takes ``decode(z, temb)``)
    and must be None: the graph is ``decode(latents)`` as exported."""

    def decode(self, z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        if args:
            skeleton = self.__dict__.get("_skeleton")
            params = list(inspect.signature(skeleton.decode).parameters)[1:] if skeleton is not None else []
            if len(args) > len(params):
                raise TypeError(f"{self.component_name}: decode takes {len(params)} arguments after the latents")
            kwargs = {**dict(zip(params, args, strict=False)), **kwargs}
        return_dict = kwargs.pop("return_dict", return_dict)
        kwargs.pop("generator", None)  # decoding draws no noise
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:
            raise ValueError(f"{self.component_name}: the exported decode takes the latents only, not {given}")
        (sample,) = self.run({"latents": z})[:1]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the ONNX export holds the VAE decoder only; call vae.decode(latents)")


def _check_inputs(entry: dict[str, Any], graph_inputs: list[Any]) -> None:
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
            component: OrtComponent = _CLASSES[kind](folder, name, entry, config, providers, optimize)
            if kind in ("denoiser", "vae_decoder"):  # diffusers models: pipelines read their attributes
                skeleton = meta_model(folder, name, config)
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
