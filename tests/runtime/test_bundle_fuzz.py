"""A seeded, bounded fuzz of bundles: every mutation of a real W8A8 bundle (manifest values, tensors,
files; most of them re-signed) is refused with a BundleError, or loads and runs. The long run is
tools/fuzz_bundles.py."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import load
from diffkiln.testing.bundle_fuzz import classify, mutate
from tests.runtime_e2e_helpers import build_bundle

STEPS = 1


def _run(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle on the left", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images  # fmt: skip


@pytest.fixture(scope="module")
def reference(random_shapes_pipelines: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("fuzz") / "dit-w8a8"
    bundle = build_bundle(random_shapes_pipelines["dit"], W8A8Config(), out)[0]
    return bundle, _run(load(bundle, device="cpu"))


@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(seed=st.integers(0, 2**32 - 1))
def test_every_mutation_is_refused_or_loads_and_runs(reference: tuple[Path, Any], seed: int) -> None:
    bundle, expected = reference
    with tempfile.TemporaryDirectory() as tmp:
        case = mutate(bundle, Path(tmp) / "b", random.Random(seed))
        outcome, detail = classify(Path(tmp) / "b", lambda p: load(p, device="cpu"), _run, expected)
    assert outcome in ("bundle_error", "same", "valid"), f"{case.description} (re-signed: {case.resigned}): {detail}"
