"""Locust users that call an OpenAI-compatible server the way real clients do.

User classes (pick some with ``locust ... StreamingChatUser LongPromptUser``):

- ``StreamingChatUser``: streamed chat with a realistic prompt / answer-length mix;
- ``CompletionUser``: non-streamed /v1/completions;
- ``SharedPrefixUser``: streamed chat behind one long shared system prompt (prefix caching);
- ``LongPromptUser``: a ~1.2k-token document to summarise (prefill-heavy).

Besides locust's per-request rows, every streamed request fires custom
``metric`` events: ``TTFT`` (ms), ``ITL`` (ms, one per token gap), ``TPOT``
(ms, per request), ``E2E`` (ms to ``[DONE]``; locust's own row for a streamed
POST stops its clock at the response headers) and ``output tok/s`` (the "response time" column holds
tokens/s; locust rounds its percentiles, the mean is exact); non-streamed
completions fire ``output tok/s`` only. A request fails on any non-2xx status,
a malformed stream (bad JSON chunk, error event, no ``data: [DONE]``), no
content, or (unless --allow-missing-usage) no usage block.

Options added to locust's: --model (default: the first at /v1/models),
--max-tokens-cap N (cap every max_tokens, for short smoke runs),
--long-prompt-words N (size of LongPromptUser's document), --allow-missing-usage.
Speaks HTTP only; imports no project code.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StreamError, chat_prompt, consume_sse, long_prompt, served_model, shared_prefix_messages, timed_lines

METRIC = "metric"
_STATE: dict[str, Any] = {"model": None}


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument("--model", default="", help="model name (default: first at /v1/models)")
    parser.add_argument("--max-tokens-cap", type=int, default=0, help="cap every request's max_tokens (0: none)")
    parser.add_argument("--long-prompt-words", type=int, default=900, help="LongPromptUser document size in words")
    parser.add_argument("--allow-missing-usage", action="store_true",
                        help="do not fail streams without a usage chunk (servers without stream_options)")
    parser.add_argument("--summary-json", default="",
                        help="write final per-name stats here on quit (after in-flight requests end)")


@events.test_start.add_listener
def _resolve_model(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    _STATE["model"] = (opts.model if opts else "") or served_model(environment.host or "")


@events.quitting.add_listener
def _write_summary(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    path = getattr(opts, "summary_json", "") if opts else ""
    if not path or environment.stats is None:
        return
    rows = []
    for entry in [*environment.stats.entries.values(), environment.stats.total]:
        rows.append({"type": entry.method or "", "name": entry.name, "count": entry.num_requests,
                     "failures": entry.num_failures, "mean": entry.avg_response_time,
                     "median": entry.median_response_time, "min": entry.min_response_time or 0.0,
                     "p95": entry.get_response_time_percentile(0.95),
                     "p99": entry.get_response_time_percentile(0.99), "max": entry.max_response_time,
                     "rps": entry.total_rps})
    errors = [{"name": e.name, "error": e.error, "count": e.occurrences}
              for e in environment.stats.errors.values()]
    Path(path).write_text(json.dumps({"rows": rows, "errors": errors}, indent=1, default=str) + "\n")


def fire_metric(env: Environment, name: str, value: float) -> None:
    """Record a custom measurement as a locust request row (its value goes in the response-time column)."""
    env.events.request.fire(request_type=METRIC, name=name, response_time=value, response_length=0,
                            exception=None, context={})


class OpenAIUser(HttpUser):
    """Shared request logic; subclasses pick prompts."""

    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        """A per-user random stream, so users do not send identical sequences."""
        self.rng = random.Random()

    def _opt(self, name: str, default: Any) -> Any:
        opts = self.environment.parsed_options
        return getattr(opts, name, default) if opts is not None else default

    def _cap(self, max_tokens: int) -> int:
        cap = int(self._opt("max_tokens_cap", 0))
        return min(max_tokens, cap) if cap > 0 else max_tokens

    def stream_chat(self, messages: list[dict[str, str]], max_tokens: int, name: str) -> None:
        """POST a streamed chat completion; validate the stream and fire TTFT / ITL / tokens-per-second."""
        body = {"model": _STATE["model"], "messages": messages, "max_tokens": self._cap(max_tokens),
                "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name=name) as resp:
            if resp.status_code // 100 != 2:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                result = consume_sse(timed_lines(resp.iter_lines(chunk_size=None, decode_unicode=True)), start)
            except (StreamError, UnicodeDecodeError) as exc:
                resp.failure(f"malformed stream: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - connection dropped mid-stream etc.
                resp.failure(f"stream broken: {type(exc).__name__}: {exc}")
                return
            if result.first_token is None:
                resp.failure("stream had no content")
                return
            if result.usage is None and not self._opt("allow_missing_usage", False):
                resp.failure("no usage chunk although stream_options.include_usage was set")
                return
            if result.finish_reason is None:
                resp.failure("no finish_reason in the stream")
                return
            resp.success()
        env = self.environment
        fire_metric(env, "TTFT", (result.first_token - start) * 1000)
        for gap in result.itls:
            fire_metric(env, "ITL", gap * 1000)
        if (tpot := result.tpot) is not None:
            fire_metric(env, "TPOT", tpot * 1000)
        elapsed = result.end - start
        fire_metric(env, "E2E", elapsed * 1000)
        if elapsed > 0:
            fire_metric(env, "output tok/s", result.output_tokens / elapsed)


class StreamingChatUser(OpenAIUser):
    """Streamed chat: short and long questions, answers of 32-384 tokens."""

    weight = 4

    @task
    def chat(self) -> None:
        """One chat turn from the realistic mix."""
        messages, max_tokens = chat_prompt(self.rng)
        self.stream_chat(messages, max_tokens, "chat stream")


class CompletionUser(OpenAIUser):
    """Non-streamed /v1/completions, validated field by field."""

    weight = 2

    @task
    def complete(self) -> None:
        """One completion; fires output tok/s from the usage block."""
        messages, max_tokens = chat_prompt(self.rng)
        body = {"model": _STATE["model"], "prompt": messages[0]["content"] + "\n", "max_tokens": self._cap(max_tokens),
                "temperature": 0.7}
        start = time.perf_counter()
        with self.client.post("/v1/completions", json=body, catch_response=True, name="completion") as resp:
            elapsed = time.perf_counter() - start
            if resp.status_code // 100 != 2:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                data = resp.json()
                text = data["choices"][0]["text"]
                tokens = int(data["usage"]["completion_tokens"])
            except (ValueError, KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                resp.failure(f"malformed completion: {type(exc).__name__}: {exc}")
                return
            if not isinstance(text, str) or data["choices"][0].get("finish_reason") is None:
                resp.failure("completion without text or finish_reason")
                return
            resp.success()
        if elapsed > 0:
            fire_metric(self.environment, "output tok/s", tokens / elapsed)


class SharedPrefixUser(OpenAIUser):
    """Streamed chat behind the same long system prompt: exercises prefix caching (watch TTFT)."""

    weight = 2

    @task
    def support(self) -> None:
        """One support question."""
        self.stream_chat(shared_prefix_messages(self.rng), 64, "shared-prefix stream")


class LongPromptUser(OpenAIUser):
    """Summarise a long document: prefill-heavy, short answer."""

    weight = 1

    @task
    def summarise(self) -> None:
        """One summary of a fresh document."""
        words = int(self._opt("long_prompt_words", 900))
        self.stream_chat([{"role": "user", "content": long_prompt(self.rng, words)}], 64, "long-prompt stream")
