"""A minimal batch generation loop straight on the ModelRunner (no scheduler).

Each sequence gets its own contiguous run of KV blocks, all prompts are
prefilled in one step, then every unfinished sequence decodes one token per
step. It is the shortest path from token ids to tokens, used by reference
tests and the decode benchmark to measure the model runner without
scheduler overhead; serving and ``qalora generate`` use the engine core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..worker.model_runner import ModelRunner, SequenceInput
from ..worker.sampler import Sampler


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` positions."""
    return -(-num_tokens // block_size)


def generate_tokens(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_tokens`` tokens per prompt; returns the new token ids of each.

    ``on_token(prompt_index, token_id)`` is called as each token is produced.
    Raises ValueError when the cache cannot hold every sequence at full length.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    bs = runner.block_size
    tables: list[list[int]] = []
    next_block = 0
    for p in prompts:
        n = blocks_needed(len(p) + max_tokens, bs)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    if next_block > runner.kv_cache.num_blocks:
        raise ValueError(f"needs {next_block} KV blocks, the cache has {runner.kv_cache.num_blocks}")
    sampler = Sampler()
    gens = None
    if temperature > 0:
        gens = [torch.Generator().manual_seed((seed or 0) + i) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    eos = set(eos_token_ids)
    active = list(range(len(prompts)))
    items = [SequenceInput(list(p), 0, tables[i]) for i, p in enumerate(prompts)]
    while active:
        logits = runner.execute(items)
        temps = [temperature] * len(active)
        tokens = sampler.sample(logits, temps, [gens[i] for i in active] if gens else None)
        still: list[int] = []
        for i, tok in zip(active, tokens):
            outputs[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok not in eos and len(outputs[i]) < max_tokens:
                still.append(i)
        active = still
        items = [SequenceInput([outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, tables[i])
                 for i in active]
    return outputs
