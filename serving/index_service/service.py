"""The index service's version table and the operations on it (the FastAPI routes call these).

Design points:

* Versions are immutable: loading a version again with the same fingerprint is a no-op,
  with another fingerprint a 409. A new index means a new model version.
* Loading (fetch, sha256, deserialise) runs in a worker thread; the finished index is put
  into the version table in one step on the event loop, so searches on other versions
  never wait for a load and never see a half-loaded index.
* A search takes its own reference to the loaded index before it starts, so an unload
  while it runs only drops the table's reference; FAISS frees the index when the last
  search holding it returns.
* ``POST /search`` is on every user request (one vector), so it skips FastAPI's body
  machinery: it reads the body under a size cap, validates it with pydantic-core straight
  from bytes, searches on the event loop when the work is small (a thread hop costs more
  than a one-vector search over a flat index of a few ten thousand items) and in a thread
  when it is large, and writes the JSON itself.
* A search may name the user of each vector (``user_ids``): the service then fetches
  ``k`` plus that user's seen-item count and drops the items the user had seen by the
  index's build (its seen-items file, :mod:`serving.index_service.seen`), so each row
  still holds ``k`` items. An index loaded without that file answers unfiltered, and
  says so: the answer's ``seen_last_day`` is null.
* A loaded version's seen-items table can be replaced (``update_seen``: the canary's
  fresher history for the champion, :mod:`serving.index_service.seen_swap`). The new table
  is read and verified in a thread, then a new ``LoadedIndex`` sharing the FAISS index is
  put into the table in one step: a search already holding the old entry finishes with the
  old history, every later one uses the new, none sees a mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from serving.http_guards import (
    BAD_TOKEN_DETAIL,
    BEARER_CHALLENGE,
    BodyRefused,
    bearer_matches,
    read_limited_body,
)
from serving.index_service.errors import ServiceError
from serving.index_service.exclusion import drop_seen, fetch_k
from serving.index_service.loading import (
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MAX_INDEX_BYTES,
    LoadedIndex,
    load_index_dir,
    search_in_thread,
)
from serving.index_service.local_copies import LocalCopies
from serving.index_service.meta import META_FILENAME, parse_meta
from serving.index_service.metrics import IndexMetrics
from serving.index_service.protocol import (
    LoadRequest,
    SeenUpdateRequest,
    format_results,
    parse_search_request,
    vectors_to_array,
)
from serving.index_service.seen import SEEN_FILE, encode_seen
from serving.index_service.seen_swap import check_not_older, fetch_seen
from serving.index_service.sources import Source, parse_source

log = logging.getLogger("serving.index_service")

#: ~1 MiB holds 256 vectors of 256 floats written with full float32 precision.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Loads at once; each holds its index file in memory while it is verified.
MAX_CONCURRENT_LOADS = 2
#: Estimated multiply-adds above which a search runs in a worker thread instead of on
#: the event loop (~0.5 ms of single-threaded FAISS work; below it the hop costs more).
OFFLOAD_MULTIPLY_ADDS = 2_000_000


class IndexService:
    """The version table and the operations on it (the FastAPI routes call these)."""

    def __init__(
        self,
        token: str,
        *,
        threads: int = 1,
        use_gpu: bool = True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.token = token
        self.threads = threads
        self.use_gpu = use_gpu
        self.max_body_bytes = max_body_bytes
        self.max_index_bytes = max_index_bytes
        self.fetch_timeout = fetch_timeout
        self.indexes: dict[int, LoadedIndex] = {}
        # Versions ever loaded: the only ones that get their own error label, so junk
        # requests cannot grow the metric's label set without bound.
        self.known_versions: set[int] = set()
        self.metrics = IndexMetrics()
        self._load_slots = asyncio.Semaphore(MAX_CONCURRENT_LOADS)
        # Local copies of the live versions (restored on start); None: kept in memory only.
        self.copies = LocalCopies(state_dir) if state_dir is not None else None
        self.ready = self.copies is None
        self.restore_total = 0
        self.restored: list[int] = []
        self.restore_failed: dict[int, str] = {}

    def version_label(self, version: int) -> str:
        """Metric label for a requested version: itself if ever loaded, else 'other'."""
        return str(version) if version in self.known_versions else "other"

    def require_admin(self, request: Request) -> None:
        """401 unless the request carries the admin bearer token."""
        if not bearer_matches(request.headers.get("authorization"), self.token):
            raise ServiceError(401, BAD_TOKEN_DETAIL, dict(BEARER_CHALLENGE))

    async def read_body(self, request: Request) -> bytes:
        """The request body, or 413 once it passes ``max_body_bytes`` (400 for a bad Content-Length)."""
        try:
            return await read_limited_body(request, self.max_body_bytes)
        except BodyRefused as exc:
            raise ServiceError(exc.status, exc.detail) from None

    async def load(self, version: int, req: LoadRequest) -> dict[str, Any]:
        """Load ``req.source`` as ``version`` (no-op if that exact index is loaded)."""
        source = parse_source(req.source)
        wanted = req.fingerprint.lower() if req.fingerprint else None
        current = self.indexes.get(version)
        if current is not None and wanted is not None:
            # Answer from what is loaded without touching the source.
            return self._same_or_conflict(current, wanted, req.expected_dim)
        kept: list[Path] = []
        keep = None
        if self.copies is not None:
            copies = self.copies

            def keep(files: dict[str, bytes | bytearray]) -> None:
                kept.append(copies.keep_files(version, parse_meta(files[META_FILENAME]).fingerprint, files))

        async with self._load_slots:
            loaded = await asyncio.to_thread(
                load_index_dir,
                version,
                source,
                req.expected_dim,
                wanted,
                skip_fingerprint=current.fingerprint if current is not None else None,
                use_gpu=self.use_gpu,
                max_index_bytes=self.max_index_bytes,
                fetch_timeout=self.fetch_timeout,
                keep=keep,
            )
        # The table may have changed while the thread ran; decide on what is there now.
        now = self.indexes.get(version)
        if loaded is None:
            if now is None or current is None or now.fingerprint != current.fingerprint:
                raise ServiceError(409, f"version {version} changed while loading; retry the request")
            return self._same_or_conflict(now, now.fingerprint, req.expected_dim)
        if now is not None:
            self._drop_unrecorded(version, kept)
            return self._same_or_conflict(now, loaded.fingerprint, req.expected_dim)
        self._install(loaded, req.expected_dim, kept[0] if kept else None)
        log.info(
            "loaded version %d: %s index, %d x %d, %s, fingerprint %s, from %s in %.2fs",
            version, loaded.kind, loaded.ntotal, loaded.dim, loaded.device,
            loaded.fingerprint[:12], loaded.source, loaded.load_seconds,
        )
        return {"status": "loaded", "index": loaded.info()}

    def _install(self, loaded: LoadedIndex, expected_dim: int, kept_dir: Path | None,
                 outcome: str = "loaded") -> None:
        """Put a loaded version into the table (one step, no await) and name its copy live."""
        version = loaded.version
        self.indexes[version] = loaded
        if self.copies is not None and kept_dir is not None:
            self.copies.record(version, {
                "dir": str(kept_dir.relative_to(self.copies.root)), "fingerprint": loaded.fingerprint,
                "expected_dim": expected_dim, "seen_file": SEEN_FILE if loaded.seen is not None else None,
                "seen_sha256": loaded.seen_fingerprint, "source": loaded.source,
            })
        self.known_versions.add(version)
        label = str(version)
        self.metrics.loaded.labels(version=label).set(1)
        self.metrics.ntotal.labels(version=label).set(loaded.ntotal)
        self._set_seen_gauge(loaded)
        self.metrics.loads.labels(outcome=outcome).inc()

    def _drop_unrecorded(self, version: int, kept: list[Path]) -> None:
        """Remove a copy written by a load that lost a race, unless the manifest names it."""
        if self.copies is None or not kept:
            return
        live = self.copies.entries().get(version, {}).get("dir")
        if live != str(kept[0].relative_to(self.copies.root)):
            shutil.rmtree(kept[0], ignore_errors=True)

    def _same_or_conflict(self, current: LoadedIndex, fingerprint: str, expected_dim: int) -> dict[str, Any]:
        if current.fingerprint != fingerprint:
            raise ServiceError(
                409,
                f"version {current.version} is already loaded with fingerprint {current.fingerprint}; "
                f"versions are immutable (got {fingerprint}); unload it first or use a new version",
            )
        if current.dim != expected_dim:
            raise ServiceError(
                409, f"version {current.version} is loaded with dimension {current.dim}, not {expected_dim}"
            )
        self.metrics.loads.labels(outcome="already_loaded").inc()
        return {"status": "already loaded", "index": current.info()}

    def unload(self, version: int) -> dict[str, Any]:
        """Drop ``version`` from the table; searches already holding it finish first."""
        entry = self.indexes.pop(version, None)
        if entry is None:
            raise ServiceError(404, f"index version {version} is not loaded")
        if self.copies is not None:
            self.copies.forget(version)
        self.metrics.loaded.labels(version=str(version)).set(0)
        self.metrics.ntotal.labels(version=str(version)).set(0)
        self.metrics.seen_last_day.labels(version=str(version)).set(0)
        log.info("unloaded version %d (fingerprint %s)", version, entry.fingerprint[:12])
        return {"status": "unloaded", "index": entry.info()}

    def _loaded(self, version: int) -> LoadedIndex:
        entry = self.indexes.get(version)
        if entry is None:
            raise ServiceError(404, f"index version {version} is not loaded")
        return entry

    def _set_seen_gauge(self, entry: LoadedIndex) -> None:
        day = dt.date.fromisoformat(entry.seen.last_day) if entry.seen is not None else None
        stamp = (day - dt.date(1970, 1, 1)).days * 86_400 if day is not None else 0
        self.metrics.seen_last_day.labels(version=str(entry.version)).set(stamp)

    async def update_seen(self, version: int, req: SeenUpdateRequest) -> dict[str, Any]:
        """Replace ``version``'s seen-items table with the verified file ``req.source`` names
        (no-op when that file is the one in use); the old table stays on any refusal."""
        wanted = req.fingerprint.lower()
        current = self._loaded(version)
        if current.seen_fingerprint == wanted:  # answered without touching the source
            self.metrics.seen_updates.labels(outcome="unchanged").inc()
            return {"status": "unchanged", "index": current.info()}
        kept: list[Path] = []
        keep = None
        if self.copies is not None:
            copies, fingerprint = self.copies, current.fingerprint

            def keep(data: bytes | bytearray) -> None:
                kept.append(copies.keep_seen(version, fingerprint, wanted, data))

        async with self._load_slots:
            seen, where = await asyncio.to_thread(
                fetch_seen, req.source, wanted, self.max_index_bytes, self.fetch_timeout, keep
            )
        # The table may have changed while the thread ran (an unload, another swap): decide
        # on what is there now, with no await between the check and the assignment.
        now = self._loaded(version)
        if now.seen_fingerprint == wanted:
            self.metrics.seen_updates.labels(outcome="unchanged").inc()
            return {"status": "unchanged", "index": now.info()}
        check_not_older(now, seen, where, req.allow_older)
        updated = dataclasses.replace(now, seen=seen, seen_fingerprint=wanted, seen_source=where)
        self.indexes[version] = updated
        if self.copies is not None and kept and now.fingerprint == current.fingerprint:
            entry = self.copies.entries().get(version)
            if entry is not None:
                self.copies.record(version, entry | {"seen_file": kept[0].name, "seen_sha256": wanted})
        self._set_seen_gauge(updated)
        self.metrics.seen_updates.labels(outcome="updated").inc()
        log.info(
            "version %d now excludes history through %s (%d users, %d pairs, sha256 %s, from %s; was %s)",
            version, seen.last_day, seen.n_users, seen.n_pairs, wanted[:12], where,
            now.seen.last_day if now.seen is not None else "no seen items",
        )
        return {"status": "updated", "previous": now.seen_info(), "index": updated.info()}

    async def restore(self) -> None:
        """Load every version the local copies name (at start, before ``ready``). A copy that
        fails its checks is left out and reported (``restore_failed``), never served."""
        if self.copies is None:
            self.ready = True
            return
        entries = self.copies.entries()
        self.restore_total = len(entries)
        for version, entry in sorted(entries.items()):
            try:
                await self._restore_one(version, entry)
                self.restored.append(version)
            except Exception as exc:  # noqa: BLE001 - one bad copy must not block the others
                detail = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
                self.restore_failed[version] = str(detail)
                self.metrics.loads.labels(outcome="restore_failed").inc()
                log.error("could not restore version %d from its local copy: %s", version, detail)
        self.ready = True
        log.info("restored %d of %d versions from %s%s", len(self.restored), len(entries), self.copies.root,
                 f"; failed: {self.restore_failed}" if self.restore_failed else "")

    async def _restore_one(self, version: int, entry: dict[str, Any]) -> None:
        assert self.copies is not None
        folder = self.copies.root / str(entry["dir"])
        source = Source("local", str(folder), str(folder))
        async with self._load_slots:
            loaded = await asyncio.to_thread(
                load_index_dir, version, source, int(entry["expected_dim"]), str(entry["fingerprint"]),
                use_gpu=self.use_gpu, max_index_bytes=self.max_index_bytes, fetch_timeout=self.fetch_timeout,
            )
            seen_file, seen_sha = entry.get("seen_file"), entry.get("seen_sha256")
            if loaded is not None and seen_file and seen_file != SEEN_FILE and seen_sha:
                seen, where = await asyncio.to_thread(
                    fetch_seen, str(folder / seen_file), seen_sha, self.max_index_bytes, self.fetch_timeout)
                loaded = dataclasses.replace(loaded, seen=seen, seen_fingerprint=seen_sha, seen_source=where)
        if loaded is None or version in self.indexes:
            return  # a load that came in meanwhile wins
        self._install(loaded, int(entry["expected_dim"]), None, outcome="restored")  # already in the manifest
        log.info("restored version %d (fingerprint %s) from %s in %.2fs", version, loaded.fingerprint[:12],
                 folder, loaded.load_seconds)

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "versions": sorted(self.indexes), "restoring": self.restore_total,
                "restored": sorted(self.restored),
                "restore_failed": {str(v): d for v, d in sorted(self.restore_failed.items())}}

    def seen_bytes(self, version: int) -> tuple[bytes, str]:
        """The seen-items file ``version`` excludes with, and its sha256 (404 without one)."""
        entry = self._loaded(version)
        if entry.seen is None or entry.seen_fingerprint is None:
            raise ServiceError(404, f"index version {version} has no seen-items table")
        if self.copies is not None:
            live = self.copies.entries().get(version)
            if live is not None and live.get("seen_sha256") == entry.seen_fingerprint and live.get("seen_file"):
                path = self.copies.root / str(live["dir"]) / str(live["seen_file"])
                try:
                    return path.read_bytes(), entry.seen_fingerprint
                except OSError:
                    pass  # re-encoded below from what is in memory
        s = entry.seen
        data = encode_seen(s.user_ids, s.offsets, s.items, s.last_day)
        return data, hashlib.sha256(data).hexdigest()

    async def search(self, request: Request) -> Response:
        """``POST /search``: parse, search, encode; every refusal is counted."""
        started = time.perf_counter()
        m = self.metrics
        try:
            body = await self.read_body(request)
        except ServiceError as exc:
            m.errors.labels(version="none", reason="too_large" if exc.status == 413 else "bad_body").inc()
            raise
        try:
            req = parse_search_request(body)
        except ServiceError:
            m.errors.labels(version="none", reason="invalid_request").inc()
            raise
        entry = self.indexes.get(req.version)  # our own reference from here on
        if entry is None:
            m.errors.labels(version=self.version_label(req.version), reason="not_loaded").inc()
            raise ServiceError(404, f"index version {req.version} is not loaded")
        label = str(req.version)
        try:
            x = vectors_to_array(req.vectors, entry.dim)
        except ServiceError:
            m.errors.labels(version=label, reason="invalid_vectors").inc()
            raise
        excluding = req.user_ids is not None and entry.seen is not None
        k = fetch_k(entry.seen, req.user_ids, req.k, entry.ntotal) if excluding else req.k
        try:
            scores, ids = await self._search(entry, x, k)
        except Exception as exc:
            m.errors.labels(version=label, reason="search_failed").inc()
            log.exception("search on version %d failed", req.version)
            raise ServiceError(500, f"search on version {req.version} failed: {exc}") from None
        if not np.isfinite(scores[ids >= 0]).all():
            m.errors.labels(version=label, reason="nonfinite_scores").inc()
            raise ServiceError(422, "search produced non-finite scores: query values are too large")
        answer: dict[str, Any] = {"version": req.version}
        if excluding:
            answer["ids"], answer["scores"] = drop_seen(ids, scores, entry.seen, req.user_ids, req.k)
        else:
            answer["ids"], answer["scores"] = format_results(ids, scores)
        if req.user_ids is not None:
            answer["seen_last_day"] = entry.seen.last_day if entry.seen is not None else None
            m.exclusions.labels(version=label, outcome="applied" if excluding else "unavailable").inc(len(x))
        payload = json.dumps(answer, separators=(",", ":"))
        m.searches.labels(version=label).inc()
        m.search_vectors.labels(version=label).inc(len(x))
        m.seconds.labels(version=label).observe(time.perf_counter() - started)
        return Response(payload, media_type="application/json")

    async def _search(self, entry: LoadedIndex, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if entry.device == "cpu" and len(x) * entry.cost_per_query > OFFLOAD_MULTIPLY_ADDS:
            return await asyncio.to_thread(search_in_thread, entry.index, x, k, self.threads)
        # GPU indexes are searched here only: one stream, no concurrent callers.
        return entry.index.search(x, k)
