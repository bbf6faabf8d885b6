"""The simulator's truth on a small synthetic panel and bundle-like arrays: the exact top-k
lists (with and without seen items), the expected clicks of the click model, the true ratio
and the sentence set beside each kind of rollout decision."""

from __future__ import annotations

import numpy as np
import pytest

from dayloop.config import load_settings
from dayloop.simulation.panel import make_panel
from dayloop.simulation.truth import (
    VersionTruth,
    expected_clicks_per_user,
    judge,
    judge_rollout,
    panel_path,
    top_k_lists,
    true_ratio,
    truth_from_arrays,
    truth_sentence,
)
from serving.index_service.seen import SeenItems, csr_from_pairs, encode_seen, parse_seen
from serving.simulator.core import DEFAULT_P_NOISE, DEFAULT_P_RELEVANT, position_bias

# Six items on the axes of a 6-d space; item id = 100 + axis. A user vector weighting the
# axes 6, 5, 4, ... ranks the items in that order.
ITEM_IDS = np.arange(100, 106, dtype=np.int64)
ITEMS = np.eye(6, dtype=np.float32)
USERS = np.array([1, 2], dtype=np.int64)
P_HIT = [DEFAULT_P_RELEVANT * float(position_bias(i)) for i in range(3)]


def _ranking(*order: int) -> np.ndarray:
    """A user vector ranking the item ids ``order`` first, in that order, the rest after."""
    v = np.zeros(6, dtype=np.float32)
    for rank, item in enumerate(order):
        v[item - 100] = 10.0 - rank
    return v


def _seen(by_user: dict[int, list[int]]) -> SeenItems:
    """A real seen-items table (the index service's own reader) from a dict."""
    users = [u for u, items in by_user.items() for _ in items]
    items = [i for its in by_user.values() for i in its]
    return parse_seen(encode_seen(*csr_from_pairs(users, items), last_day="2026-03-01"))


def _truth(version: int, mean: float, users=USERS, k: int = 3, excluded_seen: bool = True) -> VersionTruth:
    return VersionTruth(version=version, n_users=len(users), mean_expected_clicks=mean,
                        per_user=np.full(len(users), mean), excluded_seen=excluded_seen,
                        user_ids=np.asarray(users, dtype=np.int64), k=k)


def test_top_k_is_exact_inner_product_order():
    vectors = np.stack([_ranking(103, 101, 105), _ranking(100, 104, 102)])
    lists = top_k_lists(USERS, vectors, ITEMS, ITEM_IDS, k=3)
    assert [x.tolist() for x in lists] == [[103, 101, 105], [100, 104, 102]]
    # k beyond the catalogue: every item, still best first
    assert top_k_lists(USERS[:1], vectors[:1], ITEMS, ITEM_IDS, k=50)[0].tolist()[:3] == [103, 101, 105]


def test_seen_items_are_left_out_and_a_user_with_few_unseen_gets_a_shorter_list():
    vectors = np.stack([_ranking(103, 101, 105, 100), _ranking(100, 104, 102)])
    seen = _seen({1: [103], 2: [100, 101, 102, 103]})
    lists = top_k_lists(USERS, vectors, ITEMS, ITEM_IDS, k=3, seen=seen)
    assert lists[0].tolist() == [101, 105, 100]
    assert lists[1].tolist() == [104, 105]


def test_expected_clicks_follow_the_simulators_click_model():
    lists = [np.array([103, 101, 105]), np.array([100, 104, 102])]
    relevant = [np.array([101]), np.array([100, 102])]
    got = expected_clicks_per_user(lists, relevant)
    assert got[0] == pytest.approx(DEFAULT_P_NOISE + P_HIT[1] + DEFAULT_P_NOISE)
    assert got[1] == pytest.approx(P_HIT[0] + DEFAULT_P_NOISE + P_HIT[2])
    with pytest.raises(ValueError, match="2 lists for 1 users"):
        expected_clicks_per_user(lists, relevant[:1])


def test_truth_from_arrays_and_the_true_ratio_of_a_worse_version():
    panel = make_panel(USERS, [[101], [100, 102]])
    good = np.stack([_ranking(101, 103, 105), _ranking(100, 102, 104)])  # relevant on top
    worse = np.stack([_ranking(103, 105, 101), _ranking(104, 100, 102)])  # relevant lower down
    tg = truth_from_arrays(1, panel, good, ITEMS, ITEM_IDS, k=3)
    tw = truth_from_arrays(2, panel, worse, ITEMS, ITEM_IDS, k=3)
    want_good = np.array([P_HIT[0] + 2 * DEFAULT_P_NOISE, P_HIT[0] + P_HIT[1] + DEFAULT_P_NOISE])
    want_worse = np.array([P_HIT[2] + 2 * DEFAULT_P_NOISE, DEFAULT_P_NOISE + P_HIT[1] + P_HIT[2]])
    assert tg.per_user == pytest.approx(want_good) and tw.per_user == pytest.approx(want_worse)
    assert tg.mean_expected_clicks == pytest.approx(want_good.mean())
    assert (tg.n_users, tg.k, tg.excluded_seen, tg.version) == (2, 3, False, 1)
    assert true_ratio(tw, tg) == pytest.approx(want_worse.mean() / want_good.mean())
    assert true_ratio(tw, tg) < 0.75  # the worse version is clearly worse: the test can fail
    seen = truth_from_arrays(1, panel, good, ITEMS, ITEM_IDS, k=3, seen=_seen({}))
    assert seen.excluded_seen is True and seen.per_user == pytest.approx(want_good)


