"""Every stage on sixteen diffusers denoiser classes built tiny, none of them known to diffkiln.

For each: calibrate -> plan -> bundle (``optimize`` on the folder, with its call arguments only),
the runtime's pipeline, the bundle's denoiser against the FP one call by call, the float layers
against the architecture's real input and output projections, and the ONNX denoiser run in
onnxruntime at its recorded shape and, where it is declared dynamic, at a second one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.api import OptimizeConfig, W8A8Config, convert, optimize
from diffkiln.core.hooks import recording_calls
from diffkiln.core.metrics import sqnr_db
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.export.onnx.check import bundle_call, flatten_call
from diffkiln.generation import load_pipeline
from diffkiln.nn import QConv, QLinear
from diffkiln.zoo.catalog import TINY_CATALOG
from tests.matrix.builders import MATRIX, Lazy, build
from tests.tiers import tiered

# The built-in tiny architectures (their builders live in the zoo), as folders like any other.
BUILTIN = {e.name: dict(e.call_kwargs) for e in TINY_CATALOG}
NAMES = sorted(BUILTIN) + sorted(MATRIX)

# The architectures' real latent input and output projections (what the data flow must find).
PROJECTIONS: dict[str, tuple[set[str], set[str]]] = {
    "tiny-sd15": ({"conv_in"}, {"conv_out"}),
    "tiny-sdxl": ({"conv_in"}, {"conv_out"}),
    "tiny-sd3": ({"pos_embed.proj"}, {"proj_out"}),
    "tiny-flux": ({"x_embedder"}, {"proj_out"}),
    "tiny-pixart": ({"pos_embed.proj"}, {"proj_out"}),
    "tiny-wan": ({"patch_embedding"}, {"proj_out"}),
    "cogvideox": ({"patch_embed.proj"}, {"proj_out"}),
    "ltx": ({"proj_in"}, {"proj_out"}),
    "svd": ({"conv_in"}, {"conv_out"}),
    "stable-audio": ({"preprocess_conv", "proj_in"}, {"proj_out", "postprocess_conv"}),
    "hunyuan-dit": ({"pos_embed.proj"}, {"proj_out"}),
    "aura-flow": ({"pos_embed.proj"}, {"proj_out"}),
    "latte": ({"pos_embed.proj"}, {"proj_out"}),
    "text-to-video-sd": ({"conv_in"}, {"conv_out"}),
    "dit": ({"pos_embed.proj"}, {"proj_out_2"}),
    "ddpm": ({"conv_in"}, {"conv_out"}),
}
# The component the sampler calls at every step (stable-audio also holds a projection model and a
# VAE that the probe must not take).
UNETS = {"tiny-sd15", "tiny-sdxl", "svd", "text-to-video-sd", "ddpm"}

# Layers whose weights their parent reads: HunyuanDiT's attention pool passes its projections'
# weights to F.multi_head_attention_forward; UNet2DModel and UNet3DConditionModel read their first
# parameter's dtype (``self.dtype``: conv_in's weight). Even a dtype read breaks once the layer is an
# integer module without parameters (Wan's time embedder reads ``next(parameters()).dtype`` and
# raises StopIteration), so both kinds stay float, with the read as the evidence.
_POOL = "time_extra_emb.pooler"
READ_BY_PARENT = {
    "hunyuan-dit": {f"{_POOL}.q_proj", f"{_POOL}.k_proj", f"{_POOL}.v_proj", f"{_POOL}.c_proj"},
    "text-to-video-sd": {"conv_in"},
    "ddpm": {"conv_in"},
    "tiny-wan": {"condition_embedder.time_embedder.linear_1"},
}

# Per-call SQNR of the bundle's denoiser against the FP one on the same inputs: the floor catches a
# broken layer, layout or kernel (0 dB or less). Measured on a held-out prompt: the DiTs 35-50 dB.
MIN_CALL_SQNR_DB = 20.0
# Two UNets whose random-weight activations grow about tenfold between the two sampler steps: one
# static range per layer leaves the first step few codes (measured 18.5 dB tiny-sdxl, 18.8 dB svd;
# more calibration samples do not change it). Timestep-aware ranges lift them above the common
# floor (test_timestep_aware_ranges_lift_the_unets).
STEP_RANGE_BOUND = {"tiny-sdxl": 17.5, "svd": 17.5}

# Denoisers whose graph traced at the recorded size fails at another: a position table stored for
# the configured size, computed from the input's size elsewhere (PixArt's, AuraFlow's and
# CogVideoX's patch embeddings; CogVideoX writes its table through ``.data``). Traced at the second
# shape, they are dynamic in size as well (the exporter's second attempt, the first one's failure
# in the manifest).
TRACED_AT_SECOND_SHAPE_ONNX = {"tiny-pixart", "aura-flow", "cogvideox"}
# Every other class is dynamic in every axis the check varied at the first attempt; LTX passes its
# latent size as int arguments, which its graph takes as int64 inputs.
INT_INPUTS_ONNX = {"ltx": {"height", "width", "num_frames"}}


# The built-in tiny models' second shape for the ONNX check (the exporter's default doubles height
# and width): height unlike width, so that a graph with the two axes swapped fails; Wan's frames,
# and the padded T5 length where the pipeline takes one.
BUILTIN_SECOND = {
    name: {"height": 48, "width": 64}
    | ({"num_frames": 9, "height": 32, "width": 48} if name == "tiny-wan" else {})
    | ({"max_sequence_length": 24} if "max_sequence_length" in kwargs else {})
    for name, kwargs in BUILTIN.items()
}


def _call_kwargs(name: str) -> dict[str, Any]:
    return BUILTIN[name] if name in BUILTIN else MATRIX[name].call_kwargs


def _per_call_sqnr(name: str, fp_pipe: Any, q_pipe: Any, den_name: str) -> list[float]:
    """The bundle's denoiser against the FP one, call by call, on the FP sampler's own inputs
    (a prompt that calibration did not see)."""
    from diffkiln.calibrate import batch_kwargs, source_for

    fp_den, q_den = getattr(fp_pipe, den_name), getattr(q_pipe, den_name)
    source = source_for(fp_pipe, ["a red car on a street"], 1)
    call = {**batch_kwargs(fp_pipe, [source.sample(0)]), **_call_kwargs(name)}
    fp_pipe.set_progress_bar_config(disable=True)
    with recording_calls("matrix.record", fp_den) as calls, torch.no_grad():
        fp_pipe(**call, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert calls
    values: list[float] = []
    for args, kwargs in calls:
        kwargs = {**kwargs, "return_dict": False}
        with torch.no_grad():
            ref, got = fp_den(*args, **kwargs)[0], q_den(*args, **kwargs)[0]
        values.append(round(float(sqnr_db(ref, got)), 1))
    return values


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffkiln.zoo.registry import resolve_target

    root = tmp_path_factory.mktemp("matrix")
    return Lazy(lambda n: resolve_target(n).path if n in BUILTIN else build(n, root / n))


@pytest.fixture(scope="module")
def bundles(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-bundles")
    config = OptimizeConfig(out=root, calib_size=2, steps=2, progress=False)
    return Lazy(
        lambda n: optimize(str(folders[n]), replace(config, out=root / n, call_kwargs=tuple(_call_kwargs(n).items())))
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_on_the_denoiser_class(name: str, folders: dict[str, Path], bundles: dict[str, Path]) -> None:
    bundle = bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    q_pipe = load_pipeline(str(bundle))
    fp_pipe = load_pipeline(str(folders[name]))
    den_name = manifest["pipeline"]["denoiser"]
    assert den_name == ("unet" if name in UNETS else "transformer")
    q_den = getattr(q_pipe, den_name)
    # the bundle's diffusers class (a same-named subclass whose save_pretrained writes a bundle)
    assert isinstance(q_pipe, type(fp_pipe)) and type(q_pipe).__name__ == type(fp_pipe).__name__
    # Real integers: every quantized layer is an integer module holding int8 (or packed) codes.
    qmods = [m for m in q_den.modules() if isinstance(m, (QLinear, QConv))]
    assert len(qmods) == len(manifest["quant"]["layers"]) > 0
    assert all(m.codes_t().dtype == torch.int8 for m in qmods)

    values = _per_call_sqnr(name, fp_pipe, q_pipe, den_name)
    print(f"{name}: per-call SQNR {values} dB")
    assert min(values) >= STEP_RANGE_BOUND.get(name, MIN_CALL_SQNR_DB), f"{name}: per-call SQNR {values} dB"

    # The float layers are the architecture's real projections, found from the data flow.
    plan = {lp["name"]: lp for lp in manifest["plan"]["layers"]}
    inputs, outputs = PROJECTIONS[name]
    read = READ_BY_PARENT.get(name, set())
    assert {n for n, lp in plan.items() if lp["role"] == "input_projection"} == inputs - read
    assert {n for n, lp in plan.items() if lp["role"] == "output_projection"} == outputs
    assert {n for n, lp in plan.items() if lp["role"] == "weight_read_by_parent"} == read
    assert all(plan[n]["weight"] is None for n in inputs | outputs)


# Exported whole (text encoders and VAE too), for the pipeline tests below; the others denoiser only.
WHOLE_PIPELINE_ONNX = {"ltx", "svd", "stable-audio"}


@pytest.fixture(scope="module")
def onnx_folders(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each class's ONNX export, checked at its second call; built once, on first use."""
    root = tmp_path_factory.mktemp("matrix-onnx")

    def export(name: str) -> Path:
        second = MATRIX[name].second_call_kwargs if name in MATRIX else BUILTIN_SECOND.get(name)
        config = OnnxExportConfig(root / name, components=name in WHOLE_PIPELINE_ONNX, progress=False,
                                  check_call_kwargs=tuple((second or {}).items()))  # fmt: skip
        return convert(bundles[name], config)

    return Lazy(export)


