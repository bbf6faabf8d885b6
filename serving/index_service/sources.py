"""Where an index directory is fetched from: a local directory (a path or ``file://`` URI)
or an HTTP(S) base URL, read under a size cap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import httpx

from serving.index_service.errors import ServiceError


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
        return _file_source(text, parts)
    if scheme in ("http", "https"):
        return _http_source(text, scheme, parts)
    if not scheme:
        raise ServiceError(400, f"source must be an absolute directory path or a URL, got {text!r}")
    raise ServiceError(
        400,
        f"unsupported source scheme {parts.scheme!r}: use a directory path, file:// or http(s):// "
        "(an mlflow-artifacts: URI must first be resolved to the tracking server's "
        "/api/2.0/mlflow-artifacts/artifacts/ URL)",
    )


def _file_source(text: str, parts: SplitResult) -> Source:
    if parts.netloc not in ("", "localhost"):
        raise ServiceError(400, f"file:// source must be on this host, got host {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise ServiceError(400, "file:// source must not have a query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ServiceError(400, f"file:// source needs an absolute path, got {text!r}")
    return Source("local", str(Path(path)), str(Path(path)))


def _http_source(text: str, scheme: str, parts: SplitResult) -> Source:
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


def read_local(source: Source, name: str, limit: int) -> bytes:
    """``name`` from a local source directory; 400 if absent or unreadable, 422 over ``limit``."""
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


def read_http(client: httpx.Client, source: Source, name: str, limit: int) -> bytes | bytearray:
    """``name`` under an HTTP(S) source; 502 if it cannot be fetched, 422 over ``limit``."""
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
