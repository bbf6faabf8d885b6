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
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dayloop.errors import IndexGateFailed
from serving.fileio import atomic_write_text, file_sha256
from serving.index_service.faiss_params import set_search_params

if TYPE_CHECKING:  # pragma: no cover - typing only
    import faiss

IndexKind = Literal["flat", "ivf", "hnsw"]

INDEX_FILENAME = "index.faiss"
META_FILENAME = "index_meta.json"

#: Threads FAISS may use unless told otherwise. Two matches the workers the
#: deployment gives a task; more would fight Spark/torch tasks for the same cores.
DEFAULT_FAISS_THREADS = 2
THREADS_ENV = "DAYLOOP_FAISS_THREADS"

# Auto-tuning never probes more than this share of the IVF lists: beyond it the
# index scans a large part of the catalogue and is no longer worth its
# approximation, so failing the gate is the honest answer.
_MAX_NPROBE_FRACTION = 0.25
# HNSW search breadth ceiling for auto-tuning (cost grows ~linearly with it).
_MAX_EF_SEARCH = 4096
# Relative noise added to item embeddings to make default probe queries: enough
# to move a query off its own item, small enough to stay in the item's region.
_DEFAULT_QUERY_NOISE = 0.3


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class IndexSpec:
    """How to build and search one index. ``nlist``/``nprobe`` only matter for IVF,
    ``hnsw_m``/``ef_construction``/``ef_search`` only for HNSW."""

    kind: IndexKind
    metric: Literal["inner_product"] = "inner_product"
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    # k-means settings for IVF training; capped sample keeps training time bounded
    # (k-means cost is n_train * nlist * dim * iters).
    train_points_per_list: int = 64
    kmeans_iters: int = 15

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"IndexSpec.kind must be 'flat', 'ivf' or 'hnsw', got {self.kind!r}")
        if self.metric != "inner_product":
            raise ValueError(f"IndexSpec.metric must be 'inner_product', got {self.metric!r}")
        if self.kind == "ivf":
            if self.nlist < 1:
                raise ValueError(f"IVF needs nlist >= 1, got {self.nlist}")
            if not 1 <= self.nprobe <= self.nlist:
                raise ValueError(f"IVF needs 1 <= nprobe <= nlist ({self.nlist}), got {self.nprobe}")
            if self.train_points_per_list < 1 or self.kmeans_iters < 1:
                raise ValueError("IVF needs train_points_per_list >= 1 and kmeans_iters >= 1")
        if self.kind == "hnsw":
            if self.hnsw_m < 2:
                raise ValueError(f"HNSW needs hnsw_m >= 2, got {self.hnsw_m}")
            if self.ef_construction < 1 or self.ef_search < 1:
                raise ValueError(
                    f"HNSW needs ef_construction >= 1 and ef_search >= 1, "
                    f"got {self.ef_construction} and {self.ef_search}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for index_meta.json and MLflow params)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IndexSpec fields: {sorted(unknown)}")
        return cls(**data)


def choose_index_spec(
    n_items: int,
    dim: int,
    exact_threshold: int = 50_000,
    *,
    k: int = 100,
    approximate: Literal["ivf", "hnsw"] = "ivf",
) -> IndexSpec:
    """Pick an index for ``n_items`` vectors of ``dim`` floats (pure; no FAISS needed).

    * ``n_items < exact_threshold`` -> ``flat`` (IndexFlatIP). Brute force over 50k x 64
      floats is ~3 MFLOP per query, a few thousand queries per second batched on two
      cores, needs no training and is exact, so an approximation would only add risk.
    * above it, ``ivf`` by default. The catalogue is rebuilt daily and searched in
      batches; IVF trains in seconds-to-minutes, builds deterministically from a
      seed, costs no memory beyond the vectors, and its one knob (``nprobe``) is
      set at search time, so the gate can tune it without rebuilding.
      ``nlist ~ 4 * sqrt(n)`` balances the coarse-quantiser cost (nlist dot
      products) against list scanning (n / nlist * nprobe); it is clamped so every
      list gets at least 39 training points (below that k-means is unreliable) and
      to [16, 65536]. ``nprobe`` starts at nlist/64 + k/10 (at least 8; recall@k
      for large k needs neighbours from more lists); ``build_and_check`` doubles
      it while the measured recall is short, up to a quarter of the lists.
    * ``approximate='hnsw'`` picks HNSW instead: better latency for one-query-at-a-time
      serving, but ~2*M*4 extra bytes per item, a slower build, and a graph that is
      not bit-reproducible under multi-threaded insertion. ``M=32``,
      ``efConstruction=80``; ``efSearch`` starts at max(2k, 128).
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if exact_threshold < 0:
        raise ValueError(f"exact_threshold must be >= 0, got {exact_threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if approximate not in ("ivf", "hnsw"):
        raise ValueError(f"approximate must be 'ivf' or 'hnsw', got {approximate!r}")

    if n_items < exact_threshold:
        return IndexSpec(kind="flat")

    if approximate == "hnsw":
        return IndexSpec(kind="hnsw", hnsw_m=32, ef_construction=80, ef_search=max(2 * k, 128))

    nlist = min(max(16, int(round(4.0 * math.sqrt(n_items)))), 65_536)
    # The training-points rule wins over the lower bound; a tiny catalogue forced
    # past a near-zero threshold ends with one list, i.e. exact search.
    nlist = max(1, min(nlist, n_items // 39))
    # A base share of the lists plus one probe per 10 wanted results: a top-100
    # list spills over more clusters than a top-10 list.
    nprobe = max(8, math.ceil(nlist / 64) + math.ceil(k / 10))
    return IndexSpec(kind="ivf", nlist=nlist, nprobe=min(nprobe, nlist))


# ----------------------------------------------------------------------- threads


def configure_faiss_threads(threads: int | None = None) -> int:
    """Set FAISS's OpenMP thread count: ``threads``, else $DAYLOOP_FAISS_THREADS, else 2."""
    import faiss

    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if raw:
            try:
                threads = int(raw)
            except ValueError as exc:
                raise ValueError(f"{THREADS_ENV} must be an integer, got {raw!r}") from exc
        else:
            threads = DEFAULT_FAISS_THREADS
    if threads < 1:
        raise ValueError(f"FAISS threads must be >= 1, got {threads}")
    faiss.omp_set_num_threads(threads)
    return threads


