"""Mutate bundles as an attacker would, and classify what the runtime does with each.

:func:`mutate` applies one mutation to a copy of a bundle, drawn from a ``random.Random``: a value
somewhere in the manifest replaced (numbers out of range, NaN, paths out of the bundle, wrong
types, deep nesting), a key removed or added, a tensor of the weights file changed (NaN, inf, zero,
negative, huge values; truncated; another dtype; removed; added), or a file damaged (a byte flipped,
truncated, removed, an extra file, a symlink). Most mutations are then *re-signed* (the files
table updated), so only the schema and value rules can catch them.

:func:`classify` loads the mutated bundle and, when it loads, runs it once. The outcomes:
``bundle_error`` (refused with a BundleError), ``same`` (loaded; outputs equal the reference),
``valid`` (loaded and ran without error: a valid, different model), and the failures ``escape``
(another exception type at load), ``first_use`` (loaded, then failed when run). Crashes and hangs
are caught by the caller, which runs cases in a child process (tools/fuzz_bundles.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffkiln.core.errors import BundleError
from diffkiln.core.schema import file_digest

__all__ = ["OUTCOMES", "FuzzCase", "classify", "mutate"]

OUTCOMES = ("bundle_error", "same", "valid", "escape", "first_use")
"""What :func:`classify` reports; the last two are failures."""

_NUMBERS: list[Any] = [-1, 0, 1, 2, 3, 7, 9, 255, 1 << 31, 1 << 63, -(1 << 40), 1e308, -1e308, 0.5, 1e-45]
_ODD: list[Any] = [None, True, "", "../x", "/etc/passwd", "a/../../b", [], {}, [[[[0]]]], {"x": 1}, "NaN"]


@dataclass(frozen=True)
class FuzzCase:
    """One mutation: what was changed, and whether the files table was re-signed."""

    description: str
    resigned: bool


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        root = root[p]
    return root


def _mutate_manifest(manifest: dict[str, Any], rng: random.Random) -> str:
    paths = [p for p in _paths(manifest) if p[0] != "files"] or [("format",)]
    # Favour the parts the loader acts on: layer metadata and the pipeline section.
    weighted = [p for p in paths if p[0] in ("quant", "pipeline", "version", "cache", "sparsity", "experts")]
    path = rng.choice(weighted if weighted and rng.random() < 0.8 else paths)
    parent, key = _get(manifest, path[:-1]), path[-1]
    action = rng.random()
    if action < 0.1 and isinstance(parent, dict):
        del parent[key]
        return f"manifest: removed {'.'.join(map(str, path))}"
    if action < 0.15 and isinstance(parent, dict):
        parent[f"{key}_extra"] = 1
        return f"manifest: added a key beside {'.'.join(map(str, path))}"
    old = parent[key]
    if isinstance(old, bool) or not isinstance(old, (int, float)):
        new = rng.choice(_NUMBERS + _ODD)
    else:
        new = rng.choice([*_NUMBERS, float("nan"), float("inf"), old + 1, -old, old * 1000])
    parent[key] = new
    return f"manifest: {'.'.join(map(str, path))} = {new!r}"[:200]


def _mutate_tensor(tensors: dict[str, torch.Tensor], rng: random.Random) -> str:
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    action = rng.randrange(7)
    if action == 0 and t.numel():
        flat = t.flatten().clone()
        value = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30, -1e30, 127.0, -128.0, 1000.0])
        if not t.is_floating_point():
            value = 0 if not math.isfinite(value) else int(max(min(value, 1 << 30), -(1 << 30)))
            info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
            value = value if info is None else max(min(value, info.max), info.min)
        flat[rng.randrange(flat.numel())] = value
        tensors[name] = flat.view_as(t)
        return f"tensor {name}: one element = {value}"
    if action == 1 and t.dim() and t.shape[0] > 0:
        tensors[name] = t[: t.shape[0] - 1].clone()
        return f"tensor {name}: first dimension cut by one"
    if action == 2:
        tensors[name] = t.to(rng.choice([torch.float64, torch.int32, torch.uint8, torch.float16]))
        return f"tensor {name}: dtype {tensors[name].dtype}"
    if action == 3:
        del tensors[name]
        return f"tensor {name}: removed"
    if action == 4:
        tensors[f"{name}_extra"] = torch.zeros(3)
        return f"tensor {name}_extra: added"
    if action == 5:
        tensors[name] = torch.zeros(0, dtype=t.dtype)
        return f"tensor {name}: emptied"
    if t.is_floating_point() and t.numel():
        tensors[name] = t * rng.choice([0.0, -1.0, 1e30, float("nan")])
        return f"tensor {name}: scaled"
    tensors[name] = t.reshape(-1)
    return f"tensor {name}: flattened"


def _mutate_file(path: Path, files: list[str], rng: random.Random) -> str:
    rel = rng.choice(files)
    f = path / rel
    action = rng.randrange(5)
    if action == 0 and f.stat().st_size:
        data = bytearray(f.read_bytes())
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        return f"file {rel}: bit flipped at {i}"
    if action == 1:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return f"file {rel}: truncated to half"
    if action == 2:
        f.unlink()
        return f"file {rel}: removed"
    if action == 3:
        (f.parent / "extra.bin").write_bytes(b"\x80\x04junk")
        return f"file {rel}: an extra file beside it"
    f.unlink()
    f.symlink_to(path.parent)
    return f"file {rel}: replaced by a symlink out of the bundle"


def _resign(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    for rel in list(files):
        f = path / str(rel)
        if isinstance(rel, str) and f.is_file() and not f.is_symlink():
            files[rel] = {"sha256": file_digest(f), "bytes": f.stat().st_size}


def mutate(source: Path, dest: Path, rng: random.Random) -> FuzzCase:
    """Copy ``source`` to ``dest`` and apply one mutation drawn from ``rng`` (see the module docstring)."""
    shutil.copytree(source, dest, symlinks=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    kind = rng.random()
    resign = rng.random() < 0.75
    weights = manifest.get("quant", {}).get("weights_file")  # ONNX exports have none
    if kind < 0.45 or (weights is None and kind < 0.85):
        description = _mutate_manifest(manifest, rng)
    elif kind < 0.85:  # the denoiser's weights file, or a quantized expert's
        sections = [manifest["quant"], *(e.get("quant", {}) for e in (manifest.get("experts") or {}).values())]
        rel = rng.choice([q["weights_file"] for q in sections if isinstance(q.get("weights_file"), str)])
        tensors = load_file(str(dest / rel))
        description = _mutate_tensor(tensors, rng)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / rel))
    else:
        description = _mutate_file(dest, sorted(manifest["files"]), rng)
    if resign:
        _resign(dest, manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return FuzzCase(description, resign)


def classify(bundle: Path, load: Callable[[Path], Any], run: Callable[[Any], torch.Tensor],
             reference: torch.Tensor) -> tuple[str, str]:  # fmt: skip
    """``(outcome, detail)`` of loading ``bundle`` with ``load`` and running it with ``run``
    (see the module docstring)."""
    try:
        pipe = load(bundle)
    except BundleError as exc:
        return "bundle_error", str(exc)[:200]
    except Exception as exc:  # the point: any other type is a finding
        return "escape", f"{type(exc).__name__}: {exc}"[:300]
    try:
        out = run(pipe)
    except Exception as exc:
        return "first_use", f"{type(exc).__name__}: {exc}"[:300]
    if out.shape == reference.shape and torch.equal(out, reference):
        return "same", ""
    return "valid", "outputs differ; the bundle passed every rule"
