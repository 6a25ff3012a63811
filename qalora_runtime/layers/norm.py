"""RMSNorm as Llama-family models define it (normalize in fp32, scale in the compute dtype)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.layer_ops import rms_norm


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``.

    In fp32 this is the same computation as transformers' ``LlamaRMSNorm`` (bit
    for bit, measured). For bf16/fp16 activations transformers rounds the
    normalized value to the input dtype before multiplying by the weight; the
    fused op (``kernels.layer_ops.rms_norm``) accumulates in fp32 and rounds once
    at the end, which is at least as accurate, and also folds in the residual add
    that precedes every norm of the block (the decode step is dominated by
    per-op overhead).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype), requires_grad=False)
        self.eps = float(eps)
        self._shape = (hidden_size,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x[rows, hidden]``; with ``residual``, add ``x`` into it in place first
        and normalize the sum (the residual stream then holds ``residual + x``)."""
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self._shape[0]}, eps={self.eps}"
