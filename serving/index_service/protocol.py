"""The index service's request bodies and answers: validation straight from bytes with
pydantic-core, URL version segments, query vectors as arrays, results as JSON-ready rows."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.index_service.errors import ServiceError

MAX_VERSION = 10**9
MAX_K = 1000
MAX_VECTORS = 256
MAX_DIM = 65_536
MAX_USER_ID = 2**63 - 1

Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_DIM)]


class SearchRequest(BaseModel):
    """Body of ``POST /search``."""

    # Strict: "5" is not an int and true is not a number; the clients send real JSON
    # types. Unknown keys are ignored so a client may add fields before the service knows them.
    model_config = ConfigDict(strict=True, frozen=True)

    version: int = Field(ge=1, le=MAX_VERSION)
    vectors: list[Vector] = Field(min_length=1, max_length=MAX_VECTORS)
    k: int = Field(ge=1, le=MAX_K)
    # Optional, one per vector: the users whose seen items are dropped from their row.
    user_ids: list[Annotated[int, Field(ge=0, le=MAX_USER_ID)]] | None = Field(default=None, max_length=MAX_VECTORS)

    @model_validator(mode="after")
    def _user_ids_align(self) -> SearchRequest:
        if self.user_ids is not None and len(self.user_ids) != len(self.vectors):
            raise ValueError(
                f"user_ids has {len(self.user_ids)} entries but vectors has {len(self.vectors)}; "
                "give one user id per vector"
            )
        return self


class LoadRequest(BaseModel):
    """Body of ``PUT /admin/indexes/{version}``."""

    # Unknown keys are refused: a misspelt "fingerprint" must not silently skip the check.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    source: str = Field(min_length=1, max_length=4096)
    expected_dim: int = Field(ge=1, le=MAX_DIM)
    fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class SeenUpdateRequest(BaseModel):
    """Body of ``PUT /admin/indexes/{version}/seen``: the seen-items file to use from now on."""

    # As strict as a load: the fingerprint is required (an unverified history is never
    # swapped in) and a misspelt "allow_older" must not silently mean False.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    source: str = Field(min_length=1, max_length=4096)  # the file, or the directory holding it
    fingerprint: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    allow_older: bool = False


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


def parse_seen_update_request(body: bytes) -> SeenUpdateRequest:
    """Validate a seen-update body; 422 with the offending fields when it is wrong."""
    try:
        return SeenUpdateRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ServiceError(422, f"invalid seen update request: {describe_validation_error(exc)}") from None


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
        [row[keep].tolist() for row, keep in zip(ids, valid, strict=True)],
        [row[keep].tolist() for row, keep in zip(scores, valid, strict=True)],
    )
