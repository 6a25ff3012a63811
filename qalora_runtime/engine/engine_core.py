"""EngineCore: the synchronous engine step — schedule, run the model, sample, update, detokenize.

It owns the scheduler (pure Python, in ``core/``) and the model runner (torch, in
``worker/``) and turns their work into :class:`RequestOutput` deltas. A request
with ``n > 1`` becomes ``n`` scheduler requests ``<id>#0 .. <id>#{n-1}``; the
later ones name the first as parent, so they share its prompt KV blocks.
Nothing here is thread-safe: :class:`AsyncEngine` calls it from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.scheduler import Scheduler
from ..outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput, TokenLogprob
from ..request import FinishReason, Request
from ..sampling_params import SamplingParams
from ..worker.batch_sampler import SampledToken, SamplingRow, sample
from .detokenizer import IncrementalDetokenizer
from .prompt_logprobs import PromptLogprobsCollector
from .protocol import EngineStats, ModelInfo, StepEvent

logger = logging.getLogger(__name__)


@dataclass
class _Completion:
    index: int
    request: Request
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    pending: CompletionOutput | None = None  # the delta built during this step


@dataclass
class _Group:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    completions: list[_Completion] = field(default_factory=list)
    prompt_logprobs: PromptLogprobsCollector | None = None  # when params.prompt_logprobs is set

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class EngineCore:
    """One engine: a scheduler and a model runner stepped together."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: Any,
        tokenizer: Any,
        model_info: ModelInfo,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.step_listeners: list[Callable[[StepEvent], None]] = []
        self._groups: dict[str, _Group] = {}
        self._by_internal: dict[str, tuple[_Group, _Completion]] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @classmethod
    def from_model(cls, model: str | None = None, **engine_args: Any) -> "EngineCore":
        """Resolve, load and wire a model; see :func:`qalora_runtime.engine.builder.build_engine_core`."""
        from .builder import build_engine_core

        return build_engine_core(model, **engine_args)

    # -- requests ------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never run (empty, bad ids, too long)."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        limit = self.model_info.max_model_len
        n_prompt = len(prompt_token_ids)
        if n_prompt >= limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{n_prompt} tokens, {n_prompt - limit + 1} more than fit with at least one new token."
            )
        if params.max_tokens is not None and n_prompt + params.max_tokens > limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, {params.max_tokens} "
                f"for the completion), {n_prompt + params.max_tokens - limit} too many. Reduce the "
                "prompt or max_tokens."
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (``n`` completions) for scheduling."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, params)
        if params.max_tokens is None:
            params = params.replace(max_tokens=self.model_info.max_model_len - len(prompt_token_ids))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(request_id, list(prompt_token_ids), params, RequestMetrics(arrival_time=arrival))
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = PromptLogprobsCollector(prompt_token_ids, params.prompt_logprobs,
                                                            self.tokenizer.decode)
        parent_id = None
        for i in range(params.n):
            internal = f"{request_id}#{i}"
            req = Request(
                request_id=internal,
                prompt_token_ids=prompt_token_ids,
                sampling_params=params,
                arrival_time=arrival,
                priority=priority,
                eos_token_ids=self.eos_token_ids,
                parent_request_id=parent_id,
            )
            parent_id = parent_id or internal
            gen = None
            if params.seed is not None:
                # Each sample has its own stream so its tokens do not depend on batch-mates.
                gen = torch.Generator().manual_seed((params.seed + i) % (1 << 64))
            detok = IncrementalDetokenizer(
                self.tokenizer,
                list(prompt_token_ids),
                stop=list(params.stop_strings),
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            )
            comp = _Completion(i, req, detok, gen)
            group.completions.append(comp)
            self._by_internal[internal] = (group, comp)
        self._groups[request_id] = group
        for comp in group.completions:
            self.scheduler.add_request(comp.request)

    def abort_request(self, request_id: str) -> None:
        """Abort every completion of ``request_id`` and free its blocks now."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for comp in group.completions:
            self.scheduler.abort_request(comp.request.request_id)
            self._by_internal.pop(comp.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._groups)

    def num_waiting(self) -> int:
        """Requests waiting to be scheduled (for the bounded queue)."""
        return self.scheduler.num_waiting

    # -- the step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that changed."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self._drain_scheduler_finished()
        now = time.monotonic()
        for s in sched.scheduled:
            group, _ = self._by_internal[s.request_id]
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
        to_sample = [s for s in sched.scheduled if s.sample]
        logits = self._take_prompt_logits(sched.scheduled, self.runner.execute(sched.scheduled))
        rows = []
        for s in to_sample:
            _, comp = self._by_internal[s.request_id]
            req = s.request
            rows.append(SamplingRow(req.sampling_params, list(req.prompt_token_ids), req.output_token_ids,
                                    comp.generator, self.eos_token_ids))
        sampled = sample(logits, rows) if rows else []
        tokens = {s.request_id: t.token_id for s, t in zip(to_sample, sampled)}
        finished = {r.request_id for r in self.scheduler.update_from_output(sched, tokens)}

        now = time.monotonic()
        n_prompt = sum(s.num_tokens for s in sched.scheduled if not s.is_decode)
        self._prompt_tokens += n_prompt
        self._generation_tokens += len(tokens)
        touched: dict[str, _Group] = {}
        for s, tok in zip(to_sample, sampled):
            group, comp = self._by_internal[s.request_id]
            self._emit_token(group, comp, tok, s.request_id in finished, now)
            touched[group.request_id] = group
        event = StepEvent(sched.num_scheduled_tokens, n_prompt, len(tokens))
        for listener in self.step_listeners:
            listener(event)
        return [self._collect(g, now) for g in touched.values()]

    def _take_prompt_logits(self, scheduled: list, logits: torch.Tensor) -> torch.Tensor:
        """Feed the prompt-logprob rows of ``all_logits`` items to their collectors; the sampling rows remain."""
        if not any(s.all_logits for s in scheduled):
            return logits
        rows: list[int] = []
        offset = 0
        for s in scheduled:
            if s.all_logits:
                group, _ = self._by_internal[s.request_id]
                if group.prompt_logprobs is not None:
                    group.prompt_logprobs.add_chunk(s.start_position, logits[offset:offset + s.num_tokens])
                offset += s.num_tokens
                if s.sample:
                    rows.append(offset - 1)
            elif s.sample:
                rows.append(offset)
                offset += 1
        return logits[rows]

    def _emit_token(self, group: _Group, comp: _Completion, tok: SampledToken, finished: bool, now: float) -> None:
        m = group.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        elif m.last_token_time is not None and now > m.last_token_time:  # once per step, not per sample
            m.inter_token_latencies.append(now - m.last_token_time)
        m.last_token_time = now
        req = comp.request
        delta = comp.detok.add_token(tok.token_id)
        if comp.detok.stop_reason is not None and not finished:
            self.scheduler.finish_request(req.request_id, FinishReason.STOP)
            finished = True
            comp.stop_reason = comp.detok.stop_reason
        if finished:
            delta += comp.detok.flush()
            comp.finish_reason = str(req.finish_reason or FinishReason.STOP)
            if comp.stop_reason is None:
                comp.stop_reason = req.stop_reason
        out = comp.pending or CompletionOutput(index=comp.index)
        out.text_delta += delta
        out.token_ids_delta.append(tok.token_id)
        if tok.logprob is not None:
            out.logprobs_delta.append(self._logprobs(tok))
        out.finish_reason = comp.finish_reason
        out.stop_reason = comp.stop_reason
        comp.pending = out

    def _logprobs(self, tok: SampledToken) -> PositionLogprobs:
        decode = self.tokenizer.decode
        return PositionLogprobs(
            sampled=TokenLogprob(tok.token_id, tok.logprob, decode([tok.token_id])),
            top=[TokenLogprob(t, lp, decode([t])) for t, lp in (tok.top_logprobs or [])],
        )

    def _collect(self, group: _Group, now: float) -> RequestOutput:
        outs = []
        for comp in group.completions:
            if comp.pending is None:
                continue
            out, comp.pending = comp.pending, None
            out.text = comp.detok.text
            out.token_ids = list(comp.request.output_token_ids)
            outs.append(out)
        done = group.finished
        if done:
            group.metrics.finished_time = now
            self._groups.pop(group.request_id, None)
            for comp in group.completions:
                self._by_internal.pop(comp.request.request_id, None)
        prompt_logprobs = None
        collector = group.prompt_logprobs
        if collector is not None and collector.complete and not collector.sent:
            prompt_logprobs, collector.sent = collector.result(), True  # once, with the first output
        return RequestOutput(group.request_id, group.prompt_token_ids, outs, done, group.metrics, prompt_logprobs)

    def _drain_scheduler_finished(self) -> list[RequestOutput]:
        """Requests the scheduler finished without a step (e.g. rejected as unschedulable)."""
        outs = []
        now = time.monotonic()
        for group in list(self._groups.values()):
            for comp in group.completions:
                if comp.finish_reason is None and comp.request.is_finished:
                    comp.finish_reason = str(comp.request.finish_reason)
                    comp.pending = CompletionOutput(index=comp.index, finish_reason=comp.finish_reason)
            if any(c.pending for c in group.completions):
                outs.append(self._collect(group, now))
        return outs

    # -- statistics ------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Gauges and counters for the metrics layer."""
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
        )
