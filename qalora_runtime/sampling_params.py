"""SamplingParams: how one request samples and when it stops, validated on construction.

Ranges mirror vLLM (and the OpenAI API where it is stricter), so a value that vLLM
rejects is rejected here too, always with a ValueError that names the field.
This module is pure Python: the scheduler and the server validate requests without torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

logger = logging.getLogger(__name__)

#: Largest ``logprobs`` (top-logprobs count) accepted, as in the OpenAI API.
MAX_LOGPROBS = 20
#: Temperatures in (0, MIN_TEMPERATURE) are raised to it: dividing logits by a
#: tinier number overflows to inf/NaN in low precision (vLLM does the same).
MIN_TEMPERATURE = 1e-2
#: OpenAI caps each logit bias at +-100 (enough to ban or force a token).
MAX_LOGIT_BIAS = 100.0
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `n=True` is a client bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters.

    Frozen so the ``n`` samples of one request (and the worker's batch) can share one
    instance safely; use :meth:`replace` to derive a changed copy (validated again).

    Normalisations done on construction: ``top_k`` 0 becomes -1 (both mean "off"),
    ``stop`` becomes a tuple of strings, ``stop_token_ids`` a tuple of ints,
    ``logit_bias`` a dict with int keys (string keys such as ``"50256"`` from JSON
    are converted), and a temperature in ``(0, 0.01)`` is raised to 0.01.

    ``min_tokens`` only stops EOS/``stop_token_ids`` from ending the request early:
    the sampler is expected to mask those tokens until ``min_tokens`` are generated.
    ``max_tokens=None`` means "until the model's context length".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    #: Logprobs of the prompt's own tokens (positions 1..), with this many top alternatives;
    #: None: not computed. Costs a full-vocabulary logits row per prompt token and
    #: disables prefix-cache hits for the request (its prompt must really be computed).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_probabilities()
        self._check_penalties()
        self._check_stops()
        self._check_flags()

    # -- validation, one group of fields per helper ----------------------------------

    def _check_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}"
            )
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.prompt_logprobs!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] or None, got {self.seed!r}")

    def _check_probabilities(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s; using %s to avoid overflow",
                self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE,
            )
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence) and not isinstance(stop, (bytes, bytearray)):
            stop = tuple(stop)
        else:
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"each stop string must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes, bytearray)):
            ids = tuple(ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of integers or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"each stop token id must be an integer >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    def _check_flags(self) -> None:
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")

    # -- derived views -------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token (temperature 0)."""
        return self.temperature == 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, always as a tuple (possibly empty)."""
        return tuple(self.stop or ())

    @cached_property
    def stop_token_id_set(self) -> frozenset[int]:
        """``stop_token_ids`` as a frozenset, for O(1) membership checks."""
        return frozenset(self.stop_token_ids or ())

    def replace(self, **changes: Any) -> SamplingParams:
        """Return a copy with ``changes`` applied, validated again."""
        return replace(self, **changes)


def _normalise_logit_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token_id = key
        # JSON object keys are strings; accept "123" so the HTTP layer can pass them through.
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token_id = int(key)
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias[{token_id}] must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {value!r}"
            )
        out[token_id] = float(value)
    return out
