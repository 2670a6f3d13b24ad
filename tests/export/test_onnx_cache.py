"""A cache schedule in the ONNX export: onnxruntime follows it as the torch runtime does, a 'whole'
schedule on the one denoiser graph, a block-range one ('residual', 'deep') through the fill graph's
extra outputs and the reuse graph that leaves the reused blocks out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.api import CacheConfig, OptimizeConfig, W8A8Config, convert, optimize
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.metrics import sqnr_db
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.runtime import load
from tests.tiers import tiered

STEPS = 6


def _latents(pipe: object) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe("a red circle on the left", num_inference_steps=STEPS, output_type="latent",  # type: ignore[operator]
                max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images  # fmt: skip


class _Exports(dict[tuple[str, str], tuple[Path, Path]]):
    """(model, mechanism) -> (bundle, its ONNX export), each built once, on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, key: tuple[str, str]) -> tuple[Path, Path]:
        model, mechanism = key
        where = self.root / f"{model}-{mechanism}"
        cache = CacheConfig(budget=0.5 if mechanism == "whole" else 0.7, mechanisms=(mechanism,), validate_samples=1,
                            refine=0)  # fmt: skip
        bundle = optimize(model, OptimizeConfig(out=where / "b", recipe=W8A8Config(), cache=cache, calib_size=2,
                                                steps=STEPS, progress=False, cache_dir=where / "c"))  # fmt: skip
        # Static: one trace per graph, at the shapes these tests run (dynamic fill and reuse graphs:
        # test_int_sized_denoiser_follows_a_block_range_schedule_at_a_size_no_export_saw).
        config = OnnxExportConfig(where / "onnx", progress=False, dynamic=False)
        self[key] = (Path(bundle), convert(bundle, config))
        return self[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("cache-exports"))


# CI: output reuse, and a UNet's block range; a DiT's residual range (dynamic, on LTX, below) in
# ``make test-slow``.
CASES = [("shapes-dit", "whole"), ("shapes-dit", "residual"), ("shapes-unet", "deep")]


@pytest.mark.parametrize(("model", "mechanism"), tiered(CASES, slow=[("shapes-dit", "residual")]))
def test_onnx_folder_follows_the_bundles_schedule_as_the_torch_runtime_does(
    exports: _Exports, model: str, mechanism: str
) -> None:
    bundle, out = exports[model, mechanism]
    schedule = CacheSchedule.from_dict(json.loads((Path(bundle) / "manifest.json").read_text())["cache"])
    assert schedule.mechanism.value == mechanism and not all(schedule.compute)
    manifest = json.loads((out / "manifest.json").read_text())
    assert CacheSchedule.from_dict(manifest["cache"]) == schedule
    ort_pipe = load(out, "cpu", backend="onnxruntime")
    got = _latents(ort_pipe)
    run = ort_pipe.diffkiln_cache
    assert run.evaluated == schedule.block_evaluations() and run.compute_fraction == schedule.compute_fraction
    if mechanism == "whole":
        assert manifest["cache_graph"] is None
    else:
        graph = manifest["cache_graph"]
        assert graph["mechanism"] == mechanism and graph["check"]["ok"] and graph["check"]["sqnr_db"] >= 20.0
        assert manifest["components"][manifest["pipeline"]["denoiser"]]["cache_outputs"] == len(graph["cache_values"])
        # The reuse graph leaves the reused blocks out: fewer weights, not just unused ones.
        full, reuse = (out / "denoiser.onnx").stat().st_size, (out / graph["file"]).stat().st_size
        assert reuse < 0.9 * full, (reuse, full)
    # onnxruntime's QDQ graphs against the torch runtime, both on the same schedule (then both
    # uncached); end-to-end parity on these 2-sample W8A8 bundles measured 17-25 dB, code flips on
    # grid boundaries compounding over steps (lowest: the UNet uncached, 17.1 dB).
    reference = _latents(load(bundle, "cpu"))
    assert sqnr_db(reference.numpy(), got.numpy()) > 15.0
    uncached = load(out, "cpu", backend="onnxruntime", cache=False)
    assert uncached.diffkiln_cache is None
    plain = _latents(uncached)
    assert sqnr_db(_latents(load(bundle, "cpu", cache=False)).numpy(), plain.numpy()) > 15.0
    assert sqnr_db(plain.numpy(), got.numpy()) < 60.0  # the schedule changed the result: it ran


def test_a_block_range_schedule_without_its_reuse_graph_is_refused(exports: _Exports, tmp_path: Path) -> None:
    from diffkiln.core.errors import BundleError
    from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline, read_onnx_manifest

    out = Path(shutil.copytree(exports["shapes-unet", "deep"][1], tmp_path / "onnx"))  # built for the test above

    manifest = read_onnx_manifest(out)
    original = manifest["cache_graph"]
    # a reuse graph outside the export's listed files: the schema refuses it before any file is read
    manifest["cache_graph"] = {**original, "file": "../elsewhere.onnx"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"cache_graph\.file '\.\./elsewhere\.onnx' is not a listed file"):
        load_onnx_pipeline(out, torch.device("cpu"))
    # no reuse graph at all for a block-range schedule
    manifest["cache_graph"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="reuse graph"):
        load_onnx_pipeline(out, torch.device("cpu"))


def test_int_sized_denoiser_follows_a_block_range_schedule_at_a_size_no_export_saw(tmp_path: Path) -> None:
    """LTX passes its latent ``height``, ``width`` and ``num_frames`` to the transformer as ints.
    The fill graph keeps its cached outputs with those as int64 inputs, and the reuse graph takes
    them too, dynamic where the fill graph is: the folder follows the schedule at another size."""
    from tests.matrix.builders import MATRIX, build

    entry = MATRIX["ltx"]
    cache = CacheConfig(budget=0.7, mechanisms=("residual",), validate_samples=1, refine=0)
    bundle = optimize(str(build("ltx", tmp_path / "ltx")), OptimizeConfig(
        out=tmp_path / "b", recipe=W8A8Config(), cache=cache, calib_size=2, steps=STEPS, progress=False,
        call_kwargs=tuple(entry.call_kwargs.items()), cache_dir=tmp_path / "c"))  # fmt: skip
    out = convert(bundle, OnnxExportConfig(tmp_path / "onnx", progress=False,
                                           check_call_kwargs=tuple(entry.second_call_kwargs.items())))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    fill, reuse = manifest["components"]["transformer"], manifest["cache_graph"]
    ints = {"height", "width", "num_frames"}
    for graph in (fill, reuse):
        assert ints <= {i["name"] for i in graph["inputs"]} and graph["dynamic_axes"]["hidden_states"] == [0, 1]
    assert len(fill["outputs"]) == 1 + fill["cache_outputs"] and reuse["check"]["ok"]
    call = {**entry.call_kwargs, "height": 96, "width": 64, "num_frames": 17}  # neither the export's nor its check's

    def latents(pipe: Any) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=STEPS, output_type="latent", **call,
                    generator=torch.Generator().manual_seed(0)).frames  # fmt: skip

    ort_pipe = load(out, "cpu", backend="onnxruntime")
    got = latents(ort_pipe)
    schedule = CacheSchedule.from_dict(manifest["cache"])
    assert ort_pipe.diffkiln_cache.evaluated == schedule.block_evaluations() and not all(schedule.compute)
    assert sqnr_db(latents(load(bundle, "cpu")).numpy(), got.numpy()) > 15.0
