"""Fused decoder-layer ops: one C++ call each on CPU, plain PyTorch everywhere else.

A decode step is a chain of tiny ops (one 576-wide row per token), so on CPU
its cost was ~40% PyTorch dispatch and allocation, not arithmetic (a bf16
``F.rms_norm`` alone ran ~10 ATen ops). The C++ extension (``csrc/qalora_ops.cpp``)
does each of these in one pass, computing in fp32 and rounding once to the
tensor's dtype. Every function here has a PyTorch fallback with the same
semantics, taken on other devices, when the extension could not be built, or
when ``QALORA_LAYER_OPS=torch`` is set at start-up (for debugging).
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from .cpu_fused_build import load_extension

OPS_ENV = "QALORA_LAYER_OPS"

# Resolved once at import: these functions run ~300 times per decoded token, so
# they must not re-read the environment. Tests swap it for None to get PyTorch.
_EXT = None if os.environ.get(OPS_ENV, "") == "torch" else load_extension()
_EXT_DTYPES = (torch.float32, torch.bfloat16)
_EXT_AVX2 = _EXT is not None and _EXT.has_avx2()  # decode attention has no scalar path


def _ext_for(t: torch.Tensor):
    """The extension when it should run on ``t``, else None (use PyTorch)."""
    if _EXT is None or t.device.type != "cpu" or t.dtype not in _EXT_DTYPES:
        return None
    return _EXT


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``rms_norm(x) * weight``; with ``residual``, first ``residual += x`` (in place) and normalize that.

    ``x`` and ``residual`` are ``[rows, hidden]``. Returns a new tensor.
    """
    ext = _ext_for(x)
    if ext is not None and x.dim() == 2 and x.stride(1) == 1 and weight.dtype == x.dtype:
        return ext.rms_norm(x, residual, weight, eps)
    if residual is not None:
        residual.add_(x)
        x = residual
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` for a fused ``[rows, 2I]`` gate/up projection."""
    ext = _ext_for(gate_up)
    if ext is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return ext.silu_mul(gate_up)
    half = gate_up.shape[-1] // 2
    h = F.silu(gate_up[:, :half])
    return h.mul_(gate_up[:, half:])


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotate the first ``heads`` heads of each row of ``x[rows, cols]`` in place.

    ``cos_table``/``sin_table`` are fp32 ``[positions, 1, head_dim]`` with rotate_half's
    sign folded into sin, so ``x' = x * cos + roll(x, head_dim / 2) * sin``.
    """
    ext = _ext_for(x)
    if ext is not None and x.dim() == 2 and x.stride(1) == 1:
        ext.rope_(x, heads, head_dim, cos_table, sin_table, positions)
        return
    view = x[:, : heads * head_dim].view(x.shape[0], heads, head_dim)
    cos = cos_table.index_select(0, positions).to(x.dtype)
    sin = sin_table.index_select(0, positions).to(x.dtype)
    rotated = view.roll(head_dim // 2, dims=-1)
    view.mul_(cos)
    view.addcmul_(rotated, sin)


def decode_attention_available(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` has a fused implementation for these tensors."""
    return _ext_for(q) is not None and _EXT_AVX2 and cache.dtype == q.dtype and cache.is_contiguous()


def decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """One query per sequence over its paged cache -> ``[B, heads * head_dim]`` (fused path only).

    Row ``b`` of ``q[B, heads, head_dim]`` attends over positions
    ``[max(0, seq_lens[b] - window), seq_lens[b])`` found through ``block_tables[b]``.
    Callers check :func:`decode_attention_available` and otherwise use their own
    PyTorch path (which needs a gather plan this function does not).
    """
    ext = _ext_for(q)
    if ext is None:
        raise RuntimeError("fused decode attention is not available for this tensor")
    return ext.decode_attention(q, cache, block_tables, seq_lens, window or 0, scale)
