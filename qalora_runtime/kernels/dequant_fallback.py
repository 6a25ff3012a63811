"""Slow but universal kernel: unpack and dequantize the layer on every call, then dense matmul.

It keeps the weight packed in memory (only the GPTQ int32 words are stored),
so it satisfies the memory contract, but it materializes the dense weight per
call (~70x slower than a fused kernel on CPU). It exists as the correct
fallback for any (device, bits, group size, dtype) no faster kernel covers.
"""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32
from ..quant.spec import QuantSpec
from .registry import LinearKernel, register_kernel


@register_kernel
class DequantFallbackKernel(LinearKernel):
    """Per-call dequantize-then-matmul; works everywhere, fast nowhere."""

    name = "dequant_fallback"
    priority = -100

    @classmethod
    def supports(cls, spec, in_features, out_features, device, dtype) -> bool:
        return dtype.is_floating_point and in_features % spec.group_size == 0

    def prepare(self, qweight, scales, zeros, spec, dtype, device):
        return {
            "qweight": qweight.to(device),
            "scales": scales.to(device=device, dtype=torch.float32),
            "zeros": zeros.to(device=device, dtype=torch.float32),
        }

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec):
        q = unpack_int32(weights["qweight"].cpu(), spec.bits, dim=0).to(x.device)
        s = weights["scales"].repeat_interleave(spec.group_size, dim=0)
        z = weights["zeros"].repeat_interleave(spec.group_size, dim=0)
        w = (s * (q.to(torch.float32) - z)).to(x.dtype)
        return x @ w
