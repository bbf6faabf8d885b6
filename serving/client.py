"""What the control plane calls: the data plane's admin surface in one place.

* :class:`TritonAdmin` - load/unload a user tower version (repository API, tritonclient);
* :class:`IndexServiceClient` - load/unload/search a version's FAISS index;
* :class:`RouterAdmin` - read/write the route table with its revision, history, faults;
* :class:`DataPlaneClient` - the three together, from ``plane.json`` or the environment.

Lightweight imports only (stdlib, httpx, numpy); tritonclient is imported inside calls.
Never imports ``dayloop``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from serving.index_service.client import IndexServiceClient, IndexServiceError
from serving.route_store import Revision
from serving.routing import RouteTable, canary_table, single_version_table
from serving.triton.client import TritonAdmin, TritonAdminError

__all__ = [
    "DataPlaneClient", "IndexServiceClient", "IndexServiceError", "Revision", "RouteConflict", "RouterAdmin",
    "RouterAdminError", "RouteTable", "TritonAdmin", "TritonAdminError", "canary_table", "plane_file_path",
    "single_version_table",
]

PLANE_FILE_ENV = "DAYLOOP_PLANE_FILE"


def plane_file_path() -> Path:
    """Where the running data plane is described: ``$DAYLOOP_PLANE_FILE``, else
    ``$DAYLOOP_SERVING_HOME/plane.json``, else ``$DAYLOOP_VAR/serving/plane.json`` (default
    ``var/`` in the checkout). The launcher writes it; every client finds the plane by it."""
    path = os.environ.get(PLANE_FILE_ENV)
    if path:
        return Path(path)
    home = os.environ.get("DAYLOOP_SERVING_HOME") or os.path.join(
        os.environ.get("DAYLOOP_VAR", str(Path(__file__).resolve().parents[1] / "var")), "serving")
    return Path(home) / "plane.json"


class RouterAdminError(RuntimeError):
    """The router refused an admin call (status and detail kept)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"router answered {status}: {detail}")
        self.status = status
        self.detail = detail


class RouteConflict(RouterAdminError):
    """409: stale revision or a table naming versions that cannot serve."""


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 300:
        return
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = resp.text[:500]
    cls = RouteConflict if resp.status_code == 409 else RouterAdminError
    raise cls(resp.status_code, detail)


