"""Minimal sampler: greedy (temperature 0) and temperature sampling with per-request generators.

The engine extends this with top-p/top-k/penalties; the contract stays
``sample(logits[N, vocab], temperatures, generators) -> token ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Sampler:
    """Picks one token per logits row."""

    def sample(self, logits: torch.Tensor, temperatures: Sequence[float],
               generators: Sequence[torch.Generator | None] | None = None) -> list[int]:
        """Greedy where ``temperature == 0``, else a draw from ``softmax(logits / T)``.

        ``generators[i]`` (optional) makes row ``i`` reproducible independently of
        the rest of the batch.
        """
        if logits.shape[0] != len(temperatures):
            raise ValueError(f"{logits.shape[0]} logits rows but {len(temperatures)} temperatures")
        if any(t < 0 for t in temperatures):
            raise ValueError("temperature must be >= 0")
        greedy = logits.argmax(dim=-1).tolist()
        if all(t == 0 for t in temperatures):
            return greedy
        out = list(greedy)
        for i, t in enumerate(temperatures):
            if t == 0:
                continue
            probs = torch.softmax(logits[i].float() / t, dim=-1)
            gen = generators[i] if generators is not None else None
            out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        return out
