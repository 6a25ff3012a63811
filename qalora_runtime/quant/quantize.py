"""Round-to-nearest (RTN) asymmetric group quantization with float zero-points.

Per group of ``G`` input features and per output feature, ``scale = (max - min) /
maxq`` and ``zero = -min / scale`` (a float, not rounded: the merged format
stores real-valued zeros), ``q = clamp(round(w / scale + zero), 0, maxq)``. The
scale is rounded to its storage dtype *before* ``zero`` and ``q`` are computed,
so the stored tensors dequantize with error at most about ``scale / 2`` per
weight. This is plain RTN with no calibration data; GPTQ-style error-correcting
quantization may come later.
"""

from __future__ import annotations

import torch

from .packing import pack_int32
from .spec import QuantSpec


def quantize_rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    input_dim: int = 1,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight; return ``(qweight, scales, zeros)`` in GPTQ orientation.

    ``input_dim`` says which dim is the input (K): 1 for an ``nn.Linear`` weight
    ``[N, K]`` (the default), 0 for a GPTQ-oriented ``W[K, N]``. Outputs:
    ``qweight`` int32 ``[K*bits/32, N]``, ``scales`` ``scale_dtype`` ``[K/G, N]``,
    ``zeros`` float32 ``[K/G, N]``, with ``W ≈ scales * (q - zeros)``. ``name``
    only labels error messages.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D weight, got shape {tuple(weight.shape)}")
    if input_dim not in (0, 1):
        raise ValueError(f"input_dim must be 0 or 1, got {input_dim}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_rtn expects a float weight, got {weight.dtype}")
    # float64 throughout so results do not depend on the source dtype or BLAS order.
    w = weight.detach().to(torch.float64)
    if input_dim == 1:
        w = w.t()
    k, n = w.shape
    spec.check_in_features(k, name)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    g = spec.group_size
    grouped = w.reshape(k // g, g, n)
    wmin = grouped.amin(dim=1)
    wmax = grouped.amax(dim=1)
    scale = ((wmax - wmin) / spec.max_q).to(scale_dtype)
    # A constant group (or a range below the dtype's resolution) gets scale 1: then
    # q = 0 and zero = -min reproduce the constant exactly.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s64 = scale.to(torch.float64)
    zeros = (-wmin / s64).to(torch.float32)
    z64 = zeros.to(torch.float64)
    q = torch.round(grouped / s64[:, None, :] + z64[:, None, :]).clamp_(0, spec.max_q)
    qweight = pack_int32(q.reshape(k, n).to(torch.int32), spec.bits, dim=0)
    return qweight, scale, zeros
