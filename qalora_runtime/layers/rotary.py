"""Rotary position embedding (RoPE) with the rope types Llama-family checkpoints use.

Supported ``rope_type``: ``default``, ``linear`` (position interpolation) and
``llama3`` (Llama 3.1 frequency-dependent scaling). Frequencies and cos/sin
values are computed exactly as transformers computes them (same fp32 ops in
the same order), so fp32 logits match it to rounding. Other rope types
(dynamic NTK, YaRN, longrope) change with sequence length or need attention
scaling; they are refused with a clear error rather than approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..kernels.layer_ops import rope_

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """The rope parameters of a model: ``theta``, ``rope_type`` and the type's extra keys."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, config: dict[str, Any], head_dim: int) -> RopeConfig:
        """Read rope settings from an HF ``config.json`` dict (old ``rope_scaling`` or new ``rope_parameters``)."""
        params = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or {}
        if not params:
            params = dict(scaling)
        theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1.0, 1):
            raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
        return cls(head_dim=head_dim, theta=float(theta), rope_type=rope_type, params=params)


def inverse_frequencies(rope: RopeConfig) -> torch.Tensor:
    """``inv_freq[head_dim/2]`` in fp32, scaled per ``rope.rope_type`` (transformers' formulas)."""
    dim = rope.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.params["factor"]
    if rope.rope_type == "llama3":
        factor = rope.params["factor"]
        low_freq_factor = rope.params["low_freq_factor"]
        high_freq_factor = rope.params["high_freq_factor"]
        old_context_len = rope.params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Cos/sin tables indexed by position, applied in place to the q/k columns of a step.

    Tables are computed in fp32 (like transformers) and kept in fp32 (the fused op
    reads them directly; the PyTorch path rounds them to the compute dtype as
    transformers does); they grow on demand, so a 128k-context config costs
    nothing until a sequence gets long. The sin table carries the sign of
    ``rotate_half`` (``-sin`` on the first half), which turns rotation into
    ``x * cos + roll(x, D/2) * sin_signed``.
    """

    def __init__(self, rope: RopeConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 initial_positions: int = 4096) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = rope.head_dim
        self.dtype = dtype
        self.inv_freq = inverse_frequencies(rope).to(device)
        self.cos_table = torch.empty(0, 1, rope.head_dim, dtype=torch.float32, device=device)
        self.sin_table = torch.empty(0, 1, rope.head_dim, dtype=torch.float32, device=device)
        self._build(initial_positions)

    def _build(self, n: int) -> None:
        pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]  # sign of rotate_half folded in (exact)
        self.cos_table = emb.cos()[:, None, :].contiguous()
        self.sin_table = sin[:, None, :].contiguous()

    def ensure_positions(self, n: int) -> None:
        """Make the tables cover positions ``[0, n)`` (call once per step with the max position + 1)."""
        if n > self.cos_table.shape[0]:
            self._build(max(n, 2 * self.cos_table.shape[0]))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` of shape ``[T, 1, head_dim]`` for ``positions[T]``, in the compute dtype."""
        return (self.cos_table.index_select(0, positions).to(self.dtype),
                self.sin_table.index_select(0, positions).to(self.dtype))

    def rotate_(self, x: torch.Tensor, heads: int, positions: torch.Tensor) -> None:
        """Rotate the first ``heads`` heads of each row of ``x[T, cols]`` in place (row ``t`` at ``positions[t]``)."""
        rope_(x, heads, self.head_dim, self.cos_table, self.sin_table, positions)
