"""``save_pretrained`` of a pipeline :func:`diffkiln.runtime.load` returned: a complete, verified
bundle, not a diffusers folder diffusers would misread.

``load`` gives the pipeline the class :func:`bundle_pipeline_class` makes: a subclass of the
bundle's diffusers class with the same name, whose only change is ``save_pretrained``. It writes,
atomically (:mod:`diffkiln.core.atomic`):

* the denoiser (and its quantized experts) exactly as the bundle it was loaded from holds it (its
  config and the weights file of integer codes and scales, copied after the source is verified
  again: same plan, same bits);
* every other component as the pipeline holds it now, through its own ``save_pretrained``
  (safetensors only): a swapped scheduler or text encoder is saved as swapped;
* ``model_index.json`` from the pipeline, and the source's manifest with a new ``files`` table and
  the current tokenizers' fingerprints.

``load(folder)`` of the result gives the same outputs as the pipeline had. Refused with a
``BundleError`` that says why: the denoiser was replaced or re-quantized in memory, the source
bundle changed since it was loaded, ``push_to_hub`` (nothing is uploaded), a ``variant``, or
``safe_serialization=False`` (bundles hold no pickles).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffkiln.core.atomic import atomic_directory, file_table
from diffkiln.core.errors import BundleError
from diffkiln.core.schema import MANIFEST_NAME, verify_files
from diffkiln.core.tokenizer_print import tokenizer_prints

__all__ = ["bundle_pipeline_class", "save_bundle"]


def save_bundle(pipe: Any, folder: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Write ``pipe`` (a pipeline ``load`` returned) as a bundle at ``folder`` (see the module
    docstring).

    Args:
        pipe: the loaded pipeline.
        folder: where to write; replaced when it exists and ``overwrite`` (diffusers'
            ``save_pretrained`` overwrites too). Default True.

    Raises:
        BundleError: the pipeline cannot be saved as a bundle; the message says why.
    """
    source: Path | None = getattr(pipe, "diffkiln_source", None)
    manifest: dict[str, Any] | None = getattr(pipe, "diffkiln_manifest", None)
    if source is None or manifest is None:
        raise BundleError("this pipeline was not loaded from a bundle by diffkiln.runtime.load; nothing to save")
    out = Path(folder)
    if out.resolve() == source.resolve():
        raise BundleError(f"{out} is the bundle this pipeline was loaded from; save to another folder")
    quantized = {manifest["pipeline"]["denoiser"]: pipe.diffkiln_denoiser, **getattr(pipe, "diffkiln_experts", {})}
    for name, module in quantized.items():
        if getattr(pipe, name, None) is not module:
            role = "denoiser" if module is pipe.diffkiln_denoiser else "expert"
            raise BundleError(
                f"the pipeline's {name} is no longer the bundle's quantized {role}; a bundle holds only the "
                "components diffkiln compiled. Save the float pipeline with diffusers, or compile it again with "
                "diffkiln optimize"
            )
    try:
        verify_files(source, manifest)
    except BundleError as exc:
        raise BundleError(f"the bundle this pipeline was loaded from ({source}) changed since: {exc}") from None
    with atomic_directory(out, overwrite) as tmp:
        for name in quantized:
            shutil.copytree(source / name, tmp / name)
        for key, component in pipe.components.items():
            if key in quantized or component is None or not hasattr(component, "save_pretrained"):
                continue
            component.save_pretrained(tmp / key, safe_serialization=True)
        pipe.save_config(tmp)  # model_index.json
        saved = dict(manifest)
        saved["pipeline"] = {**manifest["pipeline"],
                             "components": sorted(n for n, c in pipe.components.items() if c is not None)}  # fmt: skip
        saved["tokenizers"] = tokenizer_prints(pipe.components)
        saved["files"] = file_table(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(saved, indent=2) + "\n")
    return out


def _save_pretrained(
    self: Any,
    save_directory: str | os.PathLike[str],
    safe_serialization: bool = True,
    variant: str | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """Save this pipeline as a diffkiln bundle (:func:`diffkiln.runtime.save.save_bundle`)."""
    if push_to_hub:
        raise BundleError("push_to_hub: diffkiln uploads nothing; save the bundle to a folder and upload that")
    if variant is not None:
        raise BundleError(f"variant={variant!r}: a bundle has one set of weights, no variants")
    if not safe_serialization:
        raise BundleError("safe_serialization=False: a bundle holds no pickled weights")
    save_bundle(self, save_directory)


_CLASSES: dict[type, type] = {}


def bundle_pipeline_class(cls: type) -> type:
    """``cls`` (a diffusers pipeline class) with ``save_pretrained`` writing a bundle; same name,
    so the ``model_index.json`` it writes names the diffusers class. One subclass per class."""
    if cls.__module__ == __name__:  # already one
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {
            "__module__": __name__,
            "__doc__": f"{cls.__name__} loaded from a diffkiln bundle: save_pretrained writes a bundle.",
            "save_pretrained": _save_pretrained,
        })  # fmt: skip
    return _CLASSES[cls]
