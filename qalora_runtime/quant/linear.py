"""PackedLinear: a linear layer whose weight stays packed, computed by a registry-selected kernel.

The layer asks :func:`~qalora_runtime.kernels.registry.select_kernel` once, at
load, for the best kernel for its (bits, group size, shape, device, dtype); the
kernel repacks the GPTQ-layout tensors into its own layout (``prepare``) and
those tensors become this module's buffers, so ``.to(device)``, ``state_dict``
and memory accounting see exactly what is held. Model code never names a kernel.

Fused projections (q/k/v, gate/up) concatenate the parts along the output
dimension: in GPTQ layout ``qweight[K*bits/32, N]``, ``scales``/``zeros[K/G, N]``
are column-wise, so concatenating columns is exact whenever the parts share a
QuantSpec. Parts with different specs, or a mix of quantized and dense parts,
fall back to :class:`ConcatLinear` (separate layers, outputs concatenated).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..formats.checkpoint import MergedCheckpoint, QuantizedWeight
from ..kernels.registry import LinearKernel, select_kernel
from ..quant.spec import QuantSpec


class PackedLinear(nn.Module):
    """``y = x @ W + bias`` with ``W[K, N] = scales * (q - zeros)`` held packed.

    ``forward`` accepts ``x[..., K]`` in the compute dtype; the hot path (2-D
    contiguous input) does no reshaping.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, kernel: LinearKernel,
                 weights: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.kernel = kernel
        self._weight_names = tuple(weights)
        # Kernel tensors live in a child module so their names (chosen by the kernel)
        # cannot clash with this module's attributes: ``<layer>.packed.<name>``.
        self.packed = nn.Module()
        for name, tensor in weights.items():
            self.packed.register_buffer(name, tensor)
        self.register_buffer("bias", bias)
        self._weights: dict[str, torch.Tensor] = {}
        self._refresh()

    @classmethod
    def from_quantized(cls, parts: Sequence[QuantizedWeight], dtype: torch.dtype,
                       device: torch.device | str) -> PackedLinear:
        """Build one layer from one or more same-spec parts, concatenated along the output dim."""
        if not parts:
            raise ValueError("PackedLinear.from_quantized needs at least one part")
        spec = parts[0].spec
        k = parts[0].in_features
        for p in parts[1:]:
            if p.spec != spec or p.in_features != k:
                raise ValueError("fused parts must share QuantSpec and in_features")
        if len(parts) == 1:
            qweight, scales, zeros = parts[0].qweight, parts[0].scales, parts[0].zeros
        else:
            qweight = torch.cat([p.qweight for p in parts], dim=1)
            scales = _cat_promoted([p.scales for p in parts])
            zeros = _cat_promoted([p.zeros for p in parts])
        n = qweight.shape[1]
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([
                p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts
            ]).to(device=device, dtype=dtype)
        device = torch.device(device)
        kernel = select_kernel(spec, k, n, device, dtype)
        weights = kernel.prepare(qweight, scales, zeros, spec, dtype, device)
        return cls(k, n, spec, kernel, weights, bias)

    def _refresh(self) -> None:
        # The kernel gets a plain dict; rebuild it whenever buffers are replaced (.to()).
        self._weights = {name: self.packed._buffers[name] for name in self._weight_names}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        result = super()._apply(fn, recurse)
        self._refresh()
        return result

    @property
    def packed_weights(self) -> dict[str, torch.Tensor]:
        """The kernel-layout tensors this layer holds."""
        return self._weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            y = self.kernel.forward(x, self._weights, self.spec)
        else:
            lead = x.shape[:-1]
            y = self.kernel.forward(x.reshape(-1, self.in_features), self._weights, self.spec)
            y = y.view(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.spec.bits}, group_size={self.spec.group_size}, kernel={self.kernel.name}, "
                f"bias={self.bias is not None}")


def _cat_promoted(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # Concatenate in the widest dtype of the parts, never narrower (fp16 scales next
    # to fp32 ones must not be rounded).
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in tensors], dim=1)


class DenseLinear(nn.Module):
    """An unquantized linear layer (HF orientation ``weight[N, K]``) in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ConcatLinear(nn.Module):
    """Separate layers whose outputs are concatenated: the exact fallback when fusion is not."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(int(p.out_features) for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def load_linear(ckpt: MergedCheckpoint, modules: Sequence[str], dtype: torch.dtype,
                device: torch.device | str) -> nn.Module:
    """Load checkpoint modules ``modules`` (fused along N when more than one) as one layer.

    Quantized modules become a :class:`PackedLinear` (never dequantized);
    float modules (``P.weight``) a :class:`DenseLinear` in ``dtype``.
    """
    quantized = [ckpt.is_quantized(m) for m in modules]
    if all(quantized):
        parts = [ckpt.quantized(m) for m in modules]
        if all(p.spec == parts[0].spec for p in parts):
            return PackedLinear.from_quantized(parts, dtype, device)
    elif not any(quantized):
        weights = [ckpt.tensor(f"{m}.weight") for m in modules]
        biases = [ckpt.tensor(f"{m}.bias") if ckpt.has(f"{m}.bias") else None for m in modules]
        weight = torch.cat(weights, dim=0) if len(weights) > 1 else weights[0]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(w.shape[0])
                              for b, w in zip(biases, weights)]).to(device=device, dtype=dtype)
        return DenseLinear(weight.to(device=device, dtype=dtype), bias)
    # Mixed specs or quantized+dense parts: keep them separate (exact, one more op).
    return ConcatLinear([load_linear(ckpt, [m], dtype, device) for m in modules])
