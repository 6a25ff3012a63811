"""The Grafana dashboard (deploy/grafana/dashboards) queries only metrics a real `qalora serve` exports.

Uses the suite's shared server: one completion request (so the labelled
histograms and counters have samples), then one /metrics scrape. Every
``qalora_*`` name in the dashboard's PromQL must be a sample name of that
scrape (``_total``, ``_bucket``... included, since that is what PromQL names).
tests/unit/test_deploy.py does the same against the scripted engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
from conftest import MODEL_NAME
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "qalora-serve.json"
METRIC_RE = re.compile(r"\bqalora_[a-z][a-z0-9_]*")


def queries(node: Any) -> Iterator[str]:
    """Every PromQL string of the dashboard: panel target ``expr`` and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def test_dashboard_metrics_are_in_a_live_scrape(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "The capital of France is",
                                           "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    scrape = http.get("/metrics")
    assert scrape.status_code == 200
    families = {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(scrape.text)}
    samples = set().union(*families.values())
    referenced = {m for q in queries(json.loads(DASHBOARD.read_text())) for m in METRIC_RE.findall(q)}
    assert len(referenced) >= 10
    missing = sorted(referenced - samples)
    exported = sorted(f for f in families if not f.endswith("_created"))
    assert not missing, f"dashboard queries name {missing}; the server exports the families {exported}"
    # The HPA's metric (deploy/k8s/hpa.yaml) is among them, as a gauge.
    types = {f.name: f.type for f in text_string_to_metric_families(scrape.text)}
    assert types["qalora_num_requests_waiting"] == "gauge"
