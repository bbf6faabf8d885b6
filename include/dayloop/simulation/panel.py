"""The simulator's user panel: who the simulated users are and which items each one truly likes.

A panel is what makes the online comparison honest: the simulator clicks on a recommended
item mostly when the item is in the user's relevant set, so a worse model earns measurably
fewer clicks. Two sources:

* ``panel_from_replay``: real data. The users active in the ``days`` days after a date,
  and as their relevant set the items they actually interacted with in those days, i.e.
  interactions the model (trained up to that date) has never seen.
* ``panel_from_synthetic``: the synthetic world's ground truth, each user's ``top_n`` items
  by the true choice logits on a day.

The file is a plain ``.npz`` (no pickle) so the data plane reads it with numpy alone; its
format (keys, layout, reader and writer) has one home, :mod:`serving.simulator.panel_format`.
This module validates and normalises the panel, then hands it to that writer.

CLI: ``python -m dayloop.simulation.panel --out PATH (--after YYYY-MM-DD [--days 7] | --synthetic)``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dayloop.config import ConfigError, Settings, parse_day
from dayloop.errors import DataUnavailable
from serving.simulator.panel_format import read_panel_file, write_panel_file

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dayloop.data.synthetic import SyntheticWorld

# Users scored per block in the synthetic world: bounds the (users x items) logits matrix.
_SCORE_BLOCK = 1024


@dataclass(frozen=True)
class Panel:
    """Users (sorted, unique) and, aligned with them, each user's sorted relevant item ids."""

    user_ids: np.ndarray
    relevant: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @property
    def n_relevant(self) -> int:
        return int(sum(r.size for r in self.relevant))

    def relevant_for(self, user_id: int) -> np.ndarray:
        """The relevant items of one user (KeyError if the user is not on the panel)."""
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos >= self.user_ids.size or self.user_ids[pos] != user_id:
            raise KeyError(f"user {user_id} is not on the panel")
        return self.relevant[pos]

    def write(self, path: Path | str) -> Path:
        """Write this panel with :func:`write_panel`."""
        return write_panel(path, self.user_ids, self.relevant, self.meta)


def _as_ids(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{what} must hold non-negative ids, found {int(arr.min())}")
    return arr.astype(np.int64)


def make_panel(user_ids: Any, relevant: Sequence[Any], meta: dict[str, Any] | None = None) -> Panel:
    """Validate and normalise (sort users, sort and de-duplicate items) into a Panel."""
    users = _as_ids(user_ids, "user_ids")
    if users.size == 0:
        raise ValueError("a panel needs at least one user")
    if len(relevant) != users.size:
        raise ValueError(
            f"user_ids and relevant must have the same length, got {users.size} and {len(relevant)}"
        )
    if np.unique(users).size != users.size:
        raise ValueError("user_ids must be unique")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"panel meta must be JSON-serialisable: {exc}") from exc
    order = np.argsort(users, kind="stable")
    rel = [np.unique(_as_ids(relevant[i], f"relevant items of user {users[i]}")) for i in order]
    return Panel(user_ids=users[order], relevant=rel, meta=meta)


def write_panel(path: Path | str, user_ids: Any, relevant: Sequence[Any],
                meta: dict[str, Any] | None = None) -> Path:
    """Validate the panel, then write it ``.npz`` atomically (temp file + rename); returns the path."""
    panel = make_panel(user_ids, relevant, meta)
    return write_panel_file(path, panel.user_ids, panel.relevant, panel.meta)


def read_panel(path: Path | str) -> Panel:
    """Read and check a panel written by :func:`write_panel`."""
    arrays = read_panel_file(path)
    users = arrays.user_ids
    if users.ndim != 1 or np.any(np.diff(users) <= 0):
        raise ValueError(f"{path}: user_ids must be sorted and unique")
    return Panel(user_ids=users, relevant=arrays.rows(), meta=arrays.meta)


