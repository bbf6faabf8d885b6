"""The simulator's pure parts: the click model, response checks and accounting.

Nothing here does I/O beyond writing the stats file, so the click model and the counters
are testable without a server. numpy and the stdlib only. The panel file the clicks are
drawn against is read by :mod:`serving.simulator.panel_format`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from serving.fileio import atomic_write_text

DEFAULT_P_RELEVANT = 0.5
DEFAULT_P_NOISE = 0.002


# --------------------------------------------------------------------------- click model


def position_bias(positions: np.ndarray | int) -> np.ndarray:
    """Examination probability of 0-based position ``i``: ``1 / log2(i + 2)`` (1 at the top)."""
    return 1.0 / np.log2(np.asarray(positions, dtype=float) + 2.0)


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {p}")


def click_probabilities(items: Iterable[int], relevant: frozenset[int] | set[int],
                        p_relevant: float = DEFAULT_P_RELEVANT,
                        p_noise: float = DEFAULT_P_NOISE) -> np.ndarray:
    """Per position: ``p_relevant * position_bias(i)`` for a relevant item, else ``p_noise``."""
    _check_p("p_relevant", p_relevant)
    _check_p("p_noise", p_noise)
    hits = np.array([int(it) in relevant for it in items], dtype=bool)
    return np.where(hits, p_relevant * position_bias(np.arange(hits.size)), p_noise)


def simulate_clicks(items: Iterable[int], relevant: frozenset[int] | set[int],
                    rng: np.random.Generator, p_relevant: float = DEFAULT_P_RELEVANT,
                    p_noise: float = DEFAULT_P_NOISE) -> np.ndarray:
    """0-based positions the user clicks in one returned list, each an independent draw."""
    p = click_probabilities(items, relevant, p_relevant, p_noise)
    return np.flatnonzero(rng.random(p.size) < p)


def expected_clicks(items: Iterable[int], relevant: frozenset[int] | set[int],
                    p_relevant: float = DEFAULT_P_RELEVANT, p_noise: float = DEFAULT_P_NOISE) -> float:
    """Mean clicks the list earns under the click model."""
    return float(click_probabilities(items, relevant, p_relevant, p_noise).sum())


# --------------------------------------------------------------------------- responses


class MalformedResponse(ValueError):
    """A 2xx answer whose body is not a recommendation."""


@dataclass(frozen=True)
class Recommendation:
    items: list[int]
    version: int
    impression_id: str
    level: int = 0  # 0: the version's model; 1, 2: the router's fallback chain


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_recommendation(body: Any, k: int) -> Recommendation:
    """Check a ``/recommend`` body; MalformedResponse says what is wrong."""
    if not isinstance(body, dict):
        raise MalformedResponse(f"body is {type(body).__name__}, not an object")
    items, version, imp = body.get("items"), body.get("version"), body.get("impression_id")
    if not isinstance(items, list) or not all(_is_int(i) for i in items):
        raise MalformedResponse("items is not a list of integers")
    if len(items) > k:
        raise MalformedResponse(f"{len(items)} items returned for k={k}")
    if not _is_int(version) or version < 1:
        raise MalformedResponse(f"version {version!r} is not a positive integer")
    if not isinstance(imp, str) or not imp:
        raise MalformedResponse("impression_id is missing")
    scores = body.get("scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(items)):
        raise MalformedResponse("scores do not match items")
    level = body.get("level", 0)
    if not _is_int(level) or not 0 <= level <= 2:
        raise MalformedResponse(f"level {level!r} is not 0, 1 or 2")
    return Recommendation(items=items, version=version, impression_id=imp, level=level)


# --------------------------------------------------------------------------- accounting


class LatencyHistogram:
    """Log-spaced buckets (5% wide) from 0.1 ms: bounded memory however long the run."""

    _LO_S = 1e-4
    _RATIO = 1.05

    def __init__(self, max_s: float = 300.0) -> None:
        n = int(math.ceil(math.log(max_s / self._LO_S) / math.log(self._RATIO))) + 1
        self._counts = np.zeros(n + 1, dtype=np.int64)
        self.count = 0
        self.min_s = math.inf
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(float(seconds), 0.0)
        if seconds <= self._LO_S:
            b = 0
        else:
            b = min(int(math.ceil(math.log(seconds / self._LO_S) / math.log(self._RATIO))),
                    self._counts.size - 1)
        self._counts[b] += 1
        self.count += 1
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)

    def quantile(self, q: float) -> float | None:
        """Approximate ``q`` quantile in seconds (bucket's geometric middle), None if empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        b = int(np.searchsorted(np.cumsum(self._counts), rank))
        mid = self._LO_S * self._RATIO ** (b - 0.5) if b > 0 else self._LO_S
        return min(max(mid, self.min_s), self.max_s)


@dataclass
class VersionStats:
    impressions: int = 0
    items_shown: int = 0
    clicks: int = 0


@dataclass
class Stats:
    """Client-side counters of one simulator run."""

    sent: int = 0
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    overload: Counter = field(default_factory=Counter)
    feedback_ok: int = 0
    feedback_failed: Counter = field(default_factory=Counter)
    per_version: dict[int, VersionStats] = field(default_factory=dict)
    per_level: Counter = field(default_factory=Counter)  # fallback answers (levels 1, 2)
    retried: int = 0  # sends delivered by another replica after a refused connection
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def record_ok(self, version: int, latency_s: float, n_items: int, n_clicks: int, level: int = 0) -> None:
        self.ok += 1
        self.latency.record(latency_s)
        if level:  # a fallback list is not the version's answer
            self.per_level[level] += 1
            return
        v = self.per_version.setdefault(version, VersionStats())
        v.impressions += 1
        v.items_shown += n_items
        v.clicks += n_clicks

    def record_failure(self, kind: str) -> None:
        self.failed[kind] += 1

    def record_overload(self, why: str) -> None:
        """A send the client could not make on time (late, or too many in flight)."""
        self.failed["overload"] += 1
        self.overload[why] += 1

    def record_feedback(self, kind: str | None) -> None:
        """``kind`` None for a delivered click, else why the feedback call failed."""
        if kind is None:
            self.feedback_ok += 1
        else:
            self.feedback_failed[kind] += 1

    def snapshot(self, elapsed_s: float, rate: float, in_flight: int = 0,
                 final: bool = False) -> dict[str, Any]:
        """The JSON-able report: counts, latency quantiles (ms), per-version CTR."""
        def ms(q: float) -> float | None:
            v = self.latency.quantile(q)
            return None if v is None else round(v * 1000.0, 3)

        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": dict(sorted(self.failed.items())),
            "overload": dict(sorted(self.overload.items())),
            "in_flight": in_flight,
            "latency_ms": {"p50": ms(0.50), "p95": ms(0.95), "p99": ms(0.99)},
            "per_version": {
                str(v): {"impressions": s.impressions, "items_shown": s.items_shown,
                         "clicks": s.clicks,
                         "ctr": round(s.clicks / s.impressions, 6) if s.impressions else None}
                for v, s in sorted(self.per_version.items())
            },
            "fallback_levels": {str(k): n for k, n in sorted(self.per_level.items())},
            "retried_on_other_replica": self.retried,
            "rate": rate,
            "send_rate": round(self.sent / elapsed_s, 3) if elapsed_s > 0 else None,
            "elapsed_s": round(elapsed_s, 3),
            "feedback_ok": self.feedback_ok,
            "feedback_failed": sum(self.feedback_failed.values()),
            "feedback_failed_kinds": dict(sorted(self.feedback_failed.items())),
            "final": final,
        }


def write_json_atomic(path: Path | str, doc: dict[str, Any]) -> None:
    """Rewrite the stats file ``path`` with ``doc`` atomically (readers never see half)."""
    atomic_write_text(path, json.dumps(doc, sort_keys=True) + "\n")
