"""Clients for the index service: a synchronous one for the control plane, an async one for
the router. Stdlib, httpx and numpy only, so the control plane can import this without
FAISS, FastAPI or torch.

Every failure comes out as ``IndexServiceError``: ``status`` is the HTTP status the service
answered, or None when it could not be reached (connection refused, timeout).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

#: Loading an index may fetch and hash a large file; give it longer than a search.
DEFAULT_LOAD_TIMEOUT = 300.0


class IndexServiceError(Exception):
    """The index service refused a request (``status``) or could not be reached (None)."""

    def __init__(self, status: int | None, detail: str) -> None:
        self.status = status
        self.detail = detail
        where = f"HTTP {status}" if status is not None else "unreachable"
        super().__init__(f"index service {where}: {detail}")


@dataclass(frozen=True)
class SearchResult:
    """Neighbours per query row; rows are shorter than k when the index holds fewer items.

    ``seen_last_day``: with ``user_ids``, the last day of the history whose items were
    dropped, or None when the index has no seen-items file (rows unfiltered)."""

    version: int
    ids: list[list[int]]
    scores: list[list[float]]
    seen_last_day: str | None = None


@dataclass(frozen=True)
class Neighbours:
    """Neighbours of one query vector (``seen_last_day`` as in ``SearchResult``)."""

    version: int
    ids: list[int]
    scores: list[float]
    seen_last_day: str | None = None


def _as_rows(vectors: Any) -> list[list[float]]:
    """Query vectors (one vector or a [n, dim] batch) as JSON-ready rows; ValueError if unusable."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"vectors must be one vector or a non-empty [n, dim] batch, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    return x.tolist()


def _version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    return int(version)


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:500]


def _checked(resp: httpx.Response) -> Any:
    if not resp.is_success:
        raise IndexServiceError(resp.status_code, _detail(resp))
    try:
        return resp.json()
    except ValueError:
        raise IndexServiceError(resp.status_code, f"answer is not JSON: {resp.text[:200]!r}") from None


def _unreachable(base_url: str, exc: httpx.HTTPError) -> IndexServiceError:
    return IndexServiceError(None, f"cannot reach {base_url}: {type(exc).__name__}: {exc}")


def _user_ids(user_ids: Sequence[int] | np.ndarray | None, n_rows: int) -> list[int] | None:
    """``user_ids`` as JSON-ready ints, one per query row; ValueError if unusable."""
    if user_ids is None:
        return None
    out = []
    for u in user_ids:
        if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 0:
            raise ValueError(f"user ids must be non-negative ints, got {u!r}")
        out.append(int(u))
    if len(out) != n_rows:
        raise ValueError(f"{len(out)} user ids for {n_rows} query vectors: give one per vector")
    return out


def _search_body(version: int, rows: list[list[float]], k: int, user_ids: list[int] | None = None) -> bytes:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    body: dict[str, Any] = {"version": version, "vectors": rows, "k": int(k)}
    if user_ids is not None:
        body["user_ids"] = user_ids
    return json.dumps(body, separators=(",", ":")).encode()


def _search_result(data: Any, version: int) -> SearchResult:
    try:
        return SearchResult(int(data["version"]), data["ids"], data["scores"], data.get("seen_last_day"))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise IndexServiceError(200, f"unexpected search answer for version {version}: {str(data)[:200]}") from None


_JSON = {"content-type": "application/json"}