def panel_from_replay(settings: Settings, after: dt.date | str, days: int = 7,
                      max_users: int | None = None, seed: int = 0) -> Panel:
    """Users active in the ``days`` days strictly after ``after``; relevant = what they interacted with.

    The window is clipped to the days the world has; DataUnavailable if none is left.
    ``max_users`` keeps a seeded uniform sample of the active users.
    """
    from dayloop.data.world import open_world

    after = parse_day(after)
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    if max_users is not None and max_users <= 0:
        raise ValueError(f"max_users must be positive, got {max_users}")
    world = open_world(settings)
    start = max(after + dt.timedelta(days=1), world.first_day)
    stop = min(after + dt.timedelta(days=days), world.last_day)
    if start > stop:
        raise DataUnavailable(
            f"no data in the {days} day(s) after {after}: the {settings.source} world covers "
            f"{world.first_day} .. {world.last_day}; pick --after between "
            f"{world.first_day - dt.timedelta(days=1)} and {world.last_day - dt.timedelta(days=1)}"
        )
    window = [start + dt.timedelta(days=i) for i in range((stop - start).days + 1)]
    frames = [world.interactions(d) for d in window]
    users = np.concatenate([f["user_id"].to_numpy(dtype=np.int64) for f in frames])
    items = np.concatenate([f["item_id"].to_numpy(dtype=np.int64) for f in frames])
    if users.size == 0:
        raise DataUnavailable(f"no interactions in {window[0]} .. {window[-1]}")
    # Unique (user, item) pairs, sorted by user then item: each user's run is their set.
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    panel_users, starts = np.unique(pairs[:, 0], return_index=True)
    relevant = np.split(pairs[:, 1], starts[1:])
    n_active = panel_users.size
    if max_users is not None and max_users < n_active:
        keep = np.sort(np.random.default_rng(seed).choice(n_active, size=max_users, replace=False))
        panel_users = panel_users[keep]
        relevant = [relevant[i] for i in keep]
    meta = {
        "kind": "replay",
        "source": settings.source,
        "after": after.isoformat(),
        "days": [d.isoformat() for d in window],
        "requested_days": days,
        "clipped": len(window) < days,
        "active_users": int(n_active),
        "max_users": max_users,
        "seed": seed,
        "n_users": int(panel_users.size),
        "n_relevant": int(sum(r.size for r in relevant)),
    }
    return make_panel(panel_users, relevant, meta)


def panel_from_synthetic(world: "SyntheticWorld", ds: dt.date | str, top_n: int = 20) -> Panel:
    """Every synthetic user with their ``top_n`` items by true relevance on day ``ds``."""
    ds = parse_day(ds)
    world.day_index(ds)  # DataUnavailable outside the world's calendar
    if top_n <= 0:
        raise ValueError(f"top_n must be positive, got {top_n}")
    n_items = world.item_ids.size
    top = min(top_n, n_items)
    relevant: list[np.ndarray] = []
    for lo in range(0, world.user_ids.size, _SCORE_BLOCK):
        block = world.user_ids[lo:lo + _SCORE_BLOCK]
        logits = world.relevance(block, ds)
        cols = np.argpartition(-logits, top - 1, axis=1)[:, :top]
        relevant.extend(world.item_ids[row] for row in cols)
    meta = {
        "kind": "synthetic",
        "source": "synthetic",
        "ds": ds.isoformat(),
        "top_n": top,
        "n_items": int(n_items),
        "n_users": int(world.user_ids.size),
        "synthetic": world.settings.model_dump(),
    }
    return make_panel(world.user_ids, relevant, meta)


def main(argv: list[str] | None = None) -> int:
    """CLI: build a panel from the replay (``--after``) or the synthetic world and write it."""
    from dayloop.config import load_settings
    from dayloop.data.movielens import MovieLensError

    parser = argparse.ArgumentParser(
        prog="python -m dayloop.simulation.panel",
        description="Write the user simulator's panel (users and their relevant items) as .npz.")
    parser.add_argument("--out", type=Path, required=True, help="panel file to write")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--after", help="replay: users of the days strictly after YYYY-MM-DD")
    mode.add_argument("--synthetic", action="store_true",
                      help="synthetic world: each user's top-N items by true relevance")
    parser.add_argument("--days", type=int, default=None, help="replay: window length (default 7)")
    parser.add_argument("--max-users", type=int, default=None,
                        help="replay: keep a seeded sample of at most this many users")
    parser.add_argument("--seed", type=int, default=0, help="replay: sampling seed")
    parser.add_argument("--ds", default=None,
                        help="synthetic: day of the preferences (default: replay start)")
    parser.add_argument("--top-n", type=int, default=None, help="synthetic: items per user (default 20)")
    args = parser.parse_args(argv)
    if args.synthetic and (args.days is not None or args.max_users is not None):
        parser.error("--days and --max-users apply to --after only")
    if args.after and (args.ds is not None or args.top_n is not None):
        parser.error("--ds and --top-n apply to --synthetic only")
    try:
        settings = load_settings()
        if args.synthetic:
            from dayloop.data.synthetic import SyntheticWorld

            world = SyntheticWorld(settings.synthetic, settings.replay_start)
            ds = parse_day(args.ds) if args.ds else settings.replay_start
            panel = panel_from_synthetic(world, ds, top_n=args.top_n or 20)
        else:
            panel = panel_from_replay(settings, parse_day(args.after), days=args.days or 7,
                                      max_users=args.max_users, seed=args.seed)
        path = panel.write(args.out)
    except (ConfigError, DataUnavailable, MovieLensError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"panel": str(path), "n_users": panel.n_users, "n_relevant": panel.n_relevant,
                      **{k: panel.meta[k] for k in ("kind", "source") if k in panel.meta}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
