"""Loading one index directory: fetch, verify against its meta, deserialise, apply the
meta's search knobs, and move it to the GPU where that helps. The seen-items file the
meta names is fetched and verified (sha256) the same way; a meta that names none loads
without it, exclusion then reported unavailable.

Everything here blocks; the service runs ``load_index_dir`` in a worker thread and puts the
finished ``LoadedIndex`` into its version table in one step on the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import faiss
import httpx
import numpy as np

from serving.index_service.errors import ServiceError
from serving.index_service.faiss_params import index_kind, search_params, set_search_params
from serving.index_service.meta import INDEX_FILENAME, MAX_META_BYTES, META_FILENAME, IndexMeta, parse_meta
from serving.index_service.seen import SEEN_FILE, SeenFormatError, SeenItems, parse_seen
from serving.index_service.sources import Source, read_http, read_local

log = logging.getLogger("serving.index_service")

#: Refuse index files beyond this size rather than exhaust memory (the file is held in
#: memory once while it is hashed and deserialised).
DEFAULT_MAX_INDEX_BYTES = 4 << 30
DEFAULT_FETCH_TIMEOUT = 60.0
#: Rough count of vectors HNSW scores per unit of efSearch (M=32 graph, two layers' worth).
_HNSW_VISITS_PER_EF = 64


def apply_search_params(index: Any, kind: str, *, nprobe: int | None, ef_search: int | None) -> dict[str, int]:
    """Set IVF nprobe / HNSW efSearch on the inner index; return the knobs now in force.

    A knob for another kind of index is ignored (the meta carries both); an nprobe beyond
    the index's nlist is a 422."""
    if kind == "ivf" and nprobe is not None:
        nlist = search_params(index)["nlist"]
        if nprobe > nlist:
            raise ServiceError(422, f"index_meta.json nprobe {nprobe} exceeds the index's nlist {nlist}")
        set_search_params(index, nprobe=nprobe)
    elif kind == "hnsw" and ef_search is not None:
        set_search_params(index, ef_search=ef_search)
    return search_params(index) if kind in ("ivf", "hnsw") else {}


def query_cost(kind: str, dim: int, ntotal: int, params: dict[str, int]) -> float:
    """Estimated multiply-adds for one query (decides event loop vs worker thread)."""
    if kind == "ivf":
        nlist = max(1, params["nlist"])
        return dim * (nlist + ntotal * params["nprobe"] / nlist)
    if kind == "hnsw":
        return dim * params["ef_search"] * _HNSW_VISITS_PER_EF
    return float(dim * ntotal)


def _maybe_to_gpu(index: Any, kind: str, use_gpu: bool) -> tuple[Any, str]:
    # Only flat and IVF have GPU versions; HNSW stays on the CPU. Any failure keeps the
    # CPU index: a working slower index beats a refused load.
    if not use_gpu or kind not in ("flat", "ivf"):
        return index, "cpu"
    try:
        if faiss.get_num_gpus() <= 0:
            return index, "cpu"
        return faiss.index_cpu_to_all_gpus(index), "gpu"
    except Exception as exc:  # pragma: no cover - needs faiss-gpu
        log.warning("keeping the index on the CPU; moving it to the GPU failed: %s", exc)
        return index, "cpu"


@dataclass(frozen=True, eq=False)
class LoadedIndex:
    """One version's index and what is known about it."""

    version: int
    index: Any
    dim: int
    ntotal: int
    fingerprint: str
    kind: str
    source: str
    device: str
    params: dict[str, int]
    loaded_at: str
    load_seconds: float
    cost_per_query: float
    seen: SeenItems | None = None  # None: no seen-items file, results are not filtered
    seen_fingerprint: str | None = None
    seen_source: str | None = None  # where the table was read: beside the index, or a later swap

    def seen_info(self) -> dict[str, Any]:
        """Whether seen items are excluded, and how fresh the history is (``last_day``)."""
        if self.seen is None:
            return {"available": False, "reason": f"the index directory has no {SEEN_FILE} in its meta"}
        return {
            "available": True,
            "last_day": self.seen.last_day,
            "users": self.seen.n_users,
            "pairs": self.seen.n_pairs,
            "fingerprint": self.seen_fingerprint,
            "source": self.seen_source,
        }

    def info(self) -> dict[str, Any]:
        """JSON form for ``/indexes``."""
        return {
            "version": self.version,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "loaded_at": self.loaded_at,
            "source": self.source,
            "device": self.device,
            "search_params": dict(self.params),
            "load_seconds": round(self.load_seconds, 4),
            "seen_items": self.seen_info(),
        }


