"""A denoiser's several predictions and the forms of its calls, in ONNX: each prediction a graph
output that the check compares and the backend returns in the torch output class; a graph per call
form, which the backend picks by the call's options (LTX-2's video and audio predictions, its
modality-isolation call with ``isolate_modalities=True``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.transformers.transformer_ltx2 import AudioVisualModelOutput
from torch import nn

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.onnx_manifest_schema import GraphEntry
from diffkiln.export.onnx import OnnxExportConfig, OnnxExportError, export_module_onnx
from diffkiln.export.onnx.check import run_check
from diffkiln.export.onnx.denoiser_calls import MAX_CALL_FORMS, call_forms, form_matcher, prediction_layout
from diffkiln.runtime.onnxruntime_backend import OrtDenoiser

LAYOUT = [("sample", None), ("audio_sample", None)]
OUTPUT_CLASS = "diffusers.models.transformers.transformer_ltx2:AudioVisualModelOutput"
# The graph against torch in float32 (no quantized layer): measured above 100 dB.
MIN_SQNR_DB = 80.0


class _TwoLatents(nn.Module):
    """A prediction per latent, the video's mixing in the audio's unless the call isolates them
    (LTX-2's ``isolate_modalities``); its output class LTX-2's."""

    def __init__(self) -> None:
        super().__init__()
        self.video, self.audio = nn.Linear(4, 4), nn.Linear(3, 3)

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor, isolate_modalities: bool = False,
                return_dict: bool = True) -> Any:  # fmt: skip
        video, audio = self.video(hidden_states), self.audio(audio_hidden_states)
        if not isolate_modalities:
            video = video + audio.mean(dim=(1, 2), keepdim=True)
        return AudioVisualModelOutput(sample=video, audio_sample=audio) if return_dict else (video, audio)


def _call(batch: int = 1, **options: Any) -> dict[str, Any]:
    return {"hidden_states": torch.randn(batch, 6, 4), "audio_hidden_states": torch.randn(batch, 5, 3), **options}


def _torch(module: nn.Module, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out: tuple[torch.Tensor, torch.Tensor] = module(**call, return_dict=False)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The module's two call forms exported (one graph each) and their entry as the exporter
    writes a denoiser's: its layout, and the isolating form as its variant."""
    torch.manual_seed(0)
    module, root = _TwoLatents().eval(), tmp_path_factory.mktemp("two-latents")
    config = OnnxExportConfig(root, progress=False)
    entries = [
        export_module_onnx(module, _call(isolate_modalities=isolate), root / file, config, float16=False)
        for isolate, file in ((False, "denoiser.onnx"), (True, "denoiser_variant_1.onnx"))
    ]
    call_order = ["hidden_states", "audio_hidden_states", "isolate_modalities", "return_dict"]
    main, variant = ({**e, "output_fields": [list(f) for f in LAYOUT], "output_class": OUTPUT_CLASS,
                      "call_order": call_order} for e in entries)  # fmt: skip
    entry = {**main, "variants": [variant]}
    GraphEntry.model_validate(json.loads(json.dumps(entry)))  # as the loader's schema reads it
    return module, root, entry


def test_each_prediction_is_a_graph_output(exported: tuple[nn.Module, Path, dict[str, Any]]) -> None:
    # The graph used to hold the first prediction alone: LTX-2's audio was dropped.
    module, root, entry = exported
    assert len(entry["outputs"]) == 2 and [len(o["shape"]) for o in entry["outputs"]] == [3, 3]
    call = _call(batch=2)
    check = run_check(root / "denoiser.onnx", ["hidden_states", "audio_hidden_states"],
                      _Wrapped(module, isolate=False), call, outputs=2)  # fmt: skip
    assert check["ok"] and check["sqnr_db"] >= MIN_SQNR_DB, check


class _Wrapped(nn.Module):
    """The export wrapper's calling form: the tensors positionally, the predictions as a tuple."""

    def __init__(self, module: nn.Module, isolate: bool) -> None:
        super().__init__()
        self.module, self.isolate = module, isolate

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: tuple[torch.Tensor, ...] = self.module(hidden, audio, self.isolate, return_dict=False)
        return out


def test_the_check_compares_every_prediction(exported: tuple[nn.Module, Path, dict[str, Any]]) -> None:
    # A graph right in its first output and wrong in its second passed a check of the first alone.
    module, root, _ = exported
    other = _TwoLatents().eval()
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        other.audio.bias += 1.0  # the torch audio prediction moves; the video one only through its mean
        other.video.bias -= 1.0  # ... which this puts back
    names, call = ["hidden_states", "audio_hidden_states"], _call()
    first = run_check(root / "denoiser.onnx", names, _Wrapped(other, isolate=False), call, outputs=1)
    both = run_check(root / "denoiser.onnx", names, _Wrapped(other, isolate=False), call, outputs=2)
    assert first["ok"], first
    assert not both["ok"] and "the least of 2 outputs" in both["error"], both


def test_the_backend_returns_every_prediction_in_the_torch_output_class(
    exported: tuple[nn.Module, Path, dict[str, Any]],
) -> None:
    module, root, entry = exported
    denoiser = OrtDenoiser(root, "transformer", entry, None, ["CPUExecutionProvider"], optimize=False)
    call = _call(batch=2)
    out = denoiser(**call)
    assert type(out) is AudioVisualModelOutput
    ref = _torch(module, call)
    assert sqnr_db(ref[0], out.sample) >= MIN_SQNR_DB and sqnr_db(ref[1], out.audio_sample) >= MIN_SQNR_DB
    video, audio = denoiser(**call, return_dict=False)
    assert torch.equal(video, out.sample) and torch.equal(audio, out.audio_sample)


def test_a_call_runs_the_graph_of_its_form(exported: tuple[nn.Module, Path, dict[str, Any]]) -> None:
    module, root, entry = exported
    denoiser = OrtDenoiser(root, "transformer", entry, None, ["CPUExecutionProvider"], optimize=False)
    for isolate in (False, True):
        call = _call(isolate_modalities=isolate)
        got, ref = denoiser(**call, return_dict=False), _torch(module, call)
        assert min(sqnr_db(r, g) for r, g in zip(ref, got, strict=True)) >= MIN_SQNR_DB, isolate
    # The two forms compute differently: the wrong graph would be far off.
    call = _call()
    isolated = denoiser(**{**call, "isolate_modalities": True}, return_dict=False)[0]
    assert sqnr_db(_torch(module, call)[0], isolated) < 40.0
    with pytest.raises(ValueError, match=r"isolate_modalities=2 differs .*; nor does any of its 1 variants take"):
        denoiser(**_call(isolate_modalities=2))


def test_a_variant_with_other_outputs_or_a_cache_pair_is_refused(
    exported: tuple[nn.Module, Path, dict[str, Any]],
) -> None:
    _, _, entry = exported
    fewer = {**entry, "variants": [{**entry["variants"][0], "output_fields": [["sample", None]]}]}
    with pytest.raises(ValueError, match="output_fields differ"):
        GraphEntry.model_validate(json.loads(json.dumps(fewer)))
    with pytest.raises(ValueError, match="no cache graph pair"):
        GraphEntry.model_validate(json.loads(json.dumps({**entry, "cache_outputs": 2})))


def test_the_layout_takes_the_torch_output_class_fields() -> None:
    module, call = _TwoLatents().eval(), _call()
    out = _torch(module, call)
    layout, output_class = prediction_layout(module, ((), {**call, "return_dict": False}), out)
    assert (layout, output_class) == (LAYOUT, OUTPUT_CLASS)
    one = prediction_layout(module, ((), call), (out[0], None))  # FLUX.2's (sample, kv cache None)
    assert one == ([("sample", None)], None)


def test_calls_group_by_form_and_the_options_that_tell_them_apart() -> None:
    calls = [
        (["h", "t"], {"isolate": False, "fps": 25.0}),
        (["h", "t"], {"isolate": False, "fps": 25.0}),  # the same form at another step
        (["h", "t"], {"isolate": True, "fps": 25.0}),
        (["h", "t"], {"isolate": False, "fps": 25.0, "blocks": [28]}),
    ]
    assert call_forms(calls) == ([0, 2, 3], ("blocks", "isolate"), False)
    assert call_forms([*calls, (["h", "t", "mask"], {"isolate": False, "fps": 25.0})])[2]
    # An option that changes at every call (a step index) would need a graph per step.
    with pytest.raises(OnnxExportError, match=r"forms \(changing: \['step'\]\)"):
        call_forms([(["h"], {"step": i}) for i in range(MAX_CALL_FORMS + 1)])


def test_a_forms_call_is_found_at_another_shape() -> None:
    module = _TwoLatents()
    isolating = form_matcher(module, ["isolate_modalities"], {"isolate_modalities": True}, None)
    assert isolating((torch.ones(2, 9, 4), torch.ones(2, 7, 3)), {"isolate_modalities": True})
    assert not isolating((torch.ones(1, 6, 4), torch.ones(1, 5, 3)), {})
    # An absent option matches the form that the export recorded without it.
    plain = form_matcher(module, ["isolate_modalities"], {}, ("audio_hidden_states", "hidden_states"))
    assert plain((), {"hidden_states": torch.ones(1), "audio_hidden_states": torch.ones(1)})
    assert not plain((), {"hidden_states": torch.ones(1), "audio_hidden_states": torch.ones(1),
                          "isolate_modalities": True})  # fmt: skip


# SD3's skip-layer guidance from the first step: a third call per step with ``skip_layers``.
SKIP_LAYER_GUIDANCE = {"height": 32, "width": 32, "max_sequence_length": 32, "skip_guidance_layers": [0],
                       "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}  # fmt: skip
# The onnxruntime pipeline against the torch bundle over 4 steps: measured 72.2 dB; with the
# denoiser's own graph for the skip-layer calls too, 29.6 dB.
MIN_SKIP_LAYER_PIPELINE_SQNR_DB = 50.0


@pytest.mark.slow  # a whole-pipeline export of two forms
def test_skip_layer_guidance_runs_its_own_graph_in_onnxruntime(tmp_path: Path) -> None:
    from diffkiln.api import OptimizeConfig, optimize
    from diffkiln.export.onnx import export_onnx
    from diffkiln.optimizer import W8A8Config
    from diffkiln.runtime import load, open_bundle

    bundle = optimize("tiny-sd3", OptimizeConfig(out=tmp_path / "b", recipe=W8A8Config(), calib_size=2, steps=3,
                                                 progress=False, call_kwargs=tuple(SKIP_LAYER_GUIDANCE.items()),
                                                 cache_dir=tmp_path / "c"))  # fmt: skip
    out = export_onnx(open_bundle(bundle), OnnxExportConfig(tmp_path / "onnx", progress=False))
    entry = json.loads((out / "manifest.json").read_text())["components"]["transformer"]
    assert [v["options"].get("skip_layers") for v in entry["variants"]] == [[0]]

    def latents(pipe: Any) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images: torch.Tensor = pipe("a red circle", num_inference_steps=4, output_type="latent",
                                        generator=torch.Generator().manual_seed(3), **SKIP_LAYER_GUIDANCE).images
        return images

    got = sqnr_db(latents(load(bundle)), latents(load(out, backend="onnxruntime")))
    assert got >= MIN_SKIP_LAYER_PIPELINE_SQNR_DB, got
