"""The analysis inputs: Prometheus histograms, their repair and quantiles, thresholds
(dayloop.rollout.analysis.inputs)."""

from __future__ import annotations

import math

import pytest

from dayloop.rollout.analysis import (
    Histogram,
    Thresholds,
    histogram_quantile,
)


def test_histogram_quantile_follows_prometheus() -> None:
    h = Histogram((0.1, 0.2, 0.4, math.inf), (10, 50, 90, 100))
    # rank 45 lies in (0.1, 0.2] holding 40 observations, 35 of them below the rank
    assert histogram_quantile(0.45, h) == pytest.approx(0.1 + 0.1 * 35 / 40)
    # the first bucket starts at 0 when its bound is positive
    assert histogram_quantile(0.05, h) == pytest.approx(0.05)
    # a rank in the +Inf bucket answers the largest finite bound
    assert histogram_quantile(0.99, h) == pytest.approx(0.4)
    assert math.isnan(histogram_quantile(0.5, Histogram((0.1, 0.2), (5, 10))))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, Histogram((0.1, math.inf), (0, 0))))  # no observations
    assert histogram_quantile(1.5, h) == math.inf and histogram_quantile(-0.1, h) == -math.inf
    # a bucket below a non-positive bound answers its bound
    assert histogram_quantile(0.1, Histogram((-0.5, 0.5, math.inf), (20, 90, 100))) == -0.5
    # a rank equal to a cumulative count stops at the first bucket reaching it (count >= rank)
    flat = Histogram((0.1, 0.2, 0.4, math.inf), (50, 50, 100, 100))
    assert histogram_quantile(0.5, flat) == pytest.approx(0.1)
    # increase() can leave a bucket a hair below the previous one: repaired like Prometheus
    jitter = Histogram((0.1, 0.2, 0.4, math.inf), (10, 9.9, 90, 100))
    assert histogram_quantile(0.5, jitter) == pytest.approx(0.2 + 0.2 * 40 / 80)


def test_histogram_repair_is_the_shared_running_maximum() -> None:
    from dayloop.rollout.analysis.inputs import monotone_cumulative

    jitter = Histogram((0.1, 0.2, 0.4, math.inf), (10, 9.9, 90, 100))
    assert list(jitter.monotone()) == list(monotone_cumulative(jitter.cumulative)) == [10, 10, 90, 100]


def test_histogram_from_prometheus_pairs() -> None:
    h = Histogram.from_prometheus([("+Inf", 100), ("0.2", 50), ("0.1", 10), ("0.4", 90)])
    assert h.upper_bounds == (0.1, 0.2, 0.4, math.inf) and h.count == 100
    assert h.complete
    with pytest.raises(ValueError):
        Histogram((0.2, 0.1), (1, 2))
    with pytest.raises(ValueError):
        Histogram((0.1,), (1, 2))


def test_thresholds_from_mapping() -> None:
    t = Thresholds.from_mapping({"max_error_ratio": 0.02, "min_requests": 50})
    assert t.max_error_ratio == 0.02 and t.min_requests == 50 and t.alpha == Thresholds().alpha
    with pytest.raises(ValueError, match="unknown"):
        Thresholds.from_mapping({"max_eror_ratio": 0.02})
    with pytest.raises(ValueError):
        Thresholds(alpha=0.0)
    with pytest.raises(ValueError):
        Thresholds(ctr_dispersion=0.5)
    with pytest.raises(ValueError):
        Thresholds(ctr_margin=1.0)
    assert Thresholds.from_mapping(t.as_dict()) == t
