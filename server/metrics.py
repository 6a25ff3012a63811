"""Prometheus metrics: vLLM's metric stems under the ``qalora_`` prefix, promtool-clean.

Naming follows Prometheus conventions (``promtool check metrics``): counters
end in ``_total``, times are in seconds, no colons. Sources:

- engine gauges and counters are read from ``engine.stats()`` at scrape time by
  a custom collector (no polling thread, never stale);
- per-request histograms are observed once, when a request finishes, from
  ``RequestOutput.metrics`` timestamps;
- iteration sizes come from the engine's step listener;
- HTTP counts and latencies from :mod:`server.http_metrics`.

One registry per app, so several apps in one process (tests) do not collide.

Deviation from vLLM: vLLM's ``iteration_tokens_total`` is a histogram, and
promtool rejects ``_total`` on a non-counter, so it is exposed as the
histogram ``qalora_iteration_tokens``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from qalora_runtime.engine.protocol import EngineClient, StepEvent
from qalora_runtime.outputs import RequestOutput

if TYPE_CHECKING:
    from .generation import ChoiceState

logger = logging.getLogger(__name__)

PREFIX = "qalora_"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineStatsCollector(Collector):
    """Reads ``engine.stats()`` and ``engine.model_info`` on every scrape."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def describe(self) -> Iterable[Metric]:
        # Describing nothing keeps registration from calling collect() before the engine is up.
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._engine.stats()
        except Exception:  # engine still loading or dead: /health says so, /metrics stays up
            logger.debug("engine stats unavailable", exc_info=True)
            return
        labels = ["model_name"]
        values = [self._model_name]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", stats.kv_cache_usage),
        )
        for stem, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + stem, doc, labels=labels)
            g.add_metric(values, float(value))
            yield g
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ("num_preemptions", "Requests preempted to free KV-cache blocks.", stats.num_preemptions),
            ("prompt_tokens", "Prompt tokens processed (prefilled).", stats.prompt_tokens),
            ("generation_tokens", "Tokens generated.", stats.generation_tokens),
        )
        for stem, doc, value in counters:
            c = CounterMetricFamily(PREFIX + stem, doc, labels=labels)
            c.add_metric(values, float(value))
            yield c
        info = self._model_info()
        if info is not None:
            yield info

    def _model_info(self) -> Metric | None:
        try:
            mi = self._engine.model_info
        except Exception:
            return None
        family = InfoMetricFamily(PREFIX + "model", "The served model and its quantization.")
        family.add_metric(
            [],
            {
                "model_name": self._model_name,
                "architecture": str(mi.architecture),
                "bits": str(mi.bits),
                "group_size": str(mi.group_size),
                "kernel": str(mi.kernel),
                "dtype": str(mi.dtype),
                "device": str(mi.device),
                "max_model_len": str(mi.max_model_len),
            },
        )
        return family


class ServerMetrics:
    """All metrics of one app, and the hooks that feed them."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self.registry.register(EngineStatsCollector(engine, model_name))
        reg = self.registry
        m = ["model_name"]
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests (per choice), by finish reason.",
            m + ["finished_reason"], registry=reg,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first generated token.",
            m, buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive generated tokens.",
            m, buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the end of the request.",
            m, buckets=_REQUEST_BUCKETS, registry=reg,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time a request waited before it was first scheduled.",
            m, buckets=_REQUEST_BUCKETS, registry=reg,
        )
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt length of finished requests, in tokens.",
            m, buckets=_TOKEN_BUCKETS, registry=reg,
        )
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens", "Tokens generated by finished requests (all choices).",
            m, buckets=_TOKEN_BUCKETS, registry=reg,
        )
        self.iteration_tokens = Histogram(
            PREFIX + "iteration_tokens", "Tokens computed per engine step.",
            m, buckets=_TOKEN_BUCKETS, registry=reg,
        )
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests answered, by route and status.",
            ["method", "route", "status"], registry=reg,
        )
        self.http_latency = Histogram(
            PREFIX + "http_request_duration_seconds", "HTTP request handling time (to the last byte).",
            ["method", "route"], buckets=_REQUEST_BUCKETS, registry=reg,
        )

    # -- hooks -------------------------------------------------------------------------

    def on_step(self, event: StepEvent) -> None:
        """Step listener (called from the engine thread; prometheus-client is thread-safe)."""
        self.iteration_tokens.labels(self.model_name).observe(event.num_tokens)

    def request_finished(self, output: RequestOutput, choices: Sequence[ChoiceState]) -> None:
        """Observe a finished engine request: latencies from its timestamps, token counts, reasons."""
        name = self.model_name
        for choice in choices:
            self.request_success.labels(name, choice.finish_reason or "unknown").inc()
        generated = sum(c.num_tokens for c in choices)
        self.request_prompt_tokens.labels(name).observe(len(output.prompt_token_ids))
        self.request_generation_tokens.labels(name).observe(generated)
        t = output.metrics
        if t is None:
            return
        if t.first_scheduled_time is not None:
            self.queue_time.labels(name).observe(max(0.0, t.first_scheduled_time - t.arrival_time))
        if t.first_token_time is not None:
            self.time_to_first_token.labels(name).observe(max(0.0, t.first_token_time - t.arrival_time))
        end = t.finished_time if t.finished_time is not None else t.last_token_time
        if end is not None:
            self.e2e_latency.labels(name).observe(max(0.0, end - t.arrival_time))
        child = self.inter_token_latency.labels(name)
        for gap in t.inter_token_latencies:
            child.observe(gap)

    def request_aborted(self, num_choices: int) -> None:
        """Count an engine request aborted before it finished (client gone, error, shutdown)."""
        self.request_success.labels(self.model_name, "abort").inc(num_choices)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request."""
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