def load_index_dir(
    version: int,
    source: Source,
    expected_dim: int,
    fingerprint: str | None = None,
    *,
    skip_fingerprint: str | None = None,
    use_gpu: bool = False,
    max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES,
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
    keep: Callable[[dict[str, bytes | bytearray]], None] | None = None,
) -> LoadedIndex | None:
    """Fetch, verify and deserialise one index directory (blocking; run it in a thread).

    Returns None without reading ``index.faiss`` when the meta's fingerprint equals
    ``skip_fingerprint`` (that exact index is already loaded). Raises ``ServiceError``:
    400 for a bad source, 502 when a URL cannot be fetched, 409 for a dimension or
    fingerprint mismatch, 422 for an unusable artifact.

    ``keep``, when given, receives the directory's files (name -> bytes) once every check has
    passed, before the index is returned: the service keeps its local copy with it.
    """
    started = time.perf_counter()
    fetched = _fetch(source, expected_dim, fingerprint, skip_fingerprint, max_index_bytes, fetch_timeout)
    if fetched is None:
        return None
    meta_raw, meta, data, seen_data = fetched
    del fetched  # the tuple would keep the file's bytes alive next to the index
    seen = _parse_seen(source, meta, seen_data)  # before the index: a bad file costs no deserialise
    index = _deserialise(source, meta, data)
    kind = _check_index(source, meta, index, expected_dim)
    if keep is not None:
        files = {META_FILENAME: meta_raw, INDEX_FILENAME: data}
        if seen_data is not None:
            files[SEEN_FILE] = seen_data
        keep(files)
        del files
    del data, seen_data
    params = apply_search_params(index, kind, nprobe=meta.nprobe, ef_search=meta.ef_search)
    dim, ntotal = int(index.d), int(index.ntotal)
    index, device = _maybe_to_gpu(index, kind, use_gpu)
    return LoadedIndex(
        version=version,
        index=index,
        dim=dim,
        ntotal=ntotal,
        fingerprint=meta.fingerprint,
        kind=kind,
        source=source.display,
        device=device,
        params=params,
        loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_seconds=time.perf_counter() - started,
        cost_per_query=query_cost(kind, dim, ntotal, params),
        seen=seen,
        seen_fingerprint=meta.seen.fingerprint if meta.seen is not None else None,
        seen_source=source.display_file(SEEN_FILE) if seen is not None else None,
    )


def _fetch(
    source: Source,
    expected_dim: int,
    fingerprint: str | None,
    skip_fingerprint: str | None,
    max_index_bytes: int,
    fetch_timeout: float,
) -> tuple[bytes | bytearray, IndexMeta, bytes | bytearray, bytes | bytearray | None] | None:
    """The meta's bytes, the checked meta, the index file's bytes and the seen-items file's (None when the meta
    names none); None when the meta says ``skip_fingerprint``."""
    client = httpx.Client(timeout=fetch_timeout, follow_redirects=True) if source.kind == "http" else None

    def read(name: str, limit: int) -> bytes | bytearray:
        if client is None:
            return read_local(source, name, limit)
        return read_http(client, source, name, limit)

    try:
        meta_raw = read(META_FILENAME, MAX_META_BYTES)
        meta = parse_meta(meta_raw)
        if meta.dim != expected_dim:
            raise ServiceError(
                409,
                f"index at {source.display} has dimension {meta.dim} but expected_dim is {expected_dim}: "
                "it was built for another model's embeddings",
            )
        if fingerprint is not None and meta.fingerprint != fingerprint.lower():
            raise ServiceError(
                409, f"index at {source.display} has fingerprint {meta.fingerprint}, expected {fingerprint.lower()}"
            )
        if skip_fingerprint is not None and meta.fingerprint == skip_fingerprint:
            return None
        seen_data = read(SEEN_FILE, max_index_bytes) if meta.seen is not None else None
        return meta_raw, meta, read(INDEX_FILENAME, max_index_bytes), seen_data
    finally:
        if client is not None:
            client.close()


def _parse_seen(source: Source, meta: IndexMeta, data: bytes | bytearray | None) -> SeenItems | None:
    """The seen-items table, once its sha256 matches the meta's (None when the meta names none)."""
    if meta.seen is None or data is None:
        return None
    where = source.display_file(SEEN_FILE)
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.seen.fingerprint:
        raise ServiceError(
            409,
            f"{where} has sha256 {actual} but {META_FILENAME} says {meta.seen.fingerprint}: "
            "a partial copy or files from different builds",
        )
    try:
        seen = parse_seen(data, where)
    except SeenFormatError as exc:
        raise ServiceError(422, str(exc)) from None
    if seen.last_day != meta.seen.last_day:
        raise ServiceError(
            422, f"{where} says its history ends {seen.last_day} but {META_FILENAME} says {meta.seen.last_day}"
        )
    return seen


def _deserialise(source: Source, meta: IndexMeta, data: bytes | bytearray) -> Any:
    """The FAISS index in ``data``, once its sha256 matches the meta's fingerprint."""
    # A hash of bytes already in memory (they may have come over HTTP), not of a file.
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.fingerprint:
        raise ServiceError(
            409,
            f"{source.display_file(INDEX_FILENAME)} has sha256 {actual} but {META_FILENAME} says "
            f"{meta.fingerprint}: a partial copy or files from different builds",
        )
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = source.display_file(INDEX_FILENAME)
        raise ServiceError(422, f"{where} is not a readable FAISS index: {first}") from None


def _check_index(source: Source, meta: IndexMeta, index: Any, expected_dim: int) -> str:
    """Refuse an index that does not match its meta or cannot serve; return its kind."""
    if index.d != expected_dim:  # expected_dim == meta.dim was checked above
        raise ServiceError(
            409,
            f"index at {source.display} has dimension {index.d} but its meta and expected_dim say {expected_dim}",
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ServiceError(422, f"index at {source.display} does not use the inner-product metric")
    if not index.is_trained:
        raise ServiceError(422, f"index at {source.display} is not trained")
    if index.ntotal == 0:
        raise ServiceError(422, f"index at {source.display} is empty")
    if meta.n_items is not None and meta.n_items != index.ntotal:
        raise ServiceError(
            422, f"index at {source.display} holds {index.ntotal} vectors but its meta says {meta.n_items}"
        )
    kind = index_kind(index)
    if kind != meta.kind:
        raise ServiceError(422, f"index at {source.display} is {kind} but its meta says {meta.kind}")
    return kind


def search_in_thread(index: Any, x: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` from a worker thread, with the service's OpenMP thread count."""
    # OpenMP's thread count is per calling thread; a pool thread would otherwise use the
    # process default (every core).
    faiss.omp_set_num_threads(threads)
    return index.search(x, k)
