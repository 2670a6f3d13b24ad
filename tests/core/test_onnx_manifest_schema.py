"""The ONNX export manifest's strict schema: a real export's manifest passes, and every field the
onnxruntime loader acts on is refused when it has the wrong type, range or cross-reference, with the
field named. The manifest below is the one ``diffkiln export --format onnx`` wrote for shapes-unet,
trimmed (the export tests check that whole real manifests pass too)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from diffkiln.core.errors import BundleError
from diffkiln.core.onnx_manifest_schema import validate_onnx_manifest

_SHA = "0" * 64


def _manifest() -> dict[str, Any]:
    return {
        "format": "diffkiln.onnx",
        "version": 3,
        "opset": 21,
        "compute": "qdq",
        "matmulnbits": False,
        "pipeline": {"class": "StableDiffusionPipeline", "denoiser": "unet"},
        "components": {
            "unet": {
                "kind": "denoiser",
                "file": "denoiser.onnx",
                "inputs": [
                    {"name": "sample", "dtype": "float", "shape": ["s26", "s85", "s68", "s43"]},
                    {"name": "timestep", "dtype": "int64", "shape": []},
                    {"name": "encoder_hidden_states", "dtype": "float", "shape": ["s26", "s0", "s67"]},
                ],
                "outputs": [{"name": "conv_out", "dtype": "float", "shape": ["s26", 4, "s68", "s43"]}],
                "options": {"return_dict": False},
                "output_fields": [["sample", None]],
                "output_class": None,
                "call_order": ["sample", "timestep", "encoder_hidden_states", "return_dict"],
                "dynamic_axes": {"sample": [0, 2, 3], "timestep": [], "encoder_hidden_states": [0]},
                "dynamic": True,
                "check": {"ok": True, "sqnr_db": 38.75, "error": None},
                "unverified_axes": {"sample": [1]},
            },
            "text_encoder": {
                "kind": "text_encoder",
                "file": "text_encoder.onnx",
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["s95", 16]}],
                "outputs": [
                    {"name": "layer_norm_6", "dtype": "float", "shape": ["s95", 16, 64]},
                    {"name": "index", "dtype": "float", "shape": ["s95", 64]},
                ],
                "options": {},
                "output_fields": [["last_hidden_state", None], ["pooler_output", None]],
                "output_class": "transformers.modeling_outputs:BaseModelOutputWithPooling",
                "call_order": ["input_ids", "attention_mask", "position_ids", "kwargs"],
                "dynamic_axes": {"input_ids": [0]},
                "dynamic": True,
            },
        },
        "skipped_components": {},
        "kept_fp": {},
        "bundle": {"source": {"id": "test"}, "recipe": "w8a8"},
        "cache": {},
        "cache_graph": None,
        "sparsity_not_exported": None,
        "files": {
            "denoiser.onnx": {"sha256": _SHA, "bytes": 3074063},
            "text_encoder.onnx": {"sha256": _SHA, "bytes": 100},
            "model_index.json": {"sha256": _SHA, "bytes": 637},
        },
    }


def _with_cache_graph(m: dict[str, Any]) -> None:
    graph = copy.deepcopy(m["components"]["unet"])
    graph["inputs"].append({"name": "cache_0", "dtype": "float", "shape": [2, 64, 96]})
    graph.update(file="denoiser_cached.onnx", mechanism="residual", cache_values=["cache_0"])
    m["cache_graph"] = graph
    m["files"]["denoiser_cached.onnx"] = {"sha256": _SHA, "bytes": 10}


def test_a_real_export_manifest_passes() -> None:
    parsed = validate_onnx_manifest(_manifest())
    m = _manifest()
    m["components"]["unet"]["own_tensors"] = "unet/own_tensors.safetensors"
    m["files"]["unet/own_tensors.safetensors"] = {"sha256": _SHA, "bytes": 80}
    assert validate_onnx_manifest(m).components["unet"].own_tensors == "unet/own_tensors.safetensors"
    assert parsed.components["text_encoder"].output_fields == [["last_hidden_state", None], ["pooler_output", None]]
    m = _manifest()
    _with_cache_graph(m)
    assert validate_onnx_manifest(m).cache_graph is not None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(m: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _experts(names: list[str]) -> Callable[[dict[str, Any]], None]:
    def change(m: dict[str, Any]) -> None:
        m["version"] = 4
        m["pipeline"]["experts"] = names

    return change


TE = "components/text_encoder"
UNET = "components/unet"
BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown top-level field": (_set("extra", 1), "extra: Extra inputs are not permitted"),
    "version too new": (_set("version", 99), "version"),
    "version as a string": (_set("version", "2"), "version"),
    "unknown compute": (_set("compute", "fp8"), "compute"),
    "unknown component kind": (_set(f"{TE}/kind", "scheduler"), "components.text_encoder.kind"),
    "component name not an identifier": (
        lambda m: m["components"].update({"../x": m["components"].pop("text_encoder")}),
        "components.../x",
    ),
    "output class outside transformers/diffusers": (_set(f"{TE}/output_class", "os:system"), "output_class"),
    "output class not a qualname": (
        _set(f"{TE}/output_class", "transformers.modeling_outputs:A.__init__"),
        "output_class",
    ),
    "output_class of the wrong type": (_set(f"{TE}/output_class", ["x"]), "output_class"),
    "call_order of integers": (_set(f"{TE}/call_order", [1, 2]), "call_order"),
    "call_order repeats a name": (_set(f"{TE}/call_order", ["input_ids", "input_ids"]), "call_order names"),
    "output_fields of the wrong shape": (_set(f"{TE}/output_fields", [["a", None, 1]]), "output_fields"),
    "output_fields name an integer": (_set(f"{TE}/output_fields", [[1, None]]), "output field is"),
    "output_fields count of zero": (_set(f"{TE}/output_fields", [["a", 0]]), "output_fields"),
    "output_fields wider than the graph": (_set(f"{TE}/output_fields", [["a", 5]]), "take 5 graph outputs"),
    "input shape with a negative axis": (_set(f"{TE}/inputs/0/shape/1", -1), "inputs.0.shape"),
    "input shape of floats": (_set(f"{TE}/inputs/0/shape", [1.5]), "inputs.0.shape"),
    "input dtype with odd characters": (_set(f"{TE}/inputs/0/dtype", "int64; rm"), "dtype"),
    "duplicate input names": (
        lambda m: m["components"]["text_encoder"]["inputs"].append(dict(m["components"]["text_encoder"]["inputs"][0])),
        "share a name",
    ),
    "dynamic axis of an unknown input": (_set(f"{UNET}/dynamic_axes/other", [0]), "not graph inputs"),
    "no graph inputs": (_set(f"{TE}/inputs", []), "inputs"),
    "component file not listed": (_set(f"{TE}/file", "../../etc/passwd"), "is not a listed file"),
    "an encoder on a denoiser": (
        lambda m: m["components"]["unet"].update(encoder={**m["components"]["text_encoder"], "kind": "vae_encoder"}),
        "only a vae_decoder entry holds an encoder",
    ),
    "an encoder graph as a component": (_set(f"{TE}/kind", "vae_encoder"), "is a vae_decoder entry's encoder"),
    "a distribution field that is no output": (
        _set(f"{TE}/distribution_fields", ["latent_dist"]),
        "distribution_fields names ['latent_dist']",
    ),
    "a distribution class outside the two the loader builds": (
        _set(f"{TE}/distribution_class", "os:system"),
        "distribution_class",
    ),
    "an encoder file not listed": (
        lambda m: m["components"]["text_encoder"].update(
            kind="vae_decoder", encoder={**m["components"]["text_encoder"], "kind": "vae_encoder", "file": "x.onnx"}
        ),
        "components.text_encoder.encoder.file 'x.onnx' is not a listed file",
    ),
    "own tensors not listed": (_set(f"{UNET}/own_tensors", "../unet/weights.safetensors"), "own_tensors '../unet"),
    "own tensors not a name": (_set(f"{UNET}/own_tensors", 3), "own_tensors"),
    "options not an object": (_set(f"{UNET}/options", [1]), "options"),
    "two denoisers": (_set(f"{TE}/kind", "denoiser"), "more components are denoisers than the denoiser and its"),
    "pipeline.denoiser names a text encoder": (_set("pipeline/denoiser", "text_encoder"), "is a text_encoder"),
    "experts before version 4": (_set("pipeline/experts", ["unet_2"]), "experts need ONNX export version 4"),
    "an expert without a graph": (_experts(["unet_2"]), "pipeline.experts ['unet_2'] have no graph"),
    "an expert that is a text encoder": (_experts(["text_encoder"]), "'text_encoder' is a text_encoder component"),
    "the denoiser as its own expert": (_experts(["unet"]), "names the denoiser"),
    "several predictions before version 5": (
        lambda m: m["components"]["unet"].update(output_fields=[["sample", None], ["audio_sample", None]],
                                                 outputs=[m["components"]["unet"]["outputs"][0]] * 2),
        "several predictions need ONNX export version 5",
    ),
    "variants before version 5": (
        lambda m: m["components"]["unet"].update(variants=[dict(m["components"]["unet"])]),
        "variants or several predictions need ONNX export version 5",
    ),
    "a variant of a text encoder": (
        lambda m: m.update(version=5) or m["components"]["text_encoder"].update(
            variants=[dict(m["components"]["unet"])]),
        "only a denoiser entry holds variants",
    ),
    "a variant file not listed": (
        lambda m: m.update(version=5) or m["components"]["unet"].update(
            variants=[{**m["components"]["unet"], "file": "../v.onnx"}]),
        "components.unet.variants.0.file '../v.onnx' is not a listed file",
    ),
    "file entry with a short sha256": (_set("files/model_index.json/sha256", "abc"), "sha256"),
    "dynamic as an integer": (_set(f"{UNET}/dynamic", 1), "dynamic"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_field_is_refused_with_its_name(case: str) -> None:
    change, message = BAD[case]
    m = _manifest()
    change(m)
    with pytest.raises(BundleError, match=r"manifest\.json: ") as info:
        validate_onnx_manifest(m)
    assert message in str(info.value), str(info.value)


CACHE_BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a cache graph beside variants": (
        lambda m: m.update(version=5) or m["components"]["unet"].update(variants=[dict(m["components"]["unet"])]),
        "a cache graph pair follows one call form",
    ),
    "cache value not a graph input": (_set("cache_graph/cache_values", ["nope"]), "are not inputs of the reuse graph"),
    "reuse graph file not listed": (_set("cache_graph/file", "../elsewhere.onnx"), "cache_graph.file"),
    "cache graph without its mechanism": (lambda m: m["cache_graph"].pop("mechanism"), "mechanism"),
}


@pytest.mark.parametrize("case", sorted(CACHE_BAD))
def test_a_bad_cache_graph_is_refused(case: str) -> None:
    change, message = CACHE_BAD[case]
    m = _manifest()
    _with_cache_graph(m)
    change(m)
    with pytest.raises(BundleError) as info:
        validate_onnx_manifest(m)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ("transformers.modeling_outputs:BaseModelOutputWithPooling", True),
        ("diffusers.models.autoencoders.vae:DecoderOutput", True),
        ("diffusers.utils:export_to_video", False),  # a function, not an output class
        ("transformers.modeling_outputs:torch", False),  # a module
        ("transformers.no_such_module:Output", False),
        ("diffusers:DiffusionPipeline", False),  # a class, not an output class
    ],
)
def test_the_loader_rebuilds_only_library_output_classes(spec: str, ok: bool) -> None:
    from diffkiln.runtime.onnxruntime_backend import OrtComponent

    resolve = OrtComponent.resolve_output_class
    if ok:
        assert resolve(spec).__name__ == spec.rpartition(":")[2]
    else:
        with pytest.raises(BundleError, match="output class"):
            resolve(spec)
