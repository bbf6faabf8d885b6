"""Read what a canary analysis needs from Prometheus: per-version counts over one exact
window ``[start, end]`` (a ramp step's window, not a recording rule's fixed 30 s).

Every figure is the increase of the routers' raw counters over the window, summed over
router replicas (``sum by (version)``), evaluated by one instant query at ``end``:

* requests, errors, nonfinite, impressions, clicks: ``dayloop_router_*_total`` (the routers'
  fallback counter is for dashboards and the fallback-ratio rule; no analysis reads it, so
  no look queries it);
* latency and score histograms: the increase of each ``_bucket`` series, as cumulative
  ``(le, count)`` pairs sorted by ``le`` and ending at ``+Inf``.

Missing is not zero. A version with no series for a counter gets ``None`` (the analysis
reads that as inconclusive), except the router's failure counters (errors, nonfinite):
prometheus_client creates a labelled child only on its first increment, so a
version that never failed has no such series at all. When the same version's requests
series exists, the router is demonstrably reporting on that version and the absence means
"none happened", so those read 0.0; without it they stay ``None``. Clicks are not
zero-filled even when impressions exist: they arrive by a different path (the feedback
endpoint), so their absence does not prove there were none, and reading 0 clicks on both
sides as "canary no worse" would take an empty answer for a healthy one.

Accuracy. ``increase()`` only sees the samples inside the window and extrapolates from the
first and last of them to the window's edges, so with a scrape interval ``s`` a count can
read high by up to ``2s / window`` (the extrapolated share of the window) when the counter
was flat at the edges, and an event within ``s`` of an edge can be credited to either side.
Worse, it ignores the first sample of a series born inside the window: a NaN that creates
``dayloop_router_nonfinite_total{version="7"}`` at value 1 would read as an increase of 0,
and a zero-tolerance check would pass it. So series that did not exist at the window's
start (no sample at ``start`` within Prometheus' 5 minute lookback) are counted from zero:
their last value in the window is used, exactly, instead of ``increase()``. Series that did
exist use ``increase()`` (which also handles a replica restart's counter reset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dayloop.errors import DayloopError

COUNTERS = {
    "requests": "dayloop_router_requests_total",
    "errors": "dayloop_router_errors_total",
    "nonfinite": "dayloop_router_nonfinite_total",
    "impressions": "dayloop_router_impressions_total",
    "clicks": "dayloop_router_clicks_total",
}
HISTOGRAMS = {
    "latency_buckets": "dayloop_router_request_seconds_bucket",
    "score_buckets": "dayloop_router_score_bucket",
}
# Failure counters whose series appear only on the first failure (see the module docstring).
ZERO_WHEN_REQUESTS_EXIST = ("errors", "nonfinite")
ROUTER_JOB = "router"
DEFAULT_TIMEOUT_S = 10.0


class PrometheusUnavailable(DayloopError):
    """Prometheus could not be reached or gave an answer that cannot be trusted.

    Never caught and turned into numbers: a rollout that cannot read its metrics must not
    decide anything from them."""


@dataclass(frozen=True)
class VersionCounts:
    """One version's increases over the window; ``None`` where the series is missing."""

    version: int
    window_seconds: int
    requests: float | None
    errors: float | None
    nonfinite: float | None
    impressions: float | None
    clicks: float | None
    latency_buckets: list[tuple[float, float]] | None
    score_buckets: list[tuple[float, float]] | None


def require_aware(t: datetime, name: str) -> datetime:
    """``t`` itself, if it is a timezone-aware datetime (else ValueError naming ``name``)."""
    # A naive datetime's timestamp() is local time: off by hours on a non-UTC host.
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {t!r}")
    return t


def window_seconds(start: datetime, end: datetime, scrape_interval_seconds: float = 1.0) -> int:
    """The range used for ``[start, end]``: whole seconds, rounded up, at least two scrapes.

    Rounding up keeps every event of the window inside the range; two scrape intervals is
    the least range in which an existing series has the two samples ``increase()`` needs.
    """
    require_aware(start, "start")
    require_aware(end, "end")
    span = (end - start).total_seconds()
    if span <= 0:
        raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    if not scrape_interval_seconds > 0:
        raise ValueError(f"scrape_interval_seconds must be > 0, got {scrape_interval_seconds!r}")
    # 1 ms of slack: a window computed as 30.0000001 s by float arithmetic is 30 s, not 31.
    return max(math.ceil(span - 1e-3), math.ceil(2 * scrape_interval_seconds))


def versions_selector(versions: list[int]) -> str:
    """The PromQL label matcher for ``versions`` (positive integers only)."""
    if not versions:
        raise ValueError("at least one version is needed")
    for v in versions:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"versions must be positive integers, got {v!r}")
    # Integers only, so nothing in the regex can be anything but a literal alternative.
    return f'version=~"{"|".join(str(v) for v in sorted(set(versions)))}"'


