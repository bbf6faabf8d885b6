"""FAISS index stage: pick an index for the item tower, build it, prove its recall, save it.

The two-tower model scores (user, item) by inner product of L2-normalised
embeddings, so every index here uses the inner-product metric (cosine on unit
vectors). Search returns *item ids* (not row numbers), so serving needs no side
table that could drift from the index.

The stage is a gate: ``build_and_check`` measures recall@k of the built index
against exact search over the same vectors and refuses to publish an index that
misses too many true neighbours (``IndexGateFailed``).

``faiss`` is imported inside functions only, so importing this module stays cheap
(Airflow parses DAG files often; this module must not drag a native library in).
The same holds for the modules it is built from:

* ``dayloop.index.spec``: ``IndexSpec`` and ``choose_index_spec`` (index kind by size);
* ``dayloop.index.build``: ``build_index`` and ``configure_faiss_threads``;
* ``dayloop.index.recall``: exact search, ``recall_against_exact``, probe queries and
  the search-breadth tuning;
* ``dayloop.index.storage``: ``save_index`` / ``load_index`` / ``index_fingerprint``;
* ``dayloop.index.vectors``: the input checks they share.

This module orchestrates them (``build_and_check``, ``IndexResult``) and re-exports
their public names, so ``from dayloop.index.faiss_index import ...`` keeps working.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dayloop.errors import IndexGateFailed
from dayloop.index.build import DEFAULT_FAISS_THREADS, THREADS_ENV, build_index, configure_faiss_threads
from dayloop.index.recall import (
    ExactNeighbours,
    default_queries,
    exact_search,
    recall_against_exact,
    tune_search_breadth,
)
from dayloop.index.spec import IndexKind, IndexSpec, choose_index_spec
from dayloop.index.storage import (
    INDEX_FILENAME,
    META_FILENAME,
    index_fingerprint,
    load_index,
    save_index,
    write_json_atomic,
)
from dayloop.index.vectors import check_ids, check_vectors
from serving.index_service.faiss_params import set_search_params

if TYPE_CHECKING:  # pragma: no cover - typing only
    import faiss

__all__ = [
    "DEFAULT_FAISS_THREADS",
    "INDEX_FILENAME",
    "META_FILENAME",
    "THREADS_ENV",
    "ExactNeighbours",
    "IndexKind",
    "IndexResult",
    "IndexSpec",
    "build_and_check",
    "build_index",
    "choose_index_spec",
    "configure_faiss_threads",
    "default_queries",
    "exact_search",
    "index_fingerprint",
    "load_index",
    "recall_against_exact",
    "save_index",
    # From serving.index_service.faiss_params (shared with the index service);
    # benchmarks/bench_faiss.py reaches it through this module.
    "set_search_params",
]


@dataclass(frozen=True)
class IndexResult:
    """What the index stage published (also written as index_meta.json)."""

    path: Path
    spec: IndexSpec
    recall: float
    build_seconds: float
    n_items: int
    dim: int
    fingerprint: str
    k: int = 100
    n_queries: int = 0
    query_source: str = "perturbed_items"
    recall_floor: float = 0.95
    meta_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings, spec flattened to a dict)."""
        return {
            "path": str(self.path),
            "meta_path": str(self.meta_path) if self.meta_path is not None else None,
            "spec": self.spec.to_dict(),
            "recall": self.recall,
            "recall_floor": self.recall_floor,
            "k": self.k,
            "n_queries": self.n_queries,
            "query_source": self.query_source,
            "build_seconds": self.build_seconds,
            "n_items": self.n_items,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            **self.extra,
        }


