"""Repack a GPTQ-layout layer into the quad-interleaved block layout of the C++ CPU kernels.

Layout (mirrors ``csrc/qalora_layout.h``): output features are grouped in quads
(N padded to a multiple of 4 with zero columns); for each quad, each block of 32
inputs holds 4 columns x ``4*bits`` bytes of levels, so a thread streams one
contiguous buffer (3-bit: one 48-byte quad-block whose bytes mix the columns);
scales and ``s*(z - off)`` are fp32 ``[N/4, K/G, 2, 4]``.
Everything stays packed: ``bits/8`` bytes per weight plus 8 bytes per group and column.

``repack_dot`` builds the dot layout (layers whose activations are quantized to int8):
the same sizes and scales, each quad-block's levels reordered into four 32-byte
vectors so that one AVX2 ``maddubs`` + ``madd`` yields the four columns' partial sums
side by side (byte ``p`` of vector ``j``: column ``(p/4)%4``, input ``8j + 4(p/16) + p%4``).

``repack_planes`` builds the plane layout instead (2/3-bit layers that run with fp32
activations): per 16 columns and block of 32 inputs, ``bits`` planes of 16 uint32, bit
``r`` of column ``c``'s dword in plane ``j`` being bit ``j`` of the level of input
``r``; scales and ``s*z`` are fp32 ``[N/16, K/G, 2, 16]``.
"""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32
from ..quant.spec import QuantSpec


def level_offset(bits: int) -> int:
    """8-bit levels are stored signed (q - 128) so AVX2's maddubs cannot saturate."""
    return 128 if bits == 8 else 0


def _pack_quad3(q: torch.Tensor) -> torch.Tensor:
    """3-bit ``q[..., 4, 32]`` (a quad's 4 columns of one block) -> ``[..., 48]`` quad-block.

    Bytes 0-31: ``q0 | q1 << 3 | (q2 & 3) << 6``; bytes 32-47 (j < 16):
    ``q3[j] | (q2[j] >> 2) << 3 | q3[j+16] << 4 | (q2[j+16] >> 2) << 7``, see
    ``qalora_layout.h`` (the AVX2 decoder needs 8 vector ops for all 128 levels).
    """
    q0, q1, q2, q3 = q.unbind(-2)
    a = q0 | (q1 << 3) | ((q2 & 3) << 6)
    h2 = q2 >> 2
    b = q3[..., :16] | (h2[..., :16] << 3) | (q3[..., 16:] << 4) | (h2[..., 16:] << 7)
    return torch.cat([a, b], dim=-1)


