"""The router's Prometheus metrics, all labelled by model version (one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.router.buckets import LATENCY_BUCKETS, SCORE_BUCKETS

__all__ = ["LATENCY_BUCKETS", "SCORE_BUCKETS", "RouterMetrics"]


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dayloop_router_requests", "Requests sent to a version (canary attempts "
                                "included, fallback answers excluded)", ["version"], registry=r)
        self.errors = Counter("dayloop_router_errors", "Failed attempts on a version, by reason",
                              ["version", "reason"], registry=r)
        self.latency = Histogram("dayloop_router_request_seconds", "Time of an attempt on a version "
                                 "(model + index), failed and timed-out ones included", ["version"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.nonfinite = Counter("dayloop_router_nonfinite", "Attempts whose embedding or scores held "
                                 "NaN or Inf", ["version"], registry=r)
        self.score = Histogram("dayloop_router_score", "Top-1 score of each list served", ["version"],
                               buckets=SCORE_BUCKETS, registry=r)
        self.impressions = Counter("dayloop_router_impressions", "Lists served, by the version that "
                                   "served them", ["version"], registry=r)
        self.clicks = Counter("dayloop_router_clicks", "Clicks, by the version whose list was clicked",
                              ["version"], registry=r)
        # Per bucket group (routing.N_GROUPS contiguous bucket ranges under the table's salt):
        # what the user-level CTR test reads. Labelled by the version that served the list.
        self.group_impressions = Counter("dayloop_router_group_impressions", "Lists served, by version and "
                                         "bucket group of the user", ["version", "group"], registry=r)
        self.group_clicks = Counter("dayloop_router_group_clicks", "Clicks, by the version whose list was "
                                    "clicked and the bucket group of the user", ["version", "group"], registry=r)
        self.fallbacks = Counter("dayloop_router_fallbacks", "Attempts on a version answered by the "
                                 "stable version instead", ["version"], registry=r)
        self.unanswered = Counter("dayloop_router_unanswered", "Requests no version could answer (5xx "
                                  "to the user)", ["version"], registry=r)
        self.e2e = Histogram("dayloop_router_response_seconds", "End-to-end /recommend time as the user "
                             "sees it", buckets=LATENCY_BUCKETS, registry=r)
        self.revision = Gauge("dayloop_router_route_revision", "Route table revision this replica "
                              "applies", registry=r)
        self.stable = Gauge("dayloop_router_stable", "1 for the route table's stable version (everyone's "
                            "fallback), 0 for the others it named", ["version"], registry=r)
        self.share = Gauge("dayloop_router_route_share", "Share of buckets routed to a version",
                           ["version"], registry=r)
        self.breaker_state = Gauge("dayloop_router_breaker_state", "Circuit of a version in this replica: "
                                   "0 closed, 1 half-open, 2 open", ["version"], registry=r)
        self.breaker_trips = Counter("dayloop_router_breaker_trips", "Times a version's circuit opened",
                                     ["version"], registry=r)
        self.breaker_rejected = Counter("dayloop_router_breaker_rejected", "Requests a version's open "
                                        "circuit kept from it", ["version"], registry=r)
        self.level_answers = Counter("dayloop_router_level_answers", "Lists served, by the level of the "
                                     "fallback chain: model, popularity, static", ["level"], registry=r)
        self.level_clicks = Counter("dayloop_router_level_clicks", "Clicks on lists served by a fallback "
                                    "level (popularity, static)", ["level"], registry=r)
        for level in ("model", "popularity", "static"):
            self.level_answers.labels(level)
        for level in ("popularity", "static"):
            self.level_clicks.labels(level)
        self.bad_requests = Counter("dayloop_router_bad_requests", "Requests refused with a 4xx",
                                    ["endpoint"], registry=r)
