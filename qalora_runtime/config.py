"""Frozen configuration of the KV cache and the scheduler, validated on construction.

Every field is keyword-only so call sites read as ``CacheConfig(num_blocks=512)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Paged KV cache geometry: ``num_blocks`` blocks of ``block_size`` token slots each."""

    block_size: int = 16
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive_int("CacheConfig", "block_size", self.block_size)
        _positive_int("CacheConfig", "num_blocks", self.num_blocks)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"CacheConfig.enable_prefix_caching must be a boolean, got {self.enable_prefix_caching!r}"
            )

    @property
    def num_slots(self) -> int:
        """Total token slots in the cache."""
        return self.block_size * self.num_blocks


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Per-step limits of the scheduler.

    ``max_num_batched_tokens`` is the token budget of one step (prefill chunks plus one
    token per decode); ``max_num_seqs`` caps the running batch; ``max_model_len`` caps
    prompt plus output length. Without chunked prefill a whole prompt must fit in one
    step, so the budget must cover ``max_model_len`` (as vLLM requires) — otherwise a
    long prompt, or a preempted request resuming, could never be scheduled.
    ``max_queued_requests`` bounds the waiting queue (None: unbounded).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int
    enable_chunked_prefill: bool = True
    max_queued_requests: int | None = None
    #: "fcfs" or "priority" (lower ``Request.priority`` first, then arrival order).
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _positive_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _positive_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("SchedulerConfig", "max_model_len", self.max_model_len)
        if self.max_queued_requests is not None:
            _positive_int("SchedulerConfig", "max_queued_requests", self.max_queued_requests)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(
                f"SchedulerConfig.enable_chunked_prefill must be a boolean, got {self.enable_chunked_prefill!r}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"SchedulerConfig.policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs one token per step"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) when chunked prefill is disabled, or long "
                "prompts could never be scheduled; enable chunked prefill or raise the budget"
            )
