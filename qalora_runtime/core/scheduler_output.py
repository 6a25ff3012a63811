"""SchedulerOutput: what one engine step must compute — the boundary object between
the scheduler and the model runner.

For each scheduled request the runner gets the token ids to run at positions
``start_position .. end_position-1``, the request's whole block table (for attention
over its cached prefix) and the cache slot of every new token (where to write K/V).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qalora_runtime.request import Request
from qalora_runtime.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of a step.

    ``sample`` is True when this step computes the request's last known token, so the
    runner must sample one new token from the logits at the last position; it is False
    for a prefill chunk that leaves part of the prompt for later steps.
    ``is_new`` is True the first time the request is scheduled and again after each
    preemption: per-request runner state (seeded generator, penalty counts) must be
    (re)built from ``request``.
    ``request`` is a live reference for reading (sampling params, prompt and output
    tokens for penalties); only the scheduler mutates it.
    ``all_logits`` asks the runner for the logits of every token of this chunk, not
    only the last (the request wants prompt logprobs and the chunk holds prompt positions).
    """

    request_id: str
    token_ids: Sequence[int]
    start_position: int
    block_table: Sequence[int]
    slot_mapping: Sequence[int]
    sample: bool
    is_new: bool
    request: Request = field(repr=False, compare=False)
    all_logits: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens computed for this request in this step."""
        return len(self.token_ids)

    @property
    def end_position(self) -> int:
        """One past the last position computed in this step (the new context length)."""
        return self.start_position + len(self.token_ids)

    @property
    def positions(self) -> range:
        """Positions of ``token_ids`` in the sequence."""
        return range(self.start_position, self.end_position)

    @property
    def is_decode(self) -> bool:
        """True for a single generated token (not a prompt chunk or a recompute)."""
        return len(self.token_ids) == 1 and self.start_position >= self.request.num_prompt_tokens

    @property
    def sampling_params(self) -> SamplingParams:
        """The request's sampling parameters."""
        return self.request.sampling_params


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything one step computes.

    ``scheduled`` lists running requests first (decodes and prefill continuations),
    then newly admitted ones, in scheduling order. ``preempted_request_ids`` lost their
    KV in this step; ``finished_request_ids`` finished or were aborted since the
    previous step — the runner drops its per-request state for both.
    """

    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when nothing is to be computed this step."""
        return not self.scheduled

    @property
    def num_sampled(self) -> int:
        """How many requests sample a token in this step."""
        return sum(1 for s in self.scheduled if s.sample)

    def get(self, request_id: str) -> ScheduledRequest | None:
        """The scheduled entry for ``request_id``, or None."""
        for s in self.scheduled:
            if s.request_id == request_id:
                return s
        return None
