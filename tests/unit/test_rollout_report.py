"""The rollout report rendered from hand-made steps and series: what a reader must find in
the HTML (outcome, steps, failing checks, escaped text, the truth beside the decision), the
PNG, and the no-Prometheus and no-panel paths."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from dayloop.config import load_settings
from dayloop.rollout import report as report_mod
from dayloop.rollout.analysis import Analysis, Check
from dayloop.rollout.plan import PROFILES
from dayloop.rollout.prom import PrometheusUnavailable
from dayloop.rollout.report import METRICS, failed_checks, fetch_series, render_report, write_and_log_report
from dayloop.simulation.panel import write_panel
from dayloop.simulation.truth import VersionTruth, judge, panel_path
from serving_helpers import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = datetime(2026, 11, 23, 21, 0, tzinfo=timezone.utc)
EVIL = "<script>alert('x')</script>"
FAIL_MESSAGE = "error ratio 0.120 > max 0.050 (12 of 100 requests)"


def _iso(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def _analysis(phase: str, checks: list[Check]) -> dict:
    return Analysis(phase=phase, checks=tuple(checks)).as_dict()


def _steps() -> list[dict]:
    ok = Check("error_ratio", "pass", "error ratio 0.000 <= max 0.050 (0 of 60 requests)", {"ratio": 0.0})
    bad = Check("error_ratio", "fail", FAIL_MESSAGE, {"ratio": 0.12})
    waiting = Check("ctr", "inconclusive", "too few impressions & clicks", {})
    return [
        {"index": 0, "percent": 10.0, "started_at": _iso(0), "ended_at": _iso(35), "decision": "pass",
         "looks": [{"at": _iso(30), "elapsed_s": 30.0, "phase": "inconclusive", "reasons": ["ctr: too few"]},
                   {"at": _iso(35), "elapsed_s": 35.0, "phase": "pass", "reasons": []}],
         "analysis": _analysis("pass", [ok])},
        {"index": 1, "percent": 50.0, "started_at": _iso(38), "ended_at": _iso(80), "decision": "fail",
         "looks": [{"at": _iso(80), "elapsed_s": 42.0, "phase": "fail", "reasons": [f"error_ratio: {EVIL}"]}],
         "analysis": _analysis("fail", [bad, waiting])},
        {"index": 2, "percent": 100.0, "started_at": _iso(83), "ended_at": _iso(90), "decision": "aborted",
         "looks": [], "analysis": None},
    ]


def _rollout(outcome: str = "rolled_back") -> dict:
    return {"version": 5, "champion": 4, "salt": "v5-ab12", "plan": PROFILES["demo"].to_dict(),
            "outcome": outcome, "reason": f"step 2 failed: {EVIL}"}


def _series(versions=(5, 4)) -> dict:
    start = T0.timestamp() - 30
    out: dict = {}
    for key, _ in METRICS:
        out[key] = {}
        for v in versions:
            base = {"request_rate": 2.0 if v == 5 else 18.0, "error_ratio": 0.1 if v == 5 else 0.0,
                    "p99_latency_s": 0.03, "nonfinite_rate": 0.0, "ctr": 0.2,
                    "route_share": 0.1 if v == 5 else 0.9}[key]
            out[key][v] = [(start + 5 * i, base * (1 + 0.01 * i)) for i in range(25)]
    return out


def _embedded_png(text: str) -> bytes:
    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert m, "no inlined PNG"
    return base64.b64decode(m.group(1))


def test_report_shows_outcome_steps_failing_checks_and_plot(tmp_path):
    path = render_report(tmp_path, _rollout(), _steps(), _series())
    assert path == tmp_path / "rollout_report.html"
    text = path.read_text()
    assert "Rollout of v5 vs champion v4: ROLLED_BACK" in text
    for percent in ("10%", "50%", "100%"):
        assert percent in text
    assert html.escape(FAIL_MESSAGE) in text  # '>' escaped like everything else
    assert "too few impressions &amp; clicks" in text
    assert "demo" in text  # plan name
    # Reason and look text arrive from elsewhere: shown escaped, never as markup.
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert text.count("&lt;script&gt;") == 2  # the rollout's reason and the failing look's
    for decision in ("PASS", "FAIL", "ABORTED"):
        assert decision in text
    png = (tmp_path / "rollout_metrics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert _embedded_png(text) == png
    assert "Plots missing" not in text


def test_a_version_without_series_still_plots(tmp_path):
    series = _series(versions=(5,))
    series["ctr"] = {}  # no clicks at all on this row
    text = render_report(tmp_path, _rollout("promoted"), _steps()[:1], series).read_text()
    assert "Rollout of v5 vs champion v4: PROMOTED" in text
    assert _embedded_png(text).startswith(PNG_MAGIC)
    assert (tmp_path / "rollout_metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_without_prometheus_the_report_says_why_and_keeps_the_steps(tmp_path):
    (tmp_path / "rollout_metrics.png").write_bytes(b"stale")
    text = render_report(tmp_path, _rollout(), _steps(), None).read_text()
    assert "Plots missing" in text and "Prometheus was unreachable" in text
    assert "data:image/png" not in text
    assert not (tmp_path / "rollout_metrics.png").exists()  # a stale plot would contradict the page
    assert html.escape(FAIL_MESSAGE) in text and "50%" in text


def test_the_final_analysis_is_also_read_from_the_operators_result(tmp_path):
    step = _steps()[1]
    step["result"] = {"analysis": step.pop("analysis"), "decision": "fail"}
    text = render_report(tmp_path, _rollout(), [step], None).read_text()
    assert html.escape(FAIL_MESSAGE) in text and "no final analysis" not in text


def test_a_rollout_without_champion_or_steps_renders(tmp_path):
    rollout = {**_rollout("failed"), "champion": None, "reason": "deploy failed"}
    text = render_report(tmp_path, rollout, [], _series(versions=(5,))).read_text()
    assert "Rollout of v5 vs no champion: FAILED" in text
    assert "no step ran" in text


class _FakeRegistry:
    logged: ClassVar[list] = []

    def __init__(self, settings):
        self.settings = settings

    def log_artifacts(self, version, local_dir, artifact_path):
        self.logged.append((version, sorted(p.name for p in Path(local_dir).iterdir()), artifact_path))
        return f"mlflow-artifacts:/run/artifacts/{artifact_path}"


@pytest.fixture
def fake_registry(monkeypatch):
    import dayloop.registry

    _FakeRegistry.logged = []
    monkeypatch.setattr(dayloop.registry, "Registry", _FakeRegistry)
    return _FakeRegistry


@pytest.mark.parametrize("prom", [None, "unreachable"])
def test_write_and_log_report_without_prometheus_logs_a_plotless_report(tmp_path, fake_registry, prom):
    prom_url = None if prom is None else f"http://127.0.0.1:{free_port()}"
    out = write_and_log_report(load_settings(), prom_url, _rollout(), _steps(), tmp_path / "report")
    assert out["plots"] is False
    assert out["truth"] is None  # no panel file: production, no truth
    assert out["artifact_uri"] == "mlflow-artifacts:/run/artifacts/rollout"
    assert fake_registry.logged == [(5, ["rollout_report.html"], "rollout")]
    text = Path(out["html"]).read_text()
    why = "no Prometheus URL was given" if prom is None else "Prometheus was unreachable"
    assert f"Plots missing: {why}" in text


def test_write_and_log_report_fetches_around_the_steps(tmp_path, fake_registry, monkeypatch):
    calls = []

    def fake_fetch(prom_url, versions, start, end, **kw):
        calls.append((prom_url, versions, start, end))
        return _series()

    monkeypatch.setattr(report_mod, "fetch_series", fake_fetch)
    out = write_and_log_report(load_settings(), "http://prom:9090", _rollout(), _steps(), tmp_path)
    assert calls == [("http://prom:9090", [4, 5], T0 - timedelta(seconds=30), T0 + timedelta(seconds=100))]
    assert out["plots"] is True
    assert fake_registry.logged == [(5, ["rollout_metrics.png", "rollout_report.html"], "rollout")]


def _verdict(canary_mean: float, outcome: str, checks: list[str]) -> dict:
    users = np.array([1, 2, 3], dtype=np.int64)

    def truth(version, mean):
        return VersionTruth(version=version, n_users=3, mean_expected_clicks=mean, per_user=np.full(3, mean),
                            excluded_seen=True, user_ids=users, k=10)

    return judge(truth(5, canary_mean), truth(4, 0.2), 0.02, outcome, checks).as_dict()


def test_failed_checks_name_the_verdict_checks_of_the_failed_step():
    steps = _steps()
    assert failed_checks(steps) == ["error_ratio"]
    assert failed_checks(steps[:1]) == []  # no step failed
    drift = Check("score_drift", "fail", "PSI 4.5", {}, advisory=True)
    ctr = Check("ctr", "fail", "CTR ratio 0.73", {})
    steps[1]["result"] = {"analysis": _analysis("fail", [drift, ctr])}
    steps[1]["analysis"] = None
    assert failed_checks(steps) == ["ctr"]  # advisory checks decide nothing
    steps[1]["result"] = {"analysis": _analysis("inconclusive", [Check("ctr", "inconclusive", "few", {})])}
    assert failed_checks(steps) == []  # inconclusive until the maximum bake


@pytest.mark.parametrize(("mean", "checks", "css", "words"), [
    (0.197, ["ctr"], "fail", "the decision DISAGREES with the truth"),
    (0.15, ["ctr"], "pass", "the decision agrees with the truth"),
    (0.197, ["error_ratio"], "aborted", "the truth concerns CTR only"),
])
def test_the_report_sets_the_decision_beside_the_truth(tmp_path, mean, checks, css, words):
    truth = _verdict(mean, "rolled_back", checks)
    text = render_report(tmp_path, _rollout(), _steps(), None, truth).read_text()
    assert "Truth (simulated users)" in text
    assert f"<p class='{css}'><b>{html.escape(truth['sentence'])}</b></p>" in text and words in truth["sentence"]
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    # Rendered again without a truth (production): no section, and no stale truth.json.
    text = render_report(tmp_path, _rollout(), _steps(), None).read_text()
    assert "Truth" not in text and not (tmp_path / "truth.json").exists()


def test_a_truth_that_cannot_be_computed_never_costs_the_report(tmp_path, fake_registry):
    settings = load_settings()
    write_panel(panel_path(settings), [1, 2], [[1001], [1002]])
    # The (fake) registry cannot answer for the version: the truth fails, the report is still
    # written and logged.
    out = write_and_log_report(settings, None, _rollout(), _steps(), tmp_path / "report")
    assert set(out["truth"]) == {"error"} and "AttributeError" in out["truth"]["error"]
    assert fake_registry.logged == [(5, ["rollout_report.html", "truth.json"], "rollout")]
    text = Path(out["html"]).read_text()
    assert "Truth not computed: AttributeError" in text and html.escape(FAIL_MESSAGE) in text
    # A rollout without a control has nothing to compare with.
    assert write_and_log_report(settings, None, {**_rollout(), "champion": None}, _steps(),
                                tmp_path / "r2")["truth"] is None


def test_fetch_series_refuses_bad_arguments_and_unreachable_prometheus():
    end = datetime.now(timezone.utc)
    with pytest.raises(ValueError, match="timezone-aware"):
        fetch_series("http://127.0.0.1:1", [4, 5], end.replace(tzinfo=None) - timedelta(seconds=60), end)
    with pytest.raises(ValueError, match="version"):
        fetch_series("http://127.0.0.1:1", [], end - timedelta(seconds=60), end)
    with pytest.raises(ValueError, match="after start"):
        fetch_series("http://127.0.0.1:1", [5], end, end)
    with pytest.raises(PrometheusUnavailable, match="did not answer"):
        fetch_series(f"http://127.0.0.1:{free_port()}", [4, 5], end - timedelta(seconds=60), end, timeout_s=2)


def test_module_import_stays_light():
    code = ("import sys, dayloop.rollout.report; "
            "heavy = [m for m in ('matplotlib', 'numpy', 'mlflow', 'prometheus_api_client') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
