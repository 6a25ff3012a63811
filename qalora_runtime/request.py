"""Request: one sequence's state as the scheduler sees it (token ids, progress, status).

Pure Python, no torch. The scheduler owns and mutates requests; other layers read them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qalora_runtime.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request ended, with the OpenAI ``finish_reason`` strings as values."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the scheduler.

    WAITING -> RUNNING -> (PREEMPTED -> RUNNING)* -> FINISHED_*. A PREEMPTED request
    sits in the waiting queue with no KV blocks and recomputes its tokens when resumed.
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for the three FINISHED_* states."""
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        """The OpenAI finish reason of a finished status, else None."""
        return _FINISH_REASONS.get(self)

    @staticmethod
    def from_finish_reason(reason: FinishReason | str) -> RequestStatus:
        """The FINISHED_* status for ``reason`` ("stop", "length" or "abort")."""
        reason = FinishReason(reason)
        for status, r in _FINISH_REASONS.items():
            if r is reason:
                return status
        raise ValueError(f"unknown finish reason {reason!r}")  # pragma: no cover


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, generated tokens and scheduling state.

    ``num_computed_tokens`` counts the leading tokens of :attr:`all_token_ids` whose KV
    is in the cache (or is being written by the step just scheduled). A request
    samples a new token in a step only when that step computes its last known token.

    ``eos_token_ids`` come from the tokenizer/generation config; they end the request
    unless ``sampling_params.ignore_eos`` (``stop_token_ids`` always end it, once
    ``min_tokens`` are out). ``parent_request_id`` marks one of the ``n > 1`` samples of
    a request: the scheduler admits it once the parent's prompt KV exists and shares the
    parent's full prompt blocks (see :meth:`Scheduler.add_request`).
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    eos_token_ids: tuple[int, ...] = ()
    parent_request_id: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    #: The stop token id (or, set by the engine, stop string) that ended the request.
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    #: time.monotonic() when first scheduled; the engine derives queue time from it.
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        prompt = list(self.prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {self.request_id!r}: the prompt must have at least one token")
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"request {self.request_id!r}: token ids must be integers >= 0, got {t!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        self.prompt_token_ids = tuple(prompt)
        self.eos_token_ids = tuple(self.eos_token_ids)
        # One list for prompt + output so slicing the tokens to compute is O(slice),
        # not a concatenation per step.
        self._all_token_ids: list[int] = prompt + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt followed by output tokens. Read-only by convention: do not mutate."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Number of generated tokens so far."""
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once the request reached a FINISHED_* status."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        """"stop", "length" or "abort" once finished, else None."""
        return self.status.finish_reason

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
