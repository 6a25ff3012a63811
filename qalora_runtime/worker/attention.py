"""Paged attention over a mixed batch of prefill chunks and decode tokens, in plain PyTorch.

One step's tokens are flattened to ``[T, ...]`` in item order. Per layer:

1. the new K/V rows are written into the paged cache at ``slot_mapping`` (one
   ``index_copy_`` for K and V together);
2. each query attends over its own sequence's valid prefix only — DESIGN.md
   measured that attending over the whole preallocated cache halves decode speed.

Decode tokens (one query each) are batched into one attention computation:
their block tables are padded to the longest, the gathered keys are cut at
the longest valid length and an additive mask hides each row's tail (no mask
at all for a single sequence). Each prefill chunk gets its own call with a causal mask
offset by its start position (``is_causal`` when it starts at 0), through
SDPA with ``enable_gqa``. Everything that depends only on the batch layout
is built once per step in :class:`AttentionMetadata`; layers reuse it. GQA
never copies K/V per query head: decode groups the query heads of each KV
head into one batched matmul.

Sliding windows (Mistral, some Qwen2 layers) are applied as masks: a key
``j`` is visible to a query at position ``p`` iff ``p - window < j <= p``,
transformers' rule. The cache still stores every position (no ring buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..kernels.layer_ops import decode_attention, decode_attention_available


@dataclass
class DecodePlan:
    """The decode rows of a step: one query per sequence, batched into a single SDPA call."""

    rows: torch.Tensor | None  # row indices into the step's tokens; None = all rows, in order
    block_tables: torch.Tensor  # [B, max_blocks] long (padded with block 0, masked out)
    kv_start: int  # first key position to gather (> 0 only for a single windowed sequence)
    kv_len: int  # keys gathered per row: max valid length over the batch
    mask: torch.Tensor | None  # [B, 1, kv_len - kv_start] fp32, 0 = attend, -inf = hidden; None = all valid
    seq_lens: torch.Tensor  # [B] long: valid keys of each row (its position + 1)
    window: int | None  # sliding window of this plan's layers (None = full attention)


@dataclass
class PrefillPlan:
    """One multi-token chunk of one sequence: rows ``[row_start, row_end)`` of the step."""

    row_start: int
    row_end: int
    block_table: torch.Tensor  # [blocks] long
    kv_len: int  # start position + chunk length
    mask: torch.Tensor | None  # [chunk, kv_len] bool; None = plain causal from position 0


@dataclass
class AttentionMetadata:
    """Everything a layer's attention needs for one step (built once, shared by all layers)."""

    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset of each new token
    decode: DecodePlan | None
    prefills: list[PrefillPlan]
    num_tokens: int


