"""The exposition passes `promtool check metrics`, and a real Prometheus scrapes the server."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import MODEL_NAME
from server_process import REPO


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install -y prometheus)")
def test_promtool_check_metrics(http) -> None:
    http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 3,
                                            "messages": [{"role": "user", "content": "hi"}]})
    text = http.get("/metrics").text
    for stem in ("num_requests_running", "kv_cache_usage_perc", "prompt_tokens_total", "request_success_total",
                 "time_to_first_token_seconds_bucket", "iteration_tokens_bucket", "model_info"):
        assert f"qalora_{stem}" in text, stem
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (apt-get install -y prometheus)")
def test_real_prometheus_scrapes_and_answers(server) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prometheus_check.py"), "--url", server.base_url,
         "--served-model-name", MODEL_NAME],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "qalora_generation_tokens_total" in proc.stderr
