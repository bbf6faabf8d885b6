"""Benchmark two-tower training on real MovieLens features (60-day window x 5000 ratings).

Lands the MovieLens replay into DAYLOOP_HOME, builds the feature set of one held-out
day with Spark (local[2]) and trains with the default TrainParams (one torch thread).
Prints examples/s, seconds per epoch and the loss curve; as the baselines measured in
the same run, one epoch with torch's default thread count (one per core), giving the
throughput ratio default / all-cores, and (``--legacy``) the whole run with the model
before issue 9 (``LEGACY``), giving the train-time ratio new / legacy (issue 9 allows at
most 2x), plus the ratio of the whole run to the 120 s budget. No asserts: it reports.

    .venv/bin/python benchmarks/bench_training.py                       # temp home
    .venv/bin/python benchmarks/bench_training.py --home /tmp/dl --ds 2026-11-03 --legacy

Reusing ``--home`` skips landing and feature building that are already done.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 120.0
REPLAY_START = "2026-11-01"
# today's model before issue 9 parts E/F (in-batch softmax with logQ, mean-pooled history,
# no popularity prior, no row weighting, no gate holdout): the training-time baseline
LEGACY = {
    "loss": "in_batch",
    "logq_weight": 2.0,
    "popularity_windows": (),
    "history_pooling": "mean",
    "user_day_weight": 0.0,
    "gate_holdout_share": 0.0,
}


def prepare_real_features(home: Path, days: list[dt.date], master: str = "local[2]") -> dict[dt.date, Path]:
    """Land the MovieLens replay up to max(days) under ``home`` and build features per day.

    Sets DAYLOOP_HOME / DAYLOOP_SOURCE / DAYLOOP_REPLAY_START (kept if already set).
    Feature directories that already exist are reused.
    """
    os.environ["DAYLOOP_HOME"] = str(home)
    os.environ.setdefault("DAYLOOP_SOURCE", "movielens")
    os.environ.setdefault("DAYLOOP_REPLAY_START", REPLAY_START)
    from dayloop.config import load_settings
    from dayloop.data.landing import land_partition, seed_history
    from dayloop.features.build import build_features
    from dayloop.features.schema import feature_dir

    settings = load_settings()
    t0 = time.perf_counter()
    seed_history(settings)
    day = settings.replay_start
    while day <= max(days):
        land_partition(day, settings)
        day += dt.timedelta(days=1)
    print(f"landing: {time.perf_counter() - t0:.1f} s (home {home})", flush=True)
    out = {}
    for ds in days:
        target = feature_dir(settings.features_dir, ds)
        if not (target / "meta.json").is_file():
            t0 = time.perf_counter()
            build_features(ds, settings, master=master)
            print(f"features {ds}: {time.perf_counter() - t0:.1f} s", flush=True)
        out[ds] = target
    return out


def main(argv: list[str] | None = None) -> int:
    from dayloop.training.train import TrainParams

    defaults = TrainParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="DAYLOOP_HOME (default: a temp dir)")
    parser.add_argument("--ds", default=REPLAY_START, help="held-out day whose features to train on")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--threads", type=int, default=defaults.num_threads, help="torch threads")
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--skip-baseline", action="store_true", help="skip the all-cores epoch")
    parser.add_argument("--legacy", action="store_true", help="also train the pre-issue-9 model (LEGACY)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    import torch

    from dayloop.training.train import train_two_tower

    home = args.home or Path(tempfile.mkdtemp(prefix="dayloop-bench-train-"))
    ds = dt.date.fromisoformat(args.ds)
    features = prepare_real_features(home, [ds])[ds]

    params = replace(
        defaults,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_threads=args.threads,
        max_train_rows=args.max_train_rows,
    )
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"params: {params}")
    t0 = time.perf_counter()
    res = train_two_tower(features, home / "bench_models" / f"ds={ds}", params)
    wall = time.perf_counter() - t0
    m = res.metrics
    print(f"\ndevice {res.device}: {int(m['n_train_examples'])} examples, {int(m['n_users'])} users, "
          f"{int(m['n_items'])} items")
    for i, (loss, sec) in enumerate(zip(res.history["loss"], res.history["epoch_seconds"], strict=True)):
        print(f"  epoch {i}: loss {loss:.4f}  {sec:.1f} s  ({m['n_train_examples'] / sec:,.0f} ex/s)")
    print(f"train: {m['train_seconds']:.1f} s, {m['seconds_per_epoch']:.1f} s/epoch, "
          f"{m['examples_per_s']:,.0f} examples/s")
    print(f"whole call (load + train + export): {wall:.1f} s = {wall / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")

    if args.legacy:
        t0 = time.perf_counter()
        old = train_two_tower(features, home / "bench_models" / f"ds={ds}-legacy", replace(params, **LEGACY))
        old_wall = time.perf_counter() - t0
        print(f"legacy model {LEGACY}: train {old.metrics['train_seconds']:.1f} s "
              f"({old.metrics['seconds_per_epoch']:.1f} s/epoch), whole call {old_wall:.1f} s -> "
              f"train-time ratio new / legacy {m['train_seconds'] / old.metrics['train_seconds']:.2f}, "
              f"whole call {wall / old_wall:.2f}")

    if not args.skip_baseline:
        base = train_two_tower(
            features, home / "bench_models" / f"ds={ds}-allcores", replace(params, epochs=1, num_threads=None)
        )
        ratio = m["examples_per_s"] / base.metrics["examples_per_s"]
        print(f"baseline, torch default threads ({torch.get_num_threads()}): "
              f"{base.metrics['examples_per_s']:,.0f} examples/s -> this run / baseline throughput "
              f"ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
