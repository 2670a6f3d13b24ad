"""The bundle manifest contract shared by export (writer) and runtime (reader).

Pure JSON helpers and the typed error; imports nothing from calibrate or optimizer, so a
deployment needs only runtime + kernels. The format is specified in docs/bundle-format.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkiln.core.confine import check_tree, confined_file, read_json_file
from diffkiln.core.errors import BundleError, OutputPathError
from diffkiln.core.manifest_schema import validate_manifest

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MANIFEST_NAME",
    "ONNX_FORMAT",
    "ONNX_VERSION",
    "PLAIN_DIFFUSERS_GUARD",
    "BundleError",
    "LoadedBundle",
    "carries_bundle_guard",
    "file_digest",
    "read_json",
    "read_manifest",
    "verify_files",
]

BUNDLE_FORMAT = "diffkiln.bundle"
BUNDLE_VERSION = 9
"""2 adds packed 4-/2-bit and weight-only layers, 3 adds packed 3-bit layers, 4 adds derived buffers
(rebuilt by the runtime, not stored), 5 adds requantized convolution outputs (``output_scale``), 6
adds module bundles (``kind: "module"``) and 1-D / 3-D convolutions, 7 adds the cache schedule
(``cache``), 8 the sparse-attention masks (``sparsity``), 9 quantized experts beside the denoiser
(``experts``: Wan 2.2's ``transformer_2``); this runtime reads 1 to 9.
Exports write the lowest version that describes the bundle, so bundles without those features stay
readable by older runtimes."""
MANIFEST_NAME = "manifest.json"
PLAIN_DIFFUSERS_GUARD = {
    "quant_method": "diffkiln: this folder is a diffkiln bundle, not a plain diffusers model; "
    "load it with diffkiln.runtime.load(folder)"
}
"""Written as the denoiser config's ``quantization_config``: diffusers' ``from_pretrained`` reads it
before any weights file and refuses an unknown ``quant_method`` with a ``ValueError`` that quotes
this text, so plain diffusers never loads a bundle's denoiser (or a folder ``save_pretrained``
wrote from a loaded bundle, which keeps the config) as a model with missing weights. It names no
code to import. docs/bundle-format.md, "Opened by plain diffusers"."""
ONNX_FORMAT = "diffkiln.onnx"
"""The manifest format of an ONNX export folder (docs/onnx-export.md)."""
ONNX_VERSION = 5
"""2: a block-range cache schedule exports its reuse graph (``cache_graph``); 3: a component's own
top-level tensors, for the loader's skeleton (``own_tensors``); 4: experts of the denoiser's class
(``pipeline.experts``, Wan 2.2's ``transformer_2``), each a graph of its own; 5: a denoiser's
several predictions (``output_fields``, LTX-2's video and audio) and a graph per form of its calls
(``variants``). A folder is written as the oldest version that holds it (3 without experts),
readable by older runtimes."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUIRED_KEYS = ("format", "version", "source", "pipeline", "quant", "bos", "sparsity", "cache", "files")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    """Parse a bundle's JSON file strictly (never unpickles): a regular file, size-capped, no
    duplicate keys, nesting capped (:func:`diffkiln.core.confine.read_json_file`).

    Raises:
        BundleError: the file is not valid JSON (corrupt or truncated) or breaks one of those rules.
    """
    return read_json_file(path)


def carries_bundle_guard(folder: Path) -> bool:
    """True when a component config directly under ``folder`` carries :data:`PLAIN_DIFFUSERS_GUARD`:
    a bundle (or a folder saved from a loaded one), even one whose manifest is gone. Small
    regular files only; an unreadable config counts as not carrying it."""
    for config in sorted(folder.glob("*/config.json"))[:64]:
        try:
            if not config.is_file() or config.is_symlink() or config.stat().st_size >= 1 << 20:
                continue
            quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(quant, dict) and quant.get("quant_method") == PLAIN_DIFFUSERS_GUARD["quant_method"]:
            return True
    return False


def read_manifest(bundle: Path) -> dict[str, Any]:
    """Read and check a bundle's manifest: JSON, format name, version and required sections.

    Raises:
        BundleError: the reason, naming the file or key at fault.
    """
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise OutputPathError(f"{bundle} is not a bundle directory; give the folder `diffkiln optimize --out` wrote")
    if not path.exists() and not path.is_symlink():
        if (bundle / "model_index.json").is_file() and not carries_bundle_guard(bundle):
            raise OutputPathError(
                f"{bundle} is a diffusers pipeline folder, not a bundle; build one with "
                f"`diffkiln optimize {bundle} --out BUNDLE` and give BUNDLE"
            )
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}; it is not a diffkiln bundle or its export was interrupted")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a diffkiln bundle manifest (format must be {BUNDLE_FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise BundleError(
            f"bundle format version {version!r} is newer than this runtime reads ({BUNDLE_VERSION}); upgrade diffkiln"
        )
    if version < 1:
        raise BundleError(f"bundle format version {version!r} is invalid")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks required section(s) {missing}")
    validate_manifest(manifest, str(path))
    return manifest


# Configs are small; vocabularies (tokenizer.json, several MB) are left to their loaders, whose
# errors the readers report as BundleError, so a load does not parse them twice.
_JSON_CHECKED_BYTES = 1 << 20


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Check the bundle's files against the manifest's ``files`` table: every entry a plain path
    inside the bundle to a regular file (:func:`~diffkiln.core.confine.confined_file`) with its
    recorded size and sha256, and nothing in the folder but those files and the manifest
    (:func:`~diffkiln.core.confine.check_tree`), so no unlisted file is ever read.

    Raises:
        BundleError: a malformed table, a path outside the bundle, a link or special file, an
            unlisted file, or a file missing, truncated or whose checksum differs.
    """
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError("the manifest's files table must map each file's relative path to its sha256 and bytes")
    for rel, info in files.items():
        if (not isinstance(info, dict) or set(info) != {"sha256", "bytes"} or not isinstance(info["bytes"], int)
                or isinstance(info["bytes"], bool) or info["bytes"] < 0 or not isinstance(info["sha256"], str)
                or not _SHA256.fullmatch(info["sha256"])):  # fmt: skip
            raise BundleError(f"files[{rel!r}] must be {{'sha256': 64 hex digits, 'bytes': a size}}")
        path = confined_file(bundle, rel)
        size = path.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"bundle file {rel} has {size} bytes, the manifest says {info['bytes']} (truncated?)")
        if file_digest(path) != info["sha256"]:
            raise BundleError(f"bundle file {rel} fails its sha256 check (corrupt or tampered)")
        if rel.endswith(".json") and size <= _JSON_CHECKED_BYTES:
            read_json_file(path, rel)  # configs: strict JSON before a library's loader reads them
    check_tree(bundle, set(files), frozenset({MANIFEST_NAME}))


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle, loaded by the runtime: what bundle converters (ONNX, MindIE-SD) read.

    Attributes:
        path: the bundle directory.
        manifest: its verified manifest.
        denoiser: the denoiser with its integer modules.
        pipeline: the diffusers pipeline around it, or None for a module bundle.
        experts: the quantized experts beside the denoiser (``manifest["experts"]``), by component name.
    """

    path: Path
    manifest: dict[str, Any]
    denoiser: Any
    pipeline: Any = None
    experts: dict[str, Any] = field(default_factory=dict)
