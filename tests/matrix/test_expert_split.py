"""A pipeline whose sampler runs two models of one class at different steps: Wan 2.2's experts,
``transformer`` above a boundary timestep and ``transformer_2`` below it. Both are quantized, each
from a calibration of its own (an expert sees only its own noise levels), stored side by side in
one bundle (format version 9), loaded, saved and inspected together; exports that write one
denoiser refuse such a bundle instead of dropping an expert."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file, save_file

from diffkiln.cli import main
from diffkiln.core.errors import BundleError
from diffkiln.core.manifest_schema import validate_manifest
from diffkiln.core.schema import file_digest
from diffkiln.generation import load_pipeline
from diffkiln.nn.qmodules import QLinear
from diffkiln.runtime import load
from diffkiln.zoo.architectures.video import tiny_wan
from tests.matrix.builders import optimized
from tests.matrix.per_call import per_call_sqnr

CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 32}
STEPS = 4  # with boundary_ratio 0.6: two steps on transformer, two on transformer_2
# Per-call SQNR of each W8A8 expert against its FP self on a held-out prompt: measured 29.9 to 39.0
# dB (transformer) and 39.4 to 39.9 dB (transformer_2).
MIN_CALL_SQNR_DB = 20.0


def _wan22(scratch: Path) -> WanPipeline:
    """Tiny Wan with a second expert: the first's weights perturbed, the boundary at 0.6."""
    base = tiny_wan(scratch)
    expert = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=base.transformer, scheduler=base.scheduler, transformer_2=expert,
                       boundary_ratio=0.6)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return optimized(_wan22, tmp_path_factory.mktemp("wan22"), CALL, calib_size=2, steps=STEPS)


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


def test_inspect_names_the_expert_and_exports_refuse_the_bundle(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(built[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("expert ")] == [
        "expert   transformer_2 (WanTransformer3DModel)"
    ], lines
    for fmt in ("onnx", "mindiesd"):
        assert main(["export", str(built[1]), "--format", fmt, "--out", str(tmp_path / fmt)]) != 0
        err = capsys.readouterr().err
        assert "writes one denoiser" in err and "its experts transformer_2" in err, err
        assert not (tmp_path / fmt).exists()


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
