"""Offline evaluation of a model bundle and of the popularity baseline on eval.parquet.

Both evaluators return the same per-user layout, one row per evaluable user, sorted by
user_id: ``user_id, n_targets, recall@k, ndcg@k`` for each k. A user is evaluable when
at least one of their targets is not in ``seen`` (see :mod:`dayloop.training.metrics`);
the rule depends on eval.parquet only, so per-user frames of different models on the
same day pair up row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from dayloop.training.metrics import metrics_from_topk, relevant_targets

if TYPE_CHECKING:  # pragma: no cover
    from dayloop.training.bundle import ModelBundle

DEFAULT_KS = (10, 50, 100)
EVAL_COLUMNS = ("user_id", "hist", "seen", "targets")
# cap on one score block (users x items float32) so evaluation memory stays bounded
MAX_SCORE_BLOCK_BYTES = 64 * 1024 * 1024


class EvalResult(NamedTuple):
    """Per-user metrics plus a sample of each evaluated user's top-1 score.

    ``top1_scores`` are raw cosines. ``top1_zscores`` standardise the top-1 score against
    the user's scores over all unseen items, ``(top1 - mean) / std``: in-batch softmax is
    invariant to shifting a user's scores, so raw cosine levels differ arbitrarily between
    two equally good models, whereas the z-score is comparable and is what PSI should use.
    Both arrays hold the same users in the same order.
    """

    per_user: pd.DataFrame
    top1_scores: np.ndarray
    top1_zscores: np.ndarray


class _EvalUsers(NamedTuple):
    user_ids: np.ndarray
    hists: list[np.ndarray]
    seen: list[np.ndarray]
    targets: list[np.ndarray]


def _as_ids(value: object) -> np.ndarray:
    if value is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(value, dtype=np.int64).ravel()


def _eval_users(eval_df: pd.DataFrame) -> _EvalUsers:
    missing = [c for c in EVAL_COLUMNS if c not in eval_df.columns]
    if missing:
        raise ValueError(f"eval frame lacks columns {missing} (has {list(eval_df.columns)})")
    if eval_df["user_id"].duplicated().any():
        dup = eval_df.loc[eval_df["user_id"].duplicated(), "user_id"].iloc[0]
        raise ValueError(f"eval frame must hold one row per user; user_id {dup} repeats")
    df = eval_df.sort_values("user_id", kind="stable")
    user_ids, hists, seen, targets = [], [], [], []
    for uid, hist, seen_ids, tgt in zip(
        df["user_id"].to_numpy(np.int64), df["hist"], df["seen"], df["targets"], strict=True
    ):
        seen_arr = _as_ids(seen_ids)
        rel = relevant_targets(_as_ids(tgt), seen_arr)
        if rel.size == 0:
            continue
        user_ids.append(uid)
        hists.append(_as_ids(hist))
        seen.append(seen_arr)
        targets.append(rel)
    return _EvalUsers(np.asarray(user_ids, dtype=np.int64), hists, seen, targets)


def _frame(users: _EvalUsers, topk: np.ndarray, ks: Sequence[int]) -> pd.DataFrame:
    cols = metrics_from_topk(topk, users.targets, ks)
    df = pd.DataFrame(
        {
            "user_id": users.user_ids,
            "n_targets": np.fromiter((t.size for t in users.targets), np.int64, len(users.targets)),
        }
    )
    for k in sorted({int(k) for k in ks}):
        df[f"recall@{k}"] = cols[f"recall@{k}"]
        df[f"ndcg@{k}"] = cols[f"ndcg@{k}"]
    return df


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be non-empty positive integers, got {ks}")
    return ks


def evaluate_bundle(
    bundle: ModelBundle,
    eval_df: pd.DataFrame,
    ks: Sequence[int] = DEFAULT_KS,
    max_score_samples: int = 20_000,
    seed: int = 0,
) -> EvalResult:
    """Exact dot-product top-K of every evaluable user, seen items excluded.

    Scores are computed in blocks of users bounded by MAX_SCORE_BLOCK_BYTES. The top-1
    scores (raw and standardised, see EvalResult) are returned for all users, or a
    seeded sample of ``max_score_samples``.
    """
    ks = _check_ks(ks)
    users = _eval_users(eval_df)
    n_users, n_items = users.user_ids.size, bundle.n_items
    max_k = ks[-1]
    topk = np.full((n_users, max_k), -1, dtype=np.int64)
    top1 = np.full(n_users, np.nan, dtype=np.float32)
    top1_z = np.full(n_users, np.nan, dtype=np.float32)
    if n_users and n_items:
        user_vec = bundle.encode_users(users.user_ids, users.hists)
        item_emb = bundle.item_embeddings
        kk = min(max_k, n_items)
        block = max(1, min(4096, MAX_SCORE_BLOCK_BYTES // (4 * n_items)))
        for start in range(0, n_users, block):
            stop = min(start + block, n_users)
            scores = user_vec[start:stop] @ item_emb.T
            seen_rows = [bundle.item_index(s) - 1 for s in users.seen[start:stop]]
            lens = np.fromiter((int((r >= 0).sum()) for r in seen_rows), np.int64, len(seen_rows))
            if lens.sum():
                cols = np.concatenate([r[r >= 0] for r in seen_rows])
                scores[np.repeat(np.arange(stop - start), lens), cols] = -np.inf
            finite = np.isfinite(scores)
            n_free = finite.sum(axis=1)
            masked = np.where(finite, scores, 0.0)
            mean = masked.sum(axis=1) / np.maximum(n_free, 1)
            std = np.sqrt(np.maximum((masked**2).sum(axis=1) / np.maximum(n_free, 1) - mean**2, 0.0))
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            part_scores = np.take_along_axis(scores, part, axis=1)
            # sort by score desc, ties by item row so the ranking is reproducible
            order = np.lexsort((part, -part_scores), axis=1)
            rows = np.take_along_axis(part, order, axis=1)
            ranked_scores = np.take_along_axis(part_scores, order, axis=1)
            ids = bundle.item_ids[rows]
            ids[~np.isfinite(ranked_scores)] = -1  # the user has seen nearly every item
            topk[start:stop, :kk] = ids
            best = np.where(np.isfinite(ranked_scores[:, 0]), ranked_scores[:, 0], np.nan)
            top1[start:stop] = best
            with np.errstate(invalid="ignore", divide="ignore"):
                top1_z[start:stop] = np.where((n_free > 1) & (std > 0), (best - mean) / std, np.nan)
    per_user = _frame(users, topk, ks)
    keep = np.isfinite(top1) & np.isfinite(top1_z)
    scores, zscores = top1[keep], top1_z[keep]
    if scores.size > max_score_samples:
        pick = np.sort(np.random.default_rng(seed).choice(scores.size, max_score_samples, replace=False))
        scores, zscores = scores[pick], zscores[pick]
    return EvalResult(
        per_user=per_user,
        top1_scores=scores.astype(np.float32),
        top1_zscores=zscores.astype(np.float32),
    )


def popularity_ranking(popularity_df: pd.DataFrame) -> np.ndarray:
    """Item ids by count descending, ties by ``window_count`` descending when the frame has
    it (see :func:`recent_popularity`), then by item id ascending (deterministic). Items
    with no count (and no window count) are not ranked."""
    for col in ("item_id", "count"):
        if col not in popularity_df.columns:
            raise ValueError(f"popularity frame lacks column {col!r}")
    counts = popularity_df["count"].to_numpy(np.int64)
    tie = popularity_df["window_count"].to_numpy(np.int64) if "window_count" in popularity_df else np.zeros_like(counts)
    keep = (counts > 0) | (tie > 0)
    ids = popularity_df["item_id"].to_numpy(np.int64)[keep]
    order = np.lexsort((ids, -tie[keep], -counts[keep]))
    return ids[order]


def recent_popularity(
    train_df: pd.DataFrame, window_end: pd.Timestamp, days: int | None = 7, exclude: np.ndarray | None = None
) -> pd.DataFrame:
    """Time-aware popularity: ``item_id, count, window_count`` from train.parquet rows.

    ``count`` counts the rows of the last ``days`` days before ``window_end`` (every row
    for ``days=None``), ``window_count`` every row (it orders items the last days did not touch);
    ``exclude`` is a boolean row mask of rows to leave out (the gate's held-out rows,
    which no model trained on either). Feed it to :func:`evaluate_popularity`.
    """
    for col in ("item_id", "ts"):
        if col not in train_df.columns:
            raise ValueError(f"train frame lacks column {col!r}")
    if days is not None and int(days) <= 0:
        raise ValueError(f"days must be positive, got {days}")
    rows = train_df if exclude is None else train_df[~np.asarray(exclude, dtype=bool)]
    window = rows["item_id"].value_counts()
    recent = window
    if days is not None:
        recent = rows.loc[rows["ts"] >= window_end - pd.Timedelta(days=int(days)), "item_id"].value_counts()
    items = window.index.to_numpy(np.int64)
    return pd.DataFrame(
        {
            "item_id": items,
            "count": recent.reindex(items, fill_value=0).to_numpy(np.int64),
            "window_count": window.to_numpy(np.int64),
        }
    )


def evaluate_popularity(
    popularity_df: pd.DataFrame, eval_df: pd.DataFrame, ks: Sequence[int] = DEFAULT_KS
) -> pd.DataFrame:
    """The most-popular baseline with the same per-user layout as evaluate_bundle."""
    ks = _check_ks(ks)
    users = _eval_users(eval_df)
    ranking = popularity_ranking(popularity_df)
    max_k = ks[-1]
    topk = np.full((users.user_ids.size, max_k), -1, dtype=np.int64)
    for u, seen in enumerate(users.seen):
        # the first max_k + |seen| popular items always contain max_k unseen ones
        head = ranking[: max_k + seen.size]
        head = head[~np.isin(head, seen)][:max_k]
        topk[u, : head.size] = head
    return _frame(users, topk, ks)


def evaluate_scores(
    item_ids: np.ndarray, score_fn: Callable[[list[np.ndarray]], np.ndarray], eval_df: pd.DataFrame,
    ks: Sequence[int] = DEFAULT_KS, block: int = 512,
) -> pd.DataFrame:
    """Per-user metrics (same layout as evaluate_bundle) of any scorer over ``item_ids``.

    ``score_fn(seen_lists)`` returns float scores [len(seen_lists), len(item_ids)] for a
    block of evaluable users given their seen items (e.g. EASE's closed-form item-item
    weights applied to the user's seen set); seen items are then excluded, ties broken by
    item order, exactly as for a bundle.
    """
    ks = _check_ks(ks)
    users = _eval_users(eval_df)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    max_k, n_items = ks[-1], item_ids.size
    topk = np.full((users.user_ids.size, max_k), -1, dtype=np.int64)
    order_ids = np.argsort(item_ids, kind="stable")
    for start in range(0, users.user_ids.size, block):
        seen = users.seen[start : start + block]
        scores = np.asarray(score_fn(seen), dtype=np.float64).copy()
        if scores.shape != (len(seen), n_items):
            raise ValueError(f"score_fn returned {scores.shape}, expected {(len(seen), n_items)}")
        for r, s in enumerate(seen):
            pos = np.searchsorted(item_ids[order_ids], s)
            pos = np.minimum(pos, n_items - 1)
            hit = item_ids[order_ids][pos] == s
            scores[r, order_ids[pos[hit]]] = -np.inf
        kk = min(max_k, n_items)
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        ids = item_ids[rows]
        ids[~np.isfinite(np.take_along_axis(scores, rows, axis=1))] = -1
        topk[start : start + len(seen), :kk] = ids
    return _frame(users, topk, ks)


def window_histories(train_df: pd.DataFrame, history_length: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every user active in train.parquet with their history as of the end of the window.

    The history is the user's last event followed by that event's own (point-in-time)
    history, most recent first, cut to ``history_length``. Sorted by user_id.
    """
    for col in ("user_id", "item_id", "ts", "hist"):
        if col not in train_df.columns:
            raise ValueError(f"train frame lacks column {col!r}")
    if history_length <= 0:
        raise ValueError(f"history_length must be positive, got {history_length}")
    if len(train_df) == 0:
        return np.empty(0, dtype=np.int64), []
    order = np.lexsort((train_df["ts"].astype("int64").to_numpy(), train_df["user_id"].to_numpy(np.int64)))
    df = train_df.iloc[order]
    users = df["user_id"].to_numpy(np.int64)
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
    items, hists = df["item_id"].to_numpy(np.int64), df["hist"].to_numpy()
    out = [np.r_[items[i], _as_ids(hists[i])][:history_length].astype(np.int64) for i in last]
    return users[last], out


def top1_score_sample(
    bundle: ModelBundle,
    user_ids: np.ndarray,
    hists: Sequence[Sequence[int] | np.ndarray],
    max_users: int = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(raw, z) top-1 scores over all items for a seeded sample of at most ``max_users``.

    Used for PSI on a population much larger than one day's eval users: with ~100 users
    PSI is dominated by sampling noise. No seen-filtering here (it is a drift signal, not
    a quality metric), so the top-1 may be an item the user already knows.
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    if len(hists) != user_ids.size:
        raise ValueError(f"{user_ids.size} user ids but {len(hists)} histories")
    pick = np.arange(user_ids.size)
    if user_ids.size > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(user_ids.size, max_users, replace=False))
    if pick.size == 0 or bundle.n_items == 0:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    user_vec = bundle.encode_users(user_ids[pick], [hists[i] for i in pick])
    n_items = bundle.n_items
    block = max(1, min(4096, MAX_SCORE_BLOCK_BYTES // (4 * n_items)))
    raw = np.empty(pick.size, np.float32)
    z = np.empty(pick.size, np.float32)
    for start in range(0, pick.size, block):
        scores = user_vec[start : start + block] @ bundle.item_embeddings.T
        best = scores.max(axis=1)
        std = scores.std(axis=1)
        raw[start : start + block] = best
        z[start : start + block] = np.where(std > 0, (best - scores.mean(axis=1)) / np.maximum(std, 1e-12), 0.0)
    return raw, z
