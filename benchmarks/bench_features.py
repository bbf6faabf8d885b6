"""Benchmark the Spark feature job on MovieLens-shaped random data.

Lands ``--days`` training days of ``--events`` ratings each plus the held-out day
(6040 users, 3706 items, skewed user activity and item popularity, same-second
ties), then times ``build_features`` twice in one process: cold (JVM start, class
loading, code generation) and warm. The baseline, measured in the same run, is a
single-threaded pure pandas/Python computation of the same train and eval tables
from the same files; the ratio is Spark wall time / baseline. No asserts: it reports.

    .venv/bin/python benchmarks/bench_features.py                  # 60 x 5000
    .venv/bin/python benchmarks/bench_features.py --days 10 --events 1000
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dayloop.config import Settings
from dayloop.data.schema import items_file, partition_file, users_file

N_USERS, N_ITEMS = 6040, 3706
GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip


def land(settings: Settings, ds: dt.date, days: int, per_day: int, seed: int = 0) -> None:
    """Write MovieLens-shaped landing data for [ds - days, ds]."""
    rng = np.random.default_rng(seed)
    user_w = rng.pareto(1.2, N_USERS) + 1.0  # a few very active users, like ML-1M
    user_p = user_w / user_w.sum()
    item_p = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.9
    item_p /= item_p.sum()
    item_perm = rng.permutation(N_ITEMS) + 1
    for k in range(days, -1, -1):
        day = ds - dt.timedelta(days=k)
        start = pd.Timestamp(day.isoformat(), tz="UTC")
        # Sessions: ratings of one user cluster in time and often share a second.
        seconds = np.sort(rng.integers(0, 86_400, per_day)) // 5 * 5
        frame = pd.DataFrame(
            {
                "user_id": rng.choice(N_USERS, per_day, p=user_p).astype("int64") + 1,
                "item_id": item_perm[rng.choice(N_ITEMS, per_day, p=item_p)].astype("int64"),
                "rating": rng.integers(1, 6, per_day).astype("int64"),
                "ts": (start + pd.to_timedelta(seconds, unit="s")).astype("datetime64[us, UTC]"),
            }
        )
        path = partition_file(settings.landing_dir, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    pd.DataFrame(
        {
            "user_id": np.arange(1, N_USERS + 1, dtype="int64"),
            "gender": rng.choice(["M", "F"], N_USERS),
            "age": rng.choice([1, 18, 25, 35, 45, 50, 56], N_USERS).astype("int64"),
            "occupation": rng.integers(0, 21, N_USERS).astype("int64"),
        }
    ).to_parquet(users_file(settings.landing_dir), index=False)
    pd.DataFrame(
        {
            "item_id": np.arange(1, N_ITEMS + 1, dtype="int64"),
            "title": [f"Movie {i}" for i in range(1, N_ITEMS + 1)],
            "year": rng.integers(1919, 2001, N_ITEMS).astype("int64"),
            "genres": ["|".join(rng.choice(GENRES, rng.integers(1, 4), replace=False))
                       for _ in range(N_ITEMS)],
        }
    ).to_parquet(items_file(settings.landing_dir), index=False)


def pandas_baseline(settings: Settings, ds: dt.date) -> tuple[int, int]:
    """Same train/eval semantics in plain pandas + Python loops; returns (n_train, n_eval)."""
    L = settings.history_length
    frames = []
    for k in range(settings.train_window_days, -1, -1):
        day = ds - dt.timedelta(days=k)
        path = partition_file(settings.landing_dir, day)
        if path.is_file():
            cols = ["user_id", "item_id", "ts"]
            frames.append(pd.read_parquet(path, columns=cols).assign(day=day))
    ev = pd.concat(frames, ignore_index=True).sort_values(["user_id", "ts", "item_id"])
    train, held = ev[ev["day"] < ds], ev[ev["day"] == ds]
    n_train = 0
    last: dict[int, list[int]] = {}
    for user, grp in train.groupby("user_id", sort=False):
        items, stamps = grp["item_id"].to_numpy(), grp["ts"].to_numpy()
        hist: list[list[int]] = []
        start_of_moment = 0
        for i in range(len(items)):
            if i and stamps[i] != stamps[i - 1]:
                start_of_moment = i
            hist.append(items[max(0, start_of_moment - L):start_of_moment][::-1].tolist())
        n_train += len(hist)
        last[user] = items[::-1][:L].tolist()
    n_eval = 0
    for user, grp in held.groupby("user_id", sort=False):
        _ = (last.get(user, []), sorted(set(grp["item_id"])))
        n_eval += 1
    return n_train, n_eval


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)

    from dayloop.features.build import build_features

    ds = dt.date(2026, 11, 1)
    with tempfile.TemporaryDirectory(prefix="dayloop-bench-features-") as tmp:
        home = Path(tmp)
        settings = Settings(
            home=home,
            data_cache=home / "cache",
            train_window_days=args.days,
            history_length=args.history,
        )
        t0 = time.perf_counter()
        land(settings, ds, args.days, args.events)
        landed = time.perf_counter() - t0
        print(f"landed {args.days + 1} days x {args.events} events in {landed:.1f}s")

        t0 = time.perf_counter()
        info = build_features(ds, settings, master=args.master)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_features(ds, settings, master=args.master)
        warm = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_train, n_eval = pandas_baseline(settings, ds)
        base = time.perf_counter() - t0

        size = sum(p.stat().st_size for p in info.path.iterdir())
        print(f"train rows {info.n_train} (baseline {n_train}), eval users {info.n_eval_users} "
              f"(baseline {n_eval}), output {size / 1e6:.1f} MB")
        print(f"spark build, cold (incl. JVM start): {cold:7.1f}s")
        print(f"spark build, warm (JVM up):          {warm:7.1f}s")
        print(f"pandas baseline (train+eval only):   {base:7.1f}s")
        print(f"ratio cold/baseline {cold / base:.1f}x, warm/baseline {warm / base:.1f}x")


if __name__ == "__main__":
    main()
