"""4-bit CPU kernel on PyTorch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations only).

The aten op computes ``y = x @ W`` with ``W[k, n] = (q[k, n] - 8) * scale[g, n] + zero[g, n]``
from a weight pre-packed by ``_convert_weight_to_int4pack_for_cpu`` and a
``scale_zero[K/G, N, 2]`` table. QA-LoRA's ``W = s * (q - z)`` (float ``z``) maps
onto it exactly with ``scale = s`` and ``zero = s * (8 - z)``.

Only the bf16 path of the op is vectorized on x86; fp32 activations run
10-60x slower than a dense matmul (DESIGN.md, measured), so this kernel
declines fp32 and lets the registry pick a better kernel for it.
"""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32
from ..quant.spec import QuantSpec
from .registry import LinearKernel, register_kernel

#: Group sizes the aten op accepts.
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def _has_ops() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


def int4pack_weights(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> dict[str, torch.Tensor]:
    """Repack a 4-bit GPTQ layer into the aten int4pack layout (packed weight + bf16 scale_zero)."""
    levels = unpack_int32(qweight.cpu(), 4, dim=0)  # [K, N] int32 in [0, 16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.t().contiguous(), 1)
    s = scales.to(torch.float32).cpu()
    z = zeros.to(torch.float32).cpu()
    # The op subtracts 8 from every level; fold the float zero into its additive term.
    scale_zero = torch.stack([s, s * (8.0 - z)], dim=-1).to(torch.bfloat16).contiguous()
    return {"w_int4pack": packed, "scale_zero": scale_zero}


def int4pack_mm(x: torch.Tensor, weights: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """``x[..., K]`` (bf16) -> ``y[..., N]`` (bf16) through the aten int4pack op."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2, weights["w_int4pack"], group_size, weights["scale_zero"]
    )
    return y.reshape(*lead, y.shape[-1])


@register_kernel
class CpuInt4PackKernel(LinearKernel):
    """Fused 4-bit GEMV/GEMM for bf16 activations on CPU via PyTorch's int4pack op.

    Accuracy: scale and ``s * (8 - z)`` are stored in bf16 (relative rounding
    2**-9 each) and the op accumulates in fp32 from bf16 inputs, so results match
    a bf16 dense matmul of the bf16-rounded weight, not the fp32 reference.
    """

    name = "cpu_int4pack"
    priority = 10

    @classmethod
    def supports(
        cls,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> bool:
        # fp32 is deliberately refused: the op's fp32 path is scalar and slower than dense.
        return (
            torch.device(device).type == "cpu"
            and dtype == torch.bfloat16
            and spec.bits == 4
            and spec.group_size in INT4PACK_GROUP_SIZES
            and in_features % spec.group_size == 0
            and out_features % 16 == 0
            and _has_ops()
        )

    def prepare(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        if spec.bits != 4:
            raise ValueError(f"cpu_int4pack handles 4-bit weights only, got bits={spec.bits}")
        return int4pack_weights(qweight, scales, zeros, spec)

    def forward(
        self, x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec
    ) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise ValueError(f"cpu_int4pack expects bf16 activations, got {x.dtype}")
        return int4pack_mm(x, weights, spec.group_size)
