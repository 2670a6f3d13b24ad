"""A loaded bundle and diffusers: ``save_pretrained`` writes a complete, verified bundle that loads
to bit-identical outputs (a swapped scheduler saved as swapped; a replaced denoiser, push_to_hub,
variants and pickles refused with a BundleError), and plain diffusers never misreads a bundle: the
denoiser's config carries a ``quantization_config`` whose ``quant_method`` diffusers does not
know, so ``from_pretrained`` stops before reading any weights with a ValueError that names
diffkiln and ``diffkiln.runtime.load``."""

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


def _latents(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images  # fmt: skip


def test_save_pretrained_writes_a_bundle_that_loads_to_identical_outputs(bundle: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from diffkiln.runtime import is_bundle

    pipe = load(bundle, device="cpu")
    before = _latents(pipe)
    assert torch.isfinite(before).all()
    pipe.save_pretrained(tmp_path / "saved")
    assert is_bundle(tmp_path / "saved")
    again = load(tmp_path / "saved", device="cpu")
    assert torch.equal(_latents(again), before)
    assert type(again).__name__ == type(pipe).__name__  # the diffusers class name, in model_index.json too
    # and plain diffusers still refuses it rather than load missing weights
    with pytest.raises(ValueError, match=MESSAGE):
        DiffusionPipeline.from_pretrained(tmp_path / "saved")


def test_a_swapped_scheduler_is_saved_as_swapped(bundle: Path, tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    pipe = load(bundle, device="cpu")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = _latents(pipe)
    pipe.save_pretrained(tmp_path / "euler")
    again = load(tmp_path / "euler", device="cpu")
    assert type(again.scheduler).__name__ == "EulerDiscreteScheduler"
    assert torch.equal(_latents(again), expected)


def test_what_cannot_be_a_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    import copy

    from diffkiln.core.errors import BundleError

    pipe = load(bundle, device="cpu")
    for kwargs, match in (({"push_to_hub": True}, "uploads nothing"), ({"variant": "fp16"}, "no variants"),
                          ({"safe_serialization": False}, "no pickled")):  # fmt: skip
        with pytest.raises(BundleError, match=match):
            pipe.save_pretrained(tmp_path / "x", **kwargs)
    name = pipe.diffkiln_manifest["pipeline"]["denoiser"]
    setattr(pipe, name, copy.deepcopy(getattr(pipe, name)))  # e.g. a user's own denoiser in its place
    with pytest.raises(BundleError, match="no longer the bundle's quantized denoiser"):
        pipe.save_pretrained(tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
