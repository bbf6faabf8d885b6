"""The seen-items file: which items each user had interacted with when an index was built.

The index stage writes it beside ``index.faiss`` (``dayloop.pipeline.rebuild_index``); the
index service reads it with the index and drops those items from a user's results, so the
served list holds what the offline evaluation ranks: items the user has not seen. Both
planes use this module (numpy and the standard library only), so the format has one home.

A plain ``.npz`` (no pickle), CSR by user:

* ``user_ids``  int64[n]    sorted, unique, >= 0
* ``offsets``   int64[n+1]  user ``user_ids[i]`` saw ``items[offsets[i]:offsets[i+1]]``
* ``items``     int64[m]    item ids >= 0, sorted and unique within each user
* ``last_day``  0-d unicode the last day (ISO date) the history includes
* ``format``    0-d int64   ``FORMAT_VERSION``
"""

from __future__ import annotations

import datetime as dt
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.fileio import atomic_write_bytes

#: The file name inside an index directory.
SEEN_FILE = "seen_items.npz"
FORMAT_VERSION = 1
_KEYS = ("user_ids", "offsets", "items", "last_day", "format")


class SeenFormatError(ValueError):
    """Arrays or a file that are not a well-formed seen-items table."""


def _file_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path / SEEN_FILE`` when ``path`` is a directory."""
    p = Path(path)
    return p / SEEN_FILE if p.is_dir() else p


def check_last_day(last_day: str) -> str:
    """``last_day`` when it is an ISO date ``YYYY-MM-DD``; SeenFormatError otherwise."""
    try:
        parsed = dt.date.fromisoformat(last_day) if isinstance(last_day, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.isoformat() != last_day:
        raise SeenFormatError(f"last_day must be an ISO date YYYY-MM-DD, got {last_day!r}")
    return last_day


def _int_array(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise SeenFormatError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise SeenFormatError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_csr(user_ids: object, offsets: object, items: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays as int64 once their layout is checked (SeenFormatError names the flaw)."""
    users = _int_array("user_ids", user_ids)
    ptr = _int_array("offsets", offsets)
    its = _int_array("items", items)
    if users.size and (users[0] < 0 or (np.diff(users) <= 0).any()):
        raise SeenFormatError("user_ids must be >= 0, sorted and unique")
    if ptr.size != users.size + 1 or ptr[0] != 0 or ptr[-1] != its.size or (np.diff(ptr) < 0).any():
        raise SeenFormatError(
            f"offsets must have len(user_ids) + 1 = {users.size + 1} non-decreasing entries from 0 to "
            f"len(items) = {its.size}, got {ptr.size} entries"
        )
    if its.size and its.min() < 0:
        raise SeenFormatError("items must be >= 0")
    # Inside each user's run the ids must strictly increase; a run's first id may be anything.
    run_start = np.zeros(its.size, dtype=bool)
    run_start[ptr[:-1][ptr[:-1] < its.size]] = True
    if its.size > 1 and not ((np.diff(its) > 0) | run_start[1:]).all():
        raise SeenFormatError("each user's items must be sorted and unique")
    return users, ptr, its


