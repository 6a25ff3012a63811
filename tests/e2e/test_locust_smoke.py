"""A short locust smoke run (3 users, ~20 s, all four scenarios) against the real server: zero failures.

Runs ``loadtest/run.py --url`` against the shared e2e server (max_model_len 512,
so answers are capped at 32 tokens and the long-prompt document is shortened).
Skipped when locust is not installed (``pip install -e '.[loadtest]'``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import REPO, ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed (extra 'loadtest')"),
]

USERS = 3
DURATION = "20s"


def test_locust_smoke_has_zero_failures(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "locust"
    cmd = [sys.executable, str(REPO / "loadtest" / "run.py"), "--url", server.base_url,
           "--users", str(USERS), "--spawn-rate", str(USERS), "--duration", DURATION,
           "--max-tokens-cap", "32", "--long-prompt-words", "150", "--stop-timeout", "180", "--out", str(out)]
    # Bounded: 20 s of load plus at most 180 s for in-flight requests on a busy machine.
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=420)
    summary = json.loads((out / "summary.json").read_text())
    detail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\nserver log:\n{server.log_tail()}"
    assert proc.returncode == 0, detail
    assert summary["ok"] is True, detail
    assert summary["total_failures"] == 0 and not summary["errors"], detail
    assert summary["total_requests"] >= USERS, detail
    assert {"TTFT", "ITL", "output tok/s"} <= set(summary["metrics"]), detail
    for name in ("locust_stats.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