def build_and_check(
    item_embeddings: np.ndarray,
    item_ids: np.ndarray,
    out_dir: Path,
    recall_floor: float = 0.95,
    k: int = 100,
    n_queries: int = 1000,
    query_vectors: np.ndarray | None = None,
    spec: IndexSpec | None = None,
    seed: int = 0,
    *,
    exact_threshold: int = 50_000,
    approximate: Literal["ivf", "hnsw"] = "ivf",
    threads: int | None = None,
    meta_extra: dict[str, Any] | None = None,
) -> IndexResult:
    """Build the item index, gate it on recall@k vs exact search, save index.faiss + index_meta.json.

    With ``spec=None`` the spec comes from ``choose_index_spec`` (``exact_threshold``,
    ``approximate``) and its search
    breadth (IVF nprobe / HNSW efSearch) is raised until the floor is met; a given
    ``spec`` is used as is. ``query_vectors`` (real user embeddings) are preferred
    over the default perturbed-item probes. ``k`` is capped at the catalogue size.
    Raises ``IndexGateFailed`` when recall < ``recall_floor``; nothing is written then.
    ``meta_extra`` adds keys to ``index_meta.json`` (e.g. the seen-items file beside the index).
    """
    out_dir = Path(out_dir)
    x = check_vectors("item_embeddings", item_embeddings)
    ids = check_ids(item_ids, x.shape[0])
    n, dim = x.shape
    _check_gate_settings(recall_floor, k)
    k_eff = min(k, n)
    q, query_source = _probe_queries(x, query_vectors, n_queries, seed)
    tune = spec is None
    if spec is None:
        spec = choose_index_spec(n, dim, exact_threshold, k=k_eff, approximate=approximate)

    used_threads = configure_faiss_threads(threads)
    index, build_seconds = _timed_build(x, ids, spec, seed)
    spec, recall = _measure_recall(index, spec, x, ids, q, k_eff, recall_floor, tune=tune)
    if recall < recall_floor:
        raise _gate_failure(spec, recall, recall_floor, k_eff, n_queries=int(q.shape[0]),
                            query_source=query_source, n_items=n)

    return _publish(
        index,
        out_dir,
        spec=spec,
        recall=recall,
        build_seconds=build_seconds,
        n_items=n,
        dim=dim,
        k=k_eff,
        n_queries=int(q.shape[0]),
        query_source=query_source,
        recall_floor=recall_floor,
        extra={**(meta_extra or {}), "seed": seed, "faiss_threads": used_threads},
    )


def _check_gate_settings(recall_floor: float, k: int) -> None:
    if not 0.0 <= recall_floor <= 1.0:
        raise ValueError(f"recall_floor must be in [0, 1], got {recall_floor}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _probe_queries(
    x: np.ndarray, query_vectors: np.ndarray | None, n_queries: int, seed: int
) -> tuple[np.ndarray, str]:
    """The queries the gate measures recall on, and where they came from."""
    if query_vectors is not None:
        return check_vectors("query_vectors", query_vectors, dim=x.shape[1]), "provided"
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    return default_queries(x, n_queries, seed=seed), "perturbed_items"


def _timed_build(x: np.ndarray, ids: np.ndarray, spec: IndexSpec, seed: int) -> tuple[faiss.Index, float]:
    # Looks ``build_index`` up in this module, so a test can replace it here.
    start = time.perf_counter()
    index = build_index(x, ids, spec, seed=seed)
    return index, time.perf_counter() - start


def _measure_recall(
    index: faiss.Index,
    spec: IndexSpec,
    x: np.ndarray,
    ids: np.ndarray,
    q: np.ndarray,
    k: int,
    floor: float,
    *,
    tune: bool,
) -> tuple[IndexSpec, float]:
    """Recall@k against exact search; with ``tune``, after widening the search to meet ``floor``."""
    truth = exact_search(x, ids, q, k)
    if tune:
        return tune_search_breadth(index, spec, x, ids, q, k, truth, floor)
    return spec, recall_against_exact(index, x, ids, q, k, ground_truth=truth)


def _gate_failure(
    spec: IndexSpec, recall: float, floor: float, k: int, *, n_queries: int, query_source: str, n_items: int
) -> IndexGateFailed:
    detail = ""
    if spec.kind == "ivf":
        detail = f" (ivf nlist={spec.nlist}, nprobe={spec.nprobe})"
    elif spec.kind == "hnsw":
        detail = f" (hnsw M={spec.hnsw_m}, efSearch={spec.ef_search})"
    return IndexGateFailed(
        [
            f"recall@{k} = {recall:.4f} is below the floor {floor:.4f} "
            f"on {n_queries} {query_source} queries over {n_items} items, {spec.kind} index{detail}"
        ]
    )


def _publish(index: faiss.Index, out_dir: Path, *, extra: dict[str, Any], **fields: Any) -> IndexResult:
    """Save index.faiss, then index_meta.json describing it; ``fields`` go to ``IndexResult``."""
    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = save_index(index, out_dir / INDEX_FILENAME)
    result = IndexResult(
        path=index_path,
        fingerprint=index_fingerprint(index_path),
        meta_path=out_dir / META_FILENAME,
        extra={**extra, "faiss_version": faiss.__version__},
        **fields,
    )
    # The meta file goes last: it names the index's fingerprint, so a reader that
    # finds a meta file can trust the index beside it is the one it describes.
    write_json_atomic(result.as_dict(), out_dir / META_FILENAME)
    return result
