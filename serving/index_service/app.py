"""The FAISS index service: one in-memory FAISS index per model version, searched over HTTP.

The control plane loads an index directory (``index.faiss`` + ``index_meta.json``, as the
index stage writes it) under the model version it belongs to; the router searches it with
the user embedding Triton returned. Design points:

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

FAISS and FastAPI are imported at the top; prometheus_client only inside ``IndexMetrics``
so that the pure helpers here stay importable from the control-plane venv (which has no
prometheus_client) for unit tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import faiss
import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("serving.index_service")

INDEX_FILENAME = "index.faiss"
META_FILENAME = "index_meta.json"

MAX_VERSION = 10**9
MAX_K = 1000
MAX_VECTORS = 256
MAX_DIM = 65_536
#: ~1 MiB holds 256 vectors of 256 floats written with full float32 precision.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Refuse index files beyond this size rather than exhaust memory (the file is held in
#: memory once while it is hashed and deserialised).
DEFAULT_MAX_INDEX_BYTES = 4 << 30
MAX_META_BYTES = 1 << 20
DEFAULT_FETCH_TIMEOUT = 60.0
#: Loads at once; each holds its index file in memory while it is verified.
MAX_CONCURRENT_LOADS = 2
#: Estimated multiply-adds above which a search runs in a worker thread instead of on
#: the event loop (~0.5 ms of single-threaded FAISS work; below it the hop costs more).
OFFLOAD_MULTIPLY_ADDS = 2_000_000
#: Rough count of vectors HNSW scores per unit of efSearch (M=32 graph, two layers' worth).
_HNSW_VISITS_PER_EF = 64

IndexKind = Literal["flat", "ivf", "hnsw"]


class ServiceError(Exception):
    """An error with its HTTP status; the app turns it into ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


# ------------------------------------------------------------------------ requests


Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_DIM)]


class SearchRequest(BaseModel):
    """Body of ``POST /search``."""

    # Strict: "5" is not an int and true is not a number; the clients send real JSON
    # types. Unknown keys are ignored so a client may add fields before the service knows them.
    model_config = ConfigDict(strict=True, frozen=True)

    version: int = Field(ge=1, le=MAX_VERSION)
    vectors: list[Vector] = Field(min_length=1, max_length=MAX_VECTORS)
    k: int = Field(ge=1, le=MAX_K)


class LoadRequest(BaseModel):
    """Body of ``PUT /admin/indexes/{version}``."""

    # Unknown keys are refused: a misspelt "fingerprint" must not silently skip the check.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    source: str = Field(min_length=1, max_length=4096)
    expected_dim: int = Field(ge=1, le=MAX_DIM)
    fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


def describe_validation_error(err: ValidationError, limit: int = 5) -> str:
    """One line naming each bad field (never echoing the input, which may be huge)."""
    errors = err.errors(include_url=False, include_input=False)
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more error(s)")
    return "; ".join(parts)


def parse_search_request(body: bytes) -> SearchRequest:
    """Validate a search body; 422 with the offending fields when it is wrong."""
    try:
        return SearchRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ServiceError(422, f"invalid search request: {describe_validation_error(exc)}") from None


def parse_load_request(body: bytes) -> LoadRequest:
    """Validate a load body; 422 with the offending fields when it is wrong."""
    try:
        return LoadRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ServiceError(422, f"invalid load request: {describe_validation_error(exc)}") from None


def parse_version(raw: str) -> int:
    """A version from a URL path segment: a decimal integer in 1..10**9, else 422."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 10:
        version = int(raw)
        if 1 <= version <= MAX_VERSION:
            return version
    shown = raw if len(raw) <= 40 else raw[:40] + "..."
    raise ServiceError(422, f"version must be an integer between 1 and {MAX_VERSION}, got {shown!r}")


def vectors_to_array(vectors: list[list[float]], dim: int) -> np.ndarray:
    """The query vectors as a contiguous float32 [n, dim] array; 422 if a row is unusable."""
    for i, row in enumerate(vectors):
        if len(row) != dim:
            raise ServiceError(422, f"vectors[{i}] has {len(row)} values; this index has dimension {dim}")
    # Values beyond float32's range become inf here and are caught just below.
    with np.errstate(over="ignore"):
        x = np.array(vectors, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise ServiceError(
            422,
            f"{len(bad)} vector(s) contain NaN or infinite values (or values beyond float32), "
            f"first is vectors[{int(bad[0])}]",
        )
    return x


def format_results(ids: np.ndarray, scores: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    """Rows of ids and scores as lists, without FAISS's -1 padding for missing results."""
    valid = ids >= 0
    if valid.all():
        return ids.tolist(), scores.tolist()
    return (
        [row[keep].tolist() for row, keep in zip(ids, valid)],
        [row[keep].tolist() for row, keep in zip(scores, valid)],
    )


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))


