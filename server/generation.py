"""RequestGroup: the engine requests behind one HTTP request, and the state of each choice.

One HTTP request becomes one engine request per prompt (a completions
request may carry several), each with ``n`` samples; choice ``i`` of prompt
``p`` is reported as index ``p * n + i``, as OpenAI and vLLM do. The group
owns those engine requests: whatever ends the HTTP request (the last token,
an error, a client that hangs up, a cancelled task), :meth:`close` aborts what
is still running so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio

from qalora_runtime.engine.protocol import EngineClient, QueueFullError
from qalora_runtime.outputs import PositionLogprobs, RequestOutput
from qalora_runtime.sampling_params import SamplingParams

from .errors import APIError
from .metrics import ServerMetrics
from .responses import UsageInfo

logger = logging.getLogger(__name__)


@dataclass
class ChoiceState:
    """Everything generated so far for one choice."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    #: The prompt's own logprobs (first entry None) when the request asked for them.
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass
class ChoiceDelta:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs]
    finish_reason: str | None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # the choice's, once known


class RequestGroup:
    """Submits prompts to the engine, merges their outputs and tracks every choice."""

    def __init__(
        self, engine: EngineClient, metrics: ServerMetrics | None, *, retry_after_s: int = 1
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self.prompts: list[list[int]] = []
        self.choices: dict[int, ChoiceState] = {}
        self._n = 1
        self._ids: list[str] = []
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._firsts: list[RequestOutput] = []
        self._unfinished: set[str] = set()
        self._closed = False

    async def start(self, prompts: list[list[int]], params: SamplingParams, base_id: str) -> None:
        """Submit every prompt and wait for each one's first output.

        Waiting for the first output lets a full queue (429) or an invalid
        request (400) become the HTTP status, before any stream has started.
        """
        self._n = params.n
        self.prompts = prompts
        for p in range(len(prompts)):
            for i in range(params.n):
                self.choices[p * params.n + i] = ChoiceState(index=p * params.n + i)
        for p, ids in enumerate(prompts):
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{p}"
            self._ids.append(request_id)
            self._streams.append(aiter(self._engine.generate(ids, params, request_id)))
            self._unfinished.add(request_id)
        try:
            self._firsts = list(await asyncio.gather(*(anext(s) for s in self._streams)))
        except QueueFullError as exc:
            await self.close()
            raise APIError(
                429, str(exc), code="queue_full", headers={"Retry-After": str(self._retry_after_s)}
            ) from exc
        except ValueError as exc:
            await self.close()
            raise APIError(400, str(exc)) from exc
        except Exception as exc:
            await self.close()
            if not self._engine.is_healthy:  # e.g. "not accepting requests" while it shuts down
                raise APIError(503, f"the engine is not available: {exc}", code="engine_unavailable") from exc
            raise
        except BaseException:
            await self.close()
            raise

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield, per engine output, the choices it changed (already recorded in ``choices``)."""
        async for p, output in self._merged():
            yield self._record(p, output)

    async def run_to_end(self) -> dict[int, ChoiceState]:
        """Consume every output; the final state of each choice."""
        async for _ in self.deltas():
            pass
        return self.choices

    def usage(self) -> UsageInfo:
        """Token counts so far (prompts counted once, all choices' tokens summed)."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def close(self) -> None:
        """Abort what is still running (idempotent, safe from a cancelled task)."""
        if self._closed:
            return
        self._closed = True
        # Shielded: the caller is often a task being cancelled because its client left.
        with anyio.CancelScope(shield=True):
            for request_id in sorted(self._unfinished):
                try:
                    await self._engine.abort(request_id)
                except Exception:  # an abort must never mask the original error
                    logger.exception("aborting %s failed", request_id)
                if self._metrics is not None:
                    self._metrics.request_aborted(self._n)
            if self._unfinished:
                logger.info("aborted %d unfinished request(s): %s", len(self._unfinished), sorted(self._unfinished))
            self._unfinished.clear()
            for stream in self._streams:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        logger.debug("closing an engine stream failed", exc_info=True)

    # -- internals ---------------------------------------------------------------------

    def _record(self, p: int, output: RequestOutput) -> list[ChoiceDelta]:
        changed = []
        if output.prompt_logprobs is not None:  # once per prompt, shared by its n choices
            for i in range(self._n):
                self.choices[p * self._n + i].prompt_logprobs = output.prompt_logprobs
        for co in output.outputs:
            state = self.choices[p * self._n + co.index]
            state.text += co.text_delta
            state.num_tokens = len(co.token_ids) if co.token_ids else state.num_tokens + len(co.token_ids_delta)
            state.logprobs.extend(co.logprobs_delta)
            if co.finish_reason is not None:
                state.finish_reason = co.finish_reason
            changed.append(
                ChoiceDelta(
                    index=state.index,
                    text=co.text_delta,
                    token_ids=list(co.token_ids_delta),
                    logprobs=list(co.logprobs_delta),
                    finish_reason=co.finish_reason,
                    prompt_logprobs=state.prompt_logprobs,
                )
            )
        if output.finished:
            self._unfinished.discard(output.request_id)
            if self._metrics is not None:
                states = [self.choices[p * self._n + i] for i in range(self._n)]
                self._metrics.request_finished(output, states)
        return changed

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._streams) == 1:  # the common case: no tasks, no queue
            yield 0, self._firsts[0]
            if not self._firsts[0].finished:
                async for output in self._streams[0]:
                    yield 0, output
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                await queue.put((p, self._firsts[p]))
                if not self._firsts[p].finished:
                    async for output in self._streams[p]:
                        await queue.put((p, output))
                await queue.put((p, None))
            except Exception as exc:  # surfaced to the consumer below
                await queue.put((p, exc))

        tasks = [asyncio.create_task(pump(p)) for p in range(len(self._streams))]
        try:
            remaining = len(tasks)
            while remaining:
                p, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield p, item
        finally:
            for task in tasks:
                task.cancel()
