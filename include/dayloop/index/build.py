"""Building an index from a spec, and FAISS's thread count.

``faiss`` is imported inside functions only (see ``faiss_index``).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from dayloop.index.spec import IndexSpec
from dayloop.index.vectors import check_ids, check_vectors

if TYPE_CHECKING:  # pragma: no cover - typing only
    import faiss

#: Threads FAISS may use unless told otherwise. Two matches the workers the
#: deployment gives a task; more would fight Spark/torch tasks for the same cores.
DEFAULT_FAISS_THREADS = 2
THREADS_ENV = "DAYLOOP_FAISS_THREADS"


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


def build_index(embeddings: np.ndarray, ids: np.ndarray, spec: IndexSpec, seed: int = 0) -> faiss.Index:
    """Build an inner-product index over ``embeddings`` whose search returns ``ids``."""
    import faiss

    x = check_vectors("embeddings", embeddings)
    ids = check_ids(ids, x.shape[0])
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
