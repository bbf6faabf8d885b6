"""decide() on constructed per-user frames, decision tags and the HTML report."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dayloop.errors import OfflineGateFailed
from dayloop.quality.offline_gate import (
    GateDecision,
    GateThresholds,
    InfraCheck,
    decide,
    decision_tags,
)
from dayloop.quality.offline_gate.intervals import paired_ratio_interval
from dayloop.quality.report import write_offline_report

N = 300
THRESHOLDS = GateThresholds(
    primary_metric="recall",
    noninferiority_margin=0.05, min_recall=0.05, min_ndcg=0.05, min_popularity_lift=1.2, max_psi=0.25
)
# same rule as MLflow's tag key validation (posix): no '@', no leading '/'
MLFLOW_KEY = re.compile(r"^[\w.\- :/]*$")


def _frame(recall: np.ndarray, ndcg: np.ndarray | None = None, users: np.ndarray | None = None) -> pd.DataFrame:
    users = np.arange(1, recall.size + 1) if users is None else users
    ndcg = recall * 0.8 if ndcg is None else ndcg
    return pd.DataFrame({"user_id": users, "n_targets": 5, "recall@10": recall, "ndcg@10": ndcg})


@pytest.fixture
def frames() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    champion = np.clip(rng.beta(2, 5, N), 0, 1)
    return {
        "champion": _frame(champion),
        "same": _frame(np.clip(champion + rng.normal(scale=0.02, size=N), 0, 1)),
        "worse": _frame(champion * 0.7),
        "popularity": _frame(champion * 0.5),
    }


def _infra(ok: bool = True, latency: float = 3.0, problems: list[str] | None = None) -> InfraCheck:
    return InfraCheck(
        ok=ok,
        bundle_dir="/x",
        batch=256,
        budget_ms=50.0,
        latency_ms=latency if ok else None,
        latency_p95_ms=latency * 1.2 if ok else None,
        output_shape=[256, 64] if ok else None,
        output_dtype="float32" if ok else None,
        finite=True if ok else None,
        problems=problems or [],
    )


def _failed_checks(decision: GateDecision) -> str:
    return " | ".join(decision.failures)


def test_pass_against_champion(frames: dict) -> None:
    d = decide(frames["same"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05, _infra())
    assert d.passed and not d.bootstrap, d.reasons
    assert d.failures == []
    assert all(r.startswith(("PASS", "INFO")) for r in d.reasons)
    assert d.metrics["recall_at_10"] == pytest.approx(frames["same"]["recall@10"].mean())
    assert d.metrics["champion.recall_at_10"] == pytest.approx(frames["champion"]["recall@10"].mean())
    assert d.metrics["noninferiority.p_value"] < 0.05
    assert d.metrics["psi"] == 0.05 and d.metrics["decision_passed"] == 1.0
    d.raise_if_failed()  # no exception


def test_fail_noninferiority(frames: dict) -> None:
    d = decide(frames["worse"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05, _infra())
    assert not d.passed
    assert len(d.failures) == 1 and "non-inferiority" in d.failures[0]
    # the reason carries the numbers
    assert f"{frames['worse']['recall@10'].mean():.4f}" in d.failures[0]
    assert d.metrics["noninferiority.mean_diff"] < -d.metrics["noninferiority.margin_abs"]
    with pytest.raises(OfflineGateFailed, match="non-inferiority"):
        d.raise_if_failed()


def test_primary_metric_drives_noninferiority(frames: dict) -> None:
    # challenger keeps the champion's ndcg but loses 30 % recall
    mixed = frames["worse"].assign(**{"ndcg@10": frames["champion"]["ndcg@10"]})
    on_ndcg = replace(THRESHOLDS, primary_metric="ndcg")
    d = decide(mixed, frames["champion"], frames["popularity"], on_ndcg, 0.05, _infra())
    assert d.passed, d.reasons
    assert any("non-inferiority on ndcg@10" in r for r in d.reasons)
    d = decide(mixed, frames["champion"], frames["popularity"], THRESHOLDS, 0.05, _infra())
    assert not d.passed and "non-inferiority on recall@10" in _failed_checks(d)


def test_absolute_margin_mode(frames: dict) -> None:
    loose = replace(THRESHOLDS, margin_mode="absolute", noninferiority_margin=0.2)
    d = decide(frames["worse"], frames["champion"], frames["popularity"], loose, 0.05, _infra())
    assert d.passed, d.reasons
    assert d.metrics["noninferiority.margin_abs"] == 0.2


def test_fail_floor(frames: dict) -> None:
    strict = replace(THRESHOLDS, min_recall=0.9)
    d = decide(frames["same"], frames["champion"], frames["popularity"], strict, 0.05, _infra())
    assert not d.passed
    assert len(d.failures) == 1 and "recall@10" in d.failures[0] and "floor 0.9000" in d.failures[0]


def test_fail_popularity(frames: dict) -> None:
    strong_pop = _frame(frames["same"]["recall@10"].to_numpy() * 1.1)
    d = decide(frames["same"], frames["champion"], strong_pop, THRESHOLDS, 0.05, _infra())
    assert not d.passed
    assert len(d.failures) == 1 and "popularity" in d.failures[0]
    assert d.metrics["popularity_lift"] == pytest.approx(1 / 1.1)


def test_popularity_floor_is_decided_on_the_paired_interval() -> None:
    # 60 users: the challenger's point lift (~1.1x) is under the 1.2x floor, but its paired
    # interval reaches above it, so the gate cannot say it is worse than the floor: pass
    rng = np.random.default_rng(1)
    pop = rng.beta(2, 5, 60)
    values = np.clip(pop * 1.1 + rng.normal(scale=0.3, size=60), 0, 1)
    noisy, champion = _frame(values), _frame(values * 0.99)
    popularity = _frame(pop)
    d = decide(noisy, champion, popularity, THRESHOLDS, 0.05, _infra())
    lift = d.metrics["popularity_lift"]
    assert lift < THRESHOLDS.min_popularity_lift < d.metrics["popularity_lift_high"], d.reasons
    assert d.metrics["popularity_lift_low"] < lift
    assert d.passed, d.reasons
    # without a champion (bootstrap) the point lift itself must reach the floor
    boot = decide(noisy, None, popularity, THRESHOLDS, None, _infra())
    assert not boot.passed and "bootstrap: the lift itself must reach 1.200x" in _failed_checks(boot)
    # the same gap with the whole interval below the floor fails
    clear = _frame(np.clip(pop * 1.0 + rng.normal(scale=0.01, size=60), 0, 1))
    d = decide(clear, _frame(pop), popularity, THRESHOLDS, 0.05, _infra())
    assert not d.passed and "whole interval is below 1.200x" in _failed_checks(d)
    assert d.metrics["popularity_lift_high"] < THRESHOLDS.min_popularity_lift


def test_paired_ratio_interval() -> None:
    rng = np.random.default_rng(0)
    b = rng.beta(2, 5, 400)
    a = b * 1.2 + rng.normal(scale=0.05, size=400)
    ci = paired_ratio_interval(a, b, level=0.9, n_boot=1000, seed=3)
    assert ci.low < ci.ratio < ci.high and ci.n == 400
    assert ci.ratio == pytest.approx(a.mean() / b.mean())
    assert 1.1 < ci.low and ci.high < 1.3
    # seeded: the same inputs give the same interval; pairing makes it tight
    assert paired_ratio_interval(a, b, level=0.9, n_boot=1000, seed=3) == ci
    unpaired = paired_ratio_interval(a, rng.permutation(b), level=0.9, n_boot=1000, seed=3)
    assert unpaired.high - unpaired.low > 2 * (ci.high - ci.low)
    # non-finite users are dropped, bad input is refused
    assert paired_ratio_interval(np.r_[a, np.nan], np.r_[b, 1.0], n_boot=200).n == 400
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratio_interval(a, b[:-1])
    with pytest.raises(ValueError, match="at least 2 users"):
        paired_ratio_interval([1.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        paired_ratio_interval(a, b, level=1.0)


def test_bootstrap_rule(frames: dict) -> None:
    d = decide(frames["same"], None, frames["popularity"], THRESHOLDS, None, _infra())
    assert d.passed and d.bootstrap
    assert any(r.startswith("INFO") and "bootstrap" in r for r in d.reasons)
    assert not any("non-inferiority" in r and r.startswith("PASS") for r in d.reasons)
    # a bootstrap model that loses to popularity still fails
    weak = decide(frames["popularity"], None, frames["same"], THRESHOLDS, None, _infra())
    assert not weak.passed and weak.bootstrap and "popularity" in _failed_checks(weak)


def test_infra_failures(frames: dict) -> None:
    broken = _infra(ok=False, problems=["/x/user_tower.pt is missing"])
    d = decide(frames["same"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05, broken)
    assert not d.passed and "user_tower.pt is missing" in _failed_checks(d)
    slow_latency = THRESHOLDS.latency_budget_ms + 30.0
    slow = decide(frames["same"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05,
                  _infra(latency=slow_latency))
    assert not slow.passed and f"budget {THRESHOLDS.latency_budget_ms:.1f} ms" in _failed_checks(slow)
    unchecked = decide(frames["same"], None, frames["popularity"], THRESHOLDS, None, None)
    assert not unchecked.passed and "not checked" in _failed_checks(unchecked)


def test_psi_checks(frames: dict) -> None:
    drifted = decide(frames["same"], frames["champion"], frames["popularity"], THRESHOLDS, 0.4, _infra())
    assert not drifted.passed and "PSI" in _failed_checks(drifted)
    missing = decide(frames["same"], frames["champion"], frames["popularity"], THRESHOLDS, None, _infra())
    assert not missing.passed and "not computed" in _failed_checks(missing)


def test_psi_is_advisory_unless_a_limit_is_set(frames: dict) -> None:
    from dataclasses import replace

    advisory = replace(THRESHOLDS, max_psi=None)
    drifted = decide(frames["same"], frames["champion"], frames["popularity"], advisory, 1.6, _infra())
    assert drifted.passed and drifted.metrics["psi"] == 1.6
    assert any(r.startswith("INFO: PSI of top-1 scores = 1.6000 (advisory") for r in drifted.reasons)
    missing = decide(frames["same"], frames["champion"], frames["popularity"], advisory, None, _infra())
    assert missing.passed and any("not computed" in r and r.startswith("INFO") for r in missing.reasons)
    # advisory PSI never rescues a worse model: the metric checks still decide
    worse = decide(frames["worse"], frames["champion"], frames["popularity"], advisory, 0.01, _infra())
    assert not worse.passed
    assert GateThresholds().max_psi is None


def test_too_few_users_fail(frames: dict) -> None:
    few = {k: v.head(10) for k, v in frames.items()}
    d = decide(few["same"], few["champion"], few["popularity"], THRESHOLDS, 0.05, _infra())
    assert not d.passed and "10 evaluable users" in _failed_checks(d)


def test_frames_must_cover_the_same_users(frames: dict) -> None:
    shifted = frames["champion"].assign(user_id=frames["champion"]["user_id"] + 1000)
    with pytest.raises(ValueError, match="different users"):
        decide(frames["same"], shifted, frames["popularity"], THRESHOLDS, 0.05, _infra())
    with pytest.raises(ValueError, match="lacks columns"):
        decide(frames["same"].drop(columns="ndcg@10"), None, frames["popularity"], THRESHOLDS, None, _infra())


def test_thresholds_validate() -> None:
    with pytest.raises(ValueError):
        GateThresholds(primary_metric="map")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GateThresholds(margin_mode="percent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="popularity_days"):
        GateThresholds(popularity_days=0)
    with pytest.raises(ValueError, match="popularity_level"):
        GateThresholds(popularity_level=1.0)
    assert GateThresholds(k=50, primary_metric="recall").primary_column == "recall@50"
    assert GateThresholds().primary_column == "ndcg@10"


def test_decision_tags_are_mlflow_safe(frames: dict) -> None:
    d = decide(frames["worse"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05, _infra())
    long = replace(d, reasons=[*d.reasons, "FAIL: " + "x" * 9000])
    tags = decision_tags(long)
    assert tags["gate.offline.decision"] == "fail"
    assert tags["gate.offline.bootstrap"] == "false"
    assert float(tags["gate.offline.recall_at_10"]) == pytest.approx(d.metrics["recall_at_10"], rel=1e-5)
    assert tags[f"gate.offline.reason.{len(d.reasons)}"].endswith("...")
    for i, reason in enumerate(d.reasons):
        assert tags[f"gate.offline.reason.{i}"] == reason
    for key, value in tags.items():
        assert MLFLOW_KEY.match(key) and len(key) <= 250, key
        assert isinstance(value, str) and len(value) <= 5000


def test_report_contains_every_reason_and_plots(frames: dict, tmp_path: Path) -> None:
    d = decide(frames["worse"], frames["champion"], frames["popularity"], THRESHOLDS, 0.05, _infra())
    rng = np.random.default_rng(0)
    samples = {"challenger": rng.normal(size=200), "champion": rng.normal(0.2, size=200)}
    path = write_offline_report(d, frames["worse"], frames["champion"], frames["popularity"], samples, tmp_path)
    html = path.read_text()
    assert path.name == "offline_report.html"
    assert "FAILED" in html and html.count("data:image/png;base64,") == 2
    for reason in d.reasons:
        assert reason.split(":", 1)[1].strip()[:40].replace("<", "&lt;") in html
    for png in ("metric_distributions.png", "score_histograms.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # a bootstrap report without champion or scores still renders
    boot = decide(frames["same"], None, frames["popularity"], THRESHOLDS, None, _infra())
    p2 = write_offline_report(boot, frames["same"], None, frames["popularity"], None, tmp_path / "boot")
    assert "bootstrap" in p2.read_text()
