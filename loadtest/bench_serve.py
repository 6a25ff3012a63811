"""A vLLM-style serving benchmark against any OpenAI-compatible URL.

Sends N streamed requests, either at a fixed concurrency (a closed loop of C
clients) or at a request rate (Poisson arrivals, optionally capped by
--concurrency), and prints successful/failed requests, duration, request and
token throughput, and mean/median/p99 of TTFT, TPOT, ITL and end-to-end
latency. ``--json FILE`` writes the same numbers (plus per-request failures).

    python loadtest/bench_serve.py --url http://127.0.0.1:8000 --num-prompts 64 --concurrency 16 \
        --max-tokens 64 --ignore-eos --json out.json

Speaks HTTP only (httpx); imports no project code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    StreamError,
    StreamResult,
    chat_prompt,
    consume_sse,
    long_prompt,
    served_model,
    shared_prefix_messages,
    story_prompt,
    summarize,
)

DATASETS = ("story", "mix", "shared-prefix", "long")


def client_limits(max_connections: int) -> httpx.Limits:
    """A fresh connection per request, as vLLM's benchmark does (a session per request).

    Reusing kept-alive connections raced with llama-server closing idle ones
    ("Server disconnected without sending a response"), a client artefact that
    would be counted as a server failure; on 127.0.0.1 a new connection costs ~0.1 ms.
    """
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=0)


@dataclass
class Outcome:
    """One request: its stream result, or the error that failed it."""

    result: StreamResult | None
    error: str | None
    prompt_tokens: int | None


def build_requests(dataset: str, n: int, model: str, max_tokens: int, ignore_eos: bool, endpoint: str,
                   seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of each request; chat bodies for every dataset, or prompt bodies for --endpoint completions."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        tokens = max_tokens
        if dataset == "story":
            messages = story_prompt(i)
        elif dataset == "mix":
            messages, tokens = chat_prompt(rng)
            tokens = min(tokens, max_tokens)
        elif dataset == "shared-prefix":
            messages = shared_prefix_messages(rng)
        else:
            messages = [{"role": "user", "content": long_prompt(rng)}]
        body: dict[str, Any] = {"model": model, "max_tokens": tokens, "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        if endpoint == "chat":
            out.append(("/v1/chat/completions", {**body, "messages": messages}))
        else:
            prompt = "\n".join(m["content"] for m in messages) + "\n"
            out.append(("/v1/completions", {**body, "prompt": prompt}))
    return out


async def send_one(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Outcome:
    """Stream one request; any non-2xx, malformed stream or transport error is a failure."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code // 100 != 2:
                text = (await resp.aread()).decode(errors="replace")[:300]
                return Outcome(None, f"HTTP {resp.status_code}: {text}", None)
            lines: list[tuple[str, float]] = []
            async for line in resp.aiter_lines():
                lines.append((line, time.perf_counter()))
        result = consume_sse(lines, start)
    except StreamError as exc:
        return Outcome(None, f"malformed stream: {exc}", None)
    except (httpx.HTTPError, OSError) as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}", None)
    if result.first_token is None:
        return Outcome(None, "stream had no content", None)
    prompt_tokens = (result.usage or {}).get("prompt_tokens")
    return Outcome(result, None, prompt_tokens if isinstance(prompt_tokens, int) else None)


async def run_benchmark_async(url: str, requests: list[tuple[str, dict[str, Any]]], concurrency: int | None,
                              request_rate: float, seed: int = 0, timeout: float = 600.0) -> dict[str, Any]:
    """Send every request and return the metrics dict (see ``compute_metrics``)."""
    limits = client_limits(max(concurrency or len(requests), 1))
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)

    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits) as client:
        async def guarded(path: str, body: dict[str, Any]) -> Outcome:
            if sem is None:
                return await send_one(client, path, body)
            async with sem:
                return await send_one(client, path, body)

        start = time.perf_counter()
        tasks = []
        for path, body in requests:
            tasks.append(asyncio.create_task(guarded(path, body)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals: this IS the schedule
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return compute_metrics(outcomes, duration, concurrency, request_rate)


def run_benchmark(url: str, requests: list[tuple[str, dict[str, Any]]], concurrency: int | None = None,
                  request_rate: float = math.inf, seed: int = 0) -> dict[str, Any]:
    """Synchronous wrapper of ``run_benchmark_async``."""
    return asyncio.run(run_benchmark_async(url, requests, concurrency, request_rate, seed))


def compute_metrics(outcomes: list[Outcome], duration: float, concurrency: int | None,
                    request_rate: float) -> dict[str, Any]:
    """vLLM's benchmark_serving numbers: counts, throughputs, and TTFT/TPOT/ITL/E2E mean/median/p99 in ms."""
    ok = [o.result for o in outcomes if o.result is not None]
    errors = [o.error for o in outcomes if o.error is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    known_prompt = [o.prompt_tokens for o in outcomes if o.result is not None and o.prompt_tokens is not None]
    in_tokens = sum(known_prompt) if len(known_prompt) == len(ok) else None
    return {
        "concurrency": concurrency,
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "successful_requests": len(ok),
        "failed_requests": len(errors),
        "errors": errors[:20],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else math.nan,
        "output_throughput": out_tokens / duration if duration else math.nan,
        "total_token_throughput": ((in_tokens + out_tokens) / duration) if in_tokens is not None and duration
        else math.nan,
        "mean_output_tokens": out_tokens / len(ok) if ok else math.nan,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summarize([gap for r in ok for gap in r.itls]),
        "e2el_ms": summarize([r.end - r.start for r in ok]),
    }


def format_report(m: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The metrics as vLLM prints them."""
    rows = [
        ("Successful requests:", m["successful_requests"]),
        ("Failed requests:", m["failed_requests"]),
        ("Maximum request concurrency:", m["concurrency"] or "unbounded"),
        ("Request rate (req/s):", m["request_rate"]),
        ("Benchmark duration (s):", f"{m['duration_s']:.2f}"),
        ("Total input tokens:", m["total_input_tokens"] if m["total_input_tokens"] is not None else "n/a"),
        ("Total generated tokens:", m["total_output_tokens"]),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"),
    ]
    lines = [f" {title} ".center(50, "=")]
    lines += [f"{k:<40}{v!s:<10}" for k, v in rows]
    for key, label in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        lines.append(f"{label:-^50}")
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {short} (ms):':<40}{m[key][stat]:<10.2f}")
    lines.append("=" * 50)
    for err in m["errors"][:5]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first at /v1/models)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--dataset", choices=DATASETS, default="story",
                   help="story: long answers (EOS rare); mix: realistic chat lengths; shared-prefix; long prompts")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="max requests in flight (default: unbounded)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (servers that know it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any request failed."""
    args = parse_args(argv)
    model = args.model or served_model(args.url)
    requests = build_requests(args.dataset, args.num_prompts, model, args.max_tokens, args.ignore_eos,
                              args.endpoint, args.seed)
    metrics = run_benchmark(args.url, requests, args.concurrency, args.request_rate, args.seed)
    metrics.update(model=model, url=args.url, dataset=args.dataset, endpoint=args.endpoint,
                   max_tokens=args.max_tokens, num_prompts=args.num_prompts)
    print(format_report(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 1 if metrics["failed_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
