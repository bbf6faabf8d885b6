"""Ranking metrics and the evaluators on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dayloop.training.evaluate import (
    evaluate_bundle,
    evaluate_popularity,
    evaluate_scores,
    popularity_ranking,
    recent_popularity,
    top1_score_sample,
    window_histories,
)
from dayloop.training.holdout import (
    HoldoutSpec,
    held_out_rows,
    held_out_users,
    holdout_eval_frame,
    pooled_eval_frame,
)
from dayloop.training.metrics import (
    aggregate,
    metric_column,
    metrics_from_topk,
    mlflow_key,
    ndcg_at_k,
    parse_metric_column,
    recall_at_k,
)

D1, D2, D3 = 1.0, 1 / math.log2(3), 0.5  # discounts of ranks 1..3


def test_recall_and_ndcg_hand_computed() -> None:
    ranked = [5, 3, 9, 1, 7]
    targets = {3, 7, 8}
    assert recall_at_k(ranked, targets, 3) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, targets, 3) == pytest.approx(D2 / (D1 + D2 + D3))
    # at 5 both 3 (rank 2) and 7 (rank 5) are hits
    assert recall_at_k(ranked, targets, 5) == pytest.approx(2 / 3)
    dcg5 = D2 + 1 / math.log2(6)
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(dcg5 / (D1 + D2 + D3))


def test_seen_items_are_removed_before_the_cutoff() -> None:
    ranked = [5, 3, 9, 1, 7]
    # without 5 the ranking is [3, 9, 1, 7]: the hit moves to rank 1
    assert recall_at_k(ranked, {3, 7, 8}, 3, seen={5}) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, {3, 7, 8}, 3, seen={5}) == pytest.approx(1 / (D1 + D2 + D3))
    # a seen target cannot be retrieved and leaves the denominator
    assert recall_at_k([3, 9], {3, 5}, 1, seen={5}) == 1.0
    assert ndcg_at_k([3, 9], {3, 5}, 1, seen={5}) == 1.0


def test_perfect_and_empty_cases() -> None:
    assert ndcg_at_k([1, 2, 3], {1, 2}, 10) == pytest.approx(1.0)
    assert recall_at_k([1, 2, 3], {1, 2}, 10) == 1.0
    assert recall_at_k([4, 5], {1}, 2) == 0.0 and ndcg_at_k([4, 5], {1}, 2) == 0.0
    assert math.isnan(recall_at_k([1], [], 1)) and math.isnan(ndcg_at_k([1], {2}, 1, seen={2}))
    # duplicates in a ranking score once
    assert recall_at_k([1, 1, 2], {1, 2}, 2) == 0.5
    with pytest.raises(ValueError, match="k must be positive"):
        recall_at_k([1], {1}, 0)


def test_vectorised_metrics_match_scalar_ones() -> None:
    rng = np.random.default_rng(3)
    topk = np.stack([rng.permutation(40)[:12] for _ in range(30)])
    topk[0, 8:] = -1  # short list padded with -1
    targets = [rng.choice(40, size=rng.integers(1, 15), replace=False) for _ in range(30)]
    cols = metrics_from_topk(topk, targets, ks=(5, 12))
    for u in range(30):
        ranked = topk[u][topk[u] >= 0]
        for k in (5, 12):
            assert cols[f"recall@{k}"][u] == pytest.approx(recall_at_k(ranked, targets[u], k))
            assert cols[f"ndcg@{k}"][u] == pytest.approx(ndcg_at_k(ranked, targets[u], k))


def test_vectorised_metrics_hand_case_and_empty_targets() -> None:
    cols = metrics_from_topk(np.array([[5, 3, 9], [1, 2, 3]]), [np.array([3, 7]), np.array([], int)], ks=(2,))
    assert cols["recall@2"][0] == 0.5
    assert cols["ndcg@2"][0] == pytest.approx(D2 / (D1 + D2))
    assert math.isnan(cols["recall@2"][1]) and math.isnan(cols["ndcg@2"][1])
    with pytest.raises(ValueError, match="target lists"):
        metrics_from_topk(np.zeros((2, 3), int), [np.array([1])], ks=(1,))


def test_aggregate_and_column_names() -> None:
    df = pd.DataFrame({"user_id": [1, 2, 3], "recall@10": [0.5, np.nan, 1.0], "n_targets": [1, 2, 3]})
    assert aggregate(df) == {"recall@10": 0.75}
    assert metric_column("ndcg", 50) == "ndcg@50"
    assert parse_metric_column("recall@100") == ("recall", 100)
    assert mlflow_key("recall@10") == "recall_at_10"
    for bad in ("recall", "map@10", "recall@0", "recall@x"):
        with pytest.raises(ValueError):
            parse_metric_column(bad)


def _eval_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [7, 3, 9],
            "hist": [[10], [20, 10], []],
            "seen": [[10], [20, 10], [30]],
            "targets": [[30, 40], [40], [30]],  # user 9's only target is seen: not evaluable
        }
    )


def test_popularity_baseline_hand_computed() -> None:
    pop = pd.DataFrame({"item_id": [40, 10, 30, 20, 50], "count": [2, 5, 3, 4, 0]})
    assert popularity_ranking(pop).tolist() == [10, 20, 30, 40]  # count 0 is not ranked
    out = evaluate_popularity(pop, _eval_df(), ks=(1, 2))
    assert out["user_id"].tolist() == [3, 7]
    assert out["n_targets"].tolist() == [1, 2]
    # user 3 (seen 10, 20): ranking [30, 40] -> 40 at rank 2
    u3 = out.iloc[0]
    assert u3["recall@1"] == 0.0 and u3["recall@2"] == 1.0
    assert u3["ndcg@2"] == pytest.approx(D2)
    # user 7 (seen 10): ranking [20, 30, 40] -> 30 at rank 2 of targets {30, 40}
    u7 = out.iloc[1]
    assert u7["recall@2"] == 0.5 and u7["ndcg@2"] == pytest.approx(D2 / (D1 + D2))


def _train_df() -> pd.DataFrame:
    """Window [Nov 1, Nov 11): item 10 popular long ago, 40 and 30 in the last days."""
    day = lambda d, h=12: pd.Timestamp(2026, 11, d, h, tz="UTC")  # noqa: E731
    rows = [(1, 10, day(1)), (2, 10, day(1)), (3, 10, day(2)), (4, 10, day(2)),
            (1, 40, day(9)), (2, 40, day(10)), (5, 40, day(10)), (3, 30, day(10)), (4, 20, day(3))]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    df["hist"] = [[] for _ in range(len(df))]
    return df


def test_recent_popularity_counts_the_last_days_and_breaks_ties_by_the_window() -> None:
    end = pd.Timestamp(2026, 11, 11, tz="UTC")
    pop = recent_popularity(_train_df(), end, days=3)
    counts = dict(zip(pop["item_id"], pop["count"], strict=True))
    assert counts == {10: 0, 40: 3, 30: 1, 20: 0}
    # 40 and 30 lead; 10 (4 in the window) before 20 (1) although neither is recent
    assert popularity_ranking(pop).tolist() == [40, 30, 10, 20]
    # all-time ranking for comparison: 10 first
    assert popularity_ranking(recent_popularity(_train_df(), end, days=None)).tolist()[0] == 10
    dropped = recent_popularity(_train_df(), end, days=3, exclude=(_train_df()["item_id"] == 40).to_numpy())
    assert 40 not in dropped["item_id"].tolist()
    with pytest.raises(ValueError, match="days must be positive"):
        recent_popularity(_train_df(), end, days=0)
    with pytest.raises(ValueError, match="lacks column 'ts'"):
        recent_popularity(_train_df().drop(columns="ts"), end)


def test_evaluate_scores_matches_the_popularity_evaluator() -> None:
    pop = pd.DataFrame({"item_id": [40, 10, 30, 20], "count": [2, 5, 3, 4]})
    items = np.array([10, 20, 30, 40])
    scores = np.array([5.0, 4.0, 3.0, 2.0])
    out = evaluate_scores(items, lambda seen: np.tile(scores, (len(seen), 1)), _eval_df(), ks=(1, 2))
    pd.testing.assert_frame_equal(out, evaluate_popularity(pop, _eval_df(), ks=(1, 2)))
    with pytest.raises(ValueError, match="score_fn returned"):
        evaluate_scores(items, lambda seen: np.zeros((len(seen), 3)), _eval_df())


def test_holdout_users_are_a_fixed_share_and_their_recent_rows_are_held_out() -> None:
    ids = np.arange(1, 20_001)
    mask = held_out_users(ids, 0.25)
    assert 0.23 < mask.mean() < 0.27  # the hash spreads consecutive ids
    np.testing.assert_array_equal(mask, held_out_users(ids, 0.25))  # same users every call
    assert not held_out_users(ids, 0.0).any()
    train = _train_df()
    end = pd.Timestamp(2026, 11, 11, tz="UTC")
    spec = HoldoutSpec(days=3, share=0.999)  # every user: only the last 3 days' rows go
    held = held_out_rows(train, end, spec)
    assert held.tolist() == [False] * 4 + [True, True, True, True, False]
    assert not held_out_rows(train, end, HoldoutSpec(days=0, share=0.5)).any()
    with pytest.raises(ValueError, match="share"):
        HoldoutSpec(days=3, share=1.0)
    assert HoldoutSpec.from_meta({"gate_holdout": spec.as_dict()}) == spec
    assert HoldoutSpec.from_meta({}) is None


def test_holdout_eval_frame_uses_the_last_active_day_point_in_time() -> None:
    train = _train_df()
    train.loc[4, "hist"] = [10]  # user 1 on Nov 9: history before that day
    end = pd.Timestamp(2026, 11, 11, tz="UTC")
    frame = holdout_eval_frame(train, end, HoldoutSpec(days=3, share=0.999), history_length=5)
    assert frame["user_id"].tolist() == [1, 2, 3, 5]
    row = frame.set_index("user_id")
    assert row.loc[1, "targets"].tolist() == [40] and row.loc[1, "seen"].tolist() == [10]
    assert row.loc[1, "hist"].tolist() == [10]
    assert row.loc[3, "targets"].tolist() == [30] and row.loc[3, "seen"].tolist() == [10]
    assert row.loc[5, "seen"].tolist() == []  # a new user: nothing before the day
    # pooled with eval.parquet: its users keep their own row, the others are added
    eval_df = pd.DataFrame({"user_id": [2, 9], "hist": [[10], []], "seen": [[10], []], "targets": [[30], [10]]})
    pooled, added = pooled_eval_frame(eval_df, train, end, HoldoutSpec(days=3, share=0.999), 5)
    assert pooled["user_id"].tolist() == [1, 2, 3, 5, 9] and added == 3
    assert pooled.set_index("user_id").loc[2, "targets"] == [30]
    none, added = pooled_eval_frame(eval_df, train, end, HoldoutSpec(days=0, share=0.0), 5)
    assert none["user_id"].tolist() == [2, 9] and added == 0


class _FakeBundle:
    """Minimal stand-in for ModelBundle: fixed user vectors, 4 items in 2-D."""

    item_ids = np.array([10, 20, 30, 40], dtype=np.int64)
    item_embeddings = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    n_items = 4

    def encode_users(self, user_ids, hists):
        vecs = {3: [0.0, 1.0], 7: [1.0, 0.0]}
        return np.array([vecs[int(u)] for u in user_ids], dtype=np.float32)

    def item_index(self, ids):
        lookup = {int(v): i + 1 for i, v in enumerate(self.item_ids)}
        return np.array([lookup.get(int(i), 0) for i in np.asarray(ids).ravel()], dtype=np.int64)


def test_evaluate_bundle_exact_topk_with_seen_filter() -> None:
    res = evaluate_bundle(_FakeBundle(), _eval_df(), ks=(1, 2))
    df = res.per_user
    assert df["user_id"].tolist() == [3, 7]
    # user 3 = (0, 1): scores 10:0, 20:.6, 30:1, 40:0; seen {10, 20} -> ranking [30, 40]
    assert df.iloc[0]["recall@1"] == 0.0 and df.iloc[0]["recall@2"] == 1.0
    # user 7 = (1, 0): scores 10:1, 20:.8, 30:0, 40:-1; seen {10} -> ranking [20, 30, 40]
    assert df.iloc[1]["recall@2"] == 0.5
    np.testing.assert_allclose(res.top1_scores, [1.0, 0.8], atol=1e-6)
    # z-score of the best unseen item: user 3 scores over unseen items {30: 1, 40: 0}
    assert res.top1_zscores[0] == pytest.approx(1.0)
    assert res.top1_scores.shape == res.top1_zscores.shape


def test_evaluators_reject_malformed_eval_frames() -> None:
    pop = pd.DataFrame({"item_id": [1], "count": [1]})
    with pytest.raises(ValueError, match="lacks columns"):
        evaluate_popularity(pop, _eval_df().drop(columns="seen"))
    dup = pd.concat([_eval_df(), _eval_df().head(1)])
    with pytest.raises(ValueError, match="one row per user"):
        evaluate_popularity(pop, dup)


def test_window_histories_end_of_window() -> None:
    ts = pd.to_datetime(["2026-01-01 10:00", "2026-01-02 09:00", "2026-01-01 08:00", "2026-01-03 00:00"], utc=True)
    train = pd.DataFrame(
        {"user_id": [1, 1, 2, 1], "item_id": [11, 12, 21, 13], "ts": ts, "hist": [[5], [11, 5], [], [12, 11, 5]]}
    )
    users, hists = window_histories(train, history_length=3)
    assert users.tolist() == [1, 2]
    assert hists[0].tolist() == [13, 12, 11]  # last event first, then its own history
    assert hists[1].tolist() == [21]


def test_top1_score_sample_raw_and_z() -> None:
    raw, z = top1_score_sample(_FakeBundle(), np.array([3, 7]), [[], []])
    # user 3 = (0, 1): scores (0, .6, 1, 0), mean .4, population std sqrt(.18)
    assert raw[0] == pytest.approx(1.0)
    assert z[0] == pytest.approx(0.6 / math.sqrt(0.18), rel=1e-5)
    # sampling keeps at most max_users, deterministically
    r1, _ = top1_score_sample(_FakeBundle(), np.array([3, 7, 3, 7]), [[]] * 4, max_users=2, seed=1)
    r2, _ = top1_score_sample(_FakeBundle(), np.array([3, 7, 3, 7]), [[]] * 4, max_users=2, seed=1)
    assert r1.size == 2 and r1.tolist() == r2.tolist()