def build_metadata(
    token_counts: Sequence[int],
    start_positions: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    window: int | None,
    device: torch.device | str,
    slot_mapping: torch.Tensor,
) -> AttentionMetadata:
    """Plan one step's attention for sequences with ``token_counts[i]`` new tokens each.

    ``slot_mapping`` is shared between window variants (it does not depend on the window).
    """
    decode_rows: list[int] = []
    decode_items: list[int] = []
    prefills: list[PrefillPlan] = []
    row = 0
    for i, n in enumerate(token_counts):
        start = start_positions[i]
        if n == 1:
            decode_rows.append(row)
            decode_items.append(i)
        else:
            kv_len = start + n
            nblocks = -(-kv_len // block_size)
            bt = torch.tensor(block_tables[i][:nblocks], dtype=torch.long, device=device)
            mask = None
            if start > 0 or window is not None:
                q_pos = torch.arange(start, kv_len, device=device)[:, None]
                k_pos = torch.arange(kv_len, device=device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
            prefills.append(PrefillPlan(row, row + n, bt, kv_len, mask))
        row += n
    decode = None
    if decode_items:
        lens = [start_positions[i] + 1 for i in decode_items]
        kv_len = max(lens)
        nblocks = -(-kv_len // block_size)
        table = [list(block_tables[i][:nblocks]) + [0] * (nblocks - len(block_tables[i][:nblocks]))
                 for i in decode_items]
        kv_start = 0
        mask = None
        if len(decode_items) == 1:
            if window is not None:
                kv_start = max(0, kv_len - window)
        else:
            k_pos = torch.arange(kv_len, device=device)[None, :]
            lens_t = torch.tensor(lens, device=device)[:, None]
            visible = k_pos < lens_t
            if window is not None:
                visible &= k_pos >= lens_t - window
            mask = torch.zeros(visible.shape, dtype=torch.float32, device=device)
            mask.masked_fill_(~visible, float("-inf"))
            mask = mask[:, None, :]
        rows = None
        if len(decode_rows) != row:
            rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        decode = DecodePlan(rows, torch.tensor(table, dtype=torch.long, device=device),
                            kv_start, kv_len, mask, torch.tensor(lens, dtype=torch.long, device=device), window)
    return AttentionMetadata(slot_mapping, decode, prefills, row)


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor) -> None:
    """Store ``kv[T, 2, kv_heads, head_dim]`` into ``cache[blocks, block_size, 2, kv_heads, head_dim]``."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, kv)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """``q[T, heads, head_dim]`` attends over each sequence's cached prefix -> ``[T, heads*head_dim]``.

    The step's new K/V must already be in ``cache`` (see :func:`write_kv`).
    """
    t, heads, dim = q.shape
    block_size = cache.shape[1]
    d = meta.decode
    if d is not None and d.rows is None:  # pure decode step: the common, hot case
        return _decode(q, cache, d, scale, block_size).reshape(t, heads * dim)
    if d is None and len(meta.prefills) == 1:  # a single prefill chunk
        return _prefill(q, cache, meta.prefills[0], scale, block_size).reshape(t, heads * dim)
    out = q.new_empty(t, heads, dim)
    if d is not None:
        out.index_copy_(0, d.rows, _decode(q.index_select(0, d.rows), cache, d, scale, block_size))
    for p in meta.prefills:
        out[p.row_start:p.row_end] = _prefill(q[p.row_start:p.row_end], cache, p, scale, block_size)
    return out.view(t, heads * dim)


def _decode(q: torch.Tensor, cache: torch.Tensor, d: DecodePlan, scale: float,
            block_size: int) -> torch.Tensor:
    if decode_attention_available(q, cache):
        # One C++ pass reading K/V in place from the paged cache (no gather copy),
        # same fp32 math as below; measured (1 thread, 9 heads / 3 KV heads) 6 vs
        # 110 us at 16 keys and 55-75 vs 150-275 us at 260 keys.
        b, heads, dim = q.shape
        return decode_attention(q, cache, d.block_tables, d.seq_lens, d.window, scale).view(b, heads, dim)
    # Hand-written instead of SDPA: at decode sizes (a few heads x a few hundred keys)
    # every op is overhead-bound, and measured on this CPU two fp32 bmm + softmax cost
    # ~25 us where SDPA costs ~35 us (fp32) and ~100 us (bf16, whose small bmm is slow).
    # So K/V are gathered once, converted to fp32 in the same copy that lays them out,
    # and the whole attention runs in fp32 (as transformers' eager softmax does).
    b, heads, dim = q.shape
    kv_heads = cache.shape[3]
    kv = cache.index_select(0, d.block_tables.view(-1))  # [B * blocks, block_size, 2, kv_heads, dim]
    kv = kv.view(b, -1, 2, kv_heads, dim)[:, d.kv_start:d.kv_len]
    length = kv.shape[1]
    kvf = torch.empty(2, b, kv_heads, length, dim, dtype=torch.float32, device=q.device)
    kvf.copy_(kv.permute(2, 0, 3, 1, 4))
    k = kvf[0].view(b * kv_heads, length, dim)
    v = kvf[1].view(b * kv_heads, length, dim)
    qf = q.to(torch.float32).reshape(b * kv_heads, heads // kv_heads, dim)  # GQA: group query heads
    scores = torch.bmm(qf, k.transpose(1, 2))  # [B * kv_heads, group, L]
    if d.mask is None:
        scores.mul_(scale)
    else:
        scores = torch.add(d.mask, scores.view(b, -1, length), alpha=scale)
    probs = torch.softmax(scores, dim=-1).view(b * kv_heads, -1, length)
    return torch.bmm(probs, v).view(b, heads, dim).to(q.dtype)  # [B, heads, dim]


def _prefill(q: torch.Tensor, cache: torch.Tensor, p: PrefillPlan, scale: float,
             block_size: int) -> torch.Tensor:
    kv = cache[p.block_table]  # [blocks, block_size, 2, kv_heads, dim]
    kv = kv.view(-1, *kv.shape[2:])[: p.kv_len]
    k = kv[:, 0].transpose(0, 1).unsqueeze(0)
    v = kv[:, 1].transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=p.mask,
                                         is_causal=p.mask is None, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)  # [chunk, heads, dim]
