"""Check a user's diffusers folder before it is loaded, so that a folder copied incompletely says
which component or file is wrong instead of failing deep inside diffusers or transformers.

Cheap by design: it reads ``model_index.json`` and each safetensors file's header (never the
tensors), so it runs before every load of a user's folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from diffkiln.core.errors import InvalidInputError, ModelNotFoundError

__all__ = ["check_pipeline_folder", "check_safetensors_file"]

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on a header


def check_safetensors_file(path: Path) -> None:
    """Raise :class:`InvalidInputError` when ``path`` is not a complete safetensors file: its
    header unreadable, or the file shorter than the tensors the header lists (a truncated copy or
    download)."""
    size = path.stat().st_size
    fix = "copy or download it again (or re-save the model with save_pretrained)"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInputError(f"{path} is not a safetensors file (only {size} bytes); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise InvalidInputError(f"{path} has a corrupt or truncated safetensors header; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise InvalidInputError(f"{path} has a corrupt safetensors header; {fix}") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path} has a corrupt safetensors header; {fix}")
    ends = [
        int(entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise InvalidInputError(f"{path} is truncated: {size} of {expected} bytes; {fix}")


def check_pipeline_folder(path: Path) -> None:
    """Check that every component ``model_index.json`` lists is present, and every weights file
    complete.

    Raises:
        ModelNotFoundError: ``model_index.json`` is unreadable, or a listed component's folder is
            missing (the message names it).
        InvalidInputError: a safetensors file is truncated or corrupt, or a sharded checkpoint's
            index names a missing shard.
    """
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}/model_index.json cannot be read ({exc}); re-save the pipeline") from None
    if not isinstance(index, dict):
        raise ModelNotFoundError(f"{path}/model_index.json is not a JSON object; re-save the pipeline")
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue  # metadata, or a component saved as None
        folder = path / name
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"{path} lists the component {name!r} ({entry[1]}) in model_index.json but has no {name}/ folder; "
                "copy the whole pipeline folder (save_pretrained writes every component)"
            )
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(weights)
        for index_file in sorted(folder.glob("*.safetensors.index.json")):
            try:
                shards = set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise InvalidInputError(f"{index_file} is corrupt; copy the component again") from None
            missing = sorted(s for s in shards if not (folder / str(s)).is_file())
            if missing:
                raise InvalidInputError(f"{index_file} names missing shards {missing}; copy the component again")