# CI exports one class per ONNX mechanism: UNet convolutions (tiny-sd15), joint attention with
# rotary tables (tiny-flux, tiny-sd3), video (cogvideox, latte, tiny-wan; ltx with int inputs), a
# whole pipeline with its VAE (ltx, stable-audio; a VAE encode graph: the inpainting folder of
# tests/matrix/test_image_conditioned.py) and class labels (dit). The other classes' exports, each
# another half-minute of tracing (SVD's whole image-to-video pipeline a minute), run in
# ``make test-slow``.
ONNX_SLOW_TIER = ("text-to-video-sd", "tiny-sdxl", "aura-flow", "hunyuan-dit", "tiny-pixart", "ddpm", "svd")


@pytest.mark.parametrize("name", tiered(NAMES, ONNX_SLOW_TIER))
def test_onnx_denoiser_runs_at_two_shapes(name: str, bundles: dict[str, Path], onnx_folders: dict[str, Path]) -> None:
    from diffkiln.runtime.onnxruntime_backend import OrtDenoiser

    out = onnx_folders[name]
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"][manifest["pipeline"]["denoiser"]]
    # The recorded shape (the export's own sampler call): the graph against the bundle's torch denoiser.
    pipe = load_pipeline(str(bundles[name]))
    den = getattr(pipe, pipe.diffkiln_manifest["pipeline"]["denoiser"])
    with recording_calls("matrix.onnx", den) as calls, torch.no_grad():
        pipe(**bundle_call(pipe, pipe.diffkiln_manifest, OnnxExportConfig.prompt))
    args, kwargs = calls[-1]
    # Called as the pipeline called the torch denoiser, through the runtime's onnxruntime stand-in:
    # it names and flattens the arguments, and feeds the int arguments the graph takes (LTX's size).
    ort_den = OrtDenoiser(out, "denoiser", entry, None, ["CPUExecutionProvider"], optimize=False)
    got = ort_den(*args, **{**kwargs, "return_dict": False})[0]
    with torch.no_grad():
        ref = den(*args, **{**kwargs, "return_dict": False})[0]
    assert sqnr_db(ref, got) >= MIN_CALL_SQNR_DB, name
    # A second shape: declared dynamic only after running there.
    print(f"{name}: dynamic axes {entry['dynamic_axes']}, wider attempts failed: {entry.get('wider_axes_failed')}")
    assert entry["dynamic"] and entry["check"]["ok"] and entry["check"]["sqnr_db"] >= MIN_CALL_SQNR_DB
    failed = entry.get("wider_axes_failed", [])
    if name in TRACED_AT_SECOND_SHAPE_ONNX:
        assert len(failed) == 1 and set(next(iter(entry["dynamic_axes"].values()))) > {0}, entry["dynamic_axes"]
    else:
        assert not failed, failed
    # The graph's inputs that are no tensor of the call: its int arguments, taken as int64 scalars.
    graph_ints = {i["name"] for i in entry["inputs"]} - set(flatten_call(den, args, kwargs))
    assert graph_ints == INT_INPUTS_ONNX.get(name, set()), entry["inputs"]
    assert all(i["dtype"] == "int64" and i["shape"] == [] for i in entry["inputs"] if i["name"] in graph_ints)


