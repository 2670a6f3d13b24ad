"""Each class of the test matrix, and each image-to-image and inpainting class
(test_image_conditioned.py), exported whole to ONNX, loaded with the onnxruntime backend and run to
its decoded output, against the torch bundle: ``python -m tests.matrix.onnx_pipelines_survey
[NAME ...]`` (about 7 minutes on two cores). Not a test: the suite runs this for LTX, SVD, Stable
Audio and the 9-channel inpainting UNet only; this measures every class, for the docs."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffkiln.api import OptimizeConfig, convert, optimize
from diffkiln.core.metrics import sqnr_db
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.export.onnx.check import bundle_call
from diffkiln.generation import load_pipeline
from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline
from diffkiln.zoo.registry import resolve_target
from tests.matrix.builders import build
from tests.matrix.test_image_conditioned import CALL_KWARGS, CLASSES, build_image_class
from tests.matrix.test_matrix import BUILTIN, NAMES, _call_kwargs


def _output(pipe: Any, call: dict[str, Any]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    first = pipe(**call, generator=torch.Generator().manual_seed(0))[0]
    return torch.stack([torch.as_tensor(x) for x in first]) if isinstance(first, list) else torch.as_tensor(first)


def survey(name: str, root: Path) -> str:
    """One class: export whole, run both pipelines for 2 steps on the export's own call; one line."""
    if name in CLASSES:
        folder, call_kwargs = build_image_class(name, root / name), CALL_KWARGS.get(name, {})
    else:
        folder = resolve_target(name).path if name in BUILTIN else build(name, root / name)
        call_kwargs = _call_kwargs(name)
    config = OptimizeConfig(out=root / f"{name}-b", calib_size=2, steps=2, progress=False,
                            call_kwargs=tuple(call_kwargs.items()))  # fmt: skip
    bundle = optimize(str(folder), config)
    out = convert(bundle, OnnxExportConfig(root / f"{name}-onnx", progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["skipped_components"]:
        return f"{name}: skipped {manifest['skipped_components']}"
    ort_pipe, pipe = load_onnx_pipeline(out, torch.device("cpu")), load_pipeline(str(bundle))
    call = {**bundle_call(pipe, pipe.diffkiln_manifest, OnnxExportConfig.prompt), "num_inference_steps": 2}
    call.pop("generator", None)
    if "output_type" in call:
        call["output_type"] = "pt"
    got, ref = _output(ort_pipe, call), _output(pipe, call)
    graphs = sorted(manifest["components"]) + [
        f"{n}.encode" for n, e in manifest["components"].items() if e.get("encoder")
    ]
    return f"{name}: {float(sqnr_db(ref, got)):.1f} dB, output {tuple(got.shape)}, graphs {graphs}"


def main(names: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="onnx-survey-"))
    for name in names or [*NAMES, *sorted(CLASSES)]:
        start = time.perf_counter()
        try:
            line = survey(name, root)
        except Exception as exc:  # a survey: report every class, whatever fails
            line = f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}"
        print(f"{line} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
