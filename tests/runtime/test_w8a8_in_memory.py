"""W8A8 end to end in memory (calibrate -> plan -> freeze -> integer modules) on both architectures."""

from __future__ import annotations

import pytest

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.plan import ActMode
from diffkiln.nn import QConv, QLinear
from diffkiln.optimizer import SmoothMode, W8A8Config
from tests.runtime_e2e_helpers import PROMPTS, latents, quantize_in_memory

CONFIGS = {
    "static-bos": W8A8Config(),
    "dynamic": W8A8Config(act_mode=ActMode.DYNAMIC),
    # The grids that run on oneDNN's fast kernels on AVX2 CPUs, and smoothing on every Linear.
    "static-a7-smooth-all": W8A8Config(act_bits=7, smooth=SmoothMode.ALL),
    "static-w7-no-smooth": W8A8Config(weight_bits=7, smooth=SmoothMode.OFF),
    "static-timestep-aware": W8A8Config(timestep_aware=True),
}


@pytest.mark.parametrize("cfg_id", list(CONFIGS))
@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_w8a8_latents_track_fp(arch: str, cfg_id: str, random_shapes_pipelines) -> None:
    pipe = random_shapes_pipelines[arch]
    qpipe, plan = quantize_in_memory(pipe, CONFIGS[cfg_id])
    den = qpipe.unet if arch == "unet" else qpipe.transformer
    qmods = [m for m in den.modules() if isinstance(m, (QLinear, QConv))]
    assert len(qmods) == sum(lp.quantized for lp in plan.layers) > 10
    assert plan.avg_weight_bits < 9.0
    ref = latents(pipe, PROMPTS[:2])
    out = latents(qpipe, PROMPTS[:2])
    # Untrained weights give erratic activations; measured 15-51 dB with 8-bit grids and 9.6 dB
    # for the random UNet with 7-bit activations. The trained models' figures are in the report;
    # these floors catch a broken integer path (which gives < 0 dB).
    floor = 5.0 if "a7" in cfg_id else 10.0
    assert sqnr_db(ref, out) >= floor


def test_7_bit_grids_stay_inside_their_codes(random_shapes_pipelines) -> None:
    _, plan = quantize_in_memory(random_shapes_pipelines["unet"], CONFIGS["static-a7-smooth-all"])
    acts = [lp.act for lp in plan.layers if lp.act is not None]
    assert acts and all(a.bits == 7 and -64 <= (a.zero_point or 0) <= 63 for a in acts)
    qpipe_w7, _ = quantize_in_memory(random_shapes_pipelines["unet"], CONFIGS["static-w7-no-smooth"])
    weights = [m.codes_t() for m in qpipe_w7.unet.modules() if isinstance(m, (QLinear, QConv))]
    assert weights and max(int(w.abs().max()) for w in weights) <= 63


def test_timestep_aware_layers_switch_grids_with_the_sampler_step(random_shapes_pipelines) -> None:
    qpipe, plan = quantize_in_memory(random_shapes_pipelines["unet"], CONFIGS["static-timestep-aware"])
    acts = [lp.act for lp in plan.layers if lp.act is not None]
    assert acts and all(len(a.step_scales) == len(a.step_timesteps) == 4 for a in acts)
    q = next(m for m in qpipe.unet.modules() if isinstance(m, QLinear) and m.step_selector is not None)
    selector, timesteps = q.step_selector, q.act_timesteps
    seen = []
    handle = qpipe.unet.register_forward_pre_hook(lambda *_: seen.append(selector.index))
    try:
        latents(qpipe, PROMPTS[:1])
    finally:
        handle.remove()
    # Each of the 4 sampler steps ran on its own calibrated grid, in order (CFG shares one call).
    assert sorted(set(seen)) == list(range(len(timesteps)))
    assert selector.select(float(timesteps[2]) + 0.4) == 2
