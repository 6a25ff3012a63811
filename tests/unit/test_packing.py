"""GPTQ bit packing: round trips for every width and a byte-level check against AutoGPTQ's pack loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_runtime.quant.packing import pack_int32, unpack_int32

BITS = (2, 3, 4, 8)


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """Transcription of AutoGPTQ's QuantLinear.pack loop (qlinear_cuda_old.py) for qweight."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(32, 1), (64, 7), (128, 96), (256, 33)])
def test_round_trip_dim0(bits: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    levels = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32)
    packed = pack_int32(levels, bits, dim=0)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0] * bits // 32, shape[1])
    assert torch.equal(unpack_int32(packed, bits, dim=0), levels)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_dim1(bits: int) -> None:
    levels = torch.randint(0, 1 << bits, (5, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_int32(levels, bits, dim=1)
    assert packed.shape == (5, 96 * bits // 32)
    assert torch.equal(unpack_int32(packed, bits, dim=1), levels)
    # Packing along dim 1 is packing the transpose along dim 0.
    assert torch.equal(packed, pack_int32(levels.t().contiguous(), bits, dim=0).t())


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    blocks=st.integers(1, 4),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    dim=st.sampled_from((0, 1)),
)
def test_round_trip_property(bits: int, blocks: int, cols: int, seed: int, dim: int) -> None:
    shape = (blocks * 32, cols) if dim == 0 else (cols, blocks * 32)
    levels = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    assert torch.equal(unpack_int32(pack_int32(levels, bits, dim=dim), bits, dim=dim), levels)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_levels_round_trip(bits: int) -> None:
    """All-max levels set the sign bit of every word (int32 wrap) and must survive."""
    levels = torch.full((64, 3), (1 << bits) - 1, dtype=torch.int32)
    packed = pack_int32(levels, bits)
    assert (packed == -1).all()
    assert torch.equal(unpack_int32(packed, bits), levels)


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_autogptq_pack_loop(bits: int) -> None:
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 1 << bits, size=(128, 24))
    ours = pack_int32(torch.from_numpy(levels).to(torch.int32), bits, dim=0).numpy()
    assert np.array_equal(ours, autogptq_pack_rows(levels, bits))


def test_3bit_straddling_levels() -> None:
    """Levels 10 and 21 of a 3-bit run cross word boundaries: bit 30-31 | bit 0, bit 31 | bits 0-1."""
    levels = torch.zeros(32, 1, dtype=torch.int32)
    levels[10, 0] = 0b111
    levels[21, 0] = 0b111
    words = pack_int32(levels, 3).view(-1).tolist()
    as_u32 = [w & 0xFFFFFFFF for w in words]
    assert as_u32 == [0b11 << 30, (1 << 31) | 0b1, 0b11]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pack_int32(torch.zeros(31, 2, dtype=torch.int32), 4), "not a multiple of 32"),
        (lambda: pack_int32(torch.full((32, 1), 16, dtype=torch.int32), 4), "out of range"),
        (lambda: pack_int32(torch.zeros(32, 1, dtype=torch.int32), 5), "unsupported bits"),
        (lambda: unpack_int32(torch.zeros(4, 1, dtype=torch.int64), 4), "must be int32"),
        (lambda: unpack_int32(torch.zeros(4, 1, dtype=torch.int32), 3), "not a multiple of bits"),
    ],
)
def test_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
