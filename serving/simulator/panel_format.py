"""The panel file: who the simulated users are and which items each one truly likes.

The control plane writes it (``dayloop.simulation.panel`` builds the panel, then calls
``write_panel_file``); the simulator reads it with ``load_panel``. A plain ``.npz``, no
pickle, so this side needs numpy alone:

* ``user_ids``   int64[n]     sorted, unique
* ``rel_indptr`` int64[n+1]   CSR row pointers: user ``i`` likes ``rel_items[indptr[i]:indptr[i+1]]``
* ``rel_items``  int64[m]     item ids, sorted and unique within each user
* ``meta_json``  0-d unicode  JSON object saying how the panel was made (plus ``"format"``)
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.fileio import atomic_write_bytes

PANEL_KEYS = ("user_ids", "rel_indptr", "rel_items", "meta_json")
FORMAT_VERSION = 1


class PanelFormatError(ValueError):
    """A readable ``.npz`` that is not a well-formed panel."""


@dataclass(frozen=True)
class PanelArrays:
    """A panel file's arrays as stored (users and their relevant items in CSR form)."""

    user_ids: np.ndarray  # int64[n]
    indptr: np.ndarray  # int64[n+1]
    items: np.ndarray  # int64[m]
    meta: Any  # the parsed meta_json: an object when the control plane wrote it

    def rows(self) -> list[np.ndarray]:
        """Each user's relevant items, aligned with ``user_ids``."""
        return [self.items[self.indptr[i]:self.indptr[i + 1]] for i in range(self.user_ids.size)]


def write_panel_file(path: Path | str, user_ids: np.ndarray, relevant: Sequence[np.ndarray],
                     meta: dict[str, Any]) -> Path:
    """Write a panel atomically; returns the path (no ``.npz`` is appended to it).

    ``user_ids`` must already be sorted and unique, each ``relevant[i]`` sorted and unique:
    the caller normalises (``dayloop.simulation.panel.make_panel``), this only stores."""
    path = Path(path)
    sizes = np.array([r.size for r in relevant], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = (np.concatenate(relevant) if len(relevant) else np.zeros(0)).astype(np.int64)
    meta_doc = {**meta, "format": FORMAT_VERSION}
    buf = io.BytesIO()  # a file object keeps np.savez from appending ".npz"
    np.savez(buf, user_ids=np.asarray(user_ids, dtype=np.int64), rel_indptr=indptr, rel_items=items,
             meta_json=np.array(json.dumps(meta_doc, sort_keys=True)))
    # A reader sees the old panel or the new one, never half a file.
    return atomic_write_bytes(path, buf.getvalue())


def read_panel_file(path: Path | str) -> PanelArrays:
    """The arrays of a panel file, their CSR layout checked.

    numpy's own error (OSError, ValueError) when the file cannot be opened as an ``.npz``;
    ``PanelFormatError`` when it opens but is not a panel. Users are not checked here:
    each reader says what it needs of them."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = [k for k in PANEL_KEYS if k not in data.files]
        if missing:
            raise PanelFormatError(f"{path} is not a panel file: missing {missing}")
        users = np.asarray(data["user_ids"], dtype=np.int64)
        indptr = np.asarray(data["rel_indptr"], dtype=np.int64)
        items = np.asarray(data["rel_items"], dtype=np.int64)
        try:
            meta = json.loads(str(data["meta_json"][()]))
        except ValueError as exc:
            raise PanelFormatError(f"{path}: meta_json is not JSON: {exc}") from exc
    if indptr.shape != (users.size + 1,) or indptr[0] != 0 or indptr[-1] != items.size \
            or np.any(np.diff(indptr) < 0):
        raise PanelFormatError(f"{path}: rel_indptr does not describe rel_items for {users.size} users")
    return PanelArrays(user_ids=users, indptr=indptr, items=items, meta=meta)


@dataclass(frozen=True)
class SimPanel:
    """Panel users and, per user, the set of item ids they truly like."""

    user_ids: np.ndarray
    relevant: dict[int, frozenset[int]]
    meta: dict[str, Any]

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)


def load_panel(path: Path | str) -> SimPanel:
    """Read a panel ``.npz`` for the simulator; ValueError if unreadable or malformed."""
    try:
        arrays = read_panel_file(path)
    except PanelFormatError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read panel {path}: {exc}") from exc
    users = arrays.user_ids
    if users.ndim != 1 or users.size == 0:
        raise ValueError(f"{path}: the panel has no users")
    if np.unique(users).size != users.size:
        raise ValueError(f"{path}: user_ids are not unique")
    relevant = {int(u): frozenset(row.tolist()) for u, row in zip(users.tolist(), arrays.rows(), strict=True)}
    meta = arrays.meta
    return SimPanel(user_ids=users, relevant=relevant, meta=meta if isinstance(meta, dict) else {})
