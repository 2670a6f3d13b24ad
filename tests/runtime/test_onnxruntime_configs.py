"""The onnxruntime backend's skeletons take their own top-level tensors from an export folder's
safetensors file, and only tensors the class holds itself, in its shape (a folder is untrusted)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffkiln.core.errors import BundleError
from diffkiln.runtime.onnxruntime_configs import fill_own_tensors


class _Vae(nn.Module):
    """A VAE-like class with statistics on itself and weights in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("latents_mean", torch.zeros(4))
        self.register_buffer("frozen_scale", torch.ones(2), persistent=False)
        self.shift = nn.Parameter(torch.zeros(3))
        self.decoder = nn.Conv2d(4, 3, 1)


def _skeleton() -> nn.Module:
    with torch.device("meta"):
        return _Vae()


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "vae" / "own_tensors.safetensors"))
    return "vae/own_tensors.safetensors"


def test_buffers_and_parameters_get_their_data(tmp_path: Path) -> None:
    tensors = {"latents_mean": torch.arange(4.0), "frozen_scale": torch.tensor([2.0, 3.0]), "shift": -torch.ones(3)}
    skeleton = _skeleton()
    fill_own_tensors(skeleton, tmp_path, _write(tmp_path, tensors), "vae")
    for key, value in tensors.items():
        assert torch.equal(getattr(skeleton, key), value), key
    assert isinstance(skeleton.shift, nn.Parameter) and not skeleton.shift.requires_grad
    assert skeleton.decoder.weight.is_meta  # the rest stays without memory


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"decoder.weight": torch.zeros(3, 4, 1, 1)}, "'decoder.weight' is not a tensor the vae class holds itself"),
        ({"hook": torch.zeros(1)}, "'hook' is not a tensor the vae class holds itself"),
        ({"latents_mean": torch.zeros(5)}, r"'latents_mean' has shape \[5\], the vae class \[4\]"),
    ],
)
def test_a_tensor_the_class_does_not_hold_so_is_refused(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                                        match: str) -> None:  # fmt: skip
    with pytest.raises(BundleError, match=match):
        fill_own_tensors(_skeleton(), tmp_path, _write(tmp_path, tensors), "vae")


def test_a_file_outside_the_folder_is_never_read(tmp_path: Path) -> None:
    _write(tmp_path, {"latents_mean": torch.zeros(4)})
    with pytest.raises(BundleError, match="own_tensors"):
        fill_own_tensors(_skeleton(), tmp_path / "export", "../vae/own_tensors.safetensors", "vae")


def test_a_pickle_in_place_of_safetensors_is_refused_unopened(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "own_tensors.safetensors").write_bytes(pickle.dumps({"latents_mean": [0.0] * 4}))
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        fill_own_tensors(_skeleton(), tmp_path, "vae/own_tensors.safetensors", "vae")
