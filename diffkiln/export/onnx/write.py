"""Writing an exported graph: the onnx-ir passes, the file (external data past protobuf's 2 GB),
the full ONNX checker, and the input/output record the manifest keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["OWN_TENSORS_FILE", "error_summary", "finish_model", "io_spec", "save_model", "save_own_tensors"]

_EXTERNAL_DATA_BYTES = 1 << 31  # protobuf's 2 GB limit on one file
OWN_TENSORS_FILE = "own_tensors.safetensors"


def error_summary(exc: BaseException) -> str:
    """The line of an exporter error that says what failed (torch.onnx puts it under "Exception summary")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "Exception summary" in line and i + 1 < len(lines):
            return lines[i + 1][:300]
    return (lines[0] if lines else repr(exc))[:300]


def io_spec(values: Any) -> list[dict[str, Any]]:
    """Each graph value's name, element type and shape (symbolic axes as their names)."""
    spec = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        spec.append({"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None, "shape": dims})
    return spec


def finish_model(program: Any, sub_byte: set[str], opset: int, float16: bool = True, prefix: str | None = None) -> Any:
    """Run the export passes on the ONNX program's model (in place); ``float16``: store float32
    initializers exact in float16 as float16; ``prefix``: the export wrapper's attribute path to
    drop from initializer names (``sub_byte`` names still carry it)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass

    from diffkiln.export.onnx.passes import (
        ClearValueMetadataPass,
        DropShapeInfoPass,
        Float16InitializersPass,
        GraphOptimizePass,
        ShortNodeNamesPass,
        StripNamePrefixPass,
        SubByteInitializersPass,
    )

    # The exporter leaves the graph unoptimized (``optimize=False``): GraphOptimizePass runs its optimizer.
    passes: list[ir.passes.PassBase] = [
        GraphOptimizePass(),
        ClearMetadataAndDocStringPass(),
        ClearValueMetadataPass(),
    ]
    if sub_byte and opset >= 21:
        passes.append(SubByteInitializersPass(sub_byte))
    if prefix:
        passes.append(StripNamePrefixPass(prefix))
    if float16:
        passes.append(Float16InitializersPass())
    passes += [DropShapeInfoPass(), ShortNodeNamesPass()]
    ir.passes.PassManager(passes)(program.model)
    return program.model


def save_model(model: Any, path: Path) -> None:
    """Save ``model`` (external data when its initializers pass 2 GB) and run the full checker on the file."""
    import onnx
    import onnx_ir as ir

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total >= _EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)


def save_own_tensors(folder: Path, name: str, tensors: dict[str, Any]) -> str | None:
    """Write a component's own tensors (:func:`~diffkiln.export.onnx.components.own_tensors`) to
    ``<name>/own_tensors.safetensors`` under ``folder``; return that relative path (None for none)."""
    from safetensors.torch import save_file

    if not tensors:
        return None
    relative = f"{name}/{OWN_TENSORS_FILE}"
    save_file(tensors, str(folder / relative))
    return relative
