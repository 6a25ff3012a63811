"""Run the locust scenarios headless against ``qalora serve`` (started here) or a given --url.

    python loadtest/run.py --users 4 --spawn-rate 2 --duration 60s --out loadtest/results/run1
    python loadtest/run.py --url http://127.0.0.1:8000 --users 8 --duration 2m StreamingChatUser

Starts the server on a free 127.0.0.1 port (unless --url), polls /health until
200 (with --startup-timeout), runs locust, writes ``OUT/locust_stats.csv`` (and
the other locust CSVs), ``OUT/report.html`` and ``OUT/summary.json``, stops the
server, and exits non-zero if any request failed, locust failed, or the server
did not stop cleanly. Speaks HTTP only; imports no project code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, start_qalora

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unknown ones are passed on to `qalora serve` after --."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("user_classes", nargs="*", help="locust user classes (default: all four)")
    p.add_argument("--url", default=None, help="target this server instead of starting one")
    p.add_argument("--model", default=None, help="model argument of `qalora serve` (default: the default model)")
    p.add_argument("--served-model-name", default=None, help="model name to send (default: first at /v1/models)")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=2.0)
    p.add_argument("--duration", default="60s", help="locust --run-time, e.g. 30s, 2m")
    p.add_argument("--max-tokens-cap", type=int, default=0, help="cap each request's max_tokens (0: none)")
    p.add_argument("--long-prompt-words", type=int, default=900)
    p.add_argument("--allow-missing-usage", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="seconds in-flight requests may finish")
    p.add_argument("--out", default=str(HERE / "results" / time.strftime("run-%Y%m%d-%H%M%S")))
    p.add_argument("--server-arg", action="append", default=[], help="extra `qalora serve` argument (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of the started server (1 on a busy shared machine; default: torch's)")
    return p.parse_args(argv)


def locust_command(args: argparse.Namespace, host: str, out: Path) -> list[str]:
    """The headless locust invocation."""
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "--host", host, "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.duration,
           "--stop-timeout", str(int(args.stop_timeout)), "--csv", str(out / "locust"), "--csv-full-history",
           "--html", str(out / "report.html"), "--only-summary", "--exit-code-on-error", "1",
           "--max-tokens-cap", str(args.max_tokens_cap), "--long-prompt-words", str(args.long_prompt_words),
           "--loglevel", "WARNING", "--summary-json", str(out / "locust_final.json")]
    if args.served_model_name:
        cmd += ["--model", args.served_model_name]
    if args.allow_missing_usage:
        cmd.append("--allow-missing-usage")
    return cmd + list(args.user_classes)


def summarize_stats(rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, failures and latency (ms) per endpoint; the custom metrics' distributions.

    ``rows`` come from the locustfile's --summary-json, written when locust quits,
    so requests that finished during --stop-timeout are counted too (locust's CSV
    is written at the stop and can miss them).
    """
    requests, metrics, total = {}, {}, {}
    for row in rows:
        entry = {k: row[k] for k in ("count", "failures", "mean", "median", "p95", "p99", "max")}
        if row["name"] == "Aggregated":
            total = entry
        elif row["type"] == "metric":
            metrics[row["name"]] = entry
        else:
            requests[f'{row["type"]} {row["name"]}'] = {**entry, "rps": row["rps"]}
    return {"requests": requests, "metrics": metrics, "total_requests": sum(e["count"] for e in requests.values()),
            "total_failures": sum(e["failures"] for e in requests.values()), "errors": errors,
            "aggregated_incl_metrics": total}


def main(argv: list[str] | None = None) -> int:
    """Start the server (unless --url), run locust, write reports; 0 only when nothing failed."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server: ServerProcess | None = None
    summary: dict[str, Any] = {"users": args.users, "spawn_rate": args.spawn_rate, "duration": args.duration,
                               "user_classes": args.user_classes or "all"}
    try:
        if args.url:
            host = args.url.rstrip("/")
        else:
            server = start_qalora(args.model, extra=args.server_arg, threads=args.threads)
            summary["server_startup_s"] = server.wait_healthy(args.startup_timeout)
            host = server.base_url
        summary["host"] = host
        cmd = locust_command(args, host, out)
        print("+", " ".join(cmd), flush=True)
        started = time.monotonic()
        locust_rc = subprocess.run(cmd, check=False).returncode
        summary["locust_wall_s"] = time.monotonic() - started
        summary["locust_exit_code"] = locust_rc
        final = out / "locust_final.json"
        if final.exists():
            data = json.loads(final.read_text())
            summary.update(summarize_stats(data["rows"], data["errors"]))
    finally:
        if server is not None:
            summary["server_exit_code"] = server.stop()
            if summary["server_exit_code"] != 0:
                print(server.log_tail(), file=sys.stderr)
    ok = (summary.get("locust_exit_code") == 0 and summary.get("total_failures", 1) == 0
          and summary.get("total_requests", 0) > 0 and summary.get("server_exit_code", 0) == 0)
    summary["ok"] = ok
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary.get(k) for k in ("ok", "total_requests", "total_failures", "errors")}))
    print(f"reports in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