class IndexServiceClient:
    """Blocking client (control plane, tests). Reuses one keep-alive connection pool."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 5.0,
        *,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._load_timeout = load_timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> IndexServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _admin_headers(self) -> dict[str, str]:
        # Without a token the request still goes out: the service's 401 is the clear answer.
        return {"authorization": f"Bearer {self._token}"} if self._token else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        return _checked(resp)

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "versions": [...]}``."""
        return self._request("GET", "/health")

    def list_indexes(self) -> list[dict[str, Any]]:
        """Info of every loaded index, by version."""
        return self._request("GET", "/indexes")["indexes"]

    def get_index(self, version: int) -> dict[str, Any]:
        """Info of one loaded index (IndexServiceError 404 when it is not loaded)."""
        return self._request("GET", f"/indexes/{_version(version)}")

    def load_index(
        self,
        version: int,
        source: str,
        expected_dim: int,
        fingerprint: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Load the index directory ``source`` as ``version``; ``{"status", "index"}``."""
        body = {"source": str(source), "expected_dim": int(expected_dim), "fingerprint": fingerprint}
        return self._request(
            "PUT",
            f"/admin/indexes/{_version(version)}",
            json=body,
            headers=self._admin_headers(),
            timeout=timeout if timeout is not None else self._load_timeout,
        )

    def unload_index(self, version: int) -> dict[str, Any]:
        """Unload ``version`` (IndexServiceError 404 when it is not loaded)."""
        return self._request("DELETE", f"/admin/indexes/{_version(version)}", headers=self._admin_headers())

    def update_seen(
        self,
        version: int,
        source: str,
        fingerprint: str,
        *,
        allow_older: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Make the loaded ``version`` exclude the seen-items file ``source`` names (the file
        or its index directory; sha256 ``fingerprint``); ``{"status": "updated" | "unchanged",
        "index"}``. IndexServiceError 404 not loaded, 409 another file or an older history
        (unless ``allow_older``), 422 not a seen-items file; the old table stays then."""
        body = {"source": str(source), "fingerprint": fingerprint, "allow_older": bool(allow_older)}
        return self._request(
            "PUT",
            f"/admin/indexes/{_version(version)}/seen",
            json=body,
            headers=self._admin_headers(),
            timeout=timeout if timeout is not None else self._load_timeout,
        )

    def search(
        self, version: int, vectors: Any, k: int, user_ids: Sequence[int] | np.ndarray | None = None
    ) -> SearchResult:
        """Top-k item ids and scores for each query vector (one vector or a batch); with
        ``user_ids`` (one per vector) each row leaves out the items its user had seen."""
        v = _version(version)
        rows = _as_rows(vectors)
        body = _search_body(v, rows, k, _user_ids(user_ids, len(rows)))
        return _search_result(self._request("POST", "/search", content=body, headers=_JSON), v)

    def metrics_text(self) -> str:
        """The raw ``/metrics`` exposition."""
        try:
            resp = self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if not resp.is_success:
            raise IndexServiceError(resp.status_code, _detail(resp))
        return resp.text


class AsyncIndexServiceClient:
    """Async client for the router: one ``httpx.AsyncClient`` kept open (keep-alive)."""

    def __init__(self, base_url: str, timeout: float = 5.0, *, max_connections: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncIndexServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> Any:
        try:
            resp = await self._http.request(
                method, path, timeout=timeout if timeout is not None else self._timeout, **kwargs
            )
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        return _checked(resp)

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok", "versions": [...]}``."""
        return await self._request("GET", "/health")

    async def list_indexes(self) -> list[dict[str, Any]]:
        """Info of every loaded index."""
        return (await self._request("GET", "/indexes"))["indexes"]

    async def search(
        self, version: int, vector: Any, k: int, timeout: float | None = None, user_id: int | None = None
    ) -> Neighbours:
        """Top-k neighbours of ONE vector (the router's per-request call); with ``user_id``
        without the items that user had seen."""
        v = _version(version)
        rows = _as_rows(vector)
        if len(rows) != 1:
            raise ValueError(f"search takes one vector, got {len(rows)}; use search_batch")
        body = _search_body(v, rows, k, _user_ids(None if user_id is None else [user_id], 1))
        data = await self._request("POST", "/search", timeout, content=body, headers=_JSON)
        result = _search_result(data, v)
        return Neighbours(result.version, result.ids[0], result.scores[0], result.seen_last_day)

    async def search_batch(
        self,
        version: int,
        vectors: Sequence[Sequence[float]] | np.ndarray,
        k: int,
        timeout: float | None = None,
        user_ids: Sequence[int] | np.ndarray | None = None,
    ) -> SearchResult:
        """Top-k neighbours of several vectors in one request (``user_ids`` as in ``search``)."""
        v = _version(version)
        rows = _as_rows(vectors)
        body = _search_body(v, rows, k, _user_ids(user_ids, len(rows)))
        return _search_result(await self._request("POST", "/search", timeout, content=body, headers=_JSON), v)


__all__ = [
    "AsyncIndexServiceClient",
    "IndexServiceClient",
    "IndexServiceError",
    "Neighbours",
    "SearchResult",
]
