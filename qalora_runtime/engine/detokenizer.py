"""Incremental detokenization with stop strings matched across token boundaries.

Decoding token by token breaks multi-byte characters (a UTF-8 character may
span tokens) and context-dependent spacing. We decode a short window
``ids[prefix_offset:]`` and emit only what it adds over ``ids[prefix_offset:read_offset]``,
waiting while the window ends in U+FFFD (an incomplete character). Text that
could be the start of a stop string is held back until it is known not to be
one, so the stop string itself is never streamed.
"""

from __future__ import annotations

from typing import Any

# How many prompt tokens to keep as decoding context (spacing of the first output token).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one completion's token stream into safe text deltas."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self.text = ""  # all decoded output text (stop-truncated once a stop string hits)
        self._emitted = 0
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str:
        """Consume one token; return the newly safe text (maybe empty).

        After a stop string is found, ``stop_reason`` is set and the returned
        text ends right before it (or after it with include_stop_str_in_output).
        """
        if self.stop_reason is not None:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += new
            if self._stops and self._find_stop(len(new)):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._hold)

    def _find_stop(self, new_len: int) -> bool:
        # A stop string can end only inside the new text; start the search early enough to catch
        # one that began in text we were holding back.
        start = max(0, len(self.text) - new_len - self._hold)
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self._include_stop else self.text[:i]
        self.stop_reason = s
        return True

    def flush(self) -> str:
        """The held-back tail, to emit when the completion finishes for another reason."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
