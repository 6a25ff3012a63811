"""ModelRunner: turns one scheduler step (token ids, start positions, block tables) into logits.

The scheduler decides, per step and per request, which tokens to compute, at
which position they start and which KV blocks the request owns. The runner
flattens the step into ``[T]`` token tensors, builds the attention metadata
once (shared by all layers), runs the model and returns the logits of the
rows that asked for them. Host work is a handful of small tensors per step,
never per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.fused_decode import FusedDecodeStack
from ..models.llama import DecoderForCausalLM
from .attention import AttentionMetadata, build_metadata
from .kv_cache import KVCache


@dataclass
class SequenceInput:
    """One request's share of a step.

    ``token_ids`` are the new tokens to compute (a prefill chunk, or one decode
    token) at positions ``start_position, start_position + 1, ...``;
    ``block_table`` lists the KV blocks of the whole sequence in order (position
    ``p`` lives in ``block_table[p // block_size]`` at offset ``p % block_size``)
    and must cover ``start_position + len(token_ids)`` positions. ``sample`` asks
    for the logits of the last new token (False for a prefill chunk that does
    not end the prompt); ``all_logits`` for those of every new token (prompt
    logprobs). The field names match ``core.scheduler_output.ScheduledRequest``,
    which :meth:`ModelRunner.execute` accepts as is.
    """

    token_ids: Sequence[int]
    start_position: int
    block_table: Sequence[int]
    sample: bool = True
    all_logits: bool = False


class ModelRunner:
    """Runs steps of mixed prefill/decode sequences against a paged KV cache."""

    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, block_size: int) -> None:
        if block_size != kv_cache.block_size:
            raise ValueError(f"block_size {block_size} != the cache's block size {kv_cache.block_size}")
        if model.rotary is None or model.dtype is None:
            raise ValueError("the model has no weights loaded")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.vocab_size = model.config.vocab_size
        # Decode-only steps (every sequence computes one token) run all layers in one
        # native call when the model and cache allow it (CPU, cpu_fused kernels).
        self.fused_decode = FusedDecodeStack.build(model, kv_cache.layers)

    @torch.inference_mode()
    def execute(self, items: Sequence[SequenceInput]) -> torch.Tensor:
        """Compute one step; returns fp32 logits in item order: every new token's row for an item with
        ``all_logits``, else the last token's row for an item with ``sample``, else none.

        ``items`` are :class:`SequenceInput` or anything with the same attributes
        (the scheduler's ``ScheduledRequest``).
        """
        if not items:
            raise ValueError("execute() needs at least one sequence")
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        counts: list[int] = []
        starts: list[int] = []
        tables: list[Sequence[int]] = []
        logit_rows: list[int] = []
        for item in items:
            n = len(item.token_ids)
            start = item.start_position
            table = item.block_table
            if n == 0:
                raise ValueError("a sequence in the step has no tokens")
            if start < 0 or len(table) * bs < start + n:
                raise ValueError(
                    f"block table of {len(table)} blocks cannot hold positions up to {start + n - 1}"
                )
            ids.extend(item.token_ids)
            if n == 1:
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            counts.append(n)
            starts.append(start)
            tables.append(table)
            if item.all_logits:
                logit_rows.extend(range(len(ids) - n, len(ids)))
            elif item.sample:
                logit_rows.append(len(ids) - 1)
        if max(slots) >= self.kv_cache.num_slots or min(slots) < 0:
            raise ValueError(f"a block id is outside the cache ({self.kv_cache.num_blocks} blocks)")
        if self.fused_decode is not None and len(ids) == len(items):
            return self._fused_decode_step(self.fused_decode, ids, positions, slots, tables, logit_rows)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        attn: dict[int | None, AttentionMetadata] = {
            w: build_metadata(counts, starts, tables, bs, w, dev, slot_mapping) for w in self.model.windows
        }
        self.model.rotary.ensure_positions(max(positions) + 1)
        logits_indices = None
        if len(logit_rows) != len(ids):
            logits_indices = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        if not logit_rows:
            logits_indices = torch.empty(0, dtype=torch.long, device=dev)
        logits = self.model(input_ids, pos, attn, self.kv_cache.layers, logits_indices)
        return logits.float()

    def _fused_decode_step(self, stack: FusedDecodeStack, ids: list[int], positions: list[int],
                           slots: list[int], tables: list[Sequence[int]],
                           logit_rows: list[int]) -> torch.Tensor:
        """A decode-only step through :class:`FusedDecodeStack` (same math as the module path)."""
        bs = self.block_size
        widest = max(-(-(p + 1) // bs) for p in positions)
        # Rows are padded with block 0; the kernel reads only each row's valid prefix.
        padded = [list(t[:widest]) + [0] * (widest - len(t[:widest])) for t in tables]
        self.model.rotary.ensure_positions(max(positions) + 1)
        hidden = stack.hidden_states(
            torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
            torch.tensor(slots, dtype=torch.long), torch.tensor(padded, dtype=torch.long),
            torch.tensor([p + 1 for p in positions], dtype=torch.long))
        if len(logit_rows) != len(ids):
            hidden = hidden.index_select(0, torch.tensor(logit_rows, dtype=torch.long))
        return self.model.compute_logits(hidden).float()
