"""Sensitivity groups from the data flow, simulated quantization, and the resumable sensitivity analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.optimizer import SearchContext, W8A8Config, make_plan
from diffkiln.optimizer.roles import LayerRole, sensitivity_groups
from diffkiln.optimizer.sensitivity import SensitivityConfig, SensitivityTable, analyze_sensitivity
from diffkiln.optimizer.simulate import SimChoice, layer_sims, simulated
from tests.runtime_e2e_helpers import CACHE, PROMPTS


def _setup(pipe):
    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=4, batch_size=4, cache_dir=CACHE, progress=False))
    base = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="test"))
    return stats, base


def _groups(pipe, den, **overrides):
    stats, _ = _setup(pipe)
    return sensitivity_groups(stats.graph, find_quantizable_layers(den), **overrides)


def test_groups_follow_the_data_flow_not_names(random_shapes_pipelines) -> None:
    # The names only check the result: the groups come from which tensors meet where.
    unet_roles = _groups(random_shapes_pipelines["unet"], random_shapes_pipelines["unet"].unet)
    content = {n for n, r in unet_roles.items() if r is LayerRole.CONTENT}
    expected = {n for n in unet_roles if ".attn2." in n or ".ff." in n}
    assert content == expected
    # SD3-style joint attention mixes text and image tokens: all of it is content, and so are
    # both feed-forward pairs; adaptive-norm modulation is quality.
    dit = random_shapes_pipelines["dit"]
    dit_roles = _groups(dit, dit.transformer)
    assert all(r is LayerRole.CONTENT for n, r in dit_roles.items() if ".attn." in n or ".ff" in n)
    assert all(r is LayerRole.QUALITY for n, r in dit_roles.items() if "norm1" in n)


def test_group_overrides(random_shapes_pipelines) -> None:
    pipe = random_shapes_pipelines["unet"]
    roles = _groups(pipe, pipe.unet, content=("*attn1.to_q",), quality=("*attn2.to_k",))
    assert all(r is LayerRole.CONTENT for n, r in roles.items() if n.endswith("attn1.to_q"))
    assert all(r is LayerRole.QUALITY for n, r in roles.items() if n.endswith("attn2.to_k"))


def test_simulation_is_scoped_and_restores_weights(random_shapes_pipelines) -> None:
    pipe = random_shapes_pipelines["unet"]
    stats, base = _setup(pipe)
    den = pipe.unet
    sims = layer_sims(base, stats, den)
    name = next(n for n in sims if ".attn2.to_k" in n)
    layer = find_quantizable_layers(den)[name]
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), simulated(den, {name: SimChoice(2, 8)}, sims):
        assert not torch.equal(layer.weight, before)
        assert layer._forward_pre_hooks
        raise RuntimeError("boom")
    assert torch.equal(layer.weight, before) and not layer._forward_pre_hooks
    with pytest.raises(KeyError, match="no layer"), simulated(den, {"nope": SimChoice(4)}, sims):
        pass


def _analysis(pipe, cache: Path | None, on_result=None) -> SensitivityTable:
    stats, base = _setup(pipe)
    den = pipe.unet
    roles = sensitivity_groups(stats.graph, find_quantizable_layers(den))
    sims = layer_sims(base, stats, den)
    content = [n for n in sims if roles[n] is LayerRole.CONTENT][:2]
    quality = [n for n in sims if roles[n] is LayerRole.QUALITY][:2]
    cfg = SensitivityConfig(weight_candidates=(2, 8), prompts=1, quality_steps=2, cache_dir=cache, progress=False)
    cands = {n: [2, 8] for n in content + quality}
    return analyze_sensitivity(pipe, stats, base, roles, sims, cands, cfg, on_result=on_result)


def test_sensitivity_resumes_after_interruption(random_shapes_pipelines, tmp_path: Path) -> None:
    pipe = random_shapes_pipelines["unet"]
    first: list[object] = []

    def stop_after_three(entry: object) -> None:
        first.append(entry)
        if len(first) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _analysis(pipe, tmp_path, stop_after_three)
    log = next((tmp_path / "sensitivity").glob("*.jsonl"))
    with log.open("a") as f:
        f.write('{"layer": "cut sh')  # a line cut short by a crash is dropped on resume
    resumed: list[object] = []
    table = _analysis(pipe, tmp_path, resumed.append)
    total = 4 * 2 + 4  # 4 layers x (w2, w8) + 4 activation trials
    assert len(table.entries) == total and len(resumed) == total - 3
    fresh = _analysis(pipe, None)
    assert [e.value for e in table.entries] == pytest.approx([e.value for e in fresh.entries], rel=1e-6)
    again: list[object] = []
    _analysis(pipe, tmp_path, again.append)
    assert again == []  # everything cached


def test_fewer_bits_hurt_more_and_table_round_trips(random_shapes_pipelines) -> None:
    table = _analysis(random_shapes_pipelines["unet"], None)
    for layer in table.roles:
        assert table.error(layer, "weight", 2) > table.error(layer, "weight", 8)
        assert table.error(layer, "weight", 16) == 0.0
    metrics = {e.role: e.metric for e in table.entries}
    assert metrics == {"content": "ssim", "quality": "sqnr_db"}
    again = SensitivityTable.from_dict(table.to_dict())
    assert again.entries == table.entries and again.roles == table.roles
    with pytest.raises(KeyError, match="measured"):
        table.error(next(iter(table.roles)), "weight", 4)
    with pytest.raises(ValueError, match="sensitivity table"):
        SensitivityTable.from_dict({"format": "other"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"weight_candidates": (5,)}, "2, 3, 4, 8"), ({"act_candidates": (4,)}, "8"), ({"workers": 0}, "workers")],
    ids=["weight-3-bits", "act-4-bits", "zero-workers"],
)
def test_bad_sensitivity_settings_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SensitivityConfig(**kwargs)  # type: ignore[arg-type]


def test_workers_give_the_same_results_as_one_process(tmp_path: Path) -> None:
    import functools

    from diffkiln.generation import load_pipeline
    from diffkiln.zoo.registry import resolve_target

    target = resolve_target("tiny-pixart")  # built on first use; workers load it by name
    pipe = load_pipeline(target)
    reload = functools.partial(load_pipeline, "tiny-pixart")
    stats = calibrate(
        pipe,
        CalibrationConfig(
            PROMPTS[:1], steps=2, cache_dir=CACHE, progress=False, call_kwargs=tuple(target.call_kwargs.items())
        ),
    )
    base = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="tiny-pixart"))
    den = pipe.transformer
    roles = sensitivity_groups(stats.graph, find_quantizable_layers(den))
    sims = layer_sims(base, stats, den)
    names = [n for n in sims if roles[n] is LayerRole.CONTENT][:2] + [n for n in sims if roles[n] is LayerRole.QUALITY][
        :2
    ]
    cands = {n: [4] for n in names}
    results = {}
    for workers in (1, 2):
        cfg = SensitivityConfig(weight_candidates=(4,), prompts=1, quality_steps=2, workers=workers, progress=False)
        table = analyze_sensitivity(pipe, stats, base, roles, sims, cands, cfg, reload=reload)
        results[workers] = [(e.layer, e.target, e.value) for e in table.entries]
    assert [r[:2] for r in results[1]] == [r[:2] for r in results[2]]
    assert [r[2] for r in results[1]] == pytest.approx([r[2] for r in results[2]], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="reload"):
        analyze_sensitivity(pipe, stats, base, roles, sims, cands, SensitivityConfig(workers=2, progress=False))


def test_latency_table_times_every_candidate(random_shapes_pipelines) -> None:
    from diffkiln.optimizer.latency import measure_layer_latency

    pipe = random_shapes_pipelines["unet"]
    stats, base = _setup(pipe)
    names = [lp.name for lp in base.layers if lp.quantized][:3]
    table = measure_layer_latency(pipe, base, stats, {n: (2, 4, 8, 16) for n in names}, repeats=2)
    assert set(table.ms) == set(names)
    assert all(set(v) == {2, 4, 8, 16} and min(v.values()) > 0 for v in table.ms.values())
    assert table.total({n: 8 for n in names}) == pytest.approx(sum(table.ms[n][8] for n in names))