def test_ltx_onnx_pipeline_runs_at_a_size_no_export_or_check_saw(bundles: dict[str, Path],
                                                                 onnx_folders: dict[str, Path]) -> None:  # fmt: skip
    from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

    out = onnx_folders["ltx"]
    # The pipeline assembles (it reads the VAE's compression ratios from the stand-in's skeleton),
    # feeds the latent size to the graph as ints, and denormalizes with the VAE's latents_mean and
    # latents_std, buffers the export writes beside the graph (own_tensors).
    # Its timestep-conditioned VAE decodes with the pipeline's decode timestep: a tensor input.
    vae = json.loads((out / "manifest.json").read_text())["components"]["vae"]
    assert [i["name"] for i in vae["inputs"]] == ["latents", "temb"], vae["inputs"]
    ort_pipe, pipe = load_onnx_pipeline(out, torch.device("cpu")), load_pipeline(str(bundles["ltx"]))
    for key in ("latents_mean", "latents_std"):
        assert torch.equal(getattr(ort_pipe.vae, key), getattr(pipe.vae, key)), key
    call = {**MATRIX["ltx"].call_kwargs, "height": 96, "width": 64, "num_frames": 17, "num_inference_steps": 2}
    call.update(prompt="a red circle", output_type="pt", decode_timestep=0.05, decode_noise_scale=0.025)
    frames = [p(**call, generator=torch.Generator().manual_seed(0)).frames for p in (ort_pipe, pipe)]
    assert frames[0].shape == frames[1].shape == (1, 17, 3, 96, 64), [x.shape for x in frames]
    assert sqnr_db(frames[1], frames[0]) >= 40.0