# -------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where an index directory lives: a local directory or an HTTP(S) base URL."""

    kind: Literal["local", "http"]
    location: str  # absolute directory path, or URL without a trailing slash
    display: str  # the same with any URL credentials removed (for messages and /indexes)

    def file(self, name: str) -> str:
        """Path or URL of ``name`` inside the directory."""
        if self.kind == "local":
            return str(Path(self.location) / name)
        parts = urlsplit(self.location)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/" + name, parts.query, ""))

    def display_file(self, name: str) -> str:
        """``file(name)`` without URL credentials."""
        if self.kind == "local":
            return self.file(name)
        parts = urlsplit(self.display)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/" + name, parts.query, ""))


def parse_source(raw: str) -> Source:
    """Parse ``source``: an absolute directory path, ``file://`` URI or ``http(s)://`` URL (else 400)."""
    text = raw.strip()
    if not text:
        raise ServiceError(400, "source is empty")
    if "\x00" in text:
        raise ServiceError(400, "source contains a NUL character")
    if text.startswith("/"):
        return Source("local", str(Path(text)), str(Path(text)))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ServiceError(400, f"file:// source must be on this host, got host {parts.netloc!r}")
        if parts.query or parts.fragment:
            raise ServiceError(400, "file:// source must not have a query or fragment")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ServiceError(400, f"file:// source needs an absolute path, got {text!r}")
        return Source("local", str(Path(path)), str(Path(path)))
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ServiceError(400, f"source URL has no host: {text!r}")
        if parts.fragment:
            raise ServiceError(400, "source URL must not have a fragment")
        try:
            port = parts.port
        except ValueError:
            raise ServiceError(400, f"source URL has an invalid port: {text!r}") from None
        path = parts.path.rstrip("/")
        location = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        shown_netloc = host if port is None else f"{host}:{port}"
        display = urlunsplit((scheme, shown_netloc, path, parts.query, ""))
        return Source("http", location, display)
    if not scheme:
        raise ServiceError(400, f"source must be an absolute directory path or a URL, got {text!r}")
    raise ServiceError(
        400,
        f"unsupported source scheme {parts.scheme!r}: use a directory path, file:// or http(s):// "
        "(an mlflow-artifacts: URI must first be resolved to the tracking server's "
        "/api/2.0/mlflow-artifacts/artifacts/ URL)",
    )


