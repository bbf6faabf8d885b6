"""FAISS search knobs shared by the index stage and the index service: set and read through
the id-map wrappers, refused on an index they do not apply to."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from serving.index_service.faiss_params import (  # noqa: E402
    index_kind,
    innermost_index,
    search_params,
    set_search_params,
)


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knobs_are_set_and_read_through_the_wrappers() -> None:
    x, ids = unit(100, 8, 0), np.arange(100, dtype=np.int64)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    wrapped = faiss.IndexIDMap2(ivf)
    wrapped.add_with_ids(x, ids)
    set_search_params(wrapped, nprobe=2)
    assert search_params(wrapped) == {"nprobe": 2, "nlist": 4}
    assert isinstance(innermost_index(wrapped), faiss.IndexIVFFlat)

    hnsw = faiss.IndexIDMap(faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT))
    set_search_params(hnsw, ef_search=40)
    assert search_params(hnsw) == {"ef_search": 40} and index_kind(hnsw) == "hnsw"

    flat = faiss.IndexFlatIP(8)
    assert search_params(flat) == {} and index_kind(flat) == "flat"
    set_search_params(flat)  # no knob given: nothing to refuse


def test_a_knob_for_another_kind_of_index_is_refused() -> None:
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes, not IndexFlat"):
        set_search_params(flat, nprobe=4)
    with pytest.raises(ValueError, match="ef_search applies to HNSW indexes"):
        set_search_params(flat, ef_search=4)
