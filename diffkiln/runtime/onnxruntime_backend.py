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
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core.arguments import feed_array, flatten_arguments
from diffkiln.core.cache_schedule import CacheSchedule, CacheScheduleError
from diffkiln.core.errors import BundleError
from diffkiln.core.schema import BUNDLE_FORMAT, MANIFEST_NAME, ONNX_FORMAT, ONNX_VERSION, read_json, verify_files
from diffkiln.nn.cache import apply_cache_schedule

__all__ = [
    "OrtComponent",
    "OrtDenoiser",
    "OrtTextEncoder",
    "OrtVaeDecoder",
    "load_onnx_pipeline",
    "open_session",
    "read_onnx_manifest",
]

# Output objects are rebuilt only from these libraries' classes (named in the manifest).
_OUTPUT_LIBRARIES = ("transformers.", "diffusers.")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}
log = logging.getLogger(__name__)
# onnxruntime (1.32) breaks some QDQ graphs while optimizing them: a QuantizeLinear that one of its
# rewrites inserts gets an output_dtype that contradicts its zero point (after the s8 -> u8
# conversion), and the session fails to build with the error of onnxruntime issue 25526. Measured:
# MatMulAddFusion on a QDQ MatMul + Add with a static 3-D input (diffkiln's static-shape exports:
# dynamic=False, or a component whose dynamic export fell back to the recorded shapes), and QDQ
# propagation through Transpose in onnxruntime's own quantize_static output of the SD1.5 UNet.
# The session is then built without the first of these rewrites that lets it build.
_BROKEN_REWRITE_MARK = "does not match y_zero_point type"
_PROTOBUF_BYTES = 1_800_000_000
"""Below this many initializer bytes a folded graph is handed to onnxruntime as one protobuf (2 GB cap)."""
_REWRITE_FALLBACKS = (
    ["MatMulAddFusion"],
    ["QDQPropagationTransformer"],
    ["MatMulAddFusion", "QDQPropagationTransformer"],
)


