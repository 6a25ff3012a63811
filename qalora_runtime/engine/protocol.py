"""The contract between the runtime and its callers (the HTTP server, the offline API).

The server depends on this protocol only, never on engine internals, so the
engine may move its core loop to another thread or process without the server
noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model, for /v1/models and the info metric."""

    name: str
    path: str
    architecture: str
    max_model_len: int
    bits: int
    group_size: int
    kernel: str
    dtype: str
    device: str


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of engine gauges and monotonically increasing counters."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


@dataclass(frozen=True)
class StepEvent:
    """Emitted after every engine step: how many tokens that iteration computed."""

    num_tokens: int
    num_prompt_tokens: int
    num_generation_tokens: int


class EngineClient(Protocol):
    """What a front end needs from the engine."""

    model_info: ModelInfo
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields a RequestOutput per step that changed it, the last with finished=True.

        Raises ValueError for an invalid request (e.g. prompt longer than the
        context) and QueueFullError when the waiting queue is full.
        """

    async def abort(self, request_id: str) -> None:
        """Abort a request at once, freeing its KV blocks. Unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """Current gauges and counters."""

    def add_step_listener(self, listener: Callable[[StepEvent], None]) -> None:
        """Call ``listener`` (from the engine thread) after every step."""

    @property
    def is_healthy(self) -> bool:
        """True while the engine loop is alive and the model is loaded."""

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let in-flight ones finish up to ``timeout``, then abort the rest."""


class QueueFullError(RuntimeError):
    """The engine's bounded waiting queue is full; the caller should retry later."""

    def __init__(self, max_queued: int) -> None:
        super().__init__(f"the request queue is full ({max_queued} waiting); retry later")
        self.max_queued = max_queued
