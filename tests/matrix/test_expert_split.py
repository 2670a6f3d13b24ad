"""A pipeline whose sampler runs two models of one class at different steps: Wan 2.2's experts,
``transformer`` above a boundary timestep and ``transformer_2`` below it. Both are quantized, each
from statistics of its own (an expert sees only its own noise levels; one calibration run records
both), stored side by side in one bundle (format version 9), loaded, saved and inspected together.
The ONNX export writes a graph per expert, which the onnxruntime backend runs; the MindIE-SD export
a description and weights file per expert, which MindIE-SD's loader (re-implemented from its
source) takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffkiln.api import convert
from diffkiln.cli import main
from diffkiln.core.errors import BundleError
from diffkiln.core.hooks import recording_calls
from diffkiln.core.manifest_schema import validate_manifest
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.schema import file_digest
from diffkiln.export.mindiesd import MindieExportConfig
from diffkiln.generation import load_pipeline
from diffkiln.nn.qmodules import QLinear
from diffkiln.runtime import load
from diffkiln.runtime.inspect import denoiser_sizes
from tests.export.mindiesd_contract import quantize
from tests.matrix.builders import optimized, wan22_experts
from tests.matrix.per_call import per_call_sqnr

CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 32}
STEPS = 4  # with boundary_ratio 0.6: two steps on transformer, two on transformer_2
# Per-call SQNR of each W8A8 expert against its FP self on a held-out prompt: measured 29.9 to 39.0
# dB (transformer) and 39.4 to 39.9 dB (transformer_2).
MIN_CALL_SQNR_DB = 20.0
# The mixed recipe at 6 average weight bits (2- to 8-bit layers): measured 22.4 to 23.4 dB
# (transformer) and 13.9 to 14.4 dB (transformer_2, more of its layers at 2 bits).
MIN_MIXED_CALL_SQNR_DB = 10.0
# MindIE-SD's float16 layers (the loader contract) against diffkiln's float32 runtime, per call:
# measured 53.9 to 61.0 dB over both experts. A wrong layout or cast measures below 15 dB.
MIN_MINDIESD_SQNR_DB = 40.0
# Each quantized layer of the expert on its FP input at its first call (report, isolated): measured
# 15.0 dB (blocks.0.ffn.net.2, the post-GELU down projection) to 52.0 dB.
MIN_LAYER_SQNR_DB = 10.0
# The ONNX graphs against the torch bundle: the same QDQ arithmetic, measured 130 to 134 dB.
MIN_GRAPH_SQNR_DB = 60.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return optimized(wan22_experts, tmp_path_factory.mktemp("wan22"), CALL, calib_size=2, steps=STEPS)


def _latents(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red fox running", **CALL, num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).frames  # fmt: skip


def test_both_experts_are_quantized_each_from_its_own_calibration(built: tuple[Path, Path]) -> None:
    manifest = json.loads((built[1] / "manifest.json").read_text())
    assert manifest["version"] == 9 and list(manifest["experts"]) == ["transformer_2"]
    expert = manifest["experts"]["transformer_2"]
    assert manifest["pipeline"]["denoiser"] == "transformer" and expert["plan"]["denoiser"] == "transformer_2"
    assert expert["denoiser_class"] == manifest["pipeline"]["denoiser_class"]
    assert set(expert["quant"]["layers"]) == set(manifest["quant"]["layers"]) and manifest["quant"]["layers"]
    evidence = manifest["plan"]["notes"]["calibration"]["denoiser_evidence"]
    assert evidence.startswith("the model whose calls grow most with the sampler's steps"), evidence
    assert evidence.endswith("experts of its class run in the sampler loop too, each quantized: transformer_2")
    # Own calibration: the expert's activation scales are not the first expert's.
    main_t = load_file(str(built[1] / manifest["quant"]["weights_file"]))
    expert_t = load_file(str(built[1] / expert["quant"]["weights_file"]))
    scales = [k for k in main_t if k.endswith("::act_scale")]
    assert scales and sum(not torch.equal(main_t[k], expert_t[k]) for k in scales) == len(scales)
    assert expert["quant"]["weights_file"].startswith("transformer_2/")
    assert not (built[1] / "transformer_2" / "diffusion_pytorch_model.safetensors").exists()  # no FP copy


def test_each_expert_runs_integer_layers_near_its_fp_self(built: tuple[Path, Path]) -> None:
    fp, q = load_pipeline(str(built[0])), load(built[1], device="cpu")
    assert set(q.diffkiln_experts) == {"transformer_2"} and q.diffkiln_experts["transformer_2"] is q.transformer_2
    for model in (q.transformer, q.transformer_2):
        assert any(isinstance(m, QLinear) for m in model.modules())
    for component in ("transformer", "transformer_2"):
        sqnr = per_call_sqnr(fp, q, CALL, steps=STEPS, component=component)
        assert sqnr and min(sqnr) >= MIN_CALL_SQNR_DB, (component, sqnr)


def test_save_pretrained_round_trips_both_experts(built: tuple[Path, Path], tmp_path: Path) -> None:
    q = load(built[1], device="cpu")
    q.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved", device="cpu")
    assert isinstance(again.transformer_2.blocks[0].attn1.to_q, QLinear)
    assert torch.equal(_latents(q), _latents(again))
    q.transformer_2 = load_pipeline(str(built[0])).transformer_2  # the float expert in its place
    with pytest.raises(BundleError, match="transformer_2 is no longer the bundle's quantized expert"):
        q.save_pretrained(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_inspect_names_the_expert(built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(built[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("expert ")] == [
        "expert   transformer_2 (WanTransformer3DModel)"
    ], lines


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_the_mindiesd_export_has_a_description_per_expert_that_its_loader_takes(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    out = convert(built[1], MindieExportConfig(tmp_path / "md"))
    meta = json.loads((out / "diffkiln_export.json").read_text())
    assert meta["version"] == 4 and meta["experts"]["transformer_2"]["folder"] == "transformer_2"
    manifest, fp = _manifest(built), load_pipeline(str(built[0]))
    q = load(built[1], device="cpu")
    q.set_progress_bar_config(disable=True)
    for name, folder, layers in (("transformer", out, manifest["quant"]["layers"]),
                                 ("transformer_2", out / "transformer_2",
                                  manifest["experts"]["transformer_2"]["quant"]["layers"])):  # fmt: skip
        # MindIE-SD's quantize, as re-implemented from its source, on the float expert.
        model, replaced = quantize(getattr(fp, name), folder / "quant_model_description_w8a8.json", dtype=torch.float16)
        assert set(replaced) == set(layers) and set(replaced.values()) == {"W8A8"}, name
        with recording_calls("test.record", getattr(q, name)) as calls, torch.no_grad():
            q("a red fox running", **CALL, num_inference_steps=STEPS, output_type="latent",
              generator=torch.Generator().manual_seed(3))  # fmt: skip
        with torch.no_grad():
            values = [sqnr_db(getattr(q, name)(*a, **{**k, "return_dict": False})[0].float(),
                              model(*a, **{**k, "return_dict": False})[0].float()) for a, k in calls]  # fmt: skip
        assert calls and min(values) >= MIN_MINDIESD_SQNR_DB, (name, values)


def test_the_onnx_export_has_a_graph_per_expert_and_runs_in_onnxruntime(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    # Static shapes: the dynamic export of this class is the matrix's (tests/matrix/test_matrix.py).
    assert main(["export", str(built[1]), "--format", "onnx", "--static-shapes", "--no-progress",
                 "--out", str(tmp_path / "onnx")]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["version"] == 4 and manifest["pipeline"]["experts"] == ["transformer_2"]
    graphs = {n: e for n, e in manifest["components"].items() if e["kind"] == "denoiser"}
    assert {n: e["file"] for n, e in graphs.items()} == {"transformer": "denoiser.onnx",
                                                          "transformer_2": "transformer_2.onnx"}  # fmt: skip
    assert all(e["check"]["ok"] and e["check"]["sqnr_db"] >= MIN_GRAPH_SQNR_DB for e in graphs.values()), graphs
    ort = load(tmp_path / "onnx", backend="onnxruntime", device="cpu")
    assert type(ort.transformer_2).__name__ == "OrtDenoiser"
    assert sqnr_db(_latents(load(built[1], device="cpu")), _latents(ort)) >= MIN_GRAPH_SQNR_DB


def _manifest(built: tuple[Path, Path]) -> dict[str, Any]:
    return json.loads((built[1] / "manifest.json").read_text())


@pytest.mark.parametrize(
    "case, edit, match",
    [
        ("an older version", lambda m: m.update(version=8), "experts need bundle version 9"),
        ("the denoiser again", lambda m: m["experts"].update(transformer=m["experts"]["transformer_2"]),
         "experts.transformer: not a component of the pipeline besides its denoiser"),
        ("not a component", lambda m: m["experts"].update(transformer_3=m["experts"]["transformer_2"]),
         "experts.transformer_3"),
        ("an unlisted weights file", lambda m: m["experts"]["transformer_2"]["quant"].update(weights_file="x.bin"),
         "is not listed"),
        ("an unknown key", lambda m: m["experts"]["transformer_2"].update(code="os.system"), "code"),
    ],
)  # fmt: skip
def test_the_schema_refuses_a_malformed_experts_section(
    built: tuple[Path, Path], case: str, edit: Any, match: str
) -> None:
    manifest = _manifest(built)
    validate_manifest(manifest)
    edit(manifest)
    with pytest.raises(BundleError, match=match):
        validate_manifest(manifest)


@pytest.mark.parametrize("case, match", [("weights outside the bundle", "leaves the bundle"),
                                         ("a NaN scale", "act_scale holds NaN"),
                                         ("a layer of another shape", "must be int8 of shape")])  # fmt: skip
def test_a_hostile_expert_is_refused_at_load(built: tuple[Path, Path], tmp_path: Path, case: str, match: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(built[1], bundle)
    manifest = _manifest(built)
    quant = manifest["experts"]["transformer_2"]["quant"]
    path = bundle / quant["weights_file"]
    tensors = load_file(str(path))
    if case == "weights outside the bundle":
        (tmp_path / "outside.safetensors").write_bytes(path.read_bytes())
        quant["weights_file"] = "../outside.safetensors"
        manifest["files"]["../outside.safetensors"] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    else:
        key = next(k for k in tensors if k.endswith("::act_scale" if case == "a NaN scale" else "::weight_q"))
        tensors[key] = torch.full_like(tensors[key], float("nan")) if case == "a NaN scale" else tensors[key][:1]
        save_file(tensors, str(path))
        manifest["files"][quant["weights_file"]] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        load(bundle, device="cpu")


def test_a_cache_schedule_for_a_denoiser_with_experts_is_refused_up_front(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The denoiser runs at only some of the steps: a schedule over its calls would skip the wrong ones.
    args = ["optimize", str(built[0]), "--cache-budget", "0.6", "--calib-size", "2", "--steps", str(STEPS),
            "--no-progress", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    for key, value in CALL.items():
        args += ["--call-arg", f"{key}={value}"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "transformer runs only some of the sampler steps and transformer_2 the others" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_the_mixed_recipe_allocates_each_expert_on_its_own(built: tuple[Path, Path], tmp_path: Path) -> None:
    from diffkiln.api import OptimizeConfig, optimize
    from diffkiln.optimizer import MixedConfig

    config = OptimizeConfig(out=tmp_path / "b", recipe=MixedConfig(avg_weight_bits=6.0), calib_size=2, steps=STEPS,
                            progress=False, call_kwargs=tuple(CALL.items()), cache_dir=tmp_path / "c")  # fmt: skip
    bundle = optimize(str(built[0]), config)
    manifest = _manifest((built[0], bundle))
    for quant in (manifest["quant"], manifest["experts"]["transformer_2"]["quant"]):
        assert quant["recipe"] == "mixed" and quant["avg_weight_bits"] <= 6.0 + 1e-6
        assert {info["bits"] for info in quant["layers"].values()} & {2, 3, 4}  # packed low-bit layers in each
    fp, q = load_pipeline(str(built[0])), load(bundle, device="cpu")
    for component in ("transformer", "transformer_2"):
        sqnr = per_call_sqnr(fp, q, CALL, steps=STEPS, component=component)
        assert min(sqnr) >= MIN_MIXED_CALL_SQNR_DB, (component, sqnr)


def test_the_experts_are_recorded_in_the_denoisers_calibration_run(built: tuple[Path, Path], tmp_path: Path) -> None:
    # One pipeline run records every expert, and caches each as a calibration of it alone would be:
    # the expert's own calibration then reads that file, and equals a run of its own.
    from dataclasses import replace

    from diffkiln.calibrate import CalibrationConfig, calibrate

    pipe = load_pipeline(str(built[0]))
    config = CalibrationConfig(("a red fox", "a blue bird"), steps=STEPS, call_kwargs=tuple(CALL.items()),
                               cache_dir=tmp_path / "joint", progress=False)  # fmt: skip
    stats = calibrate(pipe, config)
    assert stats.denoiser == "transformer" and stats.experts == ("transformer_2",)
    assert len(list((tmp_path / "joint").glob("calib-*.safetensors"))) == 2
    cached = calibrate(pipe, replace(config, denoiser="transformer_2"))
    assert len(list((tmp_path / "joint").glob("calib-*.safetensors"))) == 2  # read, not recomputed
    alone = calibrate(pipe, replace(config, denoiser="transformer_2", cache_dir=tmp_path / "alone"))
    assert cached.denoiser == alone.denoiser == "transformer_2" and cached.settings == alone.settings
    assert cached.timesteps == alone.timesteps and set(cached.layers) == set(alone.layers)
    for name, layer in alone.layers.items():
        assert torch.equal(cached.layers[name].samples, layer.samples), name
        assert torch.equal(cached.layers[name].channel_absmax, layer.channel_absmax), name
    # The expert's steps are its own: those below the boundary (0.6 of 1000).
    assert max(alone.timesteps) < 600 <= min(stats.timesteps), (stats.timesteps, alone.timesteps)


def test_the_report_counts_the_experts(built: tuple[Path, Path], tmp_path: Path) -> None:
    from diffkiln.report import ReportConfig, report

    json_path, html_path = report(built[1], ReportConfig(eval_size=2, steps=STEPS, progress=False), tmp_path / "r")
    data = json.loads(json_path.read_text())
    assert set(data["plan"]["experts"]) == {"transformer_2"}
    # Both experts' weights: stored and FP16 bytes of the two, as diffkiln inspect adds them.
    manifest = _manifest(built)
    sizes = [denoiser_sizes(built[1], {**manifest, "experts": {}}), denoiser_sizes(built[1], manifest)]
    assert data["size"]["denoiser_bytes"] == sizes[1][0] > sizes[0][0]
    page = html_path.read_text()
    assert "expert transformer_2: avg weight bits / act bits" in page
    # The expert's layers, each fed its FP input at the expert's first call (all quantized layers).
    expert_layers = data["experts_per_layer_sqnr_db"]["transformer_2"]
    assert set(expert_layers) == set(manifest["experts"]["transformer_2"]["quant"]["layers"])
    assert min(expert_layers.values()) >= MIN_LAYER_SQNR_DB, expert_layers
    assert "Per-layer SQNR of the expert transformer_2" in page
    assert data["fidelity"]["latent_sqnr_db"] >= MIN_CALL_SQNR_DB
