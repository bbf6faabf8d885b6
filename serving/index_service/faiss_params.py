"""FAISS search-parameter helpers, shared by the index stage (``dayloop.index``) and the
index service: find the index under its id-map wrappers, name its kind, set and read IVF
``nprobe`` / HNSW ``efSearch``.

Both knobs live in the index object and are saved with it, so the stage tunes them before
writing the file and the service may override them from ``index_meta.json`` at load time.

numpy-free and stdlib-only apart from FAISS, which is imported inside each function: the
control plane imports this from modules that Airflow parses often and that must not load a
native library at import time. (The calls happen per index, never per search.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["index_kind", "innermost_index", "search_params", "set_search_params"]


def innermost_index(index: Any) -> Any:
    """The index under any IndexIDMap/IndexIDMap2 wrappers, downcast to its real class."""
    import faiss

    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner


def index_kind(index: Any) -> str:
    """'flat', 'ivf', 'hnsw' or the class name of anything else."""
    import faiss

    inner = innermost_index(index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return type(inner).__name__


def set_search_params(index: Any, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Change IVF ``nprobe`` / HNSW ``efSearch`` in place (both are saved with the index).

    ValueError when a knob is given for an index it does not apply to."""
    import faiss

    inner = innermost_index(index)
    if nprobe is not None:
        if not isinstance(inner, faiss.IndexIVF):
            raise ValueError(f"nprobe applies to IVF indexes, not {type(inner).__name__}")
        inner.nprobe = int(nprobe)
    if ef_search is not None:
        if not isinstance(inner, faiss.IndexHNSW):
            raise ValueError(f"ef_search applies to HNSW indexes, not {type(inner).__name__}")
        inner.hnsw.efSearch = int(ef_search)


def search_params(index: Any) -> dict[str, int]:
    """The search knobs in force: ``{"nprobe", "nlist"}`` for IVF, ``{"ef_search"}`` for
    HNSW, ``{}`` for anything else."""
    import faiss

    inner = innermost_index(index)
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nprobe), "nlist": int(inner.nlist)}
    if isinstance(inner, faiss.IndexHNSW):
        return {"ef_search": int(inner.hnsw.efSearch)}
    return {}
