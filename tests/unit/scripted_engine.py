"""A scripted EngineClient and a character-level tokenizer: test doubles for the server's unit tests.

Never shipped. The engine "generates" a fixed reply one character per step,
honouring max_tokens, stop strings (holding back text that may start one),
n, ignore_eos, logprobs and abort, and keeps the counters a real engine
reports, so every server path can be driven in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import jinja2

from qalora_runtime.engine.protocol import EngineStats, ModelInfo, QueueFullError, StepEvent
from qalora_runtime.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from qalora_runtime.sampling_params import SamplingParams

PAD, BOS, EOS = 0, 1, 2
_OFFSET = 3


class CharTokenizer:
    """One token per character (id = code point + 3); ids 0-2 are pad/BOS/EOS."""

    bos_token_id = BOS
    eos_token_id = EOS
    chat_template = "built-in"

    def __len__(self) -> int:
        return 0x10000 + _OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [min(ord(c), 0xFFFF) + _OFFSET for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self._piece(i, skip_special_tokens) for i in ids)

    def _piece(self, i: int, skip: bool) -> str:
        if i >= _OFFSET:
            return chr(i - _OFFSET)
        return "" if skip else ("<pad>", "<s>", "</s>")[i]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._piece(i, False) for i in ids]

    def apply_chat_template(
        self, conversation: list[dict[str, str]], chat_template: str | None = None,
        add_generation_prompt: bool = True, tokenize: bool = False,
    ) -> str:
        assert not tokenize, "the server renders to text, then encodes"
        if chat_template:
            return jinja2.Template(chat_template).render(
                messages=conversation, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in conversation)
        return text + ("<|assistant|>" if add_generation_prompt else "")


@dataclass
class _Sample:
    index: int
    script: str
    text: str = ""  # everything generated so far
    sent: int = 0  # characters of text already emitted
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ScriptedEngine:
    """An EngineClient whose model always answers ``reply`` (sample i of n gets `` #i`` appended)."""

    def __init__(
        self, reply: str = "Hello! I am a scripted model.", *, max_model_len: int = 256,
        max_running: int | None = None, token_delay: float = 0.0, fail_after: int | None = None,
    ) -> None:
        self.reply = reply
        self.max_running = max_running
        self.token_delay = token_delay
        self.fail_after = fail_after  # raise RuntimeError after this many steps (mid-stream error)
        self.healthy = True
        self.model_info = ModelInfo(
            name="scripted-model", path="/models/scripted", architecture="LlamaForCausalLM",
            max_model_len=max_model_len, bits=4, group_size=32, kernel="reference", dtype="float32", device="cpu",
        )
        self.tokenizer = CharTokenizer()
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.submitted: list[tuple[list[int], SamplingParams, str]] = []
        self.shutdown_calls = 0
        self._abort_flags: set[str] = set()
        self._listeners: list[Callable[[StepEvent], None]] = []
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def add_step_listener(self, listener: Callable[[StepEvent], None]) -> None:
        self._listeners.append(listener)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.running), num_waiting=0, kv_cache_usage=0.125 * len(self.running),
            prefix_cache_queries=self._prompt_tokens, prefix_cache_hits=0, num_preemptions=0,
            prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
        )

    async def abort(self, request_id: str) -> None:
        self._mark_aborted(request_id)

    def _mark_aborted(self, request_id: str) -> None:
        if request_id in self.running:  # finished and unknown ids are ignored, as the engine does
            self.aborted.append(request_id)
            self._abort_flags.add(request_id)
            self.running.discard(request_id)

    async def shutdown(self, timeout: float = 30.0) -> None:
        self.shutdown_calls += 1
        self.healthy = False

    def script_for(self, index: int, n: int) -> str:
        return self.reply if n == 1 else f"{self.reply} #{index}"

    async def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        params = sampling_params
        if len(prompt_token_ids) >= self.model_info.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens exceeds the context")
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise QueueFullError(self.max_running)
        self.submitted.append((list(prompt_token_ids), params, request_id))
        self.running.add(request_id)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        samples = [_Sample(i, self.script_for(i, params.n)) for i in range(params.n)]
        self._prompt_tokens += len(prompt_token_ids)
        step = 0
        try:
            metrics.first_scheduled_time = time.monotonic()
            while True:
                await asyncio.sleep(self.token_delay)
                if request_id in self._abort_flags:
                    return
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("scripted engine failure")
                step += 1
                changed = [self._advance(s, params) for s in samples if s.finish_reason is None]
                now = time.monotonic()
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                else:  # like EngineCore: one inter-token gap per step that produced tokens
                    metrics.inter_token_latencies.append(now - metrics.last_token_time)
                metrics.last_token_time = now
                self._generation_tokens += len(changed)
                for listener in self._listeners:
                    listener(StepEvent(num_tokens=len(changed), num_prompt_tokens=0,
                                       num_generation_tokens=len(changed)))
                finished = all(s.finish_reason is not None for s in samples)
                if finished:
                    metrics.finished_time = now
                    self.running.discard(request_id)
                yield RequestOutput(request_id, list(prompt_token_ids), changed, finished, metrics)
                if finished:
                    return
        finally:
            # Like the real engine: a consumer that stops early (closed or cancelled) aborts.
            self._mark_aborted(request_id)

    def _advance(self, s: _Sample, params: SamplingParams) -> CompletionOutput:
        pos = len(s.token_ids)
        script = s.script if not params.ignore_eos else s.script * (pos // max(1, len(s.script)) + 2)
        token = self.tokenizer.encode(script[pos], add_special_tokens=False)[0] if pos < len(script) else EOS
        s.token_ids.append(token)
        if token == EOS:
            s.finish_reason, s.stop_reason = "stop", None
        else:
            s.text += script[pos]
        for stop in params.stop_strings:
            at = s.text.find(stop)
            if at >= 0:
                s.text = s.text[: at + len(stop)] if params.include_stop_str_in_output else s.text[:at]
                s.finish_reason, s.stop_reason = "stop", stop
                break
        if s.finish_reason is None and params.max_tokens is not None and len(s.token_ids) >= params.max_tokens:
            s.finish_reason = "length"
        # Hold back a tail that could still grow into a stop string.
        hold = 0 if s.finish_reason else max((len(x) - 1 for x in params.stop_strings), default=0)
        upto = max(s.sent, len(s.text) - hold)
        delta, s.sent = s.text[s.sent:upto], upto
        return CompletionOutput(
            index=s.index, text=s.text[: s.sent], token_ids=list(s.token_ids), text_delta=delta,
            token_ids_delta=[token], logprobs_delta=self._logprobs(token, params),
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
        )

    def _logprobs(self, token: int, params: SamplingParams) -> list[PositionLogprobs]:
        if params.logprobs is None:
            return []
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        sampled = TokenLogprob(token, -0.25, text)
        others = [TokenLogprob(100 + k, -1.0 - k, f"alt{k}") for k in range(max(0, params.logprobs - 1))]
        return [PositionLogprobs(sampled=sampled, top=([sampled] + others)[: params.logprobs])]


def make_client(engine: Any = None, **settings: Any) -> Any:
    """A Starlette TestClient around build_app(engine, ServerSettings(**settings))."""
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import ServerSettings

    engine = engine or ScriptedEngine()
    return TestClient(build_app(engine, ServerSettings(**settings)), raise_server_exceptions=False)
