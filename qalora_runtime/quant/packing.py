"""GPTQ-compatible bit packing of integer levels into int32 words.

GPTQ packs ``bits``-wide levels along one dimension as a little-endian bit
stream: level ``j`` of a run of 32 occupies stream bits ``[bits*j, bits*j+bits)``
and the stream is cut into 32-bit words. For 2/4/8 bits each word holds
``32/bits`` whole levels; for 3 bits, 32 levels fill exactly 3 words and levels
10 and 21 straddle a word boundary. This matches AutoGPTQ/GPTQModel byte for
byte, so a GPTQ ``qweight`` (packed along the input dim) and ``qzeros`` (packed
along the output dim) are read and written without conversion.
"""

from __future__ import annotations

import torch

from .spec import SUPPORTED_BITS


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits}; supported: {SUPPORTED_BITS}")


def pack_int32(levels: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer ``levels`` in ``[0, 2**bits)`` along ``dim`` into int32 words.

    ``levels.shape[dim]`` must be a multiple of 32; the packed size along ``dim``
    is ``shape[dim] * bits // 32``.
    """
    _check_bits(bits)
    if levels.dim() != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(levels.shape)}")
    if levels.shape[dim] % 32 != 0:
        raise ValueError(f"size {levels.shape[dim]} along dim {dim} is not a multiple of 32")
    x = levels.movedim(dim, 0).to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << bits)):
        raise ValueError(f"levels out of range for {bits}-bit packing")
    rows, cols = x.shape
    chunks = x.reshape(rows // 32, 32, cols)
    words = torch.zeros(rows // 32, bits, cols, dtype=torch.int64)
    for j in range(32):
        offset = bits * j
        word, shift = divmod(offset, 32)
        words[:, word] |= (chunks[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # 3-bit levels 10 and 21 spill into the next word
            words[:, word + 1] |= chunks[:, j] >> (32 - shift)
    words = words.reshape(rows * bits // 32, cols)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int32 levels along ``dim``."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"unpack_int32 expects a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.shape[dim] % bits != 0:
        raise ValueError(
            f"packed size {packed.shape[dim]} along dim {dim} is not a multiple of bits={bits}"
        )
    if 32 % bits == 0:
        return _unpack_aligned(packed, bits, dim)
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    rows, cols = w.shape
    words = w.reshape(rows // bits, bits, cols)
    mask = (1 << bits) - 1
    out = torch.empty(rows // bits, 32, cols, dtype=torch.int64)
    for j in range(32):
        word, shift = divmod(bits * j, 32)
        val = words[:, word] >> shift
        if shift + bits > 32:
            val = val | (words[:, word + 1] << (32 - shift))
        out[:, j] = val & mask
    return out.reshape(rows * 32 // bits, cols).to(torch.int32).movedim(0, dim).contiguous()


def _unpack_aligned(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """2/4/8 bits: whole levels per word, so one broadcast shift-and-mask unpacks everything.

    Load time is dominated by unpacking (kernels repack from GPTQ layout), hence this
    vectorized path; an arithmetic right shift of a negative int32 is harmless under the mask.
    """
    w = packed.movedim(dim, 0)
    rows, cols = w.shape
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, per_word, 1)
    out = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(rows * per_word, cols).movedim(0, dim).contiguous()
