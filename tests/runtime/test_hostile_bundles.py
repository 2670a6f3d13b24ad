"""Hand-written malicious bundles: each is refused with a BundleError naming the problem, nothing
outside the bundle is opened (an audit hook watches ``open``), and no code the bundle names runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diffkiln.core.errors import BundleError
from diffkiln.core.schema import file_digest
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import build_bundle

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside `_watched`


@pytest.fixture
def watched() -> Iterator[list[str]]:
    """The paths ``open`` is called on while the test runs."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module")
def bundle(random_shapes_pipelines: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "unet-w8a8"
    return build_bundle(random_shapes_pipelines["unet"], W8A8Config(), out)[0]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle beside a decoy file the attacks point at."""
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    (tmp_path / "decoy.safetensors").write_bytes(b"decoy")
    return dst


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _resign(path: Path, manifest: dict[str, Any], rel: str) -> None:
    """Update a file's checksum in the manifest, as an attacker who edits a bundle would."""
    f = path / rel
    manifest["files"][rel] = {"sha256": file_digest(f), "bytes": f.stat().st_size}


def _refused(path: Path, match: str, watched: list[str], tmp_path: Path) -> None:
    watched.clear()  # only what the loader opens
    with pytest.raises(BundleError, match=match):
        load(path, device="cpu")
    outside = [p for p in watched if Path(p).resolve().is_relative_to(tmp_path) and not
               Path(p).resolve().is_relative_to(path.resolve())]  # fmt: skip
    assert not outside, f"opened outside the bundle: {outside}"


@pytest.mark.parametrize("target", ["../decoy.safetensors", "/etc/hostname", "ABSOLUTE"])
def test_a_weights_file_outside_the_bundle_is_refused(bundle: Path, tmp_path: Path, watched: list[str],
                                                      target: str) -> None:  # fmt: skip
    path = _copy(bundle, tmp_path)
    target = str(tmp_path / "decoy.safetensors") if target == "ABSOLUTE" else target
    _edit(path, lambda m: m["quant"].__setitem__("weights_file", target))
    _refused(path, "weights_file", watched, tmp_path)


def test_a_weights_file_missing_from_the_files_table_is_refused(bundle: Path, tmp_path: Path,
                                                               watched: list[str]) -> None:  # fmt: skip
    path = _copy(bundle, tmp_path)
    _edit(path, lambda m: m["files"].pop(m["quant"]["weights_file"]))
    _refused(path, "not a listed file", watched, tmp_path)


def test_a_files_entry_outside_the_bundle_reveals_nothing(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    _edit(path, lambda m: m["files"].__setitem__("../../../../etc/passwd", {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(BundleError, match="leaves the bundle") as err:
        load(path, device="cpu")
    assert str(os.stat("/etc/passwd").st_size) not in str(err.value).replace("bytes': 1", "")


def test_a_symlink_inside_the_bundle_is_refused(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    weights = json.loads((path / "manifest.json").read_text())["quant"]["weights_file"]
    (path / weights).unlink()
    (path / weights).symlink_to(tmp_path / "decoy.safetensors")
    _refused(path, "symbolic link", watched, tmp_path)


def test_an_unlisted_symlink_to_a_folder_is_refused(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    (path / "escape").symlink_to(tmp_path)
    _refused(path, "symbolic link", watched, tmp_path)


@pytest.mark.parametrize("where", ["manifest.json", "listed", "unlisted"])
def test_a_fifo_never_hangs_the_loader(bundle: Path, tmp_path: Path, watched: list[str], where: str) -> None:
    path = _copy(bundle, tmp_path)
    weights = json.loads((path / "manifest.json").read_text())["quant"]["weights_file"]
    target = {"manifest.json": "manifest.json", "listed": weights, "unlisted": "extra.pipe"}[where]
    (path / target).unlink(missing_ok=True)
    os.mkfifo(path / target)
    _refused(path, "not a regular file|FIFO", watched, tmp_path)


def test_a_model_index_entry_naming_a_module_runs_no_code(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "evil_payload.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    index = json.loads((path / "model_index.json").read_text())
    index["vae"] = ["evil_payload", "Anything"]
    (path / "model_index.json").write_text(json.dumps(index))
    _edit(path, lambda m: _resign(path, m, "model_index.json"))
    sys.path.insert(0, str(tmp_path))  # as under `python -c` / `python -m` run from the bundle's parent
    try:
        with pytest.raises(BundleError, match="evil_payload"):
            load(path, device="cpu")
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists() and "evil_payload" not in sys.modules


def test_a_duplicated_json_key_is_refused(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"format":', '"format": "x", "format":', 1))
    _refused(path, "duplicate JSON key 'format'", watched, tmp_path)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("layers not a list", "plan: malformed plan"),
        ("another format", "plan: not a diffkiln plan"),
        ("layer without a name", "plan: malformed plan"),
    ],
)
def test_a_malformed_plan_section_is_refused(bundle: Path, tmp_path: Path, watched: list[str], case: str,
                                             match: str) -> None:  # fmt: skip
    def change(m: dict[str, Any]) -> None:
        if case == "layers not a list":
            m["plan"]["layers"] = 7
        elif case == "another format":
            m["plan"]["format"] = "x"
        else:
            del m["plan"]["layers"][0]["name"]

    path = _copy(bundle, tmp_path)
    _edit(path, change)
    _refused(path, match, watched, tmp_path)


def _rewrite(path: Path, rel: str, edit: Callable[[str], str]) -> None:
    """Edit one listed file's text and re-sign it, as an attacker who rewrites a bundle would."""
    f = path / rel
    f.write_text(edit(f.read_text()))
    _edit(path, lambda m: _resign(path, m, rel))


@pytest.mark.parametrize(
    ("rel", "edit", "match"),
    [
        ("unet/config.json", lambda t: t[: len(t) // 2], "unet/config.json is not valid JSON"),
        ("scheduler/scheduler_config.json", lambda t: t[: len(t) // 2], "scheduler_config.json is not valid JSON"),
        ("unet/config.json", lambda t: t.replace('"DownBlock2D"', '"DownBlock2D", "DownBlock2D"', 1),
         "cannot build the UNet2DConditionModel"),
        ("tokenizer/tokenizer_config.json", lambda t: t.replace('"model_max_length"', '"model_max_,ength"'),
         "tokenizer 'tokenizer' has model_max_length None"),
        ("tokenizer/tokenizer_config.json", lambda t: t.replace('"<|endoftext|>"', '"<|endoftextt>"'),
         "tokenizer 'tokenizer' has vocab"),
    ],
    ids=["truncated denoiser config", "truncated scheduler config", "inconsistent denoiser config",
         "dropped model_max_length", "renamed pad token"],
)  # fmt: skip
def test_a_re_signed_config_or_tokenizer_edit_is_refused_at_load(bundle: Path, tmp_path: Path, watched: list[str],
                                                                 rel: str, edit: Callable[[str], str],
                                                                 match: str) -> None:  # fmt: skip
    path = _copy(bundle, tmp_path)
    _rewrite(path, rel, edit)
    _refused(path, match, watched, tmp_path)


def test_a_deeply_nested_manifest_is_refused(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    text = (path / "manifest.json").read_text()
    deep = "[" * 200_000 + "]" * 200_000
    (path / "manifest.json").write_text(text.replace('"cache": {}', f'"cache": {{}}, "x": {deep}', 1))
    _refused(path, "nests deeper", watched, tmp_path)


def test_an_oversized_manifest_is_refused(bundle: Path, tmp_path: Path, watched: list[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path = _copy(bundle, tmp_path)
    monkeypatch.setattr("diffkiln.core.confine.MAX_JSON_BYTES", (path / "manifest.json").stat().st_size - 1)
    _refused(path, "capped", watched, tmp_path)


def test_an_unlisted_pickled_weight_file_is_never_unpickled(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    (path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    _refused(path, "not listed", watched, tmp_path)
    assert not any(p.endswith(".bin") for p in watched)  # what the loader opened


def test_a_listed_pickle_in_place_of_safetensors_is_refused(bundle: Path, tmp_path: Path, watched: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import pickle

    import torch

    def unpickled(*_a: object, **_k: object) -> None:
        raise AssertionError("the loader unpickled a bundle file")

    monkeypatch.setattr(torch, "load", unpickled)
    monkeypatch.setattr(pickle, "load", unpickled)
    monkeypatch.setattr(pickle, "loads", unpickled)
    path = _copy(bundle, tmp_path)
    vae = path / "vae"
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")

    def change(m: dict[str, Any]) -> None:
        m["files"].pop("vae/diffusion_pytorch_model.safetensors")
        _resign(path, m, "vae/diffusion_pytorch_model.bin")

    _edit(path, change)
    _refused(path, "vae", watched, tmp_path)  # hashed as a listed file, never unpickled


def test_a_clean_bundle_opens_nothing_outside_itself(bundle: Path, tmp_path: Path, watched: list[str]) -> None:
    path = _copy(bundle, tmp_path)
    watched.clear()
    load(path, device="cpu")
    outside = [p for p in watched if Path(p).resolve().is_relative_to(tmp_path) and not
               Path(p).resolve().is_relative_to(path.resolve())]  # fmt: skip
    assert not outside and any(Path(p).resolve().is_relative_to(path.resolve()) for p in watched)


def _layer_edit(path: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Edit the weights file's tensors and the manifest's layer metadata, then re-sign both, as an
    attacker who rewrites a bundle would: only the value rules can catch it."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((path / "manifest.json").read_text())
    rel = manifest["quant"]["weights_file"]
    tensors = load_file(str(path / rel))
    edit(tensors, manifest["quant"]["layers"])
    save_file(tensors, str(path / rel))
    _resign(path, manifest, rel)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _first(layers: dict[str, Any], kind: str) -> str:
    return next(n for n, info in layers.items() if info["meta"]["kind"] == kind)


def _tensor_attack(case: str) -> tuple[Callable[[dict[str, Any], dict[str, Any]], None], str]:
    import torch

    def on(kind: str, f: Callable[[dict[str, Any], str, dict[str, Any]], None]) -> Callable[..., None]:
        return lambda t, layers: f(t, _first(layers, kind), layers)

    attacks: dict[str, tuple[Callable[..., None], str]] = {
        "empty weight_scale": (on("conv", lambda t, n, _: t.__setitem__(f"{n}::weight_scale", torch.zeros(0))),
                               "weight_scale must have shape"),
        "short weight_scale": (on("linear", lambda t, n, _: t.__setitem__(f"{n}::weight_scale",
                                                                         t[f"{n}::weight_scale"][:-1].clone())),
                               "weight_scale must have shape"),
        "NaN scale": (on("linear", lambda t, n, _: t[f"{n}::weight_scale"].__setitem__(0, float("nan"))),
                      "NaN or infinite"),
        "inf act scale": (on("linear", lambda t, n, _: t.__setitem__(f"{n}::act_scale", torch.tensor(float("inf")))),
                          "act_scale holds NaN or infinite"),
        "zero scale": (on("conv", lambda t, n, _: t[f"{n}::weight_scale"].__setitem__(0, 0.0)), "> 0"),
        "negative scale": (on("linear", lambda t, n, _: t[f"{n}::weight_scale"].__setitem__(1, -1.0)), "> 0"),
        "zero point 1000": (on("linear", lambda t, n, _: t.__setitem__(f"{n}::act_zero_point",
                                                                       torch.tensor(1000, dtype=torch.int32))),
                            "inside the 8-bit grid"),
        "conv stride 0": (on("conv", lambda t, n, layers: layers[n]["meta"].__setitem__("stride", [0, 0])),
                          "stride"),
        "act_bits 1e308": (on("linear", lambda t, n, layers: layers[n]["meta"].__setitem__("act_bits", 1e308)),
                           "act_bits"),
        "conv declared as linear": (on("conv", lambda t, n, layers: layers[n]["meta"].__setitem__("kind", "linear")),
                                    "2 dimensions"),
        "unknown tensor": (on("linear", lambda t, n, _: t.__setitem__(f"{n}::payload", torch.zeros(3))),
                           "unknown tensors"),
        "NaN float tensor": (lambda t, _: t.__setitem__(next(k for k in t if k.startswith("fp::") and
                                                             t[k].is_floating_point()),
                                                        torch.full_like(t[next(k for k in t if k.startswith("fp::") and
                                                                               t[k].is_floating_point())],
                                                                        float("nan"))),
                             "NaN or infinite"),
        "integer float tensor": (lambda t, _: t.__setitem__(next(k for k in t if k.startswith("fp::") and
                                                                 t[k].is_floating_point()),
                                                            t[next(k for k in t if k.startswith("fp::") and
                                                                   t[k].is_floating_point())].to(torch.uint8)),
                                 "is torch.uint8; this model's is torch.float32"),
    }  # fmt: skip
    return attacks[case]


@pytest.mark.parametrize("case", ["empty weight_scale", "short weight_scale", "NaN scale", "inf act scale",
                                  "zero scale", "negative scale", "zero point 1000", "conv stride 0",
                                  "act_bits 1e308", "conv declared as linear", "unknown tensor",
                                  "NaN float tensor", "integer float tensor"])  # fmt: skip
def test_re_signed_bad_values_are_refused_before_any_kernel(bundle: Path, tmp_path: Path, watched: list[str],
                                                            case: str) -> None:  # fmt: skip
    path = _copy(bundle, tmp_path)
    edit, match = _tensor_attack(case)
    _layer_edit(path, edit)
    _refused(path, match, watched, tmp_path)
