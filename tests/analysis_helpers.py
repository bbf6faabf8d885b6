"""Analysis inputs shaped like the router's: histograms with its buckets and a version's window."""

from __future__ import annotations

import math
from dataclasses import replace

from scipy import stats as sps

from dayloop.rollout.analysis import Histogram, VersionWindow
from serving_helpers import LATENCY_LE, SCORE_LE


def histogram(bounds: tuple[float, ...], cdf, n: float) -> Histogram:
    """Expected cumulative counts of ``n`` observations with distribution ``cdf``."""
    cum = [n * float(cdf(b)) if math.isfinite(b) else n for b in bounds]
    return Histogram(bounds, tuple(cum))


def latency_histogram(n: float, median_s: float = 0.0085, sigma: float = 0.35) -> Histogram:
    return histogram(LATENCY_LE, sps.lognorm(s=sigma, scale=median_s).cdf, n)


def score_histogram(n: float, mean: float = 0.55, sd: float = 0.12) -> Histogram:
    return histogram(SCORE_LE, sps.norm(mean, sd).cdf, n)


def version_window(requests: float = 5000, error_ratio: float = 0.001, ctr: float = 0.3, **changes) -> VersionWindow:
    errors = requests * error_ratio
    impressions = requests - errors
    base = VersionWindow(requests=requests, errors=errors, nonfinite=0, impressions=impressions,
                         clicks=impressions * ctr, latency=latency_histogram(requests), scores=score_histogram(impressions))
    return replace(base, **changes)
