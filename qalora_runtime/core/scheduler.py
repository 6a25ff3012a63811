"""Scheduler: continuous batching with one token budget per step (vLLM v1 style).

There is no separate prefill phase. Each step spends ``max_num_batched_tokens``:

1. Running requests first, oldest first: a decode costs 1 token, an unfinished prompt
   continues with a chunk of whatever budget is left. When the KV cache has no block
   for a running request, the most recently arrived running request (with the
   ``priority`` policy: the worst priority, then the latest) is preempted: its blocks
   are freed and it goes back to the front of the waiting queue to be recomputed
   later (usually cheaply, through the prefix cache).
2. Then waiting requests in FCFS (or priority) order, each after a prefix-cache
   lookup (skipped while a request collects prompt logprobs: its prompt must really
   be computed, every row's logits returned); with chunked prefill a prompt takes
   whatever budget is left, without it a prompt is scheduled whole or waits. The queue head that does not fit blocks the
   requests behind it (no overtaking, so nothing starves). No new request is
   admitted in a step that preempted, which would only thrash.

Why it cannot deadlock: ``max_model_len`` is capped to the cache's capacity and
longer prompts are rejected in :meth:`Scheduler.add_request`, so a request alone
always fits; the oldest running request is never a preemption victim, so it always
progresses and eventually finishes.

The engine loop calls :meth:`schedule`, runs the model on the returned
:class:`SchedulerOutput`, samples, then calls :meth:`update_from_output`. Stop
strings are detected by the engine's detokenizer, which calls :meth:`finish_request`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Mapping

from qalora_runtime.config import CacheConfig, SchedulerConfig
from qalora_runtime.core.kv_cache_manager import ComputedPrefix, KVCacheManager
from qalora_runtime.core.scheduler_output import ScheduledRequest, SchedulerOutput
from qalora_runtime.core.stats import SchedulerStats
from qalora_runtime.request import FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)


class SchedulerQueueFullError(RuntimeError):
    """The waiting queue holds ``max_queued_requests`` requests; retry later (HTTP 503)."""


class Scheduler:
    """Decides, every step, which tokens of which requests the model computes."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.kv = KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        # A sequence longer than the whole cache could never run, even alone.
        self.max_model_len = min(scheduler_config.max_model_len, cache_config.num_slots)
        if self.max_model_len < scheduler_config.max_model_len:
            logger.warning(
                "max_model_len %d exceeds the KV cache capacity (%d blocks x %d = %d tokens); "
                "sequences are capped at %d tokens",
                scheduler_config.max_model_len, cache_config.num_blocks, cache_config.block_size,
                cache_config.num_slots, self.max_model_len,
            )
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _order_key
        self.running: list[Request] = []
        self._seq = itertools.count()
        self._order: dict[str, tuple[int, int]] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- queries -------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests holding KV blocks and taking part in steps."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Queued requests (new or preempted)."""
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        """The live (unfinished) request with this id, or None."""
        return self.requests.get(request_id)

    def make_stats(self) -> SchedulerStats:
        """A snapshot of queue sizes, KV usage, prefix-cache and preemption counters."""
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preempted_waiting=sum(1 for r in self.waiting if r.status is RequestStatus.PREEMPTED),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

    def stats(self) -> SchedulerStats:
        """Alias of :meth:`make_stats`."""
        return self.make_stats()

    # -- adding and finishing ------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises ValueError for a duplicate id, a request that is not fresh, or a prompt
        that leaves no room for one output token within ``max_model_len``; raises
        :class:`SchedulerQueueFullError` when the queue is full.

        For ``n > 1`` add the samples as separate requests; give each extra sample
        ``parent_request_id`` = the first one's id (same prompt). A child is not
        admitted while its parent's prompt is being computed; afterwards it shares the
        parent's full prompt blocks (:meth:`KVCacheManager.fork`) and recomputes only
        the partial last block. If the parent has finished or was aborted by then, the
        child runs on its own (prefix-cache hits still apply).
        """
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} must be new (WAITING, nothing computed)")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {rid!r}: the prompt has {request.num_tokens} tokens, but at most "
                f"{self.max_model_len - 1} fit (max_model_len {self.max_model_len}, including at "
                "least one generated token)"
            )
        parent = self.requests.get(request.parent_request_id or "")
        if parent is not None and parent.prompt_token_ids != request.prompt_token_ids:
            raise ValueError(f"request {rid!r}: prompt differs from its parent {parent.request_id!r}")
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) >= limit:
            raise SchedulerQueueFullError(f"the waiting queue is full ({limit} requests)")
        priority = request.priority if self.config.policy == "priority" else 0
        self._order[rid] = (priority, next(self._seq))
        self.requests[rid] = request
        self._enqueue(request)

    def finish_request(
        self, request_id: str, reason: FinishReason | str, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a live request now (e.g. the detokenizer matched a stop string).

        Frees its blocks at once. Returns the request, or None if it is unknown or
        already finished — finishing twice is harmless.
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        if stop_reason is not None:
            request.stop_reason = stop_reason
        self._finish(request, RequestStatus.from_finish_reason(reason))
        return request

    def abort(self, request_id: str) -> Request | None:
        """Abort a waiting or running request and free everything it holds."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def abort_request(self, request_id: str) -> Request | None:
        """Alias of :meth:`abort`."""
        return self.abort(request_id)

    # -- the step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose the tokens computed in this step and allocate their KV slots."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        to_advance: list[tuple[Request, int]] = []

        self.running.sort(key=self._order_key)
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # its sampled token was not reported yet; nothing to do
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = running.pop()  # latest arrival: never one scheduled before it
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._schedule_one(request, num_new, is_new=False))
                to_advance.append((request, num_new))
                budget -= num_new
                i += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled, to_advance)

        # Advance only now: during this call num_computed_tokens means "KV written by
        # earlier steps", which is what the fork gate and the prefix cache rely on.
        for request, num_new in to_advance:
            request.num_computed_tokens += num_new
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            finished_request_ids=finished,
        )

    def _admit_waiting(
        self, budget: int, scheduled: list[ScheduledRequest], to_advance: list[tuple[Request, int]]
    ) -> int:
        idx = 0
        while idx < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[idx]
            parent = self.requests.get(request.parent_request_id or "")
            if parent is not None and not self._prompt_computed(parent):
                idx += 1  # a sample of n waits for its parent's prompt KV; others may pass
                continue
            if parent is not None:
                prefix: ComputedPrefix = self.kv.fork(parent, request)
            else:  # a request collecting prompt logprobs must compute its whole prompt
                prefix = self.kv.get_computed_blocks(request, use_cache=not _wants_prompt_logits(request))
            num_new = request.num_tokens - prefix.num_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            del self.waiting[idx]
            request.num_computed_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(self._schedule_one(request, num_new, is_new=True))
            to_advance.append((request, num_new))
            budget -= num_new
        return budget

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, int]
    ) -> list[Request]:
        """Record the step's results; returns the requests that finished in it.

        Registers newly computed full blocks in the prefix cache, appends each sampled
        token and applies the stops that need only token ids: EOS (unless
        ``ignore_eos``) and ``stop_token_ids`` once ``min_tokens`` are out, then
        ``max_tokens`` and ``max_model_len``. Requests finished or aborted since
        :meth:`schedule` are skipped.
        """
        finished: list[Request] = []
        for entry in scheduler_output.scheduled:
            request = self.requests.get(entry.request_id)
            if request is None or request is not entry.request or request.status is not RequestStatus.RUNNING:
                continue
            self.kv.cache_blocks(request)
            if not entry.sample:
                continue
            token = sampled_token_ids.get(entry.request_id)
            if token is None:
                raise ValueError(f"no sampled token for request {entry.request_id!r}, which sampled")
            request.append_output_token(token)
            status = self._check_stop(request, token)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    # -- helpers -------------------------------------------------------------------

    def _schedule_one(self, request: Request, num_new: int, is_new: bool) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:end],
            start_position=start,
            block_table=self.kv.get_block_table(request.request_id),
            slot_mapping=self.kv.slot_mapping(request.request_id, start, end),
            sample=end == request.num_tokens,
            all_logits=_wants_prompt_logits(request) and start < request.num_prompt_tokens - 1,
            is_new=is_new,
            request=request,
        )

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_id_set:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _prompt_computed(request: Request) -> bool:
        return request.status is RequestStatus.RUNNING and request.num_computed_tokens >= request.num_prompt_tokens

    def _order_key(self, request: Request) -> tuple[int, int]:
        return self._order[request.request_id]

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._order_key)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = status
        rid = request.request_id
        del self.requests[rid]
        del self._order[rid]
        self._finished_ids.append(rid)


def _wants_prompt_logits(request: Request) -> bool:
    """Whether ``request`` still collects prompt logprobs: asked for, the first sample of
    its group (the others share its prompt), and no token generated yet (afterwards a
    recompute after preemption needs no logits)."""
    return (
        request.sampling_params.prompt_logprobs is not None
        and request.parent_request_id is None
        and request.num_output_tokens == 0
    )
