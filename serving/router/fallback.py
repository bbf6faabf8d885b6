"""The fallback chain below the models: what a user gets when no version can answer.

* level 0: a model version's own answer (Triton + its index), not built here;
* level 1: :class:`PopularityList`, one per version, built in the router when the version
  is first routed from the seen-items table its index was built with (items ranked by how
  many users had interacted with them); each user's own seen items are left out, as the
  model's answers leave them out;
* level 2: :class:`StaticList`, a fixed list of item ids shipped with the deployment
  (``--static-items``), for when even the popularity list is missing.

Pure numpy; no I/O except reading the static list's file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.index_service.seen import SeenItems

LEVEL_MODEL = 0
LEVEL_POPULARITY = 1
LEVEL_STATIC = 2
LEVEL_NAMES = {LEVEL_MODEL: "model", LEVEL_POPULARITY: "popularity", LEVEL_STATIC: "static"}
MAX_STATIC_ITEMS = 10_000


class StaticListError(ValueError):
    """A static list file that cannot serve."""


@dataclass(frozen=True, eq=False)
class PopularityList:
    """Items by descending popularity among the users of one version's seen-items table."""

    version: int
    order: np.ndarray    # item ids, most popular first (ties: lower id first)
    share: np.ndarray    # fraction of users who had seen order[i]
    seen: SeenItems
    fingerprint: str     # sha256 of the seen-items file it was built from

    @classmethod
    def build(cls, version: int, seen: SeenItems, fingerprint: str) -> PopularityList:
        if seen.items.size == 0:
            raise ValueError(f"version {version}'s seen-items table is empty: no popularity to rank")
        counts = np.bincount(seen.items)
        ids = np.flatnonzero(counts)
        # stable sort on -count keeps ascending ids among equal counts
        order = ids[np.argsort(-counts[ids], kind="stable")].astype(np.int64)
        share = counts[order] / max(1, seen.n_users)
        return cls(version, order, share.astype(np.float64), seen, fingerprint)

    def answer(self, user_id: int, k: int) -> tuple[list[int], list[float]]:
        """The ``k`` most popular items the user has not seen, with their user shares."""
        mine = self.seen.items_for(user_id)
        take = min(self.order.size, k + int(mine.size))
        head = self.order[:take]
        keep = np.ones(head.size, dtype=bool)
        if mine.size:
            pos = np.minimum(np.searchsorted(mine, head), mine.size - 1)
            keep = mine[pos] != head
        chosen = np.flatnonzero(keep)[:k]
        return head[chosen].tolist(), self.share[:take][chosen].tolist()

    def info(self) -> dict[str, object]:
        return {"version": self.version, "items": int(self.order.size), "users": self.seen.n_users,
                "history_through": self.seen.last_day, "seen_fingerprint": self.fingerprint}


@dataclass(frozen=True)
class StaticList:
    """A fixed list of item ids (the last level: needs nothing live)."""

    items: tuple[int, ...]
    source: str

    @classmethod
    def from_file(cls, path: str | Path) -> StaticList:
        """Read ``{"items": [ids...]}`` (or a bare JSON list); StaticListError when unusable."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise StaticListError(f"static list {p}: cannot read it: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise StaticListError(f"static list {p} is not JSON: {exc}") from None
        raw = doc.get("items") if isinstance(doc, dict) else doc
        if not isinstance(raw, list) or not raw or len(raw) > MAX_STATIC_ITEMS:
            raise StaticListError(f"static list {p} must hold 1..{MAX_STATIC_ITEMS} item ids under 'items'")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in raw):
            raise StaticListError(f"static list {p}: every item id must be an integer >= 0")
        if len(set(raw)) != len(raw):
            raise StaticListError(f"static list {p} repeats item ids")
        return cls(tuple(raw), str(p))

    def answer(self, k: int) -> tuple[list[int], list[float]]:
        head = list(self.items[:k])
        return head, [0.0] * len(head)
