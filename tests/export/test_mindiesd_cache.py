"""A bundle's cache schedule as MindIE-SD's CacheConfig, run by MindIE-SD's DiTBlockCache as
re-implemented from its source (tests/export/mindiesd_contract.py), against diffkiln's hooks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffkiln.api import CacheConfig, OptimizeConfig, W8A8Config, convert, optimize
from diffkiln.core.arguments import bind_call
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.export.mindiesd import MindieExportConfig
from diffkiln.export.mindiesd.cache import mindiesd_cache_config
from diffkiln.generation import load_pipeline
from diffkiln.nn.cache import cache_schedule_applied
from tests.export.mindiesd_contract import DiTBlockCacheAgent

STEPS = 10


class _AgentHook(ModelHook):
    """What a MindIE-SD integration does around each block call: ``agent.apply(block, ...)``, with the
    block's outputs put in MindIE-SD's order (hidden_states first)."""

    def __init__(self, agent: DiTBlockCacheAgent, hidden_index: int) -> None:
        super().__init__()
        self.agent, self.hidden_index = agent, hidden_index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = bind_call(module, args, kwargs)
        original = self.fn_ref.original_forward

        def run(**kw: Any) -> Any:
            out = original(**kw)
            return (out[self.hidden_index], out[1 - self.hidden_index]) if isinstance(out, tuple) else out

        out = self.agent.apply(run, **bound)
        return (out[1], out[0]) if isinstance(out, tuple) and self.hidden_index == 1 else out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("md-cache")
    config = OptimizeConfig(out=root / "b", recipe=W8A8Config(), cache=CacheConfig(budget=0.6, validate_samples=2),
                            deploy_target="mindiesd", calib_size=4, steps=STEPS, progress=False,
                            cache_dir=root / "calib")  # fmt: skip
    return Path(optimize("shapes-dit", config))


def _latents(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on the left", num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_target_schedule_is_written_as_cache_config_and_mindiesd_runs_it_as_diffkiln_does(bundle, tmp_path) -> None:
    schedule = CacheSchedule.from_dict(json.loads((bundle / "manifest.json").read_text())["cache"])
    assert schedule.mechanism.value == "residual" and not schedule.extrapolate
    out = convert(bundle, MindieExportConfig(tmp_path / "md"))
    config = json.loads((out / "mindiesd_cache_config.json").read_text())
    meta = json.loads((out / "diffkiln_export.json").read_text())
    assert meta["cache"]["expressible"] and config["method"] == "dit_block_cache"
    assert config["blocks_count"] == len(schedule.blocks) and config["steps_count"] == STEPS
    # On the FP model: diffkiln's hooks against MindIE-SD's agent driven by the exported config.
    pipe = load_pipeline("shapes-dit")
    with cache_schedule_applied(pipe.transformer, schedule, pipe.scheduler):
        ours = _latents(pipe)
    agent = DiTBlockCacheAgent(config)
    streams = {s.argument: s.output_index for s in schedule.streams}
    for name in schedule.blocks:
        block = pipe.transformer.get_submodule(name)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            _AgentHook(agent, streams["hidden_states"]), "mindiesd.cache_agent"
        )
    theirs = _latents(pipe)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    full = _latents(load_pipeline("shapes-dit"))
    assert not torch.allclose(full, theirs, atol=1e-3)  # the cache did reuse


def test_a_schedule_without_that_form_is_named_in_the_export(tmp_path) -> None:
    config = OptimizeConfig(out=tmp_path / "b", recipe=W8A8Config(), cache=CacheConfig(budget=0.5, validate_samples=2),
                            calib_size=4, steps=STEPS, progress=False, cache_dir=tmp_path / "calib")  # fmt: skip
    bundle = optimize("shapes-dit", config)
    schedule = CacheSchedule.from_dict(json.loads((Path(bundle) / "manifest.json").read_text())["cache"])
    expected, why = mindiesd_cache_config(schedule)
    out = convert(bundle, MindieExportConfig(tmp_path / "md"))
    meta = json.loads((out / "diffkiln_export.json").read_text())
    assert meta["cache"]["expressible"] is (expected is not None)
    assert (out / "mindiesd_cache_config.json").exists() is (expected is not None)
    if expected is None:
        assert meta["cache"]["note"] == why and "MindIE-SD" in why
