"""RMSNorm as Llama-family models define it (normalize in fp32, scale in the compute dtype)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``.

    In fp32 this is the same computation as transformers' ``LlamaRMSNorm`` (bit
    for bit, measured). For bf16/fp16 activations transformers rounds the
    normalized value to the input dtype before multiplying by the weight; the
    fused ``F.rms_norm`` kernel accumulates in fp32 and rounds once at the end,
    which is at least as accurate and one op instead of six (the decode step is
    dominated by per-op overhead).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype), requires_grad=False)
        self.eps = float(eps)
        self._shape = (hidden_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self._shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self._shape[0]}, eps={self.eps}"
