"""The FAISS index service's FastAPI app: one in-memory FAISS index per model version,
searched over HTTP.

The control plane loads an index directory (``index.faiss`` + ``index_meta.json``, as the
index stage writes it) under the model version it belongs to; the router searches it with
the user embedding Triton returned. The routes here only translate HTTP to
:class:`~serving.index_service.service.IndexService` calls and errors to
``{"detail": ...}``; the design points are in :mod:`serving.index_service.service`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

import faiss
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from serving.index_service.errors import ServiceError
from serving.index_service.loading import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_INDEX_BYTES
from serving.index_service.protocol import parse_load_request, parse_seen_update_request, parse_version
from serving.index_service.service import DEFAULT_MAX_BODY_BYTES, IndexService

log = logging.getLogger("serving.index_service")


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
    state_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The FastAPI app; sets FAISS's OpenMP threads for the calling (event-loop) thread.

    With ``state_dir`` the service keeps a local copy of every version it loads and, on
    start, restores the versions it held (``/ready`` answers 503 until that is done)."""
    service = IndexService(
        token,
        threads=threads,
        use_gpu=use_gpu,
        max_body_bytes=max_body_bytes,
        max_index_bytes=max_index_bytes,
        fetch_timeout=fetch_timeout,
        state_dir=state_dir,
    )
    faiss.omp_set_num_threads(threads)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(service.restore())  # /health answers while it runs
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="Dayloop index service", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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


def _add_routes(app: FastAPI, service: IndexService) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", **service.readiness()})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = service.readiness()
        if not service.ready:
            done = len(service.restored) + len(service.restore_failed)
            return JSONResponse({"detail": f"restoring local copies: {done} of {service.restore_total} done",
                                 **body}, status_code=503)
        return JSONResponse(body)

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

    @app.put("/admin/indexes/{version}/seen")
    async def update_seen(version: str, request: Request) -> JSONResponse:
        service.require_admin(request)
        v = parse_version(version)
        req = parse_seen_update_request(await service.read_body(request))
        try:
            result = await service.update_seen(v, req)
        except ServiceError as exc:
            service.metrics.seen_updates.labels(outcome=f"refused_{exc.status}").inc()
            log.warning("refused to replace the seen items of version %d: %s", v, exc.detail)
            raise
        return JSONResponse(result)

    @app.get("/admin/indexes/{version}/seen")
    async def seen_file(version: str, request: Request) -> Response:
        service.require_admin(request)
        data, sha = service.seen_bytes(parse_version(version))
        return Response(data, media_type="application/octet-stream", headers={"X-Seen-Sha256": sha})

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
