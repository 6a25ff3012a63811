"""Soak test: N minutes of moderate load; memory growth, errors, and KV blocks left allocated at the end.

    python loadtest/soak.py --minutes 10 --concurrency 4
    python loadtest/soak.py --url http://127.0.0.1:8000 --pid 12345 --minutes 3

Starts ``qalora serve`` on a free port (or targets --url; pass --pid for RSS),
keeps --concurrency clients busy with a mix of streamed chat (realistic
lengths), shared-system-prompt chat, long prompts and non-streamed completions,
and samples the server's resident memory (/proc) and /metrics every few
seconds. Memory growth is the median RSS of the last 10% of samples over the
median of the samples right after warm-up (10-20% into the run). At the end
it polls /metrics until ``qalora_num_requests_running`` and
``qalora_kv_cache_usage_perc`` are both 0. Writes a JSON report (--json) and
exits non-zero on any request error, growth above --max-growth-pct, KV blocks
or requests left at the end, or an unclean server exit. HTTP only; no project imports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import build_requests, client_limits, send_one
from common import ServerProcess, read_rss_bytes, scrape_metrics, served_model, start_qalora, summarize

RUNNING, KV, WAITING = "qalora_num_requests_running", "qalora_kv_cache_usage_perc", "qalora_num_requests_waiting"
#: (weight, dataset, endpoint) of the soak mix.
MIX = ((0.45, "mix", "chat"), (0.25, "shared-prefix", "chat"), (0.15, "mix", "completions"), (0.15, "long", "chat"))


def pick(rng: random.Random) -> tuple[str, str]:
    """(dataset, endpoint) drawn from MIX."""
    x, acc = rng.random(), 0.0
    for weight, dataset, endpoint in MIX:
        acc += weight
        if x < acc:
            return dataset, endpoint
    return MIX[-1][1], MIX[-1][2]


async def client_loop(client: httpx.AsyncClient, model: str, deadline: float, max_tokens: int, seed: int,
                      stats: dict[str, Any]) -> None:
    """One client: requests back to back until the deadline."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        dataset, endpoint = pick(rng)
        path, body = build_requests(dataset, 1, model, max_tokens, False, endpoint, seed=rng.randrange(1 << 30))[0]
        outcome = await send_one(client, path, body)
        if outcome.error is not None or outcome.result is None:
            stats["errors"].append(outcome.error or "no result")
        else:
            stats["ok"] += 1
            stats["output_tokens"] += outcome.result.output_tokens
            if outcome.result.ttft is not None:
                stats["ttft"].append(outcome.result.ttft)


async def sampler(url: str, pid: int | None, deadline: float, interval: float, samples: list[dict[str, Any]]) -> None:
    """RSS and gauges every ``interval`` seconds until the deadline."""
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        sample: dict[str, Any] = {"t": time.monotonic() - t0}
        if pid is not None:
            sample["rss"] = read_rss_bytes(pid)
        try:
            sample.update(await asyncio.to_thread(scrape_metrics, url, (RUNNING, KV, WAITING)))
        except httpx.HTTPError as exc:
            sample["metrics_error"] = str(exc)
        samples.append(sample)
        print(f"t={sample['t']:6.0f}s rss={sample.get('rss', 0) / 2**20:7.1f} MiB running={sample.get(RUNNING)} "
              f"kv={sample.get(KV)}", flush=True)
        await asyncio.sleep(interval)  # the sampling period, not a wait for some event


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    """Poll /metrics until no request runs and no KV block is in use (or the timeout); the last values."""
    deadline = time.monotonic() + timeout
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = scrape_metrics(url, (RUNNING, KV, WAITING))
        if values.get(RUNNING) == 0 and values.get(KV) == 0 and values.get(WAITING, 0) == 0:
            return values
        time.sleep(0.5)
    return values


def memory_growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Baseline (10-20% into the run) and final (last 10%) median RSS, and the growth in percent."""
    rss = [s["rss"] for s in samples if "rss" in s]
    if len(rss) < 10:
        return {"growth_pct": None, "note": f"only {len(rss)} RSS samples"}
    n = len(rss)
    base = statistics.median(rss[n // 10: max(n // 5, n // 10 + 1)])
    final = statistics.median(rss[-max(n // 10, 1):])
    return {"baseline_mib": base / 2**20, "final_mib": final / 2**20, "max_mib": max(rss) / 2**20,
            "first_mib": rss[0] / 2**20, "growth_pct": (final - base) / base * 100.0}


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Run the load and the sampler together; the raw report."""
    model = args.model or served_model(url)
    stats: dict[str, Any] = {"ok": 0, "errors": [], "output_tokens": 0, "ttft": []}
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    deadline = start + args.minutes * 60
    limits = client_limits(args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        await asyncio.gather(
            sampler(url, pid, deadline, args.sample_interval, samples),
            *(client_loop(client, model, deadline, args.max_tokens, args.seed + i, stats)
              for i in range(args.concurrency)))
    duration = time.monotonic() - start
    return {"model": model, "duration_s": duration, "requests_ok": stats["ok"], "errors": len(stats["errors"]),
            "error_examples": stats["errors"][:10], "output_tokens": stats["output_tokens"],
            "output_throughput": stats["output_tokens"] / duration, "ttft_ms": summarize(stats["ttft"]),
            "memory": memory_growth(samples), "samples": samples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="target this server instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="server pid for RSS sampling (with --url)")
    p.add_argument("--model", default=None, help="model name to send (default: first at /v1/models)")
    p.add_argument("--serve-model", default=None, help="MODEL argument of the started `qalora serve`")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the started server")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--sample-interval", type=float, default=5.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-growth-pct", type=float, default=5.0)
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds for the gauges to return to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Soak, then check errors, growth and the end state; 0 only when all pass."""
    args = parse_args(argv)
    server: ServerProcess | None = None
    report: dict[str, Any] = {"args": vars(args)}
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            server = start_qalora(args.serve_model, threads=args.threads)
            report["startup_s"] = server.wait_healthy(900.0)
            url, pid = server.base_url, server.pid
        report.update(asyncio.run(soak(url, pid, args)))
        report["end_state"] = wait_idle(url, args.idle_timeout)
    finally:
        if server is not None:
            report["server_exit_code"] = server.stop()
    growth = report.get("memory", {}).get("growth_pct")
    end = report.get("end_state", {})
    checks = {
        "zero_errors": report.get("errors", 1) == 0 and report.get("requests_ok", 0) > 0,
        "memory_growth_ok": growth is None or growth < args.max_growth_pct,
        "kv_cache_empty_at_end": end.get(KV) == 0,
        "no_requests_running_at_end": end.get(RUNNING) == 0,
        "server_exit_clean": report.get("server_exit_code", 0) == 0,
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    brief = {k: report.get(k) for k in ("ok", "checks", "duration_s", "requests_ok", "errors", "error_examples",
                                         "output_throughput", "memory", "end_state")}
    print(json.dumps(brief, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
