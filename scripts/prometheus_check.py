#!/usr/bin/env python3
"""Scrape a running qalora server with a real Prometheus (Debian's `prometheus` package) and query it.

    scripts/prometheus_check.py                      # start `qalora serve` itself, then check
    scripts/prometheus_check.py --url http://127.0.0.1:8000   # check a server that is already up

Steps: `promtool check metrics` on the exposition; start Prometheus on a free
loopback port scraping the server every second; send a few requests; query
Prometheus until it answers for the request and token metrics. Exit 0 when all
of that works, 1 otherwise, 2 when prometheus/promtool are missing (install
them with `apt-get install -y prometheus`, or pass --install to try that).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

logger = logging.getLogger("prometheus_check")
QUERIES = (
    "qalora_request_success_total",
    "qalora_prompt_tokens_total",
    "qalora_generation_tokens_total",
    "qalora_http_requests_total",
    "qalora_time_to_first_token_seconds_count",
    "qalora_num_requests_running",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if http_get(url, 2.0)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def ensure_tools(install: bool) -> bool:
    if shutil.which("prometheus") and shutil.which("promtool"):
        return True
    if install:
        logger.info("installing Debian's prometheus package")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "prometheus"], check=False, env=env)
    return bool(shutil.which("prometheus") and shutil.which("promtool"))


def promtool_check(base_url: str) -> None:
    status, body = http_get(base_url + "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    proc = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    problems = (proc.stdout + proc.stderr).decode().strip()
    if proc.returncode != 0 or problems:
        raise RuntimeError(f"promtool check metrics failed:\n{problems}")
    logger.info("promtool check metrics: clean")


def start_prometheus(target: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: qalora\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(workdir / "prometheus.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/-/ready", 60, proc)
    return proc, url


def query_until_answered(prom_url: str, query: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_get(f"{prom_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
        if status == 200:
            result = json.loads(body)["data"]["result"]
            if result:
                return sum(float(r["value"][1]) for r in result)
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus has no data for {query} after {timeout:.0f}s")


def drive_traffic(base_url: str, model: str | None) -> None:
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    if model:
        chat["model"] = model
    for _ in range(3):
        post_json(base_url + "/v1/chat/completions", chat)
    post_json(base_url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, **({"model": model} if model else {})})


def check(base_url: str, model: str | None) -> None:
    promtool_check(base_url)
    drive_traffic(base_url, model)
    target = urllib.parse.urlparse(base_url).netloc
    with tempfile.TemporaryDirectory(prefix="qalora-prom-") as tmp:
        prom, prom_url = start_prometheus(target, Path(tmp))
        try:
            for query in QUERIES:
                value = query_until_answered(prom_url, query, 30)
                logger.info("prometheus: %s = %g", query, value)
            if query_until_answered(prom_url, "qalora_generation_tokens_total", 5) <= 0:
                raise RuntimeError("generation token counter is zero after traffic")
            health = query_until_answered(prom_url, 'up{job="qalora"}', 5)
            if health != 1:
                raise RuntimeError(f"scrape target is down (up={health})")
        finally:
            prom.send_signal(signal.SIGTERM)
            prom.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="base URL of a running server (default: start one)")
    parser.add_argument("--model", default=None, help="model for the server this script starts")
    parser.add_argument("--served-model-name", default=None, help="model name to send in requests")
    parser.add_argument("--install", action="store_true", help="apt-get install prometheus when missing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not ensure_tools(args.install):
        logger.error("prometheus/promtool not found; apt-get install -y prometheus (or pass --install)")
        return 2
    server = None
    base_url = args.url
    try:
        if base_url is None:
            port = free_port()
            cmd = [sys.executable, "-m", "qalora_runtime", "serve", *([args.model] if args.model else []),
                   "--port", str(port), "--max-model-len", "512", "--kv-cache-memory", "128MiB"]
            server = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
            base_url = f"http://127.0.0.1:{port}"
            wait_for(base_url + "/health", 600, server)
        check(base_url.rstrip("/"), args.served_model_name)
    except Exception as exc:
        logger.error("%s", exc)
        return 1
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    logger.info("OK: Prometheus scraped the server and answered queries for request and token metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
