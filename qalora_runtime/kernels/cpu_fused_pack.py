"""Repack a GPTQ-layout layer into the quad-interleaved block layout of the C++ CPU kernels.

Layout (mirrors ``csrc/qalora_layout.h``): output features are grouped in quads
(N padded to a multiple of 4 with zero columns); for each quad, each block of 32
inputs holds 4 columns x ``4*bits`` bytes of levels, so a thread streams one
contiguous buffer (3-bit: one 48-byte quad-block whose bytes mix the columns);
scales and ``s*(z - off)`` are fp32 ``[N/4, K/G, 2, 4]``.
Everything stays packed: ``bits/8`` bytes per weight plus 8 bytes per group and column.
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


def repack(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ ``qweight[K*bits/32, N]``, ``scales``/``zeros[K/G, N]`` -> (``qw`` uint8, ``ss`` fp32)."""
    if spec.group_size % 32 != 0:
        raise ValueError(f"cpu_fused needs a group size that is a multiple of 32, got {spec.group_size}")
    levels = unpack_int32(qweight.cpu(), spec.bits, dim=0)  # [K, N]
    k, n = levels.shape
    spec.check_in_features(k)
    groups = k // spec.group_size
    pad = (-n) % 4
    s = scales.detach().cpu().to(torch.float64)
    z = zeros.detach().cpu().to(torch.float64)
    if pad:
        levels = torch.nn.functional.pad(levels, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
        z = torch.nn.functional.pad(z, (0, pad))
    quads = (n + pad) // 4
    blocks = levels.t().reshape(quads, 4, k // 32, 32).permute(0, 2, 1, 3)
    qw = _pack_blocks(blocks, spec.bits).contiguous().reshape(-1)
    sz = s * (z - level_offset(spec.bits))
    ss = torch.stack([s, sz], dim=1).to(torch.float32)  # [G, 2, Np]
    ss = ss.reshape(groups, 2, quads, 4).permute(2, 0, 1, 3).contiguous()
    return qw, ss
