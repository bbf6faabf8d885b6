"""Request guards shared by the data plane's HTTP services: the admin bearer token and
request-body size limits.

Body limits come in two shapes because the two services read bodies differently:

* ``BodyLimit`` is ASGI middleware for apps whose handlers let FastAPI parse the body (the
  router): it refuses a body over the limit with 413 before any handler or parser sees it.
* ``read_limited_body`` is for handlers that read the raw body themselves (the index
  service's ``/search`` skips FastAPI's body machinery): it raises ``BodyRefused`` so the
  caller can count the refusal and answer in its own error format.

Starlette and FastAPI are not imported here: ``read_limited_body`` only needs an object
with ``headers`` and ``stream()``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

__all__ = [
    "BAD_TOKEN_DETAIL",
    "BEARER_CHALLENGE",
    "BodyLimit",
    "BodyRefused",
    "bearer_matches",
    "read_limited_body",
]

#: The 401 answer's detail and headers, the same from every service.
BAD_TOKEN_DETAIL = "missing or wrong bearer token"
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``Bearer <token>`` (constant-time compare).

    The scheme is case-insensitive and the token may be padded with spaces, as RFC 6750's
    ``"Bearer" 1*SP b64token`` allows."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))


# ------------------------------------------------------------------ raw body reader


class BodyRefused(Exception):
    """A request body refused before it was read whole: 400 (bad Content-Length) or 413."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _StreamingRequest(Protocol):
    @property
    def headers(self) -> Any: ...

    def stream(self) -> AsyncIterator[bytes]: ...


async def read_limited_body(request: _StreamingRequest, limit: int) -> bytes:
    """The request body, or ``BodyRefused`` once it passes ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is read; the
    stream is counted too, since a chunked body declares no length."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyRefused(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise BodyRefused(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyRefused(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ ASGI middleware


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) before anything parses them.

    Paths under ``/admin`` get ``admin_limit``, every other path ``public_limit``; GET and
    HEAD pass untouched."""

    def __init__(self, app: Any, public_limit: int, admin_limit: int) -> None:
        self.app, self.public_limit, self.admin_limit = app, public_limit, admin_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        limit = self.admin_limit if scope["path"].startswith("/admin") else self.public_limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _send_json(send, 413, {"detail": f"request body over {limit} bytes"})
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _send_json(send, 413, {"detail": f"request body over {limit} bytes"})


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
