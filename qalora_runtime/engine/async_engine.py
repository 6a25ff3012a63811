"""AsyncEngine: an asyncio facade over the synchronous EngineCore, which runs in its own thread.

The core loop owns the model and the scheduler; nothing else touches them. The
event loop talks to it through a thread-safe inbox (add / abort commands) and
gets results back as RequestOutputs pushed onto one ``asyncio.Queue`` per
request with ``call_soon_threadsafe``. Model compute releases the GIL inside
torch ops, so the HTTP event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .engine_core import EngineCore
from .protocol import EngineStats, ModelInfo, QueueFullError, StepEvent

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs an :class:`EngineCore` on a background thread; implements ``EngineClient``."""

    def __init__(self, core: EngineCore, max_queued_requests: int | None = None) -> None:
        self._core = core
        self.model_info: ModelInfo = core.model_info
        self.tokenizer: Any = core.tokenizer
        self._max_queued = max_queued_requests
        self._inbox: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qalora-engine", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, model: str | None = None, *, max_queued_requests: int | None = None, **engine_args: Any) -> "AsyncEngine":
        """Load ``model`` (None = the default model) and start the engine thread.

        ``engine_args`` are those of :meth:`EngineCore.from_model` (dtype, max_model_len,
        max_num_seqs, max_num_batched_tokens, block_size, kv_cache_memory_bytes,
        enable_prefix_caching, chat_template, ...).
        """
        core = EngineCore.from_model(model, **engine_args)
        return cls(core, max_queued_requests=max_queued_requests)

    # -- EngineClient ------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        """True while the engine thread is alive and has not crashed."""
        return self._dead is None and self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> EngineStats:
        """Gauges and counters (read without locking: every field is a plain int/float)."""
        return self._core.stats()

    def add_step_listener(self, listener: Callable[[StepEvent], None]) -> None:
        """Call ``listener`` after every step, from the engine thread."""
        self._core.step_listeners.append(listener)

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs; aborts it if the consumer stops early."""
        if not self.is_healthy or not self._accepting:
            raise RuntimeError("the engine is not accepting requests")
        self._core.validate_request(prompt_token_ids, sampling_params)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._max_queued is not None and self._core.num_waiting() + self._inbox.qsize() >= self._max_queued:
                raise QueueFullError(self._max_queued)
            self._streams[request_id] = (loop, stream)
        self._inbox.put(_Add(request_id, list(prompt_token_ids), sampling_params, priority, time.monotonic()))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        self._inbox.put(_Abort(request_id))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; wait up to ``timeout`` s for in-flight requests; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_healthy:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self._inbox.put(_Abort(rid))
        self._stop.set()
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join, 10.0)

    # -- engine thread -----------------------------------------------------
    def _deliver(self, output: RequestOutput | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, output)
            except RuntimeError:  # the event loop closed under us (shutdown)
                pass

    def _handle(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            self._core.abort_request(cmd.request_id)
            return
        with self._lock:
            wanted = cmd.request_id in self._streams
        if not wanted:  # the client went away before the engine saw the request
            return
        try:
            self._core.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.priority, cmd.arrival_time)
        except ValueError as e:
            self._deliver(e, cmd.request_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self._core.has_unfinished_requests()
                try:
                    cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
                    while cmd is not None:
                        self._handle(cmd)
                        cmd = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self._stop.is_set():
                    break
                if self._core.has_unfinished_requests():
                    for out in self._core.step():
                        self._deliver(out, out.request_id)
        except BaseException as e:  # a bug: fail every stream loudly instead of hanging them
            logger.exception("engine loop crashed")
            self._dead = e
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(e, rid)
