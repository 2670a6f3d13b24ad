"""Derived buffers: tables the denoiser's constructor rebuilds are not stored, and are checked at load."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffkiln.core.derived import DerivedBuffer, check_derived_buffers, fingerprint
from diffkiln.core.errors import BundleError
from diffkiln.export.derived import find_derived_buffers
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import load
from diffkiln.runtime.inspect import denoiser_sizes
from tests.runtime_e2e_helpers import PROMPTS, build_bundle, latents


@pytest.fixture(scope="module")
def dit_bundle(random_shapes_pipelines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("derived") / "dit-w8a8"
    return build_bundle(random_shapes_pipelines["dit"], W8A8Config(), out)[0]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_constructor_tables_are_found_and_rounding_is_recorded(random_shapes_pipelines) -> None:
    den = random_shapes_pipelines["dit"].transformer
    found = find_derived_buffers(den)
    assert set(found) == {"pos_embed.pos_embed"}
    assert found["pos_embed.pos_embed"].round is None and found["pos_embed.pos_embed"].persistent
    # A model loaded from an FP16 checkpoint holds the table rounded to float16: still derived.
    original = den.pos_embed.pos_embed.clone()
    try:
        den.pos_embed.pos_embed.copy_(original.half().float())
        assert find_derived_buffers(den)["pos_embed.pos_embed"].round == "float16"
        den.pos_embed.pos_embed.add_(1e-3)  # an edited (or learned) table is stored, not derived
        assert find_derived_buffers(den) == {}
    finally:
        den.pos_embed.pos_embed.copy_(original)


def test_bundle_leaves_them_out_and_rebuilds_them_exactly(random_shapes_pipelines, dit_bundle: Path) -> None:
    manifest = json.loads((dit_bundle / "manifest.json").read_text())
    assert manifest["version"] == 4
    assert set(manifest["quant"]["derived_buffers"]) == {"pos_embed.pos_embed"}
    with safe_open(str(dit_bundle / manifest["quant"]["weights_file"]), "pt") as f:
        assert "fp::pos_embed.pos_embed" not in set(f.keys())
    pipe = random_shapes_pipelines["dit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same machine: bit-identical, no warning
        loaded = load(dit_bundle, device="cpu")
    assert torch.equal(loaded.transformer.pos_embed.pos_embed, pipe.transformer.pos_embed.pos_embed)
    # The FP16 reference still counts the table the FP16 checkpoint holds.
    stored, fp16 = denoiser_sizes(dit_bundle, manifest)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert fp16 == 2 * (params + pipe.transformer.pos_embed.pos_embed.numel())
    assert stored < fp16


@pytest.mark.parametrize(
    ("edit", "outcome"),
    [("sha256", "warns"), ("sample", "rejects"), ("abs_sum", "rejects"), ("shape", "rejects"), ("missing", "rejects")],
)
def test_a_rebuilt_table_that_differs_is_refused(dit_bundle: Path, tmp_path: Path, edit: str, outcome: str) -> None:
    b = _copy(dit_bundle, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    records = manifest["quant"]["derived_buffers"]
    record = records["pos_embed.pos_embed"]
    if edit == "sha256":  # another CPU's last-bit sine: within the tolerance, loads with a warning
        record["sha256"] = "0" * 64
    elif edit == "sample":  # another diffusers formula
        record["sample"][5] += 1e-3
    elif edit == "abs_sum":
        record["abs_sum"] *= 1.001
    elif edit == "shape":
        record["shape"][1] += 1
    else:
        records["not.a.buffer"] = record
    (b / "manifest.json").write_text(json.dumps(manifest))
    if outcome == "warns":
        with pytest.warns(UserWarning, match="within float"):
            loaded = load(b, device="cpu")
        assert latents(loaded, PROMPTS[:1], steps=2).isfinite().all()
    else:
        with pytest.raises(BundleError, match=r"derived|does not build"):
            load(b, device="cpu")


def test_one_ulp_passes_the_check_and_a_real_difference_does_not() -> None:
    table = torch.linspace(-1, 1, 1000).sin().reshape(1, 10, 100)
    record = fingerprint(table, None, True)
    module = torch.nn.Module()
    module.register_buffer("t", torch.nextafter(table, torch.full_like(table, 2.0)))
    with pytest.warns(UserWarning, match="within float"):
        check_derived_buffers(module, {"t": record.to_dict()})
    module.register_buffer("t", table + 1e-4)
    with pytest.raises(BundleError, match="sampled values differ"):
        check_derived_buffers(module, {"t": record.to_dict()})


def test_malformed_record_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="malformed"):
        DerivedBuffer.from_dict({"round": None})
    with pytest.raises(ValueError, match="rounding"):
        DerivedBuffer("bfloat8", True, (1,), "float32", "", (0.0,), 0.0)
    with pytest.raises(BundleError, match="dtype"):
        DerivedBuffer.from_dict({**fingerprint(torch.ones(3), None, True).to_dict(), "dtype": "nn"})
