"""Format the engine's per-position logprobs the way chat and completions clients expect."""

from __future__ import annotations

import math
from typing import Sequence

from qalora_runtime.outputs import PositionLogprobs

from .responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _finite(value: float) -> float:
    # JSON has no -inf; a token with probability 0 gets the most negative float instead.
    return value if math.isfinite(value) else -9999.0


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(positions: Sequence[PositionLogprobs], top_k: int) -> ChatLogprobs:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}`` for the given positions."""
    content = []
    for pos in positions:
        top = [
            TopLogprob(token=t.text, logprob=_finite(t.logprob), bytes=_bytes(t.text)) for t in pos.top[:top_k]
        ]
        s = pos.sampled
        content.append(
            ChatTokenLogprob(token=s.text, logprob=_finite(s.logprob), bytes=_bytes(s.text), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    positions: Sequence[PositionLogprobs | None], top_k: int, text_offset: int, first_token_text: str = ""
) -> CompletionLogprobs:
    """Legacy-completions logprobs; ``text_offset`` is where the first token starts in the choice text.

    A None position is an echoed prompt's first token, which has no context: it
    gets ``first_token_text`` and null logprobs, as in the OpenAI API.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    offset = text_offset
    for pos in positions:
        if pos is None:
            tokens.append(first_token_text)
            token_logprobs.append(None)
            offsets.append(offset)
            offset += len(first_token_text)
            tops.append(None)
            continue
        s = pos.sampled
        tokens.append(s.text)
        token_logprobs.append(_finite(s.logprob))
        offsets.append(offset)
        offset += len(s.text)
        # As vLLM does: the top-k alternatives plus the sampled token itself.
        top: dict[str, float] = {}
        for t in pos.top[:top_k]:
            top.setdefault(t.text, _finite(t.logprob))
        top.setdefault(s.text, _finite(s.logprob))
        tops.append(top)
    # Every field passed explicitly: streamed chunks are dumped with exclude_unset.
    return CompletionLogprobs(text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=tops)
