"""Offline quality on real MovieLens features: popularity vs the two-tower model.

For each held-out day (replay day 0, 1, ...) it builds the features (Spark local[2]),
trains a two-tower model with the default TrainParams and evaluates both the model and
the popularity baseline (measured in the same run) on that day's eval users. Prints
recall@10/50/100 and NDCG@10 per day with the two-tower / popularity ratio, then, from
the second day on, the offline gate run the way the DAG runs it (today's model as
challenger, yesterday's as champion, default GateThresholds); ``--shuffled`` adds a
model trained on corrupted data (item ids permuted) for the last day. No asserts.

    .venv/bin/python benchmarks/bench_offline_quality.py --days 3
    .venv/bin/python benchmarks/bench_offline_quality.py --home /tmp/dl --days 5 --epochs 3

Reusing ``--home`` skips landing and feature building that are already done.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import REPLAY_START, prepare_real_features  # noqa: E402

COLUMNS = ("recall@10", "recall@50", "recall@100", "ndcg@10")


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from dayloop.training.train import TrainParams

    defaults = TrainParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="DAYLOOP_HOME (default: a temp dir)")
    parser.add_argument("--start", default=REPLAY_START, help="first held-out day")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-gate", action="store_true", help="skip the day-over-day gate runs")
    parser.add_argument(
        "--shuffled", action="store_true", help="also gate a model trained with shuffled item ids on the last day"
    )
    args = parser.parse_args(argv)

    import pandas as pd

    from dayloop.quality.offline_gate import GateThresholds, gate_model
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.evaluate import evaluate_bundle, evaluate_popularity
    from dayloop.training.metrics import mlflow_key
    from dayloop.training.train import train_two_tower

    home = args.home or Path(tempfile.mkdtemp(prefix="dayloop-bench-quality-"))
    start = dt.date.fromisoformat(args.start)
    days = [start + dt.timedelta(days=i) for i in range(args.days)]
    features = prepare_real_features(home, days)
    params = replace(defaults, epochs=args.epochs, seed=args.seed)
    print(f"params: {params}\n", flush=True)

    thresholds = GateThresholds()
    primary = mlflow_key(thresholds.primary_column)
    rows, gates, bundles = [], [], {}

    def gate_row(label: str, challenger: Path, champion: Path, fdir: Path, report: Path) -> None:
        d = gate_model(challenger, champion, fdir, report, thresholds).decision
        gates.append(
            {
                "run": label,
                "passed": d.passed,
                f"challenger {primary}": round(d.metrics.get(primary, float("nan")), 4),
                f"champion {primary}": round(d.metrics.get(f"champion.{primary}", float("nan")), 4),
                "pop lift": round(d.metrics.get("popularity_lift", float("nan")), 2),
                "p": round(d.metrics.get("noninferiority.p_value", float("nan")), 4),
                "psi": round(d.metrics.get("psi", float("nan")), 3),
                "latency_ms": round(d.metrics.get("infra.latency_ms", float("nan")), 2),
            }
        )
        for reason in d.failures:
            print(f"  gate {label}: {reason}", flush=True)

    for ds in days:
        fdir = features[ds]
        eval_df = pd.read_parquet(fdir / "eval.parquet")
        pop_df = pd.read_parquet(fdir / "popularity.parquet")
        t0 = time.perf_counter()
        res = train_two_tower(fdir, home / "bench_models" / "quality" / f"ds={ds}", params)
        train_s = time.perf_counter() - t0
        bundles[ds] = res.bundle_dir
        tt = evaluate_bundle(ModelBundle.load(res.bundle_dir), eval_df).per_user
        pop = evaluate_popularity(pop_df, eval_df)
        row = {"ds": ds.isoformat(), "users": len(tt), "train_s": round(train_s, 1)}
        for col in COLUMNS:
            p, m = float(pop[col].mean()), float(tt[col].mean())
            row[f"pop {col}"] = round(p, 4)
            row[f"2t {col}"] = round(m, 4)
            row[f"x {col}"] = round(m / p, 2) if p > 0 else float("nan")
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

        prev = ds - dt.timedelta(days=1)
        if not args.no_gate and prev in bundles:
            gate_row(ds.isoformat(), res.bundle_dir, bundles[prev], fdir, home / "bench_reports" / f"ds={ds}")

    if args.shuffled and len(days) >= 2:
        last, prev = days[-1], days[-2]
        bad = train_two_tower(
            features[last],
            home / "bench_models" / "quality" / f"ds={last}-shuffled",
            replace(params, shuffle_item_ids=True),
        )
        gate_row(f"{last} shuffled", bad.bundle_dir, bundles[prev], features[last],
                 home / "bench_reports" / f"ds={last}-shuffled")

    table = pd.DataFrame(rows).set_index("ds")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        for col in COLUMNS:
            print(f"\n{col}: popularity vs two-tower (ratio = two-tower / popularity)")
            print(table[["users", f"pop {col}", f"2t {col}", f"x {col}"]].to_string())
        ratios = {col: float(table[f"2t {col}"].mean() / table[f"pop {col}"].mean()) for col in COLUMNS}
        print("\nmean over days, two-tower / popularity: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        print(f"train seconds per day: {table['train_s'].tolist()}")
        if gates:
            print("\noffline gate, today's model vs yesterday's champion (default thresholds):")
            print(pd.DataFrame(gates).set_index("run").to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
