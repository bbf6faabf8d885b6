"""Request guards shared by the router and the index service: the bearer-token check and
the raw body reader's limits."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.http_guards import BodyLimit, BodyRefused, bearer_matches, read_limited_body


def test_bearer_matches() -> None:
    assert bearer_matches("Bearer tok", "tok")
    assert bearer_matches("bearer  tok ", "tok")
    for header in (None, "", "tok", "Basic tok", "Bearer", "Bearer tok2", "Bearer to"):
        assert not bearer_matches(header, "tok")


class FakeRequest:
    """Just what ``read_limited_body`` reads: headers and a chunk stream."""

    def __init__(self, chunks: list[bytes], content_length: str | None = None) -> None:
        self.headers = {} if content_length is None else {"content-length": content_length}
        self._chunks = chunks

    async def stream(self):
        for chunk in self._chunks:
            yield chunk


def read(request: FakeRequest, limit: int) -> bytes:
    return asyncio.run(read_limited_body(request, limit))


def test_read_limited_body_joins_the_stream_up_to_the_limit() -> None:
    assert read(FakeRequest([b"ab", b"cd"], "4"), 4) == b"abcd"
    assert read(FakeRequest([b"ab", b"cd"]), 4) == b"abcd"  # chunked: no declared length
    assert read(FakeRequest([]), 4) == b""


@pytest.mark.parametrize(
    ("request_", "status", "text"),
    [
        (FakeRequest([b"x"], "abc"), 400, "invalid Content-Length"),
        (FakeRequest([b"x"], "-1"), 400, "invalid Content-Length"),
        (FakeRequest([b"x" * 5], "5"), 413, "is 5 bytes; the limit is 4"),
        (FakeRequest([b"abc", b"de"]), 413, "over the 4-byte limit"),
        (FakeRequest([b"abc", b"de"], "1"), 413, "over the 4-byte limit"),  # the stream counts too
    ],
)
def test_read_limited_body_refusals(request_: FakeRequest, status: int, text: str) -> None:
    with pytest.raises(BodyRefused) as err:
        read(request_, 4)
    assert err.value.status == status and text in err.value.detail


async def echo_size(scope: dict, receive, send) -> None:
    """A bare ASGI app answering with the size of the body it read."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    payload = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


def test_body_limit_middleware_refuses_large_bodies_per_path() -> None:
    httpx = pytest.importorskip("httpx")

    async def post(path: str, body) -> httpx.Response:
        transport = httpx.ASGITransport(app=BodyLimit(echo_size, public_limit=4, admin_limit=8))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=body)

    async def chunks(body: bytes):
        yield body

    ok = asyncio.run(post("/echo", b"abcd"))
    assert ok.status_code == 200 and ok.json() == {"size": 4}
    assert asyncio.run(post("/admin/echo", b"x" * 8)).status_code == 200
    refused = asyncio.run(post("/echo", b"abcde"))
    assert refused.status_code == 413 and refused.json() == {"detail": "request body over 4 bytes"}
    assert asyncio.run(post("/admin/echo", b"x" * 9)).status_code == 413
    assert asyncio.run(post("/echo", chunks(b"abcde"))).status_code == 413  # no Content-Length