# -------------------------------------------------------------------- validation


def _check_vectors(name: str, x: np.ndarray, dim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype} (cast with .astype(np.float32))")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, expected {dim}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values")
    # FAISS reads raw memory; a strided view would be silently misread.
    return np.ascontiguousarray(x)


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"ids must be a numpy array, got {type(ids).__name__}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if ids.dtype != np.int64:
        raise ValueError(f"ids must be int64, got {ids.dtype} (cast with .astype(np.int64))")
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but embeddings has {n} rows")
    if n and ids.min() < 0:
        # FAISS pads missing results with -1, so negative ids would be ambiguous.
        raise ValueError(f"ids must be >= 0 (FAISS uses -1 for 'no result'), min is {int(ids.min())}")
    uniq = np.unique(ids)
    if len(uniq) != n:
        raise ValueError(f"ids must be unique: {n - len(uniq)} duplicate(s)")
    return np.ascontiguousarray(ids)


# ------------------------------------------------------------------------- build

# Setting IVF nprobe / HNSW efSearch (``set_search_params``, used by the tuning below) is
# shared with the index service: serving.index_service.faiss_params.


def build_index(embeddings: np.ndarray, ids: np.ndarray, spec: IndexSpec, seed: int = 0) -> faiss.Index:
    """Build an inner-product index over ``embeddings`` whose search returns ``ids``."""
    import faiss

    x = _check_vectors("embeddings", embeddings)
    ids = _check_ids(ids, x.shape[0])
    n, dim = x.shape

    if spec.kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(x, ids)
        return index

    if spec.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = spec.ef_construction
        hnsw.hnsw.efSearch = spec.ef_search
        index = faiss.IndexIDMap2(hnsw)
        index.add_with_ids(x, ids)
        return index

    # IVF
    if spec.nlist > n:
        raise ValueError(f"IVF nlist ({spec.nlist}) exceeds the number of items ({n})")
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    # Spherical k-means keeps centroids on the unit sphere, which is what
    # inner-product assignment of unit vectors needs (otherwise long centroids win).
    ivf.cp.spherical = True
    ivf.cp.seed = int(seed)
    ivf.cp.niter = spec.kmeans_iters
    n_train = min(n, spec.nlist * spec.train_points_per_list)
    # Draw the training sample ourselves (seeded, sorted) so it does not depend on
    # FAISS's internal sampler; max_points_per_centroid is raised so FAISS keeps it.
    ivf.cp.max_points_per_centroid = max(spec.train_points_per_list, math.ceil(n_train / spec.nlist))
    if n_train < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        train = np.ascontiguousarray(x[rows])
    else:
        train = x
    ivf.train(train)
    ivf.add_with_ids(x, ids)
    ivf.nprobe = spec.nprobe
    # IndexIVF keeps the quantizer alive through its SWIG wrapper reference.
    return ivf


# ------------------------------------------------------------------------ recall


@dataclass(frozen=True)
class ExactNeighbours:
    """Ground truth for a query set: top-k ids and scores from brute-force search."""

    ids: np.ndarray  # [n_queries, k] int64
    scores: np.ndarray  # [n_queries, k] float32, descending
    k: int