def read_onnx_manifest(folder: Path) -> dict[str, Any]:
    """Read and check an ONNX export's manifest (JSON, format, version) and its files.

    Raises:
        BundleError: the folder is not an ONNX export, or a file is missing, truncated or altered.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
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
    verify_files(folder, manifest)
    return manifest


def _session_options(optimize: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The pipeline alternates sessions with torch work (scheduler, guidance): idle session
    # threads must not spin on the cores that work needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def open_session(path: Path, options: Any, providers: list[str], fold_conv_weights: bool = False) -> Any:
    """An onnxruntime InferenceSession; where onnxruntime's own optimizer breaks the graph (see
    ``_REWRITE_FALLBACKS``), built again without the offending rewrite, with a warning that names it.

    Args:
        path: the .onnx file.
        options: onnxruntime SessionOptions.
        providers: execution providers.
        fold_conv_weights: apply ``FoldConvWeightDequantizePass`` to the loaded graph first (for
            onnxruntime's CPU provider: its convolutions then get constant float weights, dequantized
            once; the file on disk is unchanged). Default False.
    """
    import onnxruntime as ort

    source: str | bytes = str(path)
    keep_alive = None
    if fold_conv_weights:
        source, keep_alive = _folded_source(path)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail type
        if _BROKEN_REWRITE_MARK not in str(exc):
            raise
        error = exc
        session = None
    for disabled in () if session is not None else _REWRITE_FALLBACKS:
        try:
            session = ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
        except Exception as exc:
            if _BROKEN_REWRITE_MARK not in str(exc):
                raise
            continue
        log.warning("%s: onnxruntime's optimizer breaks this graph; built without %s", path.name, ", ".join(disabled))
        break
    if session is None:
        raise error
    # A folded graph too large for one protobuf lives in a temporary folder as long as its session.
    session.diffkiln_folded_files = keep_alive
    del source  # the serialized folded graph: onnxruntime holds its own copy now
    _return_freed_memory()
    return session


def _return_freed_memory() -> None:
    """Hand the heap that loading freed back to the operating system (glibc's ``malloc_trim``).

    Parsing the graph (ours for the conv-weight fold, onnxruntime's own) leaves gigabytes of freed
    heap that glibc keeps resident: on the full-size SD1.5 UNet, more than half of what the process
    holds after building the session (BENCHMARKS.md). No-op where the C library has no
    ``malloc_trim`` (macOS, Windows, musl).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # an onnx-ir graph is full of reference cycles (nodes <-> values)
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def _folded_source(path: Path) -> tuple[str | bytes, Any]:
    """The graph at ``path`` with its convolution weights dequantized: serialized bytes, or, above
    protobuf's 2 GB or with external data, a file in a temporary folder (returned to keep alive)."""
    import onnx_ir as ir

    from diffkiln.runtime.onnx_passes import FoldConvWeightDequantizePass

    model = ir.load(path)
    if not FoldConvWeightDequantizePass()(model).modified:
        return str(path), None
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    external = any(isinstance(t, ir.ExternalTensor) for t in tensors)
    if not external and sum(t.nbytes for t in tensors) < _PROTOBUF_BYTES:
        return ir.to_proto(model).SerializeToString(), None
    folder = tempfile.TemporaryDirectory(prefix="diffkiln-ort-")
    out = Path(folder.name) / path.name
    ir.save(model, out, external_data=f"{path.stem}.folded.data")
    return str(out), folder


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
        self.session = open_session(folder / entry["file"], _session_options(optimize), providers, fold)
        self.inputs = {i["name"]: i for i in entry["inputs"]}
        self.__dict__["_skeleton"] = None

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
        named, dict arguments flattened, non-tensor arguments checked against the export."""
        kwargs = {**kwargs, **self.name_positionals(args, kwargs)}
        tensors, rest = flatten_arguments(kwargs)
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
            if key not in self.entry["options"] or self.entry["options"][key] != value:
                raise ValueError(
                    f"{self.component_name}: argument {key}={value!r} differs from the exported call "
                    f"(options {self.entry['options']}); re-export calling it that way"
                )


class OrtDenoiser(OrtComponent):
    """The denoiser: ``forward(sample, timestep, encoder_hidden_states, ..., return_dict=True)``."""

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
        (sample,) = self.run(feeds)[:1]
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
        cls = _output_class(self.entry.get("output_class"))
        if cls is None:
            return flat[0]
        output = cls(**fields)
        return output.to_tuple() if return_dict is False else output


class OrtVaeDecoder(OrtComponent):
    """The VAE as far as text-to-image needs it: ``decode(latents, return_dict=True)``."""

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        (sample,) = self.run({"latents": z})[:1]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the ONNX export holds the VAE decoder only; call vae.decode(latents)")


def _output_class(spec: str | None) -> Any:
    if spec is None:
        return None
    module_name, _, qualname = spec.partition(":")
    if not module_name.startswith(_OUTPUT_LIBRARIES):
        raise BundleError(f"output class {spec!r} is not from transformers or diffusers")
    return getattr(importlib.import_module(module_name), qualname)


def _component_config(folder: Path, name: str, kind: str) -> Any:
    from diffusers.configuration_utils import FrozenDict

    path = folder / name / "config.json"
    if kind == "text_encoder":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder / name, local_files_only=True)
    return FrozenDict(json.loads(path.read_text(encoding="utf-8")))


def _meta_denoiser(folder: Path, name: str, config: Any) -> nn.Module:
    """The denoiser's class (from its ``model_index.json`` entry) built from its config on the meta
    device (no memory)."""
    from diffkiln.core.errors import InvalidInputError
    from diffkiln.core.pipelines import resolve_component_class

    entry = read_json(folder / "model_index.json").get(name)
    library = entry[0] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) else "diffusers"
    try:
        cls: Any = resolve_component_class(library, str(config["_class_name"]))
    except InvalidInputError as exc:
        raise BundleError(f"cannot build the denoiser: {exc}") from None
    with torch.device("meta"):
        module: nn.Module = cls.from_config(dict(config))
    return module


_CLASSES: dict[str, type[OrtComponent]] = {
    "denoiser": OrtDenoiser,
    "text_encoder": OrtTextEncoder,
    "vae_decoder": OrtVaeDecoder,
}


def load_onnx_pipeline(folder: Path, device: torch.device, optimize: bool = False) -> Any:
    """Build the pipeline of an ONNX export folder (see the module docstring).

    Args:
        folder: the export folder.
        device: where the sessions run: cpu (CPUExecutionProvider), cuda (CUDAExecutionProvider),
            npu (CANNExecutionProvider).
        optimize: let onnxruntime optimize the graphs. Default False: it then runs the QDQ graph
            as written, the same integers as the torch runtime (its fused int8 kernels saturate
            u8 x s8 pair sums on x86 CPUs without VNNI).

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
    for name, entry in manifest["components"].items():
        kind = entry["kind"]
        if kind not in _CLASSES:
            raise BundleError(f"component {name}: unknown kind {kind!r}; valid: {sorted(_CLASSES)}")
        config = _component_config(folder, name, kind)
        component: OrtComponent = _CLASSES[kind](folder, name, entry, config, providers, optimize)
        if kind == "denoiser":
            component.attach_skeleton(_meta_denoiser(folder, name, config))
        overrides[name] = component
    pipe = assemble_pipeline(folder, overrides)
    pipe.diffkiln_manifest = manifest
    pipe.diffkiln_cache = None
    if manifest.get("cache"):
        try:
            schedule = CacheSchedule.from_dict(manifest["cache"])
            denoiser = overrides[manifest["pipeline"]["denoiser"]]
            pipe.diffkiln_cache = apply_cache_schedule(denoiser, schedule, pipe.scheduler, check_blocks=False)
        except CacheScheduleError as exc:
            raise BundleError(f"{folder}: the manifest's cache schedule: {exc}") from None
    return pipe
