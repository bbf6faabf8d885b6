"""The router's last fallback level: a fixed list of item ids shipped with the deployment.

``python -m dayloop.data.static_list [--n 100] [--out serving/router/static_items.json]``
ranks the MovieLens-1M catalogue by how many users rated each movie and writes the top
``n`` in the format :class:`serving.router.fallback.StaticList` reads. It needs nothing
live, which is the point: it answers when Triton, the index service and every version's
popularity list are gone. The committed file was written by this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_OUT = Path(__file__).resolve().parents[3] / "serving" / "router" / "static_items.json"


def top_items(ratings: pd.DataFrame, n: int = 100) -> list[int]:
    """The ``n`` items rated by the most distinct users (ties: lower id first)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    users = ratings.drop_duplicates(["user_id", "item_id"]).groupby("item_id").size()
    ranked = sorted(users.items(), key=lambda kv: (-int(kv[1]), int(kv[0])))
    return [int(i) for i, _ in ranked[:n]]


def document(items: list[int]) -> dict[str, object]:
    return {"source": "MovieLens-1M, items by distinct raters (python -m dayloop.data.static_list)",
            "items": [int(i) for i in np.asarray(items, dtype=np.int64)]}


def main(argv: list[str] | None = None) -> int:
    from dayloop.config import load_settings
    from dayloop.data.movielens import ensure_movielens, load_movielens

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    _users, _items, ratings = load_movielens(ensure_movielens(load_settings().data_cache))
    args.out.write_text(json.dumps(document(top_items(ratings, args.n)), indent=1) + "\n")
    print(f"wrote {args.n} items to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