@pytest.mark.parametrize("name", sorted(STEP_RANGE_BOUND))
def test_timestep_aware_ranges_lift_the_unets(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    config = OptimizeConfig(
        out=tmp_path / "b",
        calib_size=2,
        steps=2,
        progress=False,
        call_kwargs=tuple(_call_kwargs(name).items()),
        recipe=W8A8Config(timestep_aware=True),
    )
    bundle = optimize(str(folders[name]), config)
    q_pipe, fp_pipe = load_pipeline(str(bundle)), load_pipeline(str(folders[name]))
    values = _per_call_sqnr(name, fp_pipe, q_pipe, q_pipe.diffkiln_manifest["pipeline"]["denoiser"])
    print(f"{name} (timestep-aware): per-call SQNR {values} dB")
    assert min(values) >= MIN_CALL_SQNR_DB, values


@pytest.mark.slow  # SVD's whole-pipeline export (ONNX_SLOW_TIER)
def test_svd_onnx_pipeline_encodes_and_decodes_chunks_no_export_saw(bundles: dict[str, Path],
                                                                    onnx_folders: dict[str, Path]) -> None:  # fmt: skip
    """Image to video from an ONNX folder: the VAE's encode graph (the conditioning image), and its
    decode taking SVD's per-chunk ``num_frames`` as an int64 input, at chunk sizes and a size the
    export never saw."""
    import inspect

    import PIL.Image

    from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

    out = onnx_folders["svd"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["skipped_components"], manifest["skipped_components"]
    vae = manifest["components"]["vae"]
    assert {"name": "num_frames", "dtype": "int64", "shape": []} in vae["inputs"]
    assert vae["encoder"]["kind"] == "vae_encoder" and vae["encoder"]["distribution_fields"] == ["latent_dist"]
    ort_pipe, pipe = load_onnx_pipeline(out, torch.device("cpu")), load_pipeline(str(bundles["svd"]))
    # The pipeline passes num_frames only where vae.forward names it, as the torch class's does.
    assert "num_frames" in inspect.signature(ort_pipe.vae.forward).parameters
    gen = torch.Generator().manual_seed(0)
    image, z = torch.rand(1, 3, 48, 64, generator=gen) * 2 - 1, torch.randn(3, 4, 6, 8, generator=gen)
    with torch.no_grad():
        mode = (ort_pipe.vae.encode(image).latent_dist.mode(), pipe.vae.encode(image).latent_dist.mode())
        frames = (ort_pipe.vae.decode(z, num_frames=3).sample, pipe.vae.decode(z, num_frames=3).sample)
    assert sqnr_db(mode[1], mode[0]) >= 60.0 and sqnr_db(frames[1], frames[0]) >= 60.0
    call = {**MATRIX["svd"].call_kwargs, "height": 48, "width": 64, "num_frames": 5, "decode_chunk_size": 2}
    pixels = (torch.rand(48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
    call.update(image=PIL.Image.fromarray(pixels), num_inference_steps=2, output_type="pt")
    videos = [p(**call, generator=torch.Generator().manual_seed(0)).frames for p in (ort_pipe, pipe)]
    assert videos[0].shape == videos[1].shape == (1, 5, 3, 48, 64), [v.shape for v in videos]
    print("svd frames SQNR", sqnr_db(videos[1], videos[0]))
    assert sqnr_db(videos[1], videos[0]) >= 30.0


def test_stable_audio_onnx_pipeline_encodes_audio_with_its_oobleck_distribution(
    bundles: dict[str, Path], onnx_folders: dict[str, Path]
) -> None:
    """Audio to audio from an ONNX folder exported from a text-to-audio call: the Oobleck VAE's
    encode graph (on what the export's call decoded), its distribution rebuilt by class name."""
    from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

    out = onnx_folders["stable-audio"]
    vae = json.loads((out / "manifest.json").read_text())["components"]["vae"]
    encoder = vae["encoder"]
    assert encoder["distribution_class"] == "OobleckDiagonalGaussianDistribution", vae.get("encoder_skipped")
    assert encoder["distribution_fields"] == ["latent_dist"]
    ort_pipe, pipe = load_onnx_pipeline(out, torch.device("cpu")), load_pipeline(str(bundles["stable-audio"]))
    rate = pipe.vae.sampling_rate
    audio = torch.randn(1, 2, rate, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        dists = [p.vae.encode(audio).latent_dist for p in (ort_pipe, pipe)]
    assert type(dists[0]) is type(dists[1])
    assert sqnr_db(dists[1].mean, dists[0].mean) >= 60.0 and sqnr_db(dists[1].std, dists[0].std) >= 60.0
    call = {**MATRIX["stable-audio"].call_kwargs, "num_inference_steps": 2, "output_type": "pt",
            "initial_audio_waveforms": audio, "initial_audio_sampling_rate": rate}  # fmt: skip
    audios = [p("a drum", **call, generator=torch.Generator().manual_seed(0)).audios for p in (ort_pipe, pipe)]
    assert audios[0].shape == audios[1].shape and sqnr_db(audios[1], audios[0]) >= 30.0
