"""The /metrics exposition: vLLM's stems under qalora_, Prometheus naming rules, values that move."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_engine import ScriptedEngine, make_client

EXPECTED = {
    # family name -> type (prometheus_client strips _total from counter family names)
    "qalora_num_requests_running": "gauge",
    "qalora_num_requests_waiting": "gauge",
    "qalora_kv_cache_usage_perc": "gauge",
    "qalora_prefix_cache_queries": "counter",
    "qalora_prefix_cache_hits": "counter",
    "qalora_num_preemptions": "counter",
    "qalora_prompt_tokens": "counter",
    "qalora_generation_tokens": "counter",
    "qalora_request_success": "counter",
    "qalora_time_to_first_token_seconds": "histogram",
    "qalora_inter_token_latency_seconds": "histogram",
    "qalora_e2e_request_latency_seconds": "histogram",
    "qalora_request_queue_time_seconds": "histogram",
    "qalora_request_prompt_tokens": "histogram",
    "qalora_request_generation_tokens": "histogram",
    "qalora_iteration_tokens": "histogram",
    "qalora_http_requests": "counter",
    "qalora_http_request_duration_seconds": "histogram",
    "qalora_model_info": "gauge",  # an info metric, exposed as a gauge in text format 0.0.4
}


def scrape(client) -> dict[str, dict[tuple, float]]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    for key, v in samples.get(name, {}).items():
        if all((k, labels[k]) in key for k in labels):
            return v
    raise KeyError(f"{name}{labels} not in {sorted(samples)}")


@pytest.fixture()
def client():
    with make_client(ScriptedEngine(reply="abcd")) as c:
        yield c


def test_names_types_and_conventions(client) -> None:
    text = client.get("/metrics").text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert types.get(name) == kind, (name, types.get(name))
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert ":" not in name
            assert name.endswith("_total") == (kind == "counter"), line


def test_values_follow_requests(client) -> None:
    before = scrape(client)
    assert value(before, "qalora_num_requests_running") == 0
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    client.post("/v1/completions", json={"prompt": "y", "max_tokens": 2, "n": 2})
    after = scrape(client)
    assert value(after, "qalora_request_success_total", finished_reason="stop") == 1
    assert value(after, "qalora_request_success_total", finished_reason="length") == 2
    assert value(after, "qalora_generation_tokens_total") == usage["completion_tokens"] + 4
    assert value(after, "qalora_request_prompt_tokens_count") == 2
    assert value(after, "qalora_request_prompt_tokens_sum") == usage["prompt_tokens"] + 2
    assert value(after, "qalora_request_generation_tokens_sum") == usage["completion_tokens"] + 4
    assert value(after, "qalora_time_to_first_token_seconds_count") == 2
    assert value(after, "qalora_e2e_request_latency_seconds_count") == 2
    assert value(after, "qalora_request_queue_time_seconds_count") == 2
    # ITL: one observation per gap between steps that produced tokens.
    assert value(after, "qalora_inter_token_latency_seconds_count") == (usage["completion_tokens"] - 1) + 1
    assert value(after, "qalora_iteration_tokens_count") == usage["completion_tokens"] + 2
    assert value(after, "qalora_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(after, "qalora_http_request_duration_seconds_count", route="/v1/completions") == 1
    assert value(after, "qalora_model_info", bits="4", group_size="32", kernel="reference") == 1


def test_unknown_routes_share_one_label(client) -> None:
    for i in range(3):
        client.get(f"/scan/{i}")
    samples = scrape(client)
    assert value(samples, "qalora_http_requests_total", route="other", status="404") == 3


def test_metrics_survive_a_dead_engine(client) -> None:
    engine = client.app.state.qalora.engine

    def broken():
        raise RuntimeError("engine gone")

    engine.stats = broken
    assert client.get("/metrics").status_code == 200


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_metrics(client) -> None:
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    text = client.get("/metrics").text
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not re.search(r"\S", proc.stdout + proc.stderr), proc.stdout + proc.stderr
