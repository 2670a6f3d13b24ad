"""Packed 4-, 3- and 2-bit weights: bit-exact round trips, layout, and clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkiln.core.packing import pack_weights, packed_length, unpack_weights


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    rows=st.integers(1, 5),
    n=st.integers(1, 37),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_then_unpack_is_bit_exact(bits: int, rows: int, n: int, seed: int) -> None:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_weights(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack_weights(packed, bits, n), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_storage_is_bits_per_value(bits: int) -> None:
    q = torch.zeros(64, 1024, dtype=torch.int8)
    assert pack_weights(q, bits).numel() == 64 * 1024 * bits // 8


def test_nibble_order_is_lowest_index_in_lowest_bits() -> None:
    # [1, -1] -> low nibble 0x1, high nibble 0xF -> 0xF1; 2-bit [1, 0, -1, -2] -> 0b10_11_00_01.
    assert pack_weights(torch.tensor([[1, -1]], dtype=torch.int8), 4).tolist() == [[0xF1]]
    assert pack_weights(torch.tensor([[1, 0, -1, -2]], dtype=torch.int8), 2).tolist() == [[0b10110001]]


def test_3bit_codes_form_a_little_endian_24_bit_word() -> None:
    # Codes 0..7 as unsigned 3-bit fields: word = sum(u_i << 3i); -1 is 0b111, -4 is 0b100.
    q = torch.tensor([[1, 2, 3, -1, -4, 0, 0, 1]], dtype=torch.int8)
    word = sum((int(c) & 7) << (3 * i) for i, c in enumerate(q[0]))
    assert pack_weights(q, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    # A ninth code starts a new word: 8 codes per 3 bytes, padded.
    assert packed_length(9, 3) == 6 and packed_length(8, 3) == 3


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_extreme_codes_round_trip(bits: int) -> None:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.tensor([[lo, hi, lo, hi, 0, -1, lo]], dtype=torch.int8)
    assert torch.equal(unpack_weights(pack_weights(q, bits), bits, q.shape[-1]), q)


def test_out_of_range_codes_are_refused_with_the_range() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_weights(torch.tensor([[8]], dtype=torch.int8), 4)


@pytest.mark.parametrize("bits", [1, 8])
def test_unsupported_bit_widths_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="2, 3 or 4"):
        pack_weights(torch.zeros(1, 4, dtype=torch.int8), bits)


def test_wrong_lengths_and_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_weights(torch.zeros(1, 3, dtype=torch.uint8), 4, 10)
    with pytest.raises(ValueError, match="uint8"):
        unpack_weights(torch.zeros(1, 3, dtype=torch.int8), 4, 6)
    with pytest.raises(ValueError, match="int8"):
        pack_weights(torch.zeros(1, 4, dtype=torch.int32), 4)
