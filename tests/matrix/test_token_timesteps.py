"""Wan 2.2 TI2V-5B's image-to-video: ``expand_timesteps`` gives the denoiser a timestep per token,
0 for the clean conditioning frame's tokens (which come first) and the step's timestep for the
others. A call's noise level is its largest timestep. Calibration recorded the first token's, and
the runtime's step selector read it too: 0 at every step, so every timestep-aware layer ran on one
step's grid, calibrated on all steps' activations at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

from diffkiln.api import OptimizeConfig, optimize
from diffkiln.generation import load_pipeline
from diffkiln.optimizer import W8A8Config
from diffkiln.zoo.architectures.components import t5_encoder, t5_tokenizer
from tests.matrix.builders import save_built
from tests.matrix.per_call import per_call_sqnr

CALL = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}
STEPS = 3
# Per-call SQNR of the timestep-aware W8A8 denoiser against FP on a held-out prompt: measured 29.5
# to 39.8 dB (29.5 to 33.1 with every call on the last step's grid).
MIN_CALL_SQNR_DB = 20.0


def _ti2v(scratch: Path) -> WanImageToVideoPipeline:
    """Wan2.2-TI2V-5B's layout at toy width: 48 latent channels from a residual VAE that patchifies
    by 2, per-token timesteps, no image encoder (the first frame is a latent condition)."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=48, out_channels=48, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)  # fmt: skip
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                           patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48,
                           latents_std=[1.0] * 48)  # fmt: skip
    return WanImageToVideoPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 32, umt5=True), vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), image_processor=None,
                                   image_encoder=None, transformer=transformer, expand_timesteps=True)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("token-timesteps")
    folder = save_built(_ti2v, root / "folder")
    config = OptimizeConfig(out=root / "bundle", recipe=W8A8Config(timestep_aware=True), calib_size=2, steps=STEPS,
                            progress=False, call_kwargs=tuple(CALL.items()), cache_dir=root / "cache")  # fmt: skip
    return folder, optimize(str(folder), config)


def _sampler_timesteps() -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(STEPS)
    return [float(t) for t in scheduler.timesteps]


def test_each_step_is_calibrated_at_its_own_timestep(built: tuple[Path, Path]) -> None:
    plan = json.loads((built[1] / "manifest.json").read_text())["plan"]
    recorded = {tuple(lp["act"]["step_timesteps"]) for lp in plan["layers"] if lp.get("act")}
    assert len(recorded) == 1, recorded
    assert list(recorded.pop()) == pytest.approx(_sampler_timesteps(), abs=1e-3)


def test_the_runtime_selects_each_calls_step(built: tuple[Path, Path]) -> None:
    fp, q = load_pipeline(str(built[0])), load_pipeline(str(built[1]))
    selector = next(m.step_selector for m in q.transformer.modules() if hasattr(m, "step_selector"))
    seen: list[int] = []

    def after_selection(*_a: Any, **_k: Any) -> None:
        seen.append(selector.index)

    handle = q.transformer.register_forward_pre_hook(after_selection)  # runs after the selector's own
    try:
        sqnr = per_call_sqnr(fp, q, CALL, steps=STEPS)
    finally:
        handle.remove()
    assert sorted(set(seen)) == list(range(STEPS)) and seen == sorted(seen), seen
    assert min(sqnr) >= MIN_CALL_SQNR_DB, sqnr
