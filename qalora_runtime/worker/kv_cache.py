"""The paged KV cache: fixed-size blocks per layer, addressed by slot = block_id * block_size + offset.

Layout per layer: ``[num_blocks, block_size, 2, num_kv_heads, head_dim]`` in the
compute dtype, K at index 0 and V at index 1 of the third dim. Keeping K and V
of a token adjacent lets one ``index_copy_`` write both, and lets a gather by
block table fetch both, which matters because the decode step is bound by
per-op overhead. Block 0 is an ordinary block; the scheduler decides which
blocks a sequence owns (the runtime only reads the block tables it is given).
"""

from __future__ import annotations

import torch

from ..models.config import DecoderConfig


class KVCache:
    """Per-layer paged K/V tensors."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # zeros, not empty: padded block-table entries read block 0, and the masked
        # garbage must not be NaN (0 * NaN in a masked softmax is still NaN on some paths).
        self.layers: list[torch.Tensor] = [
            torch.zeros(num_blocks, block_size, 2, num_kv_heads, head_dim, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]

    @classmethod
    def for_model(cls, config: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> KVCache:
        """A cache shaped for ``config`` with ``num_blocks`` blocks of ``block_size`` tokens."""
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                   dtype, device)

    @staticmethod
    def bytes_per_block(config: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
        """Memory one block costs across all layers (to size a cache from a byte budget)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return config.num_layers * block_size * 2 * config.num_kv_heads * config.head_dim * itemsize

    @property
    def num_slots(self) -> int:
        """Total token slots (``num_blocks * block_size``)."""
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(t.numel() * t.element_size() for t in self.layers)
