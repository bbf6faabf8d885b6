"""The index service's one error type, shared by every step from parsing a request to
loading an index."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with its HTTP status; the app turns it into ``{"detail": ...}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
