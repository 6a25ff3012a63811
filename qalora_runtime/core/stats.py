"""SchedulerStats: a point-in-time snapshot of the scheduler for the metrics layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counts and gauges of one scheduler at one moment.

    ``prefix_cache_queries``/``prefix_cache_hits`` are cumulative token counts (tokens
    looked up when a request was admitted / tokens found cached), so a Prometheus
    counter can export them directly; ``num_preemptions`` is cumulative too.
    """

    num_running: int
    num_waiting: int
    #: Waiting requests that were preempted and will recompute (subset of num_waiting).
    num_preempted_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits / queries over the scheduler's lifetime (0.0 before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
