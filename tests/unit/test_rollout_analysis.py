"""The canary analysis as a whole: phases, the worst one wins, missing is never a pass,
serialisation (dayloop.rollout.analysis)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from analysis_helpers import score_histogram as _scores
from analysis_helpers import version_window as _window
from dayloop.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    CtrState,
    Histogram,
    Thresholds,
    VersionWindow,
    analyse,
    worst_phase,
)
from serving_helpers import LATENCY_LE, SCORE_LE  # the router's buckets, each closed by +Inf


def test_worst_phase_order() -> None:
    assert worst_phase([PASS, PASS]) == PASS
    assert worst_phase([PASS, INCONCLUSIVE, PASS]) == INCONCLUSIVE
    assert worst_phase([INCONCLUSIVE, FAIL, PASS]) == FAIL
    assert worst_phase([]) == INCONCLUSIVE  # nothing checked is no evidence of health
    with pytest.raises(ValueError):
        worst_phase(["ok"])


def test_identical_windows_pass_every_check() -> None:
    w = _window()
    result = analyse(w, w, Thresholds())
    assert result.phase == PASS, result.reasons
    assert {c.name for c in result.checks} == {
        "nonfinite", "error_ratio", "latency_p99", "error_ratio_vs_control", "latency_p99_vs_control",
        "score_drift", "ctr"}
    assert all(c.phase == PASS for c in result.checks)
    assert result.reasons == []
    json.dumps(result.as_dict(), allow_nan=False)  # strict JSON for XCom


@pytest.mark.parametrize("requests", [1, 3, 10_000])
def test_nan_fails_at_any_sample_size(requests: float) -> None:
    canary = _window(requests=requests, nonfinite=1)
    result = analyse(canary, _window(), Thresholds())
    assert result.phase == FAIL
    check = result.check("nonfinite")
    assert check.phase == FAIL and "1 non-finite outputs > tolerance 0" in check.message


def test_nan_fails_even_with_every_other_series_missing() -> None:
    result = analyse(VersionWindow(nonfinite=2), VersionWindow(), Thresholds())
    assert result.phase == FAIL
    assert result.check("nonfinite").phase == FAIL
    assert all(c.phase == INCONCLUSIVE for c in result.checks if c.name != "nonfinite")


@pytest.mark.parametrize(("arm", "field_name"), [
    *(("canary", f) for f in ("requests", "errors", "nonfinite", "impressions", "clicks", "latency", "scores")),
    *(("control", f) for f in ("requests", "errors", "impressions", "clicks", "latency", "scores")),
])
def test_missing_series_is_inconclusive_never_pass(arm: str, field_name: str) -> None:
    good = _window()
    broken = replace(good, **{field_name: None})
    canary, control = (broken, good) if arm == "canary" else (good, broken)
    result = analyse(canary, control, Thresholds())
    assert any("series missing" in r for r in result.reasons), result.reasons
    if field_name == "scores":
        # Only the (advisory) score drift check reads the score histograms: it says why it
        # could not judge, and decides the phase only when made blocking.
        assert result.check("score_drift").phase == INCONCLUSIVE and result.check("score_drift").advisory
        assert result.phase == PASS
        assert analyse(canary, control, Thresholds(), advisory=()).phase == INCONCLUSIVE
    else:
        assert result.phase == INCONCLUSIVE


def test_score_drift_is_reported_but_only_decides_when_made_blocking() -> None:
    shifted = _window(scores=_scores(5000, mean=0.35))
    default = analyse(shifted, _window(), Thresholds())
    blocking = analyse(shifted, _window(), Thresholds(), advisory=())
    assert default.check("score_drift").phase == blocking.check("score_drift").phase == FAIL
    assert default.phase == PASS and blocking.phase == FAIL
    assert any(r.startswith("score_drift (advisory): score PSI") for r in default.reasons)
    assert default.as_dict()["checks"][-2]["advisory"] is True


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_invalid_counts_are_inconclusive(bad: float) -> None:
    result = analyse(_window(errors=bad), _window(), Thresholds())
    assert result.phase == INCONCLUSIVE
    assert result.check("error_ratio").phase == INCONCLUSIVE
    assert "invalid value" in result.check("error_ratio").message


def test_too_few_samples_is_inconclusive() -> None:
    t = Thresholds(min_requests=200, min_impressions=200)
    result = analyse(_window(requests=150), _window(), t)
    assert result.phase == INCONCLUSIVE
    for name in ("error_ratio", "latency_p99", "error_ratio_vs_control", "latency_p99_vs_control",
                 "score_drift", "ctr"):
        assert result.check(name).phase == INCONCLUSIVE, name
    assert "too few canary requests: 150 < 200" in result.check("error_ratio").message
    # a thin control arm is just as undecidable
    assert analyse(_window(), _window(requests=100), t).phase == INCONCLUSIVE


def test_no_traffic_at_all_is_inconclusive() -> None:
    empty = VersionWindow(requests=0, errors=0, nonfinite=0, impressions=0, clicks=0,
                          latency=Histogram(LATENCY_LE, (0.0,) * len(LATENCY_LE)),
                          scores=Histogram(SCORE_LE, (0.0,) * len(SCORE_LE)))
    assert analyse(empty, _window(), Thresholds()).phase == INCONCLUSIVE
    assert analyse(empty, empty, Thresholds()).phase == INCONCLUSIVE


def test_analysis_serialises_to_strict_json_with_unbounded_values() -> None:
    # a handful of clicks leaves the CTR bound infinite: None in JSON, "inf" in the message
    result = analyse(_window(requests=20, clicks=2), _window(requests=20, clicks=3), Thresholds())
    ctr = result.check("ctr")
    assert ctr.values["upper_bound"] == math.inf and "upper bound inf" in ctr.message
    doc = json.loads(json.dumps(result.as_dict(), allow_nan=False))
    ctr_doc = next(c for c in doc["checks"] if c["name"] == "ctr")
    assert ctr_doc["values"]["upper_bound"] is None
    assert CtrState.from_dict(doc["ctr_state"]) == result.ctr_state
