"""Device names as users give them (``--device``), resolved to torch devices. Below the stages and
light (torch only), so that the command line refuses a bad or absent device before it loads a model."""

from __future__ import annotations

import importlib

import torch

from diffkiln.core.errors import InvalidInputError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "npu" (or "cuda:1", ...) to a torch device.

    "auto" prefers an Ascend NPU (when torch_npu is installed and sees one), then CUDA, then CPU.

    Raises:
        InvalidInputError: an unknown device name, or a device this machine does not have (a
            ``ValueError``).
    """
    if device == "auto":
        try:
            importlib.import_module("torch_npu")
            if torch.npu.is_available():  # type: ignore[attr-defined]
                return torch.device("npu")
        except ImportError:
            pass
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "npu"):
        raise InvalidInputError(f"unknown device {device!r}; valid: auto, cpu, cuda, npu")
    if kind == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "torch sees no CUDA device (driver, or CUDA_VISIBLE_DEVICES)")  # fmt: skip
        raise InvalidInputError(f"device 'cuda' requested but {why}; use --device cpu or auto")
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise InvalidInputError("device 'npu' needs torch_npu; install diffkiln[npu] on an Ascend host") from None
    return torch.device(device)
