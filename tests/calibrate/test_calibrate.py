from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from diffkiln.calibrate import CalibrationConfig, CalibrationStats, calibrate
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.pipelines import find_denoiser

PROMPTS = ("a red circle on the left", "a blue square above a green triangle", "a yellow circle at the top")


def _no_hooks_left(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_calibration_records_every_layer_per_step_and_finds_bos(
    arch: str, random_shapes_pipelines, tmp_path: Path
) -> None:
    pipe = random_shapes_pipelines[arch]
    cfg = CalibrationConfig(
        PROMPTS, steps=3, guidance=5.0, batch_size=2, samples_per_step=64, cache_dir=tmp_path, progress=False
    )
    stats = calibrate(pipe, cfg)
    denoiser = find_denoiser(pipe)
    layers = find_quantizable_layers(denoiser)
    assert set(stats.layers) == set(layers) and len(layers) > 10
    assert _no_hooks_left(denoiser)
    assert len(stats.timesteps) == 3
    for name, st in stats.layers.items():
        assert st.min.shape == (3,) and st.samples.shape == (3, 64)
        assert bool((st.min <= st.max).all())
        channels = layers[name].in_features if isinstance(layers[name], nn.Linear) else layers[name].in_channels
        assert st.channel_absmax.shape == (3, channels)
        assert float(st.samples.min()) >= float(st.min.min()) and float(st.samples.max()) <= float(st.max.max())
    # CLIP is causal: position 0 (BOS) is the same for every prompt, and nothing else is.
    assert stats.invariant_positions() == [0]


def test_second_calibration_comes_from_the_cache(random_shapes_pipelines, tmp_path: Path, monkeypatch) -> None:
    pipe = random_shapes_pipelines["unet"]
    cfg = CalibrationConfig(PROMPTS[:2], steps=2, batch_size=2, samples_per_step=32, cache_dir=tmp_path, progress=False)
    first = calibrate(pipe, cfg)
    assert len(list(tmp_path.glob("calib-*.safetensors"))) == 1

    @functools.wraps(type(pipe).__call__)  # keeps the signature the inputs are chosen from
    def refuse(*_a, **_k):
        raise AssertionError("recalibrated although the cache holds these stats")

    monkeypatch.setattr(type(pipe), "__call__", refuse)
    second = calibrate(pipe, cfg)
    assert second.model_hash == first.model_hash and second.timesteps == first.timesteps
    for name, st in first.layers.items():
        assert torch.equal(st.samples, second.layers[name].samples)
        assert torch.equal(st.channel_absmax, second.layers[name].channel_absmax)
    # Other settings are another cache entry.
    monkeypatch.undo()
    calibrate(
        pipe,
        CalibrationConfig(PROMPTS[:2], steps=2, batch_size=2, samples_per_step=16, cache_dir=tmp_path, progress=False),
    )
    assert len(list(tmp_path.glob("calib-*.safetensors"))) == 2


def test_hooks_are_removed_even_when_the_body_raises() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError), scoped_hooks() as hooks:
        hooks.add_forward_hook("a", lin, lambda *a: None)
        with pytest.raises(ValueError, match="already registered"):
            hooks.add_forward_hook("a", lin, lambda *a: None)
        raise RuntimeError("boom")
    assert not lin._forward_hooks


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [({"prompts": ()}, "needs prompts, or a number of samples"), ({"prompts": ("x",), "steps": 0}, "steps")],
)
def test_config_rejects_bad_values(kwargs, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        CalibrationConfig(**kwargs)


def test_stats_round_trip_without_pickle(random_shapes_pipelines, tmp_path: Path) -> None:
    stats = calibrate(random_shapes_pipelines["unet"], CalibrationConfig(PROMPTS[:1], steps=2, progress=False))
    stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert back.invariant_positions() == stats.invariant_positions()
    assert torch.equal(back.text_embeds, stats.text_embeds)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_text_layers_are_found_from_data_with_their_invariant_bos_row(arch: str, random_shapes_pipelines) -> None:
    stats = calibrate(random_shapes_pipelines[arch], CalibrationConfig(PROMPTS, steps=2, progress=False))
    bos = stats.invariant_positions()
    text_layers = {n: st for n, st in stats.layers.items() if st.invariant_rows(bos)}
    assert text_layers, "no layer reads the text embeddings"
    for name, st in text_layers.items():
        assert st.invariant_rows(bos) == [0]
        assert st.sample_positions.shape == st.samples.shape
        # Position 0 (BOS) reads the same row for every prompt; the prompt positions do not.
        assert float(st.text_spread[0]) == 0.0, name
        assert float(st.text_spread[1:].max()) > 0.0, name
    if arch == "unet":
        # Exactly the cross-attention keys and values read the text (found by data, not names).
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in text_layers)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_an_overflowing_layer_is_named_with_its_step(random_shapes_pipelines, tmp_path, arch: str) -> None:
    import copy

    from diffkiln.core.errors import NonFiniteError
    from diffkiln.core.layers import find_quantizable_layers

    pipe = copy.deepcopy(random_shapes_pipelines[arch])
    denoiser = pipe.unet if arch == "unet" else pipe.transformer
    name, layer = list(find_quantizable_layers(denoiser).items())[3]
    with torch.no_grad():
        layer.weight.mul_(1e38)  # finite in float32; its outputs are not
    cfg = CalibrationConfig(PROMPTS[:2], steps=2, batch_size=2, samples_per_step=32, cache_dir=tmp_path, progress=False)
    with pytest.raises(NonFiniteError, match=r"layer .* at step 0 holds .* infinite values") as err:
        calibrate(pipe, cfg)
    assert f"layer {name}'s output" in str(err.value) or "'s input" in str(err.value)  # here, or downstream
    # The component, too: a sampler may run several of one class (Wan 2.2's experts).
    assert str(err.value).startswith(f"calibration of {'unet' if arch == 'unet' else 'transformer'}: layer ")
