"""Token embeddings: dense, or quantized and dequantized per looked-up token.

A quantized embedding is stored in linear orientation (``in = hidden``,
``out = vocab``: ``qweight[hidden*bits/32, vocab]``) so a tied lm_head uses the
same tensors as a packed linear. A lookup therefore gathers the columns of the
looked-up tokens and dequantizes only those: the table stays packed in memory.
When the tied head's kernel can read columns of its own layout
(:class:`HeadColumnEmbedding`), the embedding holds no tensors of its own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..quant.linear import PackedLinear
from ..quant.packing import unpack_int32
from ..quant.spec import QuantSpec


class DenseEmbedding(nn.Module):
    """``weight[vocab, hidden]`` lookup in the compute dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class QuantizedEmbedding(nn.Module):
    """Embedding lookup from a GPTQ-layout packed table ``W[hidden, vocab] = s * (q - z)``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 spec: QuantSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.hidden_size = qweight.shape[0] * 32 // spec.bits
        self.num_embeddings = qweight.shape[1]
        spec.check_in_features(self.hidden_size, "embedding")
        # Kept in GPTQ layout (not transposed) so a tied lm_head whose kernel keeps
        # these same tensors shares them instead of holding a second copy.
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[0]
        words = self.qweight.index_select(1, ids)  # [hidden*bits/32, T]
        if self.spec.bits == 8:
            # Little-endian bytes of word w are levels 4w..4w+3, in order.
            levels = words.t().contiguous().view(torch.uint8).to(torch.float32)
        else:
            levels = unpack_int32(words.contiguous(), self.spec.bits, dim=0).t().to(torch.float32)
        levels = levels.view(t, -1, self.spec.group_size)
        s = self.scales.index_select(1, ids).t().to(torch.float32).unsqueeze(-1)
        z = self.zeros.index_select(1, ids).t().to(torch.float32).unsqueeze(-1)
        return (s * (levels - z)).reshape(t, self.hidden_size).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.hidden_size}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}")


class HeadColumnEmbedding(nn.Module):
    """Embedding lookup that reads token columns straight from a tied, packed lm_head.

    The head's kernel repacks the table into its own layout; reading columns from
    that layout (``LinearKernel.columns``) avoids keeping the GPTQ-layout table a
    second time (28 MB for SmolLM2's 8-bit 49152x576 table). The tensors are the
    head's own, registered here as non-persistent buffers (same storage).
    """

    def __init__(self, head: PackedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        if not head.kernel.supports_columns:
            raise ValueError(f"kernel {head.kernel.name!r} cannot serve embedding lookups")
        self.kernel = head.kernel
        self.spec = head.spec
        self.dtype = dtype
        self.hidden_size = head.in_features
        self.num_embeddings = head.out_features
        self._names = tuple(head.packed_weights)
        for name, tensor in head.packed_weights.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weights = {name: self._buffers[name] for name in self._names}
        return self.kernel.columns(ids, weights, self.spec, self.hidden_size, self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.hidden_size}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, shared with lm_head ({self.kernel.name})")
