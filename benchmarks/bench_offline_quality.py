"""Offline quality on real MovieLens features: the two-tower model against its baselines.

For each held-out day (replay day 0, 1, ...) it builds the features (Spark local[2]),
trains the two-tower model with the default TrainParams and, as the baselines measured
in the same run, today's model before issue 9 (``LEGACY``: in-batch softmax with logQ,
mean-pooled history, no popularity prior, no gate holdout), EASE (Steck 2019, closed
form on the window's user-item matrix), all-time popularity (the window's counts) and
7-day (time-aware) popularity. Everything is evaluated on that day's eval.parquet users
(the day no model saw). It prints per day NDCG@10 of each ranker / 7-day popularity, then
the table pooled over all days: NDCG@10 and recall@10, the ratio to 7-day popularity and
its 90 % paired bootstrap interval over users. From the second day on the offline gate
runs the way the DAG runs it (today's model as challenger, yesterday's as champion,
default GateThresholds); ``--shuffled`` adds a model trained on corrupted data (item ids
permuted) for the last day. No asserts.

    .venv/bin/python benchmarks/bench_offline_quality.py --home /tmp/dl --days 14
    .venv/bin/python benchmarks/bench_offline_quality.py --home /tmp/dl --days 3 --no-legacy --no-gate

Reusing ``--home`` skips landing and feature building that are already done.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import LEGACY, REPLAY_START, prepare_real_features  # noqa: E402

METRICS = ("ndcg@10", "recall@10")
BASELINE = "pop 7-day"


def ease_scorer(train_df, lam: float, fallback):
    """(item ids, score_fn) of EASE fitted on the window's binary user-item matrix.

    B = I - P / diag(P) with P = (X^T X + lam I)^-1 and a zero diagonal; a user's scores
    are their seen set's multi-hot row times B. ~2 s for 3.7k items on one core.
    ``fallback`` (item_id, count frame, e.g. 7-day popularity) breaks ties: a user with
    no history (a third of each day's MovieLens users) scores 0 everywhere in EASE and
    gets the fallback's ranking instead of the item order."""
    import scipy.sparse as sp

    items = np.unique(train_df["item_id"].to_numpy(np.int64))
    users, u_pos = np.unique(train_df["user_id"].to_numpy(np.int64), return_inverse=True)
    i_pos = np.searchsorted(items, train_df["item_id"].to_numpy(np.int64))
    x = sp.csr_matrix((np.ones(i_pos.size), (u_pos, i_pos)), shape=(users.size, items.size))
    x.data[:] = 1.0  # binary: a re-rating counts once
    gram = (x.T @ x).toarray() + lam * np.eye(items.size)
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    counts = fallback.set_index("item_id")["count"].reindex(items, fill_value=0).to_numpy(np.float64)
    # far below any EASE score gap (~1e-3) yet a strict order among equal EASE scores
    tie = 1e-9 * np.log1p(counts) / max(np.log1p(counts).max(), 1e-12)

    def score(seen_lists):
        rows = np.zeros((len(seen_lists), items.size))
        for r, seen in enumerate(seen_lists):
            pos = np.searchsorted(items, seen)
            pos = pos[(pos < items.size)]
            pos = pos[items[pos] == np.asarray(seen)[: pos.size]] if pos.size else pos
            rows[r, pos] = 1.0
        return rows @ b + tie

    return items, score


def _ratio_rows(pooled: dict, n_boot: int) -> list[dict]:
    """Pooled means, ratio to 7-day popularity and its paired bootstrap interval per ranker."""
    from dayloop.quality.offline_gate.intervals import paired_ratio_interval

    base = pooled[BASELINE]
    rows = []
    for name, df in pooled.items():
        row = {"ranker": name, "users": len(df)}
        for col in METRICS:
            ci = paired_ratio_interval(df[col].to_numpy(), base[col].to_numpy(), level=0.9, n_boot=n_boot)
            row[col] = round(float(df[col].mean()), 4)
            row[f"x {col}"] = round(ci.ratio, 3)
            row[f"x {col} 90% CI"] = f"[{ci.low:.3f}, {ci.high:.3f}]"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear benchmark script
    from dataclasses import replace

    from dayloop.training.train import TrainParams

    defaults = TrainParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="DAYLOOP_HOME (default: a temp dir)")
    parser.add_argument("--start", default=REPLAY_START, help="first held-out day")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--ease-lambda", type=float, default=500.0)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap samples of the intervals")
    parser.add_argument("--no-legacy", action="store_true", help="skip today's (pre-issue-9) model")
    parser.add_argument("--no-gate", action="store_true", help="skip the day-over-day gate runs")
    parser.add_argument(
        "--shuffled", action="store_true", help="also gate a model trained with shuffled item ids on the last day"
    )
    args = parser.parse_args(argv)

    import pandas as pd

    from dayloop.quality.offline_gate import GateThresholds, gate_model
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.evaluate import evaluate_bundle, evaluate_popularity, evaluate_scores, recent_popularity
    from dayloop.training.metrics import mlflow_key
    from dayloop.training.train import load_features, train_two_tower, window_end_of

    home = args.home or Path(tempfile.mkdtemp(prefix="dayloop-bench-quality-"))
    start = dt.date.fromisoformat(args.start)
    days = [start + dt.timedelta(days=i) for i in range(args.days)]
    features = prepare_real_features(home, days)
    params = replace(defaults, epochs=args.epochs, seed=args.seed)
    models = {"two-tower": params}
    if not args.no_legacy:
        models["today's model"] = replace(params, **LEGACY)
    print(f"params: {params}\nlegacy overrides: {LEGACY}\n", flush=True)

    thresholds = GateThresholds()
    primary = mlflow_key(thresholds.primary_column)
    per_ranker: dict[str, list] = {}
    train_s: dict[str, list[float]] = {name: [] for name in models}
    daily, gates, bundles = [], [], {}

    def gate_row(label: str, challenger: Path, champion: Path, fdir: Path, report: Path) -> None:
        d = gate_model(challenger, champion, fdir, report, thresholds).decision
        gates.append(
            {
                "run": label,
                "passed": d.passed,
                "users": int(d.metrics.get("n_eval_users", 0)),
                f"challenger {primary}": round(d.metrics.get(primary, float("nan")), 4),
                f"champion {primary}": round(d.metrics.get(f"champion.{primary}", float("nan")), 4),
                "pop lift": round(d.metrics.get("popularity_lift", float("nan")), 2),
                "p": round(d.metrics.get("noninferiority.p_value", float("nan")), 4),
                "psi": round(d.metrics.get("psi", float("nan")), 3),
            }
        )
        for reason in d.failures:
            print(f"  gate {label}: {reason}", flush=True)

    for ds in days:
        fdir = features[ds]
        fs = load_features(fdir, parts=("train", "eval", "popularity"))
        eval_df = fs["eval"]
        recent = recent_popularity(fs["train"], window_end_of(fs), 7)
        frames = {
            "pop all-time": evaluate_popularity(fs["popularity"], eval_df),
            BASELINE: evaluate_popularity(recent, eval_df),
        }
        t0 = time.perf_counter()
        items, score = ease_scorer(fs["train"], args.ease_lambda, recent)
        frames["EASE"] = evaluate_scores(items, score, eval_df)
        ease_s = time.perf_counter() - t0
        for name, p in models.items():
            t0 = time.perf_counter()
            tag = "quality" if name == "two-tower" else "quality-legacy"
            res = train_two_tower(fdir, home / "bench_models" / tag / f"ds={ds}", p)
            train_s[name].append(round(time.perf_counter() - t0, 1))
            if name == "two-tower":
                bundles[ds] = res.bundle_dir
            frames[name] = evaluate_bundle(ModelBundle.load(res.bundle_dir), eval_df).per_user
        base = float(frames[BASELINE]["ndcg@10"].mean())
        row = {"ds": ds.isoformat(), "users": len(frames[BASELINE]), "ease_s": round(ease_s, 1)}
        for name, df in frames.items():
            per_ranker.setdefault(name, []).append(df)
            row[name] = round(float(df["ndcg@10"].mean()) / base, 3) if base > 0 else float("nan")
        daily.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

        prev = ds - dt.timedelta(days=1)
        if not args.no_gate and prev in bundles:
            gate_row(ds.isoformat(), bundles[ds], bundles[prev], fdir, home / "bench_reports" / f"ds={ds}")

    if args.shuffled and len(days) >= 2:
        last, prev = days[-1], days[-2]
        bad = train_two_tower(
            features[last],
            home / "bench_models" / "quality" / f"ds={last}-shuffled",
            replace(params, shuffle_item_ids=True),
        )
        gate_row(f"{last} shuffled", bad.bundle_dir, bundles[prev], features[last],
                 home / "bench_reports" / f"ds={last}-shuffled")

    pooled = {name: pd.concat(dfs, ignore_index=True) for name, dfs in per_ranker.items()}
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"\nNDCG@10 / 7-day popularity's, per held-out day:\n{pd.DataFrame(daily).set_index('ds').to_string()}")
        table = pd.DataFrame(_ratio_rows(pooled, args.bootstrap)).set_index("ranker")
        print(f"\npooled over {len(days)} held-out days ({len(pooled[BASELINE])} user-days); "
              f"x = ratio to {BASELINE}, 90 % paired bootstrap interval over users:")
        print(table.to_string())
        for name, secs in train_s.items():
            print(f"train seconds per day, {name}: {secs} (mean {np.mean(secs):.1f})")
        if gates:
            print("\noffline gate, today's model vs yesterday's champion (default thresholds):")
            print(pd.DataFrame(gates).set_index("run").to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
