"""The index service's Prometheus metrics.

prometheus_client is imported inside ``IndexMetrics`` only, so that the service's pure
modules stay importable from the control-plane venv (which has no prometheus_client) for
unit tests.
"""

from __future__ import annotations

SEARCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class IndexMetrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.searches = Counter(
            "dayloop_index_search_total", "Search requests answered", ["version"], registry=self.registry
        )
        self.search_vectors = Counter(
            "dayloop_index_search_vectors_total", "Query vectors searched", ["version"], registry=self.registry
        )
        self.errors = Counter(
            "dayloop_index_search_errors_total",
            "Search requests refused or failed",
            ["version", "reason"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "dayloop_index_search_seconds",
            "Time to answer a search request (parse, search, encode)",
            ["version"],
            buckets=SEARCH_BUCKETS,
            registry=self.registry,
        )
        self.exclusions = Counter(
            "dayloop_index_search_exclusion_total",
            "Query vectors that named their user: seen items dropped (applied) or no seen-items file (unavailable)",
            ["version", "outcome"],
            registry=self.registry,
        )
        self.seen_updates = Counter(
            "dayloop_index_seen_updates_total",
            "Seen-items swaps of a loaded version by outcome (updated, unchanged, refused_<status>)",
            ["outcome"],
            registry=self.registry,
        )
        # Both arms of a canary should show the same value here: the same history excluded.
        self.seen_last_day = Gauge(
            "dayloop_index_seen_last_day_timestamp_seconds",
            "Midnight UTC of the last day the version's seen-items history includes (0: none)",
            ["version"],
            registry=self.registry,
        )
        self.loaded = Gauge("dayloop_index_loaded", "1 while the version's index is loaded", ["version"],
                            registry=self.registry)
        self.ntotal = Gauge("dayloop_index_vectors", "Vectors in the loaded index", ["version"],
                            registry=self.registry)
        self.loads = Counter(
            "dayloop_index_loads_total", "Load requests by outcome", ["outcome"], registry=self.registry
        )

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
