"""LoadingEngine: an EngineClient that is up at once and healthy once a background load finishes.

Loading a model takes seconds to minutes; the HTTP server starts first so
/health can answer 503 ("still loading") instead of refusing connections,
which is what orchestrators' readiness probes expect.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, AsyncIterator, Callable

from qalora_runtime.engine.protocol import EngineClient, EngineStats, ModelInfo, StepEvent
from qalora_runtime.outputs import RequestOutput
from qalora_runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineNotReady(RuntimeError):
    """The engine is still loading, or failed to load."""


class LoadingEngine:
    """Builds an engine with ``factory`` on a background thread and forwards to it once built."""

    def __init__(
        self, factory: Callable[[], EngineClient], on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        self._factory = factory
        self._on_failure = on_failure
        self._engine: EngineClient | None = None
        self.load_error: BaseException | None = None
        self._listeners: list[Callable[[StepEvent], None]] = []
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._load, name="qalora-engine-loader", daemon=True)

    def start(self) -> None:
        """Begin loading."""
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading ended (either way); True when it did within ``timeout``."""
        return self._loaded.wait(timeout)

    def _load(self) -> None:
        try:
            engine = self._factory()
        except BaseException as exc:
            logger.error("loading the engine failed: %s", exc, exc_info=not isinstance(exc, (ValueError, OSError)))
            self.load_error = exc
            self._loaded.set()
            if self._on_failure is not None:
                self._on_failure(exc)
            return
        with self._lock:
            for listener in self._listeners:
                engine.add_step_listener(listener)
            self._engine = engine
        logger.info("engine ready: %s (max_model_len %d)", engine.model_info.name, engine.model_info.max_model_len)
        self._loaded.set()

    def _ready(self) -> EngineClient:
        engine = self._engine
        if engine is None:
            raise EngineNotReady("the engine failed to load" if self.load_error else "the engine is still loading")
        return engine

    # -- EngineClient ----------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return self._ready().model_info

    @property
    def tokenizer(self) -> Any:
        return self._ready().tokenizer

    @property
    def is_healthy(self) -> bool:
        engine = self._engine
        return engine is not None and engine.is_healthy

    def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        return self._ready().generate(prompt_token_ids, sampling_params, request_id, priority)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self._ready().stats()

    def add_step_listener(self, listener: Callable[[StepEvent], None]) -> None:
        with self._lock:
            if self._engine is None:
                self._listeners.append(listener)
                return
        self._engine.add_step_listener(listener)

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._engine is not None:
            await self._engine.shutdown(timeout)
        else:
            logger.info("shutting down before the engine finished loading")