def _read_local(source: Source, name: str, limit: int) -> bytes:
    path = Path(source.file(name))
    directory = Path(source.location)
    if not directory.is_dir():
        raise ServiceError(400, f"source directory {directory} does not exist")
    if not path.is_file():
        raise ServiceError(400, f"source directory {directory} has no {name}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ServiceError(400, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ServiceError(422, f"{path} is larger than the {limit}-byte limit")
    return data


def _read_http(client: httpx.Client, source: Source, name: str, limit: int) -> bytes | bytearray:
    url, shown = source.file(name), source.display_file(name)
    try:
        with client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise ServiceError(502, f"GET {shown} answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ServiceError(422, f"{shown} is {declared} bytes, over the {limit}-byte limit")
            buf = bytearray()
            for chunk in resp.iter_bytes(1 << 20):
                buf += chunk
                if len(buf) > limit:
                    raise ServiceError(422, f"{shown} is larger than the {limit}-byte limit")
            return buf  # not bytes(buf): that would hold a second copy of the index
    except httpx.HTTPError as exc:
        raise ServiceError(502, f"cannot fetch {shown}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------- meta


@dataclass(frozen=True)
class IndexMeta:
    """The parts of ``index_meta.json`` the service relies on."""

    dim: int
    fingerprint: str
    kind: IndexKind
    nprobe: int | None  # None: keep what the index file carries
    ef_search: int | None
    n_items: int | None


def _meta_int(data: dict[str, Any], key: str, where: str, *, minimum: int, required: bool) -> int | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ServiceError(422, f"index_meta.json has no {where}{key}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ServiceError(422, f"index_meta.json {where}{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_meta(raw: bytes) -> IndexMeta:
    """Parse and check ``index_meta.json`` (422 when it is not what the index stage writes)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServiceError(422, f"index_meta.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ServiceError(422, "index_meta.json must hold a JSON object")
    dim = _meta_int(data, "dim", "", minimum=1, required=True) or 0  # required: never None here
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not _is_hex(fingerprint):
        raise ServiceError(422, "index_meta.json fingerprint must be a 64-character sha256 hex string")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ServiceError(422, "index_meta.json has no spec object")
    kind = spec.get("kind")
    if kind not in ("flat", "ivf", "hnsw"):
        raise ServiceError(422, f"index_meta.json spec.kind must be 'flat', 'ivf' or 'hnsw', got {kind!r}")
    # The index stage writes 0 for a knob that does not apply; treat it like null.
    nprobe = _meta_int(spec, "nprobe", "spec.", minimum=0, required=False) or None
    ef_search = _meta_int(spec, "ef_search", "spec.", minimum=0, required=False) or None
    n_items = _meta_int(data, "n_items", "", minimum=0, required=False)
    return IndexMeta(dim, fingerprint.lower(), kind, nprobe, ef_search, n_items)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# ---------------------------------------------------------------------------- FAISS


def innermost_index(index: Any) -> Any:
    """The index under any IndexIDMap/IndexIDMap2 wrappers, downcast to its real class."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
        inner = faiss.downcast_index(inner.index)
    return inner


def index_kind(index: Any) -> str:
    """'flat', 'ivf', 'hnsw' or the class name of anything else."""
    inner = innermost_index(index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return type(inner).__name__


def apply_search_params(index: Any, kind: str, *, nprobe: int | None, ef_search: int | None) -> dict[str, int]:
    """Set IVF nprobe / HNSW efSearch on the inner index; return the knobs now in force."""
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        if nprobe is not None:
            if nprobe > ivf.nlist:
                raise ServiceError(422, f"index_meta.json nprobe {nprobe} exceeds the index's nlist {ivf.nlist}")
            ivf.nprobe = nprobe
        return {"nprobe": int(ivf.nprobe), "nlist": int(ivf.nlist)}
    if kind == "hnsw":
        hnsw = innermost_index(index)
        if ef_search is not None:
            hnsw.hnsw.efSearch = ef_search
        return {"ef_search": int(hnsw.hnsw.efSearch)}
    return {}


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
) -> LoadedIndex | None:
    """Fetch, verify and deserialise one index directory (blocking; run it in a thread).

    Returns None without reading ``index.faiss`` when the meta's fingerprint equals
    ``skip_fingerprint`` (that exact index is already loaded). Raises ``ServiceError``:
    400 for a bad source, 502 when a URL cannot be fetched, 409 for a dimension or
    fingerprint mismatch, 422 for an unusable artifact.
    """
    started = time.perf_counter()
    client = httpx.Client(timeout=fetch_timeout, follow_redirects=True) if source.kind == "http" else None

    def read(name: str, limit: int) -> bytes | bytearray:
        if client is None:
            return _read_local(source, name, limit)
        return _read_http(client, source, name, limit)

    try:
        meta = parse_meta(read(META_FILENAME, MAX_META_BYTES))
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
        data = read(INDEX_FILENAME, max_index_bytes)
    finally:
        if client is not None:
            client.close()

    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.fingerprint:
        raise ServiceError(
            409,
            f"{source.display_file(INDEX_FILENAME)} has sha256 {actual} but {META_FILENAME} says "
            f"{meta.fingerprint}: a partial copy or files from different builds",
        )
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = source.display_file(INDEX_FILENAME)
        raise ServiceError(422, f"{where} is not a readable FAISS index: {first}") from None
    del data

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
    )


def _search_in_thread(index: Any, x: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    # OpenMP's thread count is per calling thread; a pool thread would otherwise use the
    # process default (every core).
    faiss.omp_set_num_threads(threads)
    return index.search(x, k)


# -------------------------------------------------------------------------- metrics


SEARCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class IndexMetrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.searches = Counter(
            "dayloop_index_search_total", "Search requests answered", ["version"], registry=self.registry
        )
        self.search_vectors = Counter(
            "dayloop_index_search_vectors_total", "Query vectors searched", ["version"], registry=self.registry
        )
        self.errors = Counter(
            "dayloop_index_search_errors_total",
            "Search requests refused or failed",
            ["version", "reason"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "dayloop_index_search_seconds",
            "Time to answer a search request (parse, search, encode)",
            ["version"],
            buckets=SEARCH_BUCKETS,
            registry=self.registry,
        )
        self.loaded = Gauge("dayloop_index_loaded", "1 while the version's index is loaded", ["version"],
                            registry=self.registry)
        self.ntotal = Gauge("dayloop_index_vectors", "Vectors in the loaded index", ["version"],
                            registry=self.registry)
        self.loads = Counter(
            "dayloop_index_loads_total", "Load requests by outcome", ["outcome"], registry=self.registry
        )

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ------------------------------------------------------------------------------ app


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

    def version_label(self, version: int) -> str:
        """Metric label for a requested version: itself if ever loaded, else 'other'."""
        return str(version) if version in self.known_versions else "other"

    def require_admin(self, request: Request) -> None:
        """401 unless the request carries the admin bearer token."""
        if not bearer_matches(request.headers.get("authorization"), self.token):
            raise ServiceError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The request body, or 413 once it passes ``max_body_bytes``."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ServiceError(400, "invalid Content-Length header")
            if int(declared) > limit:
                raise ServiceError(413, f"request body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def load(self, version: int, req: LoadRequest) -> dict[str, Any]:
        """Load ``req.source`` as ``version`` (no-op if that exact index is loaded)."""
        source = parse_source(req.source)
        wanted = req.fingerprint.lower() if req.fingerprint else None
        current = self.indexes.get(version)
        if current is not None and wanted is not None:
            # Answer from what is loaded without touching the source.
            return self._same_or_conflict(current, wanted, req.expected_dim)
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
            )
        # The table may have changed while the thread ran; decide on what is there now.
        now = self.indexes.get(version)
        if loaded is None:
            if now is None or current is None or now.fingerprint != current.fingerprint:
                raise ServiceError(409, f"version {version} changed while loading; retry the request")
            return self._same_or_conflict(now, now.fingerprint, req.expected_dim)
        if now is not None:
            return self._same_or_conflict(now, loaded.fingerprint, req.expected_dim)
        self.indexes[version] = loaded
        self.known_versions.add(version)
        label = str(version)
        self.metrics.loaded.labels(version=label).set(1)
        self.metrics.ntotal.labels(version=label).set(loaded.ntotal)
        self.metrics.loads.labels(outcome="loaded").inc()
        log.info(
            "loaded version %d: %s index, %d x %d, %s, fingerprint %s, from %s in %.2fs",
            version, loaded.kind, loaded.ntotal, loaded.dim, loaded.device,
            loaded.fingerprint[:12], loaded.source, loaded.load_seconds,
        )
        return {"status": "loaded", "index": loaded.info()}

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
        self.metrics.loaded.labels(version=str(version)).set(0)
        self.metrics.ntotal.labels(version=str(version)).set(0)
        log.info("unloaded version %d (fingerprint %s)", version, entry.fingerprint[:12])
        return {"status": "unloaded", "index": entry.info()}

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
        try:
            if entry.device == "cpu" and len(x) * entry.cost_per_query > OFFLOAD_MULTIPLY_ADDS:
                scores, ids = await asyncio.to_thread(_search_in_thread, entry.index, x, req.k, self.threads)
            else:
                # GPU indexes are searched here only: one stream, no concurrent callers.
                scores, ids = entry.index.search(x, req.k)
        except Exception as exc:
            m.errors.labels(version=label, reason="search_failed").inc()
            log.exception("search on version %d failed", req.version)
            raise ServiceError(500, f"search on version {req.version} failed: {exc}") from None
        if not np.isfinite(scores[ids >= 0]).all():
            m.errors.labels(version=label, reason="nonfinite_scores").inc()
            raise ServiceError(422, "search produced non-finite scores: query values are too large")
        out_ids, out_scores = format_results(ids, scores)
        payload = json.dumps({"version": req.version, "ids": out_ids, "scores": out_scores}, separators=(",", ":"))
        m.searches.labels(version=label).inc()
        m.search_vectors.labels(version=label).inc(len(x))
        m.seconds.labels(version=label).observe(time.perf_counter() - started)
        return Response(payload, media_type="application/json")


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def create_app(
    token: str,
    *,
    threads: int = 1,
    use_gpu: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES,
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> FastAPI:
    """The FastAPI app; sets FAISS's OpenMP threads for the calling (event-loop) thread."""
    service = IndexService(
        token,
        threads=threads,
        use_gpu=use_gpu,
        max_body_bytes=max_body_bytes,
        max_index_bytes=max_index_bytes,
        fetch_timeout=fetch_timeout,
    )
    faiss.omp_set_num_threads(threads)
    app = FastAPI(title="Dayloop index service", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "versions": sorted(service.indexes)})

    @app.get("/indexes")
    async def list_indexes() -> JSONResponse:
        return JSONResponse({"indexes": [service.indexes[v].info() for v in sorted(service.indexes)]})

    @app.get("/indexes/{version}")
    async def get_index(version: str) -> JSONResponse:
        v = parse_version(version)
        entry = service.indexes.get(v)
        if entry is None:
            raise ServiceError(404, f"index version {v} is not loaded")
        return JSONResponse(entry.info())

    @app.put("/admin/indexes/{version}")
    async def load_index(version: str, request: Request) -> JSONResponse:
        service.require_admin(request)
        v = parse_version(version)
        req = parse_load_request(await service.read_body(request))
        try:
            result = await service.load(v, req)
        except ServiceError as exc:
            service.metrics.loads.labels(outcome=f"refused_{exc.status}").inc()
            log.warning("refused to load version %d: %s", v, exc.detail)
            raise
        return JSONResponse(result)

    @app.delete("/admin/indexes/{version}")
    async def unload_index(version: str, request: Request) -> JSONResponse:
        service.require_admin(request)
        return JSONResponse(service.unload(parse_version(version)))

    @app.post("/search")
    async def search(request: Request) -> Response:
        return await service.search(request)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