class RouterAdmin:
    """Admin calls on the router replicas (they share one route store)."""

    def __init__(self, urls: list[str], token: str, timeout: float = 30.0) -> None:
        if not urls:
            raise ValueError("at least one router URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    def _call(self, method: str, path: str, url: str | None = None, **kw: Any) -> Any:
        resp = httpx.request(method, (url or self.urls[0]) + path, headers=self._headers,
                             timeout=self.timeout, **kw)
        _raise_for(resp)
        return resp.json()

    def routes(self) -> Revision | None:
        """The route store's latest revision, or None before the first table was written."""
        out = self._call("GET", "/admin/routes")
        return Revision.from_dict(out) if out.get("table") else None

    def write_routes(self, table: RouteTable | dict[str, Any], expected_revision: int, actor: str,
                     reason: str) -> Revision:
        """Compare-and-swap write; raises :class:`RouteConflict` on a stale revision or bad pairing."""
        body = table.as_dict() if isinstance(table, RouteTable) else table
        return Revision.from_dict(self._call("PUT", "/admin/routes", json={
            "expected_revision": expected_revision, "table": body, "actor": actor, "reason": reason}))

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", "/admin/routes/history", params={"limit": limit})["revisions"]

    def applied_revisions(self) -> dict[str, int]:
        """Revision each replica is applying now."""
        out = {}
        for url in self.urls:
            out[url] = int(httpx.get(url + "/health", timeout=self.timeout).json().get("revision", 0))
        return out

    def wait_applied(self, revision: int, timeout_s: float = 5.0, poll_s: float = 0.1) -> bool:
        """Wait (bounded) until every replica applies ``revision`` or a later one; False on
        timeout. A replica briefly unreachable is waited for, not an error."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                applied = self.applied_revisions()
                if applied and all(r >= revision for r in applied.values()):
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def probe(self, version: int) -> dict[str, Any]:
        """Does ``version`` truly serve, from every replica (a real embed + search each)?
        ``{"serving": bool, "problems": [...], "replicas": {url: report}}``; an unreachable
        replica is a problem."""
        reports: dict[str, Any] = {}
        problems: list[str] = []
        for url in self.urls:
            try:
                rep = self._call("GET", f"/admin/versions/{int(version)}/probe", url=url)
            except (httpx.HTTPError, RouterAdminError) as exc:
                rep = {"serving": False, "problems": [f"{url} unreachable or refused: {exc}"]}
            reports[url] = rep
            problems += [f"{url}: {p}" for p in rep.get("problems", [])]
        return {"version": int(version), "serving": not problems, "problems": problems, "replicas": reports}

    def breakers(self) -> dict[str, Any]:
        """Each replica's circuit breakers, trips and fallback lists (``GET /admin/breakers``);
        an unreachable replica maps to None."""
        out: dict[str, Any] = {}
        for url in self.urls:
            try:
                out[url] = self._call("GET", "/admin/breakers", url=url)
            except (httpx.HTTPError, RouterAdminError):
                out[url] = None
        return out

    def set_fault(self, version: int, latency_ms: float = 0.0, error_rate: float = 0.0,
                  nan_rate: float = 0.0) -> None:
        """Inject a fault for one version on every replica (needs fault injection enabled)."""
        for url in self.urls:
            self._call("PUT", "/admin/faults", url=url, json={
                "version": version, "latency_ms": latency_ms, "error_rate": error_rate, "nan_rate": nan_rate})

    def clear_faults(self) -> None:
        for url in self.urls:
            self._call("DELETE", "/admin/faults", url=url)


class DataPlaneClient:
    """Triton + index service + router admin for one data plane."""

    def __init__(self, endpoints: dict[str, Any], token: str) -> None:
        self.endpoints = endpoints
        self.triton = TritonAdmin(endpoints["triton_http"], endpoints["triton_repository"],
                                  endpoints.get("triton_staging"), kind=endpoints.get("triton_kind", "cpu"))
        self.index = IndexServiceClient(endpoints["index_url"], token=token)
        self.router = RouterAdmin(list(endpoints["router_urls"]), token)

    @classmethod
    def from_plane_file(cls, path: Path | str) -> DataPlaneClient:
        endpoints = json.loads(Path(path).read_text())
        token = Path(endpoints["token_file"]).read_text().strip()
        return cls(endpoints, token)

    @classmethod
    def from_env(cls) -> DataPlaneClient:
        """The data plane described at :func:`plane_file_path`; FileNotFoundError when none is."""
        path = plane_file_path()
        if not path.is_file():
            raise FileNotFoundError(f"no data plane description at {path}: start the data plane (make serve) "
                                    f"or set {PLANE_FILE_ENV}")
        return cls.from_plane_file(path)

    def health(self) -> dict[str, Any]:
        """Per component: True when it answers its health check."""
        out: dict[str, Any] = {"triton": self.triton.is_live()}
        try:
            out["index_service"] = bool(self.index.health())
        except Exception:  # noqa: BLE001
            out["index_service"] = False
        for url in self.router.urls:
            try:
                out[url] = httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                out[url] = False
        return out

    def load_version(self, version: int, model_file: Path | str, index_source: str, expected_dim: int,
                     fingerprint: str | None = None) -> dict[str, Any]:
        """Load a version's model into Triton and its paired index into the index service.

        If the index refuses to load, the model is unloaded again: a version is servable as a
        pair or not at all.
        """
        triton = self.triton.load_version(version, model_file)
        try:
            index = self.index.load_index(version, index_source, expected_dim, fingerprint)
        except BaseException:
            if triton.get("loaded"):
                self.triton.unload_version(version)
            raise
        return {"version": version, "triton": triton, "index": index}

    def unload_version(self, version: int) -> dict[str, Any]:
        """Unload both halves of a version. The route table must no longer name it."""
        current = self.router.routes()
        if current is not None and version in current.table.versions:
            raise RouteConflict(409, f"version {version} is still in the route table (revision "
                                     f"{current.revision}); route it away first")
        out: dict[str, Any] = {"version": version}
        try:
            out["index"] = self.index.unload_index(version)
        except IndexServiceError as exc:
            if exc.status != 404:
                raise
            out["index"] = "not loaded"
        out["triton"] = self.triton.unload_version(version)
        return out
