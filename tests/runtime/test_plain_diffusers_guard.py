"""Plain diffusers never misreads a bundle: the denoiser's config carries a ``quantization_config``
whose ``quant_method`` diffusers does not know, so ``from_pretrained`` stops before reading any
weights with a ValueError that names diffkiln and ``diffkiln.runtime.load``; a folder that
``save_pretrained`` writes from a loaded bundle keeps it (no model with missing weights, no NaN)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import build_bundle

MESSAGE = r"diffkiln bundle.*load it with diffkiln\.runtime\.load"


@pytest.fixture(scope="module", params=["unet", "dit"])
def bundle(request: pytest.FixtureRequest, random_shapes_pipelines: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    out = tmp_path_factory.mktemp("guard") / request.param
    return build_bundle(random_shapes_pipelines[request.param], W8A8Config(), out)[0]


def test_plain_diffusers_refuses_a_bundle_naming_diffkiln(bundle: Path) -> None:
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match=MESSAGE):
        DiffusionPipeline.from_pretrained(bundle)


def test_plain_diffusers_refuses_the_denoiser_folder_alone(bundle: Path) -> None:
    import json

    import diffusers

    name = json.loads((bundle / "manifest.json").read_text())["pipeline"]
    cls = getattr(diffusers, name["denoiser_class"])
    with pytest.raises(ValueError, match=MESSAGE):
        cls.from_pretrained(bundle / name["denoiser"])


def test_a_saved_loaded_bundle_is_refused_by_plain_diffusers_not_loaded_as_nan(bundle: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = load(bundle, device="cpu")
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=MESSAGE):
        DiffusionPipeline.from_pretrained(tmp_path / "saved")


def test_the_guard_does_not_change_what_diffkiln_loads(bundle: Path) -> None:
    pipe = load(bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images  # fmt: skip
    assert torch.isfinite(out).all()
