"""fetch_series against a real Prometheus scraping two real router-metric exporters
(serving.router.metrics.RouterMetrics in the serving venv) moved at known rates, then the
report rendered from what came back; and the report's truth computed from two really trained
bundles in a real MLflow registry, over a panel of the held-out day's users."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dayloop.config import load_settings
from dayloop.rollout.plan import PROFILES
from dayloop.rollout.report import fetch_series, render_report, write_and_log_report
from serving.simulator.core import expected_clicks
from serving_helpers import RouterPrometheus, make_index, post_event, prom_value, top_items

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONTROL, CANARY, IDLE = 1, 2, 3
SECONDS = 15
# What each of the two replicas gets every second: control clean, canary failing a quarter
# of its attempts, slower, clicked a little more. Per second across both replicas: control
# 20 requests, 4 clicks / 20 impressions; canary 8 requests, 2 errors, 2 clicks / 8 impressions.
EVERY_SECOND = [
    {"version": str(CONTROL), "requests": 10, "impressions": 10, "clicks": 2, "latency": [[0.004, 10]]},
    {"version": str(CANARY), "requests": 4, "errors": {"timeout": 1}, "impressions": 4, "clicks": 1,
     "latency": [[0.09, 4]]},
]
RATE = {CONTROL: 20.0, CANARY: 8.0}
CTR = {CONTROL: 0.2, CANARY: 0.25}
SHARE = {CONTROL: 0.8, CANARY: 0.2}


def _settled(points, since: float, until: float) -> list[float]:
    """Values whose whole rate window lies inside the traffic."""
    return [v for t, v in points if since <= t <= until]


@needs_prometheus
def test_fetch_series_reads_what_the_routers_did_and_the_report_plots_it(tmp_path):
    stack = RouterPrometheus(PROMETHEUS, tmp_path)
    ports, prom_port, prom_url, prom = stack.ports, stack.prom_port, stack.prom_url, stack.prom
    try:
        stack.wait_ready()
        for port in ports.values():
            for v, share in SHARE.items():
                post_event(port, {"version": str(v), "share": share})
        # Prometheus picks its targets up a few seconds after it is ready: wait until both
        # replicas are scraped, or the first seconds of traffic would predate every sample.
        deadline = time.monotonic() + 20
        while prom_value(prom_port, "count(dayloop_router_route_share)") != 2 * len(SHARE):
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.2)

        start = datetime.now(timezone.utc)
        t0 = time.monotonic()
        for i in range(SECONDS):
            time.sleep(max(0.0, t0 + i - time.monotonic()))
            for port in ports.values():
                for event in EVERY_SECOND:
                    post_event(port, event)
            if i == 5:
                # One NaN: it creates the canary's series at 1, which plain rate() never sees.
                post_event(ports["a"], {"version": str(CANARY), "nonfinite": 1})
        traffic_end = datetime.now(timezone.utc)
        time.sleep(3.0)  # the last bursts scraped
        end = datetime.now(timezone.utc)
        series = fetch_series(prom_url, [CONTROL, CANARY, IDLE], start - timedelta(seconds=5), end, step_s=1.0)
    finally:
        stack.stop()

    assert set(series) == {"request_rate", "error_ratio", "p99_latency_s", "nonfinite_rate", "ctr",
                           "route_share"}
    for key, per_version in series.items():
        assert IDLE not in per_version, key  # no traffic, no series: no entry
    # The rate window is max(4 x 1 s, 10 s): 10 s; from then on it lies inside the traffic.
    since, until = start.timestamp() + 11.0, traffic_end.timestamp()
    assert until - since >= 2.0
    for v in (CONTROL, CANARY):
        rates = _settled(series["request_rate"][v], since, until)
        assert rates, series["request_rate"][v]
        # A 10 s window holds 10 or 11 of the once-a-second bursts, and increase() extrapolates
        # to the window's edges: each point within 20%, the middle one within 10%.
        assert all(r == pytest.approx(RATE[v], rel=0.2) for r in rates), rates
        assert statistics.median(rates) == pytest.approx(RATE[v], rel=0.1), rates
        ctr = _settled(series["ctr"][v], since, until)
        assert statistics.median(ctr) == pytest.approx(CTR[v], abs=0.04), ctr
        shares = [s for _, s in series["route_share"][v]]
        assert shares and all(s == pytest.approx(SHARE[v]) for s in shares), shares  # averaged, not summed
    # The clean version has no errors series at all; it still reads 0, never missing.
    control_errors = [r for _, r in series["error_ratio"][CONTROL]]
    assert control_errors and all(r == 0.0 for r in control_errors)
    canary_errors = _settled(series["error_ratio"][CANARY], since, until)
    assert canary_errors and all(r > 0 for r in canary_errors)
    assert statistics.median(canary_errors) == pytest.approx(0.25, abs=0.05)
    # Latency buckets: control's 4 ms lands in (3 ms, 5 ms], canary's 90 ms in (75 ms, 100 ms].
    control_p99 = _settled(series["p99_latency_s"][CONTROL], since, until)
    canary_p99 = _settled(series["p99_latency_s"][CANARY], since, until)
    assert control_p99 and all(0.003 < p <= 0.005 for p in control_p99), control_p99
    assert canary_p99 and all(0.075 < p <= 0.1 for p in canary_p99), canary_p99
    assert max(v for _, v in series["nonfinite_rate"][CANARY]) > 0
    assert all(v == 0.0 for _, v in series["nonfinite_rate"][CONTROL])

    steps = [{"index": 0, "percent": 20.0, "started_at": start.isoformat(),
              "ended_at": traffic_end.isoformat(), "decision": "fail", "looks": [], "analysis": None}]
    rollout = {"version": CANARY, "champion": CONTROL, "salt": "v2-test", "plan": PROFILES["demo"].to_dict(),
               "outcome": "rolled_back", "reason": "error ratio"}
    html_path = render_report(tmp_path / "report", rollout, steps, series)
    text = html_path.read_text()
    assert "Rollout of v2 vs champion v1: ROLLED_BACK" in text and "data:image/png;base64," in text
    assert (tmp_path / "report" / "rollout_metrics.png").read_bytes().startswith(PNG_MAGIC)


def _register_with_index(reg, ds: str, bundle_dir, index_dir) -> int:
    """As the DAG leaves a version: registered bundle, index logged to its run, index tags."""
    from dayloop.registry import TAG_INDEX_PREFIX

    ref = reg.register_bundle(ds, bundle_dir, {"seed": 0}, {"final_loss": 1.0}, {})
    uri = reg.log_artifacts(ref.version, index_dir, "index")
    reg.set_tags(ref.version, {f"{TAG_INDEX_PREFIX}status": "ready", f"{TAG_INDEX_PREFIX}uri": uri})
    return int(ref.version)


def test_the_truth_of_real_trained_bundles_beside_the_rollout_decision(tmp_path):
    from test_training import FAST, write_latent_feature_dir

    from dayloop.registry import Registry
    from dayloop.simulation.panel import read_panel, write_panel
    from dayloop.simulation.truth import SIMULATOR_K, judge_rollout, panel_path, version_truth
    from dayloop.training.train import TrainParams, train_two_tower
    from serving.index_service.seen import csr_from_pairs, write_seen_file

    settings = load_settings()
    features = write_latent_feature_dir(tmp_path / "features")
    good = train_two_tower(features, tmp_path / "good", TrainParams(seed=1, **FAST)).bundle_dir
    # Item ids relabelled in training: a model that learned nothing about the items.
    bad = train_two_tower(features, tmp_path / "bad", TrainParams(seed=3, shuffle_item_ids=True, **FAST)).bundle_dir
    # The panel: the held-out day's users, relevant = the items they took that day.
    eval_df = pd.read_parquet(features / "eval.parquet")
    panel = read_panel(write_panel(panel_path(settings), eval_df["user_id"].to_numpy(), list(eval_df["targets"])))
    seen_of = dict(zip(eval_df["user_id"].tolist(), (np.asarray(s, dtype=np.int64) for s in eval_df["seen"]),
                       strict=True))
    # The good version's index artifact carries the seen items (as rebuild_index writes them),
    # the bad one's does not (an index from before seen-item exclusion).
    good_index = make_index(good, tmp_path / "index_good")
    pairs = [(u, i) for u, items in seen_of.items() for i in items.tolist()]
    write_seen_file(good_index, *csr_from_pairs(*zip(*pairs, strict=True)), last_day="2026-11-19")
    reg = Registry(settings)
    v_good = _register_with_index(reg, "2026-11-20", good, good_index)
    v_bad = _register_with_index(reg, "2026-11-21", bad, make_index(bad, tmp_path / "index_bad"))

    truth = version_truth(settings, v_good, panel, registry=reg)
    assert truth.excluded_seen is True and truth.n_users == panel.n_users == len(eval_df)
    # Cross-check: the bundle's serving tower + exact ranking, each user's seen items dropped,
    # the first k scored by the click model.
    ranked = top_items(good, panel.user_ids, 10_000)
    seen_sets = {u: set(items.tolist()) for u, items in seen_of.items()}
    lists = [[i for i in row.tolist() if i not in seen_sets[u]][:SIMULATOR_K]
             for u, row in zip(panel.user_ids.tolist(), ranked, strict=True)]
    want = [expected_clicks(items, frozenset(rel.tolist())) for items, rel in zip(lists, panel.relevant, strict=True)]
    assert truth.per_user == pytest.approx(np.array(want))
    # Seen items are never relevant here (each day's picks are unseen ones): leaving them out
    # can only move relevant items up, so no user earns less than from the unfiltered list.
    unfiltered = [expected_clicks(row.tolist(), frozenset(rel.tolist()))
                  for row, rel in zip(ranked[:, :SIMULATOR_K], panel.relevant, strict=True)]
    assert (truth.per_user >= np.array(unfiltered) - 1e-12).all()
    assert truth.mean_expected_clicks > np.mean(unfiltered)

    worse = judge_rollout(settings, v_bad, v_good, 0.02, "promoted")
    assert worse.ratio < 0.7, worse.sentence  # relabelled items: far fewer true clicks
    assert worse.expected == "rolled_back" and worse.agrees is False
    assert "DISAGREES" in worse.sentence and f"over all {panel.n_users} panel users" in worse.sentence
    assert "without seen-item exclusion" in worse.sentence  # both arms judged by the canary's seen set

    # The report of a CTR rollback of the bad canary: the truth agrees, logged beside the HTML.
    now = datetime.now(timezone.utc).isoformat()
    ctr_fail = {"name": "ctr", "phase": "fail", "message": "CTR ratio 0.6", "values": {}, "advisory": False}
    steps = [{"index": 0, "percent": 10.0, "started_at": now, "ended_at": now, "decision": "fail", "looks": [],
              "analysis": {"phase": "fail", "checks": [ctr_fail]}}]
    rollout = {"version": v_bad, "champion": v_good, "salt": "s", "plan": PROFILES["demo"].to_dict(),
               "outcome": "rolled_back", "reason": "ctr"}
    out = write_and_log_report(settings, None, rollout, steps, tmp_path / "report")
    assert out["truth"]["agrees"] is True and out["truth"]["ratio"] == pytest.approx(worse.ratio)
    assert "the decision agrees with the truth" in Path(out["html"]).read_text()
    logged = {Path(f.path).name for f in reg.client.list_artifacts(reg.get_version(v_bad).run_id, "rollout")}
    assert {"rollout_report.html", "truth.json"} <= logged
    assert json.loads((tmp_path / "report" / "truth.json").read_text())["sentence"] == out["truth"]["sentence"]
