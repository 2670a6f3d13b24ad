"""Sub-byte weight packing: 4-bit weights two per byte, 3-bit weights eight per three bytes,
2-bit weights four per byte.

Values are signed two's-complement codes (4-bit: [-8, 7], 3-bit: [-4, 3], 2-bit: [-2, 1]) packed
along the last dimension as a little-endian bit stream: lowest index in the lowest bits (the
nibble order of ``torch_npu.npu_convert_weight_to_int4pack`` and of most int4 GEMM kernels).
3-bit codes go in 24-bit words of eight codes (bytes: bits 0-7, 8-15, 16-23 of the word), so a
word never straddles a row. A last dimension that is not a multiple of the codes per unit (byte,
or 3-byte word) is padded with zero codes; unpacking takes the original length back. Pure torch,
so every backend can unpack inside its kernel path; packing then unpacking is bit-exact.
"""

from __future__ import annotations

import torch

__all__ = [
    "GROUP_MULT_MAX",
    "PACKABLE_BITS",
    "apply_group_mult",
    "check_group_mult",
    "pack_weights",
    "packed_length",
    "unpack_codes",
    "unpack_weights",
]

GROUP_MULT_MAX = 15
"""The largest group multiplier (a uint4): a 4-bit code (|q| <= 8) times 15 stays within int8."""

PACKABLE_BITS = (2, 3, 4)
"""Bit-widths stored packed (8-bit weights stay plain int8)."""


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: a byte for 2 and 4 bits, a 24-bit word for 3 bits."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"packed weights have 2, 3 or 4 bits, got {bits}; 8-bit weights are stored as int8")
    return (8, 3) if bits == 3 else (8 // bits, 1)


def packed_length(n: int, bits: int) -> int:
    """Bytes needed along the packed dimension for ``n`` codes of ``bits`` bits.

    Args:
        n: number of codes along the last dimension.
        bits: 2, 3 or 4.
    """
    codes, nbytes = _unit(bits)
    return (n + codes - 1) // codes * nbytes


def pack_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes of ``bits`` bits along the last dimension into uint8.

    Args:
        q: int8 tensor (..., n) whose values lie in [-2^(bits-1), 2^(bits-1) - 1].
        bits: 2, 3 or 4.

    Returns:
        uint8 tensor (..., :func:`packed_length` (n, bits)).

    Raises:
        ValueError: bits other than 2, 3 or 4, a non-int8 tensor, or values outside the range
            (the message gives the offending range).
    """
    per_unit, nbytes = _unit(bits)
    if q.dtype != torch.int8:
        raise ValueError(f"pack_weights needs int8 codes, got {q.dtype}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"{bits}-bit codes must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]; "
            f"quantize to {bits} bits first"
        )
    n = q.shape[-1]
    pad = packed_length(n, bits) // nbytes * per_unit - n
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    mask = (1 << bits) - 1
    codes = (q.to(torch.int32) & mask).reshape(*q.shape[:-1], -1, per_unit)
    word = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(per_unit):
        word |= codes[..., i] << (i * bits)
    if nbytes == 1:
        return word.to(torch.uint8)
    parts = [((word >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(nbytes)]
    return torch.stack(parts, dim=-1).reshape(*q.shape[:-1], -1)


def unpack_weights(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack uint8 bytes written by :func:`pack_weights` back to int8 codes.

    Args:
        packed: uint8 tensor (..., m).
        bits: 2, 3 or 4.
        n: the original length of the last dimension (``m == packed_length(n, bits)``).

    Raises:
        ValueError: bits other than 2, 3 or 4, a non-uint8 tensor, or a length that does not match.
    """
    per_unit, nbytes = _unit(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_weights needs uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    mask = (1 << bits) - 1
    if nbytes == 1:
        word = packed.to(torch.int32)
    else:
        b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, nbytes)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(0, per_unit * bits, bits, dtype=torch.int32, device=packed.device)
    codes = (word.unsqueeze(-1) >> shifts) & mask  # (..., units, per_unit), unsigned codes
    signed = torch.where(codes >= 2 ** (bits - 1), codes - (1 << bits), codes).to(torch.int8)
    return signed.reshape(*packed.shape[:-1], -1)[..., :n].contiguous()


def apply_group_mult(q: torch.Tensor, group_mult: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 (N, K) codes ``q * group_mult``, each uint8 multiplier of ``group_mult`` (N, groups)
    repeated over its group's ``group_size`` inputs (two-level grouped weights).

    Args:
        q: int8 (N, K) 4-, 3- or 2-bit codes.
        group_mult: uint8 (N, ceil(K / group_size)) multipliers in 1..GROUP_MULT_MAX (checked
            once by the caller, e.g. when a layer loads: see :func:`check_group_mult`).
        group_size: inputs per group.
    """
    mult = group_mult.to(torch.int16).repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    return (q.to(torch.int16) * mult).to(torch.int8)


def check_group_mult(group_mult: torch.Tensor, n: int, k: int, group_size: int) -> None:
    """Raise ValueError unless ``group_mult`` is uint8 (n, ceil(k / group_size)) within 1..15."""
    want = (n, -(-k // group_size))
    if group_mult.dtype != torch.uint8 or tuple(group_mult.shape) != want:
        raise ValueError(f"group multipliers must be uint8 {want}, got {group_mult.dtype} {tuple(group_mult.shape)}")
    if group_mult.numel() and (int(group_mult.min()) < 1 or int(group_mult.max()) > GROUP_MULT_MAX):
        raise ValueError(f"group multipliers must lie in 1..{GROUP_MULT_MAX} so that codes stay int8")


def unpack_codes(
    packed: torch.Tensor, bits: int, k: int, group_mult: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """The int8 (N, K) GEMM codes of packed (N, bytes) weights: unpacked, times their two-level group
    multipliers where there are any (then each code x multiplier is an int8 code on the per-channel scale).

    Args:
        packed: uint8 (N, packed_length(k, bits)).
        bits: 2, 3 or 4.
        k: the unpacked row length.
        group_mult: uint8 (N, ceil(k / group_size)) multipliers, or None. Default None.
        group_size: inputs per group when ``group_mult`` is given. Default None.
    """
    codes = unpack_weights(packed, bits, k)
    if group_mult is None:
        return codes
    if group_size is None:
        raise ValueError("group multipliers need their group_size")
    return apply_group_mult(codes, group_mult, group_size)
