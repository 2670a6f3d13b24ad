"""Cache schedules through every stage: optimize (cache recipe, and W8A8 + cache), the bundle's
manifest, the runtime's hooks, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.api import CacheConfig, OptimizeConfig, W8A8Config, optimize
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.errors import BundleError
from diffkiln.core.plan import Plan
from diffkiln.runtime import load

STEPS = 8


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-bundles")
    common: dict[str, Any] = {"calib_size": 4, "steps": STEPS, "progress": False, "cache_dir": root / "calib"}
    cache = CacheConfig(budget=0.5, validate_samples=2)
    return {
        "cache": optimize("shapes-dit", OptimizeConfig(out=root / "cache", recipe=cache, **common)),
        "w8a8": optimize("shapes-dit", OptimizeConfig(out=root / "w8a8", recipe=W8A8Config(), cache=cache, **common)),
    }


def _sample(pipe: Any, steps: int = STEPS) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on the left", num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


@pytest.mark.parametrize("kind", ["cache", "w8a8"])
def test_schedule_round_trips_and_the_hooks_count_what_it_plans(bundles, kind: str) -> None:
    manifest = json.loads((bundles[kind] / "manifest.json").read_text())
    schedule = CacheSchedule.from_dict(manifest["cache"])
    plan = Plan.from_dict(manifest["plan"])
    assert plan.cache == schedule  # the plan's section and the manifest's are the same schedule, bit for bit
    assert Plan.from_json(plan.to_json()).cache == schedule
    assert manifest["version"] == 7 and schedule.compute_fraction <= 0.5
    pipe = load(bundles[kind])
    _sample(pipe)
    run = pipe.diffkiln_cache
    assert run.evaluated == schedule.block_evaluations() and run.compute_fraction == schedule.compute_fraction


def test_w8a8_with_cache_matches_the_uncached_bundle_on_every_computing_step(bundles) -> None:
    cached = load(bundles["w8a8"])
    uncached = load(bundles["w8a8"], cache=False)
    assert uncached.diffkiln_cache is None
    calls: list[tuple[Any, Any, torch.Tensor]] = []

    def keep(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        calls.append((args, dict(kwargs), out[0].clone()))

    handle = cached.transformer.register_forward_hook(keep, with_kwargs=True)
    _sample(cached)
    handle.remove()
    compute = cached.diffkiln_cache.steps_run
    assert len(calls) == STEPS and any(compute) and not all(compute)
    for (args, kwargs, out), computed in zip(calls, compute, strict=True):
        with torch.no_grad():
            again = uncached.transformer(*args, **kwargs)[0]
        assert torch.equal(again, out) == computed  # reusing steps differ, computing steps are exact


def test_another_step_count_is_refused(bundles) -> None:
    pipe = load(bundles["cache"])
    with pytest.raises(Exception, match=rf"for {STEPS} sampler steps, but the pipeline runs 12"):
        _sample(pipe, steps=12)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "mechanism": "teacache"}, "unknown cache mechanism"),
        (lambda c: {**c, "compute": ["yes"] * len(c["compute"])}, "list of booleans"),
        (lambda c: {**c, "blocks": ["../../etc/passwd", *c["blocks"][1:]]}, "no block"),
        (lambda c: {**c, "end": 99}, "not within"),
    ],
)
def test_a_tampered_schedule_is_a_bundle_error(bundles, tmp_path: Path, edit: Any, message: str) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundles["cache"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["cache"] = edit(manifest["cache"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load(copy)


def test_cli_builds_cache_bundles_and_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffkiln.cli import main

    common = ["--calib-size", "2", "--steps", "6", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(["optimize", "shapes-dit", "--recipe", "cache", "--cache-speedup", "2", "--out", str(tmp_path / "a"),
                 *common]) == 0  # fmt: skip
    assert "cache    " in capsys.readouterr().out
    assert main(["optimize", "shapes-dit", "--cache-budget", "0.5", "--cache-retain", "0.5", "--cache-refine", "3",
                 "--out", str(tmp_path / "b"), *common]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["quant"]["recipe"] == "w8a8" and manifest["cache"]["compute"][:3] == [True] * 3
    search = manifest["plan"]["cache"]["search"]
    assert search["config"]["refine"] == 3 and sum(r["schedule"] == "local move" for r in search["validated"]) <= 3
    assert main(["optimize", "shapes-dit", "--cache-budget", "1.5", "--out", str(tmp_path / "c1"), *common]) == 2
    assert "budget must be in (0, 1]" in capsys.readouterr().err
    assert main(["optimize", "shapes-dit", "--cache-retain", "1", "--out", str(tmp_path / "c3"), *common]) == 2
    assert "retained fraction of first steps must be in [0, 1)" in capsys.readouterr().err
    argv = ["optimize", "shapes-dit", "--cache-budget", "0.5", "--cache-speedup", "2", "--out", str(tmp_path / "c2")]
    assert main([*argv, *common]) == 2
    assert "not both" in capsys.readouterr().err


def test_report_counts_the_schedule_and_compares_with_the_uncached_bundle(bundles, tmp_path: Path) -> None:
    from diffkiln.report.evaluate import ReportConfig, report

    json_path, html_path = report(str(bundles["w8a8"]), ReportConfig(eval_size=2, progress=False, batch_size=6),
                                  tmp_path / "r")  # fmt: skip
    data = json.loads(json_path.read_text())
    cache = data["cache"]
    schedule = CacheSchedule.from_dict(json.loads((bundles["w8a8"] / "manifest.json").read_text())["cache"])
    assert data["settings"]["steps"] == STEPS  # the schedule's step count, not the model's default
    assert cache["compute_fraction"] == pytest.approx(schedule.compute_fraction)  # counted by the hooks
    assert cache["schedule"] == schedule.pattern
    assert cache["uncached"]["fidelity_vs_fp"]["latent_sqnr_db"] > cache["fidelity_vs_fp"]["latent_sqnr_db"]
    assert set(cache["uncached"]["quality"]) >= {"content_accuracy", "content_accuracy_pairs"}
    page = html_path.read_text()
    assert "Cache schedule" in page and "<svg" in page


def test_cache_sweep_builds_one_bundle_per_budget_from_one_calibration(tmp_path: Path) -> None:
    from diffkiln.api import build_cache_sweep

    config = OptimizeConfig(out=tmp_path / "sweep", recipe=W8A8Config(), calib_size=2, steps=STEPS, progress=False,
                            cache_dir=tmp_path / "c")  # fmt: skip
    build = build_cache_sweep("shapes-dit", config, (0.4, 0.7))
    assert set(build.bundles) == {"uncached", "cache-0.4", "cache-0.7"}
    fractions = {}
    for name in ("cache-0.4", "cache-0.7"):
        schedule = CacheSchedule.from_dict(json.loads((build.bundles[name] / "manifest.json").read_text())["cache"])
        fractions[name] = schedule.compute_fraction
    assert fractions["cache-0.4"] <= 0.4 + 1e-9 < fractions["cache-0.7"] <= 0.7 + 1e-9
    assert json.loads((build.bundles["uncached"] / "manifest.json").read_text())["cache"] == {}
    with pytest.raises(Exception, match=r"compute fractions in \(0, 1\]"):
        build_cache_sweep("shapes-dit", config, (0.5, 1.5))


def test_mixed_recipe_composes_with_a_cache(tmp_path: Path) -> None:
    from diffkiln.cli import main

    out = tmp_path / "b"
    argv = ["optimize", "tiny-pixart", "--recipe", "mixed", "--avg-weight-bits", "6", "--cache-budget", "0.5",
            "--calib-size", "2", "--steps", "4", "--select-prompts", "2", "--sensitivity-prompts", "2",
            "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quant"]["recipe"] == "mixed" and manifest["version"] == 7
    pipe = load(out)
    pipe.set_progress_bar_config(disable=True)
    from diffkiln.zoo.catalog import TINY_CATALOG

    kwargs = next(dict(e.call_kwargs) for e in TINY_CATALOG if e.name == "tiny-pixart")
    pipe("a cat", num_inference_steps=4, output_type="latent", **kwargs)
    assert pipe.diffkiln_cache.compute_fraction == CacheSchedule.from_dict(manifest["cache"]).compute_fraction


def test_generate_defaults_to_the_schedule_step_count(bundles, tmp_path: Path) -> None:
    from diffkiln.cli import main

    assert main(["generate", str(bundles["cache"]), "--prompt", "a red circle on the left", "--out", str(tmp_path),
                 "--no-progress"]) == 0  # fmt: skip
    assert any(tmp_path.glob("*.png"))
    assert main(["generate", str(bundles["cache"]), "--prompt", "a red circle", "--steps", "12", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2  # fmt: skip
