"""Derived buffers: denoiser buffers that the model's own constructor rebuilds from its config.

Some denoisers keep deterministic tables as buffers: SD3's sine-cosine position table (persistent:
SD3 checkpoints store it, 113 MB in FP16 for SD3-medium), PixArt's (non-persistent), Wan's rotary
frequencies. A bundle need not store them: the exporter rebuilds the denoiser from its config,
keeps out of the weights file every buffer the constructor reproduces exactly (as is, or rounded
to float16 as an FP16 checkpoint stores it), and records for each a fingerprint; the runtime builds
the denoiser with real buffers (parameters on the meta device) and checks each derived buffer
against its fingerprint before use.

The check is bit-exact where the two machines compute the table alike (the sha256), and within a
float32 ulp otherwise (a strided sample and the absolute sum), because the math library's sine and
cosine may differ in the last bit between CPUs; a buffer that differs by more (another diffusers
formula) is a :class:`~diffkiln.core.schema.BundleError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.core.errors import BundleError

__all__ = [
    "ROUNDINGS",
    "DerivedBuffer",
    "check_derived_buffers",
    "derived_value",
    "fingerprint",
    "real_buffers_meta_params",
]

ROUNDINGS = (None, "float16")
"""How a derived buffer relates to the constructor's: as is, or rounded to float16 (a model loaded
from an FP16 checkpoint)."""

_FLOAT_DTYPES = {
    str(t).removeprefix("torch."): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_SAMPLES = 64
_ULPS = 4.0  # tolerance of the sample check, in float32 ulps of the buffer's largest magnitude


@dataclass(frozen=True)
class DerivedBuffer:
    """The manifest record of one derived buffer.

    Attributes:
        round: None (the constructor's value) or "float16" (rounded to float16 and back).
        persistent: whether the model's state_dict (its checkpoint) holds the buffer.
        shape: the buffer's shape.
        dtype: the buffer's dtype name (e.g. "float32").
        sha256: digest of the value's bytes as the exporter computed it.
        sample: ``_SAMPLES`` values at evenly spaced flat indices.
        abs_sum: the sum of absolute values (float64).
    """

    round: str | None
    persistent: bool
    shape: tuple[int, ...]
    dtype: str
    sha256: str
    sample: tuple[float, ...]
    abs_sum: float

    def __post_init__(self) -> None:
        if self.round not in ROUNDINGS:
            raise ValueError(f"derived buffer rounding must be one of {list(ROUNDINGS)}, got {self.round!r}")
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"derived buffer dtype must be one of {sorted(_FLOAT_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the manifest's ``quant.derived_buffers`` values)."""
        return {
            "round": self.round,
            "persistent": self.persistent,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sha256": self.sha256,
            "sample": list(self.sample),
            "abs_sum": self.abs_sum,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DerivedBuffer:
        """Read a manifest record.

        Raises:
            BundleError: a missing or malformed field.
        """
        try:
            return cls(
                round=d["round"],
                persistent=bool(d["persistent"]),
                shape=tuple(int(s) for s in d["shape"]),
                dtype=str(d["dtype"]),
                sha256=str(d["sha256"]),
                sample=tuple(float(v) for v in d["sample"]),
                abs_sum=float(d["abs_sum"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed derived-buffer record {d!r}: {exc}") from None


@contextlib.contextmanager
def real_buffers_meta_params() -> Iterator[None]:
    """Build modules inside the block with parameters on the meta device and real buffers, so the
    constructor computes its tables but allocates no weights (accelerate's scoped context)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def derived_value(constructed: torch.Tensor, rounding: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The buffer a derived record stands for: the constructor's value, rounded as recorded, in ``dtype``."""
    value = constructed.detach().cpu()
    if rounding == "float16":
        value = value.half()
    return value.to(dtype).contiguous()


def _sample_index(numel: int) -> torch.Tensor:
    return torch.linspace(0, numel - 1, steps=min(_SAMPLES, numel)).round().long()


def _digest(value: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major)."""
    return hashlib.sha256(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def fingerprint(value: torch.Tensor, rounding: str | None, persistent: bool) -> DerivedBuffer:
    """The record of ``value`` (the buffer as the FP model holds it)."""
    flat = value.detach().cpu().contiguous().reshape(-1)
    digest = _digest(flat)
    return DerivedBuffer(
        round=rounding,
        persistent=persistent,
        shape=tuple(value.shape),
        dtype=str(value.dtype).removeprefix("torch."),
        sha256=digest,
        sample=tuple(float(v) for v in flat[_sample_index(flat.numel())].double()),
        abs_sum=float(flat.double().abs().sum()),
    )


def _mismatch(value: torch.Tensor, record: DerivedBuffer) -> str | None:
    """None when ``value`` matches ``record`` within float32 ulps, else the reason."""
    if tuple(value.shape) != record.shape or str(value.dtype).removeprefix("torch.") != record.dtype:
        return f"shape/dtype {tuple(value.shape)}/{value.dtype}, the bundle recorded {record.shape}/{record.dtype}"
    flat = value.reshape(-1).double()
    largest = max(float(flat.abs().max()) if flat.numel() else 0.0, 1e-30)
    tol = _ULPS * largest * 2.0**-23
    worst = float((flat[_sample_index(flat.numel())] - torch.tensor(record.sample, dtype=torch.float64)).abs().max())
    if worst > tol:
        return f"sampled values differ by up to {worst:.3g} (tolerance {tol:.3g})"
    abs_sum = float(flat.abs().sum())
    if not math.isclose(abs_sum, record.abs_sum, rel_tol=_ULPS * 2.0**-23, abs_tol=tol):
        return f"absolute sum {abs_sum!r}, the bundle recorded {record.abs_sum!r}"
    return None


def check_derived_buffers(denoiser: nn.Module, records: dict[str, Any]) -> None:
    """Round each derived buffer of ``denoiser`` (built under :func:`real_buffers_meta_params`) as
    recorded, check it against its fingerprint and keep it, in place.

    Args:
        denoiser: the model, with its constructor's buffers.
        records: the manifest's ``quant.derived_buffers`` (name -> record dict).

    Raises:
        BundleError: a recorded buffer is missing, or the constructor's value differs from the
            exporter's by more than float32 rounding (another diffusers version's formula).
    """
    buffers = dict(denoiser.named_buffers())
    inexact = []
    for name, raw in records.items():
        record = DerivedBuffer.from_dict(raw)
        current = buffers.get(name)
        if current is None or current.is_meta:
            raise BundleError(f"the bundle derives buffer {name!r}, but {type(denoiser).__name__} does not build it")
        value = derived_value(current, record.round, _FLOAT_DTYPES[record.dtype])
        reason = _mismatch(value, record)
        if reason is not None:
            import diffusers

            raise BundleError(
                f"derived buffer {name!r} rebuilt by diffusers {diffusers.__version__} does not match the "
                f"bundle's: {reason}; load it with the diffusers version it was built with"
            )
        if _digest(value) != record.sha256:
            inexact.append(name)
        module_name, _, attr = name.rpartition(".")
        denoiser.get_submodule(module_name)._buffers[attr] = value
    if inexact:
        warnings.warn(
            f"{len(inexact)} derived buffer(s) (e.g. {inexact[0]!r}) match the exporting machine's within float "
            "rounding, not bit for bit (this CPU's sine/cosine differ in the last bit)",
            stacklevel=2,
        )
