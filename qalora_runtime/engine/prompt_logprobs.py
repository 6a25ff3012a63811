"""Prompt logprobs: each prompt token's logprob given the tokens before it (what ``echo`` + ``logprobs`` returns).

Evaluation harnesses score a text by the model's logprobs of its own tokens
(lm-eval-harness ``loglikelihood`` over the completions API). The scheduler
computes such a request's whole prompt (no prefix-cache hits) and asks the
runner for every prompt row's logits; this collector turns each chunk's rows
into :class:`PositionLogprobs`, position by position, until the prompt is covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..outputs import PositionLogprobs, TokenLogprob

#: Rows turned into logprobs at a time: a full-vocabulary log_softmax of a 2,048-token
#: chunk would hold another 400 MB (SmolLM2's 49,152 entries in fp32).
_SLICE = 256


class PromptLogprobsCollector:
    """Logprobs of prompt tokens ``1 .. n-1``, filled chunk by chunk (token 0 has no context: None)."""

    def __init__(self, prompt_token_ids: Sequence[int], top_k: int, decode: Callable[[list[int]], str]) -> None:
        self._prompt = list(prompt_token_ids)
        self._top_k = top_k
        self._decode = decode
        self._positions: list[PositionLogprobs | None] = [None] * len(self._prompt)
        self._missing = len(self._prompt) - 1
        self.sent = False

    @property
    def complete(self) -> bool:
        """Every prompt token after the first has its logprob."""
        return self._missing <= 0

    def result(self) -> list[PositionLogprobs | None]:
        """One entry per prompt token; the first is None."""
        return list(self._positions)

    def add_chunk(self, start_position: int, logits: torch.Tensor) -> None:
        """``logits[r]`` is the output at position ``start_position + r``: it predicts prompt token ``+ 1``.

        Positions already filled (a chunk recomputed after preemption) are kept.
        """
        rows = min(logits.shape[0], len(self._prompt) - 1 - start_position)
        for r0 in range(0, max(rows, 0), _SLICE):  # bounded temporaries for long prompts
            self._add_rows(start_position + r0, logits[r0:min(rows, r0 + _SLICE)])

    def _add_rows(self, start_position: int, logits: torch.Tensor) -> None:
        rows = logits.shape[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(self._prompt[start_position + 1:start_position + 1 + rows], dtype=torch.long)
        picked = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
        top_ids: list[list[int]] = [[] for _ in range(rows)]
        top_lps: list[list[float]] = [[] for _ in range(rows)]
        if self._top_k > 0:
            values, indices = logprobs.topk(self._top_k, dim=-1)
            top_ids, top_lps = indices.tolist(), values.tolist()
        for r in range(rows):
            position = start_position + 1 + r
            if self._positions[position] is not None:
                continue
            token = self._prompt[position]
            self._positions[position] = PositionLogprobs(
                sampled=TokenLogprob(token, picked[r], self._decode([token])),
                top=[TokenLogprob(t, lp, self._decode([t])) for t, lp in zip(top_ids[r], top_lps[r])],
            )
            self._missing -= 1