def csr_from_pairs(user_ids: object, item_ids: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_ids, offsets, items) of the distinct (user, item) pairs given as two aligned arrays."""
    users = _int_array("user_ids", user_ids)
    its = _int_array("item_ids", item_ids)
    if users.size != its.size:
        raise SeenFormatError(f"user_ids and item_ids differ in length: {users.size} vs {its.size}")
    if users.size and (users.min() < 0 or its.min() < 0):
        raise SeenFormatError("user and item ids must be >= 0")
    order = np.lexsort((its, users))
    users, its = users[order], its[order]
    keep = np.ones(users.size, dtype=bool)
    keep[1:] = (users[1:] != users[:-1]) | (its[1:] != its[:-1])
    users, its = users[keep], its[keep]
    uniq, counts = np.unique(users, return_counts=True)
    offsets = np.zeros(uniq.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return uniq.astype(np.int64), offsets, its.astype(np.int64)


@dataclass(frozen=True, eq=False)
class SeenItems:
    """A loaded seen-items table (arrays read-only)."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    last_day: str

    @property
    def n_users(self) -> int:
        """Users with a history."""
        return int(self.user_ids.size)

    @property
    def n_pairs(self) -> int:
        """(user, item) pairs in all."""
        return int(self.items.size)

    def _row(self, user_id: int) -> int:
        i = int(np.searchsorted(self.user_ids, user_id))
        return i if i < self.user_ids.size and self.user_ids[i] == user_id else -1

    def items_for(self, user_id: int) -> np.ndarray:
        """The user's seen item ids, sorted; empty for a user without history."""
        i = self._row(user_id)
        if i < 0:
            return self.items[:0]
        return self.items[self.offsets[i]:self.offsets[i + 1]]

    def counts_for(self, user_ids: object) -> np.ndarray:
        """Seen-item counts of several users (0 for an unknown one), int64."""
        u = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if not self.user_ids.size:
            return np.zeros(u.size, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.user_ids, u), self.user_ids.size - 1)
        counts = self.offsets[rows + 1] - self.offsets[rows]
        return np.where(self.user_ids[rows] == u, counts, 0).astype(np.int64)


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def encode_seen(user_ids: object, offsets: object, items: object, last_day: str) -> bytes:
    """The file's bytes for a checked table (what ``write_seen_file`` writes)."""
    users, ptr, its = check_csr(user_ids, offsets, items)
    buf = io.BytesIO()  # a file object keeps np.savez from appending ".npz"
    np.savez(buf, user_ids=users, offsets=ptr, items=its, last_day=np.array(check_last_day(last_day)),
             format=np.array(FORMAT_VERSION, dtype=np.int64))
    return buf.getvalue()


def write_seen_file(path: str | os.PathLike[str], user_ids: object, offsets: object, items: object,
                    last_day: str) -> Path:
    """Write the table atomically to ``path`` (a directory: ``path / SEEN_FILE``); returns the file.

    SeenFormatError, and nothing written, when the arrays or ``last_day`` are malformed."""
    return atomic_write_bytes(_file_path(path), encode_seen(user_ids, offsets, items, last_day))


def parse_seen(data: bytes | bytearray, where: str = SEEN_FILE) -> SeenItems:
    """A table from a file's bytes; SeenFormatError when they are not a seen-items file."""
    try:
        npz = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SeenFormatError(f"{where} is not a readable .npz file: {exc}") from None
    with npz:
        missing = [k for k in _KEYS if k not in npz.files]
        if missing:
            raise SeenFormatError(f"{where} is not a seen-items file: missing {missing}")
        try:
            fmt, last_day = int(npz["format"][()]), str(npz["last_day"][()])
            raw = (npz["user_ids"], npz["offsets"], npz["items"])
        except (TypeError, ValueError) as exc:  # e.g. an object array, refused without pickle
            raise SeenFormatError(f"{where} holds unreadable arrays: {exc}") from None
    if fmt != FORMAT_VERSION:
        raise SeenFormatError(f"{where} has format {fmt}; this reader knows {FORMAT_VERSION}")
    try:
        users, ptr, its = check_csr(*raw)
        check_last_day(last_day)
    except SeenFormatError as exc:
        raise SeenFormatError(f"{where}: {exc}") from None
    users, ptr, its = users.copy(), ptr.copy(), its.copy()  # own, contiguous, int64
    _readonly(users, ptr, its)
    return SeenItems(users, ptr, its, last_day)


def read_seen_file(path: str | os.PathLike[str]) -> SeenItems:
    """Read a seen-items file (``path`` or ``path / SEEN_FILE`` for a directory).

    OSError when it cannot be read; SeenFormatError when it is not a seen-items file."""
    file = _file_path(path)
    return parse_seen(file.read_bytes(), str(file))


__all__ = [
    "FORMAT_VERSION",
    "SEEN_FILE",
    "SeenFormatError",
    "SeenItems",
    "check_csr",
    "check_last_day",
    "csr_from_pairs",
    "encode_seen",
    "parse_seen",
    "read_seen_file",
    "write_seen_file",
]