def window_query(metric: str, selector: str, window: int, by: str = "version") -> str:
    """PromQL for a metric's per-``by`` count over the ``window`` seconds ending at eval time.

    Series present at the window's start contribute ``increase()``; series born inside it
    contribute their last value (counted from zero, which ``increase()`` would not do).
    """
    x = f"{metric}{{{selector}}}"
    existed = f"{x} offset {window}s"
    return (f"sum by ({by}) ((increase({x}[{window}s]) and {existed})"
            f" or (last_over_time({x}[{window}s]) unless {existed}))")


def connect(prom_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A Prometheus API client for ``prom_url`` (a context manager: ``with connect(url) as c``)."""
    from prometheus_api_client import PrometheusConnect
    from urllib3.util.retry import Retry

    if not isinstance(prom_url, str) or not prom_url.startswith(("http://", "https://")):
        raise ValueError(f"prom_url must be an http(s) URL, got {prom_url!r}")
    # A couple of quick retries ride over a Prometheus restart; the library's default
    # (3 retries, 1 s backoff doubling) would hold an analysis tick for ~7 s first.
    retry = Retry(total=2, backoff_factor=0.2, status_forcelist=(502, 503, 504))
    return PrometheusConnect(url=prom_url.rstrip("/"), disable_ssl=False, retry=retry, timeout=timeout_s)


def _client_errors() -> tuple[type[Exception], ...]:
    """What a client call raises when Prometheus is unreachable or answers garbage.

    The client library talks HTTP through requests, whose exceptions all derive from
    OSError; catching OSError keeps our own code off a second HTTP stack (the control
    plane's own calls use httpx). ValueError/KeyError/TypeError: a 200 answer that is not
    Prometheus' JSON (a proxy page)."""
    from prometheus_api_client.exceptions import PrometheusApiClientException

    return (OSError, PrometheusApiClientException, ValueError, KeyError, TypeError)


def _query(client: Any, query: str, at: datetime) -> list[dict[str, Any]]:
    try:
        result = client.custom_query(query, params={"time": f"{at.timestamp():.3f}"})
    except _client_errors() as exc:
        raise PrometheusUnavailable(f"Prometheus at {client.url} did not answer {query!r}: {exc}") from exc
    if not isinstance(result, list):
        raise PrometheusUnavailable(f"Prometheus at {client.url} answered {query!r} with {result!r}")
    return result


def query_range(client: Any, query: str, start: datetime, end: datetime, step_s: float,
                name: str | None = None) -> list[dict[str, Any]]:
    """Rows of a range query (a matrix) over ``[start, end]`` every ``step_s`` seconds; raises
    :class:`PrometheusUnavailable` like every query here. ``name`` stands for the query in messages."""
    what = name or repr(query)
    try:
        rows = client.custom_query_range(query, start_time=start, end_time=end, step=f"{step_s:g}")
    except _client_errors() as exc:
        raise PrometheusUnavailable(f"Prometheus at {client.url} did not answer {what}: {exc}") from exc
    if not isinstance(rows, list):
        raise PrometheusUnavailable(f"Prometheus at {client.url} answered {what} with {rows!r}")
    return rows


def _value(row: Any, query: str) -> tuple[dict[str, str], float]:
    try:
        labels, (_, raw) = row["metric"], row["value"]
        value = float(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise PrometheusUnavailable(f"unreadable sample {row!r} for {query!r}") from exc
    # An increase is finite and >= 0; anything else is not a count to decide on.
    if not math.isfinite(value) or value < 0:
        raise PrometheusUnavailable(f"Prometheus returned {value} for {query!r} {labels}")
    return labels, value


def _le(raw: str) -> float:
    return math.inf if raw == "+Inf" else float(raw)


def _read_histograms(client: Any, metric: str, selector: str, window: int, end: datetime
                     ) -> dict[int, list[tuple[float, float]]]:
    """One histogram's per-version cumulative ``(le, count)`` buckets over the window."""
    from dayloop.rollout.analysis.inputs import monotone_cumulative

    query = window_query(metric, selector, window, by="version, le")
    buckets: dict[int, list[tuple[float, float]]] = {}
    for row in _query(client, query, end):
        labels, value = _value(row, query)
        try:
            le = _le(labels["le"])
        except (KeyError, ValueError) as exc:
            raise PrometheusUnavailable(f"bucket without a numeric le: {labels}") from exc
        buckets.setdefault(int(labels["version"]), []).append((le, value))
    hist: dict[int, list[tuple[float, float]]] = {}
    for v, rows in buckets.items():
        rows.sort()
        if rows[-1][0] != math.inf:
            raise PrometheusUnavailable(f"{metric} for version {v} has no +Inf bucket: {rows}")
        # Each bucket is extrapolated on its own, so float noise can make a cumulative
        # count dip below the previous one; a histogram cannot. (histogram_quantile
        # applies the same fix.)
        counts = monotone_cumulative([count for _, count in rows]).tolist()
        hist[v] = [(le, count) for (le, _), count in zip(rows, counts, strict=True)]
    return hist


def read_window(prom_url: str, versions: list[int], start: datetime, end: datetime, *,
                scrape_interval_seconds: float = 1.0, timeout_s: float = DEFAULT_TIMEOUT_S
                ) -> dict[int, VersionCounts]:
    """Per-version counts over ``[start, end]`` (aware datetimes), one entry per requested version.

    ``scrape_interval_seconds`` must be Prometheus' (1 s in the demo, 15 s in production):
    the window is widened to at least two of them. ``end`` should be at least one scrape
    interval in the past, or the last events are not scraped yet. Raises
    :class:`PrometheusUnavailable` when Prometheus cannot be reached or answers nonsense.
    """
    window = window_seconds(start, end, scrape_interval_seconds)
    selector = versions_selector(versions)
    wanted = sorted(set(versions))
    fields: dict[str, dict[int, Any]] = {}
    with connect(prom_url, timeout_s) as client:
        for name, metric in COUNTERS.items():
            query = window_query(metric, selector, window)
            got: dict[int, float] = {}
            for row in _query(client, query, end):
                labels, value = _value(row, query)
                got[int(labels["version"])] = value
            fields[name] = got
        for name, metric in HISTOGRAMS.items():
            fields[name] = _read_histograms(client, metric, selector, window, end)

    out = {}
    for v in wanted:
        values = {name: fields[name].get(v) for name in (*COUNTERS, *HISTOGRAMS)}
        if values["requests"] is not None:
            for name in ZERO_WHEN_REQUESTS_EXIST:
                if values[name] is None:
                    values[name] = 0.0
        out[v] = VersionCounts(version=v, window_seconds=window, **values)
    return out


def scrape_health(prom_url: str, *, start: datetime | None = None, end: datetime | None = None,
                  scrape_interval_seconds: float = 1.0, timeout_s: float = DEFAULT_TIMEOUT_S
                  ) -> dict[str, Any]:
    """Are the router targets being scraped? ``{"targets": {instance: up}, "up", "total", "healthy"}``.

    Without a window, ``up{job="router"}`` now (or at ``end``); with ``start`` and ``end``, a
    target counts as up only if every scrape in the window succeeded, so a replica that was
    down for part of a step is seen. ``healthy`` needs at least one target and all of them
    up: no targets at all is not healthy.
    """
    at = require_aware(end, "end") if end is not None else datetime.now(timezone.utc)
    if start is not None:
        query = f'min_over_time(up{{job="{ROUTER_JOB}"}}[{window_seconds(start, at, scrape_interval_seconds)}s])'
    else:
        query = f'up{{job="{ROUTER_JOB}"}}'
    with connect(prom_url, timeout_s) as client:
        rows = _query(client, query, at)
    targets = {}
    for row in rows:
        labels, value = _value(row, query)
        targets[labels.get("instance", "?")] = value == 1.0
    up = sum(targets.values())
    return {"targets": dict(sorted(targets.items())), "up": up, "total": len(targets),
            "healthy": bool(targets) and up == len(targets)}


GROUP_COUNTERS = {
    "impressions": "dayloop_router_group_impressions_total",
    "clicks": "dayloop_router_group_clicks_total",
}


@dataclass(frozen=True)
class GroupCounts:
    """Impressions and clicks per bucket group over one window, summed over the given versions
    and every router replica; ``NaN`` where no series reported the group (missing, not zero)."""

    window_seconds: int
    impressions: tuple[float, ...]
    clicks: tuple[float, ...]


def read_groups(prom_url: str, versions: list[int], start: datetime, end: datetime, *,
                n_groups: int, scrape_interval_seconds: float = 1.0, timeout_s: float = DEFAULT_TIMEOUT_S
                ) -> GroupCounts:
    """Per-group counts of ``versions`` over ``[start, end]``: what the user-level CTR test reads.

    A group's count sums every listed version (the user's group is the randomised unit; a
    canary attempt answered by the stable version is still that group's list). The routers
    create a group's series at 0 for each version routed to it, so a group with no series at
    all is missing, not empty. Raises :class:`PrometheusUnavailable` like :func:`read_window`,
    also for a group label outside ``0..n_groups-1``."""
    window = window_seconds(start, end, scrape_interval_seconds)
    selector = versions_selector(versions)
    out: dict[str, list[float]] = {}
    with connect(prom_url, timeout_s) as client:
        for name, metric in GROUP_COUNTERS.items():
            query = window_query(metric, selector, window, by="group")
            values = [math.nan] * n_groups
            for row in _query(client, query, end):
                labels, value = _value(row, query)
                raw = labels.get("group", "")
                if not raw.isdigit() or int(raw) >= n_groups:
                    raise PrometheusUnavailable(f"{metric} has a group label outside 0..{n_groups - 1}: {labels}")
                values[int(raw)] = value
            out[name] = values
    return GroupCounts(window_seconds=window, impressions=tuple(out["impressions"]), clicks=tuple(out["clicks"]))
