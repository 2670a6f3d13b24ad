"""A loaded bundle's denoiser traces into one torch.compile graph: no graph breaks.

Users compile their denoisers; a break splits the graph (and under CUDA graphs, the capture). Checked
with the CPU backend and with the CUDA backend's kernels standing in on the CPU (the Triton int8
kernels run by Triton's interpreter, behind their custom ops), on both architectures, with BOS rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.core.pipelines import find_denoiser
from diffkiln.kernels.backends import base as backends
from diffkiln.kernels.backends.cuda import CudaBackend
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import build_bundle


@pytest.fixture(scope="module", params=["unet", "dit", "dit-timestep-aware"])
def bundle(request: pytest.FixtureRequest, random_shapes_pipelines: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    pipe = random_shapes_pipelines[request.param.split("-")[0]]
    config = W8A8Config(timestep_aware=request.param.endswith("timestep-aware"))
    return Path(build_bundle(pipe, config, tmp_path_factory.mktemp("graph") / request.param)[0])


def _denoiser_call(pipe: Any) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """The denoiser and the arguments of its first call in a one-step run."""
    denoiser = find_denoiser(pipe)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = denoiser.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipe("a red circle on the left", num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    return denoiser, *calls[0]


@pytest.mark.parametrize("backend", ["cpu", "cuda-kernels"])
def test_a_loaded_denoiser_compiles_without_graph_breaks(bundle: Path, backend: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if backend == "cuda-kernels" and bundle.name == "unet":
        pytest.skip("the interpreted kernels take half a minute on the UNet; the DiT covers the CUDA path")
    if backend == "cpu" and "timestep-aware" in bundle.name:
        pytest.skip("oneDNN takes each step's grid as a host value: the CPU reads the step index (a graph break)")
    # The first call's arguments do not depend on the denoiser's kernels: taken from a run on the
    # CPU backend, so that the interpreted Triton kernels run only for the two calls compared.
    _, args, kwargs = _denoiser_call(load(bundle, device="cpu"))
    if backend == "cuda-kernels":
        pytest.importorskip("triton")
        monkeypatch.setitem(backends._INSTANCES, "cpu", CudaBackend())
    denoiser = find_denoiser(load(bundle, device="cpu"))
    assert any(getattr(m, "bos_rows", None) is not None for m in denoiser.modules())  # the BOS path is traced
    with torch.no_grad():
        expected = denoiser(*args, **kwargs)[0]  # packs each layer for its backend on this first call
    packed = [p for m in denoiser.modules() for p in getattr(m, "_packed", {}).values()]
    if backend == "cuda-kernels":
        assert {type(p).__name__ for p in packed} == {"TritonStaticLinear"}, packed
    if "timestep-aware" in bundle.name:  # each step's grid is read by the kernels from device memory
        assert packed and all(hasattr(p, "call_step") for p in packed)
    with torch.no_grad():
        # fullgraph=True raises at the first graph break (what torch._dynamo.explain would count)
        compiled = torch.compile(denoiser, backend="eager", fullgraph=True)(*args, **kwargs)[0]
    assert torch.equal(compiled, expected)
