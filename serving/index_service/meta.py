"""``index_meta.json``, as the index stage writes it beside ``index.faiss``: the parts the
service relies on, checked before the index file is fetched.

An optional ``seen_items`` object names the seen-items file beside the index
(:mod:`serving.index_service.seen`) with its sha256 and the last day its history
includes; an index directory from before that file has none and still loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from serving.index_service.errors import ServiceError
from serving.index_service.seen import SEEN_FILE, SeenFormatError, check_last_day

INDEX_FILENAME = "index.faiss"
META_FILENAME = "index_meta.json"
MAX_META_BYTES = 1 << 20

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexMeta:
    """The parts of ``index_meta.json`` the service relies on."""

    dim: int
    fingerprint: str
    kind: IndexKind
    nprobe: int | None  # None: keep what the index file carries
    ef_search: int | None
    n_items: int | None
    seen: SeenMeta | None = None  # None: the directory has no seen-items file


@dataclass(frozen=True)
class SeenMeta:
    """``index_meta.json``'s ``seen_items``: the seen-items file the index was built with."""

    fingerprint: str  # sha256 of the file's bytes
    last_day: str  # ISO date: the last day the history includes


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
    seen = _parse_seen_meta(data.get("seen_items"))
    return IndexMeta(dim, fingerprint.lower(), kind, nprobe, ef_search, n_items, seen)


def _parse_seen_meta(value: Any) -> SeenMeta | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ServiceError(422, "index_meta.json seen_items must be an object")
    if value.get("file", SEEN_FILE) != SEEN_FILE:
        raise ServiceError(422, f"index_meta.json seen_items.file must be {SEEN_FILE!r}, got {value.get('file')!r}")
    fingerprint = value.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not _is_hex(fingerprint):
        raise ServiceError(422, "index_meta.json seen_items.fingerprint must be a 64-character sha256 hex string")
    try:
        last_day = check_last_day(value.get("last_day"))
    except SeenFormatError as exc:
        raise ServiceError(422, f"index_meta.json seen_items.{exc}") from None
    return SeenMeta(fingerprint.lower(), last_day)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