def _pack_blocks(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    """``blocks[..., 4, 32]`` int levels (a quad's columns) -> ``[..., 16*bits]`` uint8 in kernel order."""
    b = blocks.to(torch.int32)
    if bits == 3:
        return _pack_quad3(b).to(torch.uint8)
    if bits == 4:
        out = b[..., :16] | (b[..., 16:] << 4)
    elif bits == 2:
        q = b.unflatten(-1, (4, 8))
        out = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    else:
        out = b ^ 0x80
    return out.to(torch.uint8).flatten(-2)  # the 4 columns' blocks one after another


def _padded_columns(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels ``[K, Np]`` and float64 scales/zeros ``[K/G, Np]``, N zero-padded to ``multiple``."""
    if spec.group_size % 32 != 0:
        raise ValueError(f"cpu_fused needs a group size that is a multiple of 32, got {spec.group_size}")
    levels = unpack_int32(qweight.cpu(), spec.bits, dim=0)  # [K, N]
    spec.check_in_features(levels.shape[0])
    pad = (-levels.shape[1]) % multiple
    s = scales.detach().cpu().to(torch.float64)
    z = zeros.detach().cpu().to(torch.float64)
    if pad:
        levels = torch.nn.functional.pad(levels, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
        z = torch.nn.functional.pad(z, (0, pad))
    return levels, s, z


def _quad_blocks(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels as quad-blocks ``[N/4, K/32, 4, 32]`` and the quad/dot layouts' ``ss`` fp32 ``[N/4, K/G, 2, 4]``."""
    levels, s, z = _padded_columns(qweight, scales, zeros, spec, 4)
    k, groups = levels.shape[0], levels.shape[0] // spec.group_size
    quads = levels.shape[1] // 4
    blocks = levels.t().reshape(quads, 4, k // 32, 32).permute(0, 2, 1, 3)
    sz = s * (z - level_offset(spec.bits))
    ss = torch.stack([s, sz], dim=1).to(torch.float32)  # [G, 2, Np]
    ss = ss.reshape(groups, 2, quads, 4).permute(2, 0, 1, 3).contiguous()
    return blocks, ss


def repack(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ ``qweight[K*bits/32, N]``, ``scales``/``zeros[K/G, N]`` -> (``qw`` uint8, ``ss`` fp32)."""
    blocks, ss = _quad_blocks(qweight, scales, zeros, spec)
    return _pack_blocks(blocks, spec.bits).contiguous().reshape(-1), ss


def repack_dot(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ layer -> dot layout (``qw`` uint8, ``ss`` fp32 as in ``repack``), for the int8-activation GEMV."""
    blocks, ss = _quad_blocks(qweight, scales, zeros, spec)
    # Byte p = 16*h + 4*c + r of vector j is column c at input 8j + 4h + r: split the
    # inputs as (j, h, r) and move the column between h and r (a permuted copy, no gather).
    q, kb = blocks.shape[:2]
    # Levels fit a byte and every packed byte below stays < 256: work in uint8 (4x less to copy).
    v = blocks.to(torch.uint8).unflatten(-1, (4, 2, 4)).permute(0, 1, 3, 4, 2, 5).reshape(q, kb, 4, 32)
    if spec.bits == 3:
        packed = _pack_quad3(v)  # the vectors in place of the columns
    elif spec.bits == 4:
        packed = torch.cat([v[..., 0, :] | (v[..., 1, :] << 4), v[..., 2, :] | (v[..., 3, :] << 4)], dim=-1)
    elif spec.bits == 2:
        packed = v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)
    else:
        packed = (v ^ 0x80).flatten(-2)
    return packed.contiguous().reshape(-1), ss


def repack_planes(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ layer -> plane layout (``qw`` uint8 bytes of the uint32 planes, ``ss`` fp32); 2/3-bit only."""
    if spec.bits not in (2, 3):
        raise ValueError(f"the plane layout holds 2- and 3-bit layers, got bits={spec.bits}")
    cols = 16  # one row of planes = one 64-byte line (csrc/qalora_layout.h, kPlaneCols)
    levels, s, z = _padded_columns(qweight, scales, zeros, spec, cols)
    k, n = levels.shape
    groups, rows = k // spec.group_size, n // cols
    blocks = levels.t().reshape(rows, cols, k // 32, 32).permute(0, 2, 1, 3)  # [R, KB, 16, 32]
    bit_values = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64), torch.arange(32))
    planes = torch.empty(rows, k // 32, spec.bits, cols, dtype=torch.int32)
    for o in range(0, rows, 128):  # in slices: the int64 temporaries of a 7B layer would be GBs
        part = blocks[o:o + 128].to(torch.int64)
        for j in range(spec.bits):
            # Values up to 2**32 - 1; the int32 cast keeps the bit pattern (two's complement).
            planes[o:o + 128, :, j] = ((part >> j) & 1).mul(bit_values).sum(-1).to(torch.int32)
    # [R, KB, bits, 16] as little-endian uint32 (what the C++ reads through a uint32 pointer).
    qw = planes.view(torch.uint8).reshape(-1)
    ss = torch.stack([s, s * z], dim=1).to(torch.float32)  # [G, 2, Np]
    ss = ss.reshape(groups, 2, rows, cols).permute(2, 0, 1, 3).contiguous()
    return qw, ss