def exact_search(embeddings: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> ExactNeighbours:
    """Exact top-k by inner product of ``queries`` over ``embeddings`` (returns item ids)."""
    import faiss

    x = _check_vectors("embeddings", embeddings)
    ids = _check_ids(ids, x.shape[0])
    q = _check_vectors("queries", queries, dim=x.shape[1])
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
    x = _check_vectors("embeddings", embeddings)
    ids = _check_ids(ids, x.shape[0])
    q = _check_vectors("queries", queries, dim=x.shape[1])
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


# ------------------------------------------------------------------- persistence


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_index(index: faiss.Index, path: Path | str) -> Path:
    """Write ``index`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    import faiss

    # Not serving.fileio.atomic_write_bytes: FAISS writes through a path, streaming the
    # index to disk, whereas serialize_index would hold a second full copy in memory.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    # atomic_write_text syncs the file; the rename is durable once the folder is synced too.
    _fsync_dir(path.parent)


def index_fingerprint(path: Path | str) -> str:
    """SHA-256 (hex) of the index file's bytes."""
    return file_sha256(path)


def load_index(
    path: Path | str, expected_dim: int | None = None, *, expected_fingerprint: str | None = None
) -> faiss.Index:
    """Read an index; refuse it when its dimension or fingerprint is not the expected one."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index at {path}")
    if expected_fingerprint is not None:
        actual = index_fingerprint(path)
        if actual != expected_fingerprint:
            raise ValueError(f"index {path} has fingerprint {actual}, expected {expected_fingerprint}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a readable FAISS index: {exc}") from exc
    if expected_dim is not None and index.d != expected_dim:
        raise ValueError(
            f"index {path} has dimension {index.d} but the model produces {expected_dim}-d "
            "embeddings; rebuild the index from the current model bundle"
        )
    return index


# ------------------------------------------------------------------------- stage


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


def default_queries(embeddings: np.ndarray, n_queries: int, seed: int = 0) -> np.ndarray:
    """Probe queries: a seeded sample of item rows plus Gaussian noise, renormalised."""
    x = _check_vectors("embeddings", embeddings)
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


def _tune(
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
) -> IndexResult:
    """Build the item index, gate it on recall@k vs exact search, save index.faiss + index_meta.json.

    With ``spec=None`` the spec comes from ``choose_index_spec`` (``exact_threshold``,
    ``approximate``) and its search
    breadth (IVF nprobe / HNSW efSearch) is raised until the floor is met; a given
    ``spec`` is used as is. ``query_vectors`` (real user embeddings) are preferred
    over the default perturbed-item probes. ``k`` is capped at the catalogue size.
    Raises ``IndexGateFailed`` when recall < ``recall_floor``; nothing is written then.
    """
    out_dir = Path(out_dir)
    x = _check_vectors("item_embeddings", item_embeddings)
    ids = _check_ids(item_ids, x.shape[0])
    n, dim = x.shape
    if not 0.0 <= recall_floor <= 1.0:
        raise ValueError(f"recall_floor must be in [0, 1], got {recall_floor}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_eff = min(k, n)
    if query_vectors is not None:
        q = _check_vectors("query_vectors", query_vectors, dim=dim)
        query_source = "provided"
    else:
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        q = default_queries(x, n_queries, seed=seed)
        query_source = "perturbed_items"
    tune = spec is None
    if spec is None:
        spec = choose_index_spec(n, dim, exact_threshold, k=k_eff, approximate=approximate)

    used_threads = configure_faiss_threads(threads)

    start = time.perf_counter()
    index = build_index(x, ids, spec, seed=seed)
    build_seconds = time.perf_counter() - start

    truth = exact_search(x, ids, q, k_eff)
    if tune:
        spec, recall = _tune(index, spec, x, ids, q, k_eff, truth, recall_floor)
    else:
        recall = recall_against_exact(index, x, ids, q, k_eff, ground_truth=truth)

    if recall < recall_floor:
        detail = ""
        if spec.kind == "ivf":
            detail = f" (ivf nlist={spec.nlist}, nprobe={spec.nprobe})"
        elif spec.kind == "hnsw":
            detail = f" (hnsw M={spec.hnsw_m}, efSearch={spec.ef_search})"
        raise IndexGateFailed(
            [
                f"recall@{k_eff} = {recall:.4f} is below the floor {recall_floor:.4f} "
                f"on {q.shape[0]} {query_source} queries over {n} items, {spec.kind} index{detail}"
            ]
        )

    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = save_index(index, out_dir / INDEX_FILENAME)
    fingerprint = index_fingerprint(index_path)
    result = IndexResult(
        path=index_path,
        spec=spec,
        recall=recall,
        build_seconds=build_seconds,
        n_items=n,
        dim=dim,
        fingerprint=fingerprint,
        k=k_eff,
        n_queries=int(q.shape[0]),
        query_source=query_source,
        recall_floor=recall_floor,
        meta_path=out_dir / META_FILENAME,
        extra={"seed": seed, "faiss_threads": used_threads, "faiss_version": faiss.__version__},
    )
    # The meta file goes last: it names the index's fingerprint, so a reader that
    # finds a meta file can trust the index beside it is the one it describes.
    _write_json_atomic(result.as_dict(), out_dir / META_FILENAME)
    return result
