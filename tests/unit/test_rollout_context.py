"""The rollout context: typed between tasks, a flat JSON object only at the XCom and trigger
edges, and the one test of whether the route table is still the rollout's."""

from __future__ import annotations

import json

import pytest

from dayloop.rollout.context import Endpoints, InvalidContext, RolloutContext, RolloutMode, context_or_none
from dayloop.rollout.plan import plan_from_params
from serving.route_store import Revision


def _revision(table: dict | None) -> Revision | None:
    if table is None:
        return None
    return Revision.from_dict({"revision": 3, "table": table, "actor": "t", "reason": "r", "created_at": "now"})


def test_route_ownership_needs_our_salt_and_our_canary():
    ctx = RolloutContext(RolloutMode.CANARY, 5, champion=4, salt="v5-ab")
    ours = {"table": {"salt": "v5-ab", "stable": 4, "routes": [{"start": 0, "end": 1000, "version": 5},
                                                                {"start": 1000, "end": 10000, "version": 4}]}}
    assert ctx.owns(_revision(ours["table"]))
    taken = {"table": {"salt": "v3-manual-1", "stable": 3, "routes": [{"start": 0, "end": 10000, "version": 3}]}}
    assert not ctx.owns(_revision(taken["table"]))
    same_salt_no_canary = {"table": {"salt": "v5-ab", "stable": 4, "routes": [{"start": 0, "end": 10000, "version": 4}]}}
    assert not ctx.owns(_revision(same_salt_no_canary["table"]))
    assert not ctx.owns(_revision({"table": None}["table"]))


def test_a_canary_context_round_trips_through_json_with_int_versions():
    plan = plan_from_params("demo", {"bake_seconds": 7})
    ctx = RolloutContext(RolloutMode.CANARY, 12, champion=11, salt="v12-00ff", plan=plan,
                         endpoints=Endpoints("/x/plane.json", "http://127.0.0.1:9090", 0.5),
                         started_at="2026-12-07T10:00:00+00:00", actor="daily_refresh/r1", revision=4,
                         live_check={"n": 64, "p99_ms": 3.2})
    wire = json.loads(json.dumps(ctx.to_dict()))
    # The XCom keeps its flat shape: what the DAG's templated fields and the e2e tests read.
    assert wire["version"] == 12 and wire["champion"] == 11 and wire["plane_file"] == "/x/plane.json"
    back = RolloutContext.from_dict(wire)
    assert back == ctx and back.plan == plan and back.endpoints.scrape_interval_s == 0.5
    assert isinstance(back.version, int) and back.mode is RolloutMode.CANARY and back.mode == "canary"


def test_skipped_and_champion_contexts_carry_only_what_they_have():
    skipped = RolloutContext(RolloutMode.SKIPPED, 3, reason="deploy off")
    assert skipped.to_dict() == {"mode": "skipped", "version": 3, "reason": "deploy off"}
    assert context_or_none(skipped.to_dict()) == skipped and context_or_none(None) is None
    with pytest.raises(InvalidContext, match="no plan"):
        skipped.require_plan()
    with pytest.raises(InvalidContext, match="names no data plane"):
        skipped.require_endpoints()


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "JSON object"),
    ({"mode": "sideways", "version": 1}, "unreadable"),
    ({"mode": "canary"}, "unreadable"),
    ({"mode": "canary", "version": "7"}, "must be an integer"),
    ({"mode": "canary", "version": 7, "champion": True}, "must be an integer"),
    ({"mode": "canary", "version": 7, "plan": {"steps": "all"}}, "unreadable"),
])
def test_a_corrupt_context_is_refused_with_a_reason(bad, match):
    with pytest.raises(InvalidContext, match=match):
        RolloutContext.from_dict(bad)
