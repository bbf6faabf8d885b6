"""Ranking metrics for retrieval evaluation (pure numpy, no model code).

Conventions used by every Dayloop evaluation:

* relevance is binary: an item is relevant iff it is in the user's ``targets``;
* ``seen`` items are removed from the ranking *before* the cut-off, so a model is never
  rewarded (or punished) for re-recommending what the user already touched, and targets
  that are also seen are dropped (they can never be retrieved);
* ``recall@k = |top_k ∩ targets| / |targets|`` (plain recall, not capped at k);
* ``ndcg@k = DCG@k / IDCG@k`` with gain 1 and discount ``1 / log2(rank + 1)`` (rank from 1),
  where IDCG puts ``min(|targets|, k)`` relevant items on top;
* a user with no targets has undefined metrics; callers drop such users (``nan`` here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

METRIC_NAMES = ("recall", "ndcg")


def metric_column(name: str, k: int) -> str:
    """Column name of a per-user metric, e.g. ``recall@10``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
    if int(k) <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return f"{name}@{int(k)}"


def parse_metric_column(column: str) -> tuple[str, int]:
    """Inverse of :func:`metric_column`: ``'ndcg@10' -> ('ndcg', 10)``."""
    name, sep, k = column.partition("@")
    if not sep or name not in METRIC_NAMES or not k.isdigit() or int(k) <= 0:
        raise ValueError(f"not a metric column (expected e.g. 'recall@10'): {column!r}")
    return name, int(k)


def mlflow_key(column: str) -> str:
    """MLflow-safe spelling of a metric column (MLflow keys may not contain '@')."""
    return column.replace("@", "_at_")


def _as_id_array(values: Iterable[int] | np.ndarray | None) -> np.ndarray:
    if values is None:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    return arr.astype(np.int64, copy=False).ravel()


def _validate_k(k: int) -> int:
    if int(k) <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return int(k)


def relevant_targets(
    targets: Iterable[int] | np.ndarray, seen: Iterable[int] | np.ndarray | None = None
) -> np.ndarray:
    """Distinct targets that are not in ``seen`` (sorted int64)."""
    tgt = np.unique(_as_id_array(targets))
    if seen is None:
        return tgt
    return np.setdiff1d(tgt, _as_id_array(seen), assume_unique=False)


def _hits(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Boolean hit vector of the first k ranked ids (duplicates in ``ranked`` count once)."""
    top = ranked[:k]
    # a ranking should not repeat items; if it does, only the first occurrence may score
    _, first = np.unique(top, return_index=True)
    mask = np.zeros(top.shape[0], dtype=bool)
    mask[first] = True
    return np.isin(top, targets) & mask


def _ranking_hits(
    ranked: Sequence[int] | np.ndarray,
    targets: Iterable[int] | np.ndarray,
    k: int,
    seen: Iterable[int] | np.ndarray | None,
) -> tuple[int, np.ndarray, np.ndarray | None]:
    """The common start of a one-ranking metric: ``(k, relevant targets, hit vector)``.

    ``k`` is validated; the relevant targets are the distinct targets not in ``seen``; the
    hit vector covers the first ``k`` ranked ids once ``seen`` ids are dropped from the
    ranking. It is None when no target is relevant (the metric is then NaN).
    """
    k = _validate_k(k)
    rel = relevant_targets(targets, seen)
    if rel.size == 0:
        return k, rel, None
    ranked_arr = _as_id_array(ranked)
    if seen is not None:
        ranked_arr = ranked_arr[~np.isin(ranked_arr, _as_id_array(seen))]
    return k, rel, _hits(ranked_arr, rel, k)


def recall_at_k(
    ranked: Sequence[int] | np.ndarray,
    targets: Iterable[int] | np.ndarray,
    k: int,
    seen: Iterable[int] | np.ndarray | None = None,
) -> float:
    """Recall@k of one ranking; ``seen`` ids are skipped in the ranking and the targets."""
    k, rel, hits = _ranking_hits(ranked, targets, k, seen)
    if hits is None:
        return float("nan")
    return float(hits.sum() / rel.size)


def ndcg_at_k(
    ranked: Sequence[int] | np.ndarray,
    targets: Iterable[int] | np.ndarray,
    k: int,
    seen: Iterable[int] | np.ndarray | None = None,
) -> float:
    """NDCG@k (binary gains) of one ranking; ``seen`` ids are skipped as in recall."""
    k, rel, hits = _ranking_hits(ranked, targets, k, seen)
    if hits is None:
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = float((hits * discounts[: hits.size]).sum())
    idcg = float(discounts[: min(rel.size, k)].sum())
    return dcg / idcg


def metrics_from_topk(
    topk: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-user recall@k / ndcg@k for already-filtered top lists.

    ``topk`` is an int64 array [U, K] of item ids, best first, with seen items already
    removed (pad with -1 when fewer than K candidates exist); ``targets[u]`` holds the
    relevant ids of user u (already without seen items). Returns column -> float64[U].
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D [users, K], got shape {topk.shape}")
    if len(targets) != topk.shape[0]:
        raise ValueError(f"{topk.shape[0]} rankings but {len(targets)} target lists")
    ks = sorted({_validate_k(k) for k in ks})
    if not ks:
        raise ValueError("ks must not be empty")
    max_k = ks[-1]
    if topk.shape[1] < max_k:
        pad = np.full((topk.shape[0], max_k - topk.shape[1]), -1, dtype=np.int64)
        topk = np.concatenate([topk.astype(np.int64, copy=False), pad], axis=1)
    n_users = topk.shape[0]
    hits = np.zeros((n_users, max_k), dtype=bool)
    n_rel = np.zeros(n_users, dtype=np.int64)
    for u, tgt in enumerate(targets):
        tgt = np.asarray(tgt, dtype=np.int64)
        n_rel[u] = np.unique(tgt).size
        if n_rel[u]:
            hits[u] = _hits(topk[u, :max_k], tgt, max_k)
    discounts = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))
    cum_hits = np.cumsum(hits, axis=1)
    cum_dcg = np.cumsum(hits * discounts, axis=1)
    cum_ideal = np.cumsum(discounts)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            recall = cum_hits[:, k - 1] / n_rel
            ideal = np.where(n_rel > 0, cum_ideal[np.minimum(n_rel, k) - 1], np.nan)
            ndcg = cum_dcg[:, k - 1] / ideal
            recall[n_rel == 0] = np.nan
            ndcg[n_rel == 0] = np.nan
            out[metric_column("recall", k)] = recall.astype(np.float64)
            out[metric_column("ndcg", k)] = ndcg.astype(np.float64)
    return out


def aggregate(per_user: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, float]:
    """Mean of every metric column (``name@k``), ignoring users with undefined metrics."""
    out: dict[str, float] = {}
    for column in per_user.keys():
        try:
            parse_metric_column(str(column))
        except ValueError:
            continue
        values = np.asarray(per_user[column], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[str(column)] = float(values.mean()) if values.size else float("nan")
    return out