def test_bad_arrays_are_refused_with_what_is_wrong():
    vectors = np.stack([_ranking(101), _ranking(100)])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_k_lists(USERS, vectors, ITEMS, ITEM_IDS, k=0)
    with pytest.raises(ValueError, match="expected \\[3, D\\]"):
        top_k_lists(np.array([1, 2, 3]), vectors, ITEMS, ITEM_IDS)
    with pytest.raises(ValueError, match="width 6, item embeddings 4"):
        top_k_lists(USERS, vectors, ITEMS[:, :4], ITEM_IDS)
    with pytest.raises(ValueError, match="5 item ids for 6"):
        top_k_lists(USERS, vectors, ITEMS, ITEM_IDS[:5])
    vectors[1, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 2 panel users get a non-finite vector"):
        top_k_lists(USERS, vectors, ITEMS, ITEM_IDS)


def test_true_ratio_refuses_mismatched_truths():
    with pytest.raises(ValueError, match="different panels"):
        true_ratio(_truth(2, 0.2), _truth(1, 0.2, users=[1, 3]))
    with pytest.raises(ValueError, match="different k"):
        true_ratio(_truth(2, 0.2), _truth(1, 0.2, k=10))
    with pytest.raises(ValueError, match="no expected click"):
        true_ratio(_truth(2, 0.2), _truth(1, 0.0))


def test_a_ctr_rollback_of_a_version_inside_the_margin_disagrees():
    canary, control = _truth(2, 0.197), _truth(1, 0.2)  # ratio 0.985
    v = judge(canary, control, 0.02, "rolled_back", ["ctr"])
    assert v.ratio == pytest.approx(0.985) and v.floor == pytest.approx(0.98)
    assert (v.expected, v.ctr_decision, v.agrees) == ("promoted", True, False)
    assert v.sentence == ("true CTR ratio v2/v1 over all 2 panel users 0.985 (floor 0.98 = 1 - ctr_margin): "
                          "promotion expected; decision: rolled back by the CTR test — the decision DISAGREES "
                          "with the truth")
    assert truth_sentence(canary, control, 0.02, "rolled_back", ["ctr"]) == v.sentence


@pytest.mark.parametrize(("mean", "outcome", "checks", "agrees"), [
    (0.197, "promoted", [], True),                 # inside the margin, promoted
    (0.19, "promoted", [], False),                 # 0.95 < 0.98: a promotion the truth rejects
    (0.19, "rolled_back", ["ctr"], True),
    (0.19, "rolled_back", ["ctr", "latency_p99"], True),
    (0.196, "promoted", [], True),                 # exactly at the floor counts as not worse
])
def test_ctr_decisions_are_set_against_the_floor(mean, outcome, checks, agrees):
    v = judge(_truth(2, mean), _truth(1, 0.2), 0.02, outcome, checks)
    assert v.ctr_decision is True and v.agrees is agrees
    assert ("agrees with the truth" if agrees else "DISAGREES with the truth") in v.sentence


def test_a_ratio_just_under_the_floor_shows_enough_decimals():
    v = judge(_truth(2, 0.19599), _truth(1, 0.2), 0.02, "rolled_back", ["ctr"])
    assert "panel users 0.9799 (floor 0.98" in v.sentence  # 0.980 would read as at the floor
    assert v.expected == "rolled_back" and v.agrees is True


@pytest.mark.parametrize(("outcome", "checks", "said"), [
    ("rolled_back", ["error_ratio", "nonfinite"], "rolled back on error_ratio, nonfinite"),
    ("rolled_back", [], "rolled back without a failed check"),
    ("aborted", [], "aborted (a manual rollback took the route table)"),
    ("failed", [], "failed (the run failed before or during its rollout)"),
])
def test_operational_decisions_say_the_truth_concerns_ctr_only(outcome, checks, said):
    v = judge(_truth(2, 0.19), _truth(1, 0.2), 0.02, outcome, checks)
    assert v.agrees is None and v.ctr_decision is False
    assert said in v.sentence
    assert v.sentence.endswith("not a CTR decision: the truth concerns CTR only")
    assert "rollback expected" in v.sentence


def test_a_version_served_without_seen_exclusion_is_named():
    v = judge(_truth(2, 0.2), _truth(1, 0.2, excluded_seen=False), 0.02, "promoted")
    assert v.sentence.endswith("(v1 without seen-item exclusion: no seen-items file in the index artifact)")
    assert "seen-item" not in judge(_truth(2, 0.2), _truth(1, 0.2), 0.02, "promoted").sentence
    assert v.as_dict()["agrees"] is True and v.as_dict()["sentence"] == v.sentence


@pytest.mark.parametrize("margin", [-0.1, 1.0, float("nan"), True, "0.02", None])
def test_a_bad_margin_or_outcome_is_refused(margin):
    with pytest.raises(ValueError, match="ctr_margin"):
        judge(_truth(2, 0.2), _truth(1, 0.2), margin, "promoted")
    with pytest.raises(ValueError, match="ctr_margin"):
        judge_rollout(load_settings(), 2, 1, margin, "promoted")


def test_without_a_panel_file_there_is_no_truth(tmp_path):
    settings = load_settings()
    assert panel_path(settings) == settings.home / "serving" / "panel.npz"
    # Production: no panel, nothing computed, no registry touched.
    assert judge_rollout(settings, 2, 1, 0.02, "promoted") is None
    assert judge_rollout(settings, 2, 1, 0.02, "promoted", panel_file=tmp_path / "none.npz") is None
    with pytest.raises(ValueError, match="outcome"):
        judge_rollout(settings, 2, 1, 0.02, "")
