"""The recall check: exact search, recall@k of an index against it, probe queries,
and tuning the search breadth (IVF nprobe / HNSW efSearch) until recall meets a floor.

``faiss`` is imported inside functions only (see ``faiss_index``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from dayloop.index.spec import IndexSpec
from dayloop.index.vectors import check_ids, check_vectors
from serving.index_service.faiss_params import set_search_params

if TYPE_CHECKING:  # pragma: no cover - typing only
    import faiss

# Auto-tuning never probes more than this share of the IVF lists: beyond it the
# index scans a large part of the catalogue and is no longer worth its
# approximation, so failing the gate is the honest answer.
_MAX_NPROBE_FRACTION = 0.25
# HNSW search breadth ceiling for auto-tuning (cost grows ~linearly with it).
_MAX_EF_SEARCH = 4096
# Relative noise added to item embeddings to make default probe queries: enough
# to move a query off its own item, small enough to stay in the item's region.
_DEFAULT_QUERY_NOISE = 0.3


@dataclass(frozen=True)
class ExactNeighbours:
    """Ground truth for a query set: top-k ids and scores from brute-force search."""

    ids: np.ndarray  # [n_queries, k] int64
    scores: np.ndarray  # [n_queries, k] float32, descending
    k: int


def exact_search(embeddings: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> ExactNeighbours:
    """Exact top-k by inner product of ``queries`` over ``embeddings`` (returns item ids)."""
    import faiss

    x = check_vectors("embeddings", embeddings)
    ids = check_ids(ids, x.shape[0])
    q = check_vectors("queries", queries, dim=x.shape[1])
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of items ({x.shape[0]}), got {k}")
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    scores, rows = flat.search(q, k)
    return ExactNeighbours(ids=ids[rows], scores=scores, k=k)


def recall_against_exact(
    index: faiss.Index,
    embeddings: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    ground_truth: ExactNeighbours | None = None,
) -> float:
    """Mean recall@k of ``index`` against exact search over the same vectors and ids.

    A returned id counts as a hit when its exact score reaches the k-th exact score
    (within float tolerance), so equally-scored items at the cut-off are not misses.
    Pass ``ground_truth`` (from ``exact_search``) to avoid recomputing it.
    """
    x = check_vectors("embeddings", embeddings)
    ids = check_ids(ids, x.shape[0])
    q = check_vectors("queries", queries, dim=x.shape[1])
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of items ({x.shape[0]}), got {k}")
    if index.d != x.shape[1]:
        raise ValueError(f"index dimension {index.d} != embeddings dimension {x.shape[1]}")
    if ground_truth is None:
        ground_truth = exact_search(x, ids, q, k)
    elif ground_truth.k != k or ground_truth.ids.shape[0] != q.shape[0]:
        raise ValueError(
            f"ground_truth is for k={ground_truth.k}, {ground_truth.ids.shape[0]} queries; "
            f"asked for k={k}, {q.shape[0]} queries"
        )

    _, found = index.search(q, k)

    # Map returned ids back to rows to rescore them exactly; an id that is not in
    # the catalogue (or -1 padding) can never be a hit.
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, found), len(sorted_ids) - 1)
    known = sorted_ids[pos] == found
    rows = order[pos]
    true_scores = np.empty(found.shape, dtype=np.float32)
    for lo in range(0, q.shape[0], 1024):  # bounded memory: block x k x dim floats
        hi = lo + 1024
        true_scores[lo:hi] = np.einsum("qd,qkd->qk", q[lo:hi], x[rows[lo:hi]])

    kth = ground_truth.scores[:, k - 1 : k]
    # Tolerance scales with the score magnitude: float32 dot products of unit
    # vectors computed by different kernels (BLAS vs FAISS's SIMD) differ by ~1e-7.
    tol = 2e-6 * np.maximum(1.0, np.abs(kth))
    hit = known & (true_scores >= kth - tol)
    # Count each id once in case a broken index repeats a result.
    marked = np.sort(np.where(hit, found, -1), axis=1)
    first = np.ones_like(marked, dtype=bool)
    first[:, 1:] = marked[:, 1:] != marked[:, :-1]
    hits = ((marked >= 0) & first).sum(axis=1)
    return float(np.mean(np.minimum(hits, k) / k))


def default_queries(embeddings: np.ndarray, n_queries: int, seed: int = 0) -> np.ndarray:
    """Probe queries: a seeded sample of item rows plus Gaussian noise, renormalised."""
    x = check_vectors("embeddings", embeddings)
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    rng = np.random.default_rng(seed)
    n, dim = x.shape
    rows = rng.choice(n, size=n_queries, replace=n_queries > n)
    base = x[rows].astype(np.float64)
    norms = np.linalg.norm(base, axis=1, keepdims=True)
    # Noise is relative to each row's length so un-normalised inputs behave the same.
    noise = rng.standard_normal(base.shape) * (_DEFAULT_QUERY_NOISE / math.sqrt(dim)) * np.maximum(norms, 1e-12)
    q = base + noise
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q.astype(np.float32)


# Setting IVF nprobe / HNSW efSearch (``set_search_params``, used by the tuning below) is
# shared with the index service: serving.index_service.faiss_params.


def tune_search_breadth(
    index: faiss.Index,
    spec: IndexSpec,
    x: np.ndarray,
    ids: np.ndarray,
    q: np.ndarray,
    k: int,
    truth: ExactNeighbours,
    floor: float,
) -> tuple[IndexSpec, float]:
    """Double nprobe / efSearch until recall reaches ``floor`` or the ceiling is hit."""
    recall = recall_against_exact(index, x, ids, q, k, ground_truth=truth)
    if spec.kind == "ivf":
        ceiling = max(spec.nprobe, math.ceil(spec.nlist * _MAX_NPROBE_FRACTION))
        while recall < floor and spec.nprobe < ceiling:
            spec = replace(spec, nprobe=min(ceiling, spec.nprobe * 2))
            set_search_params(index, nprobe=spec.nprobe)
            recall = recall_against_exact(index, x, ids, q, k, ground_truth=truth)
    elif spec.kind == "hnsw":
        ceiling = max(spec.ef_search, _MAX_EF_SEARCH)
        while recall < floor and spec.ef_search < ceiling:
            spec = replace(spec, ef_search=min(ceiling, spec.ef_search * 2))
            set_search_params(index, ef_search=spec.ef_search)
            recall = recall_against_exact(index, x, ids, q, k, ground_truth=truth)
    return spec, recall
