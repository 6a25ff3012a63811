"""Reference dequantizer: the slow, obviously-correct oracle every kernel is tested against."""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32
from ..quant.spec import QuantSpec


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the dense weight ``W[K, N] = scales[g] * (q - zeros[g])`` (input-major, GPTQ order).

    Computed in float64 and rounded once to ``dtype``, so it is the exact value
    of the stored format up to that final rounding.
    """
    q = unpack_int32(qweight, spec.bits, dim=0).to(torch.float64)
    in_features = q.shape[0]
    spec.check_in_features(in_features)
    groups = in_features // spec.group_size
    if scales.shape != (groups, q.shape[1]) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros must be [{groups}, {q.shape[1]}], got "
            f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    s = scales.to(torch.float64).repeat_interleave(spec.group_size, dim=0)
    z = zeros.to(torch.float64).repeat_interleave(spec.group_size, dim=0)
    return (s * (q - z)).to(dtype)


def reference_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: QuantSpec,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W + bias`` with ``W`` from :func:`dequantize`, computed in float64."""
    w = dequantize(qweight, scales, zeros, spec, torch.float64)
    y = x.to(torch.float64) @ w
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
