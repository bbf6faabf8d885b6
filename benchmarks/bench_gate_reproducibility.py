"""Does the offline gate's decision survive a retrain with another seed? (issue 9, part F)

For each held-out day it trains the champion (the previous day's features, default
TrainParams, seed 42; reused from a previous run under the same --home), then retrains
the same day's challenger with ``--seeds`` different seeds and gates each one against the
champion and, as the bootstrap rule, without one. The planted worse model (the pipeline's
``shuffle_item_ids`` fault: training targets relabelled by a fixed item permutation) is
trained with ``--bad-seeds`` seeds and gated the same way. Prints every decision with
its numbers, then per day the share of healthy retrains that get the majority decision
(target >= 95 %) and the share of planted models refused (target 100 %), next to the same
figures for the gate before issue 9 (the held-out day alone, margin 0.15, PSI 0.25,
all-time popularity) as the baseline measured in the same run, and for the pooled gate
with its 7-day popularity floor raised to 1.0x. No asserts.

    .venv/bin/python benchmarks/bench_gate_reproducibility.py --home /tmp/dl --start 2026-11-08 --days 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import REPLAY_START, prepare_real_features  # noqa: E402


def _train(fdir: Path, out: Path, params) -> Path:
    """Train into ``out`` unless a bundle is already there (reruns reuse models)."""
    from dayloop.training.train import train_two_tower

    bundle = out / "bundle"
    if (bundle / "model_meta.json").is_file():
        return bundle
    return train_two_tower(fdir, out, params).bundle_dir


def _agreement(decisions: list[bool]) -> float:
    """Share of runs that got the majority decision."""
    if not decisions:
        return float("nan")
    passes = sum(decisions)
    return max(passes, len(decisions) - passes) / len(decisions)


def main(argv: list[str] | None = None) -> int:
    from dayloop.training.train import TrainParams

    defaults = TrainParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="DAYLOOP_HOME (default: a temp dir)")
    parser.add_argument("--start", default=(dt.date.fromisoformat(REPLAY_START) + dt.timedelta(days=1)).isoformat(),
                        help="first held-out day to gate (its previous day trains the champion)")
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=6, help="healthy retrains per day")
    parser.add_argument("--bad-seeds", type=int, default=2, help="planted shuffled-id models per day")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    args = parser.parse_args(argv)

    import pandas as pd

    from dayloop.quality.offline_gate import GateThresholds, gate_model

    home = args.home or Path(tempfile.mkdtemp(prefix="dayloop-bench-gate-"))
    start = dt.date.fromisoformat(args.start)
    days = [start + dt.timedelta(days=i) for i in range(args.days)]
    features = prepare_real_features(home, sorted({*days, *(d - dt.timedelta(days=1) for d in days)}))
    params = replace(defaults, epochs=args.epochs)
    modes = {
        "default (pooled, 7-day pop)": GateThresholds(),
        "pooled, 7-day pop >= 1.0x": GateThresholds(min_popularity_lift=1.0),
        # the gate before issue 9: the held-out day alone, margin 0.15, PSI 0.25, all-time popularity
        "before (day only)": GateThresholds(pool_holdout=False, noninferiority_margin=0.15, max_psi=0.25,
                                            popularity_days=None),
    }
    rows = []
    for ds in days:
        prev = ds - dt.timedelta(days=1)
        champion = _train(features[prev], home / "bench_models" / "quality" / f"ds={prev}", params)
        runs = [("healthy", 42 + i, replace(params, seed=42 + i)) for i in range(args.seeds)]
        runs += [("shuffled", 7 + i, replace(params, seed=7 + i, shuffle_item_ids=True)) for i in range(args.bad_seeds)]
        for kind, seed, p in runs:
            tag = "quality" if (kind, seed) == ("healthy", 42) else f"gate-{kind}-{seed}"
            bundle = _train(features[ds], home / "bench_models" / tag / f"ds={ds}", p)
            for mode, t in modes.items():
                for against, champ in (("champion", champion), ("bootstrap", None)):
                    report = home / "bench_reports" / "gate" / f"ds={ds}" / f"{kind}-{seed}-{against}-{list(modes).index(mode)}"
                    d = gate_model(bundle, champ, features[ds], report, t).decision
                    row = {"ds": ds.isoformat(), "model": kind, "seed": seed, "mode": mode, "against": against,
                           "passed": d.passed, "users": int(d.metrics["n_eval_users"]),
                           "ndcg@10": round(d.metrics.get("ndcg_at_10", float("nan")), 4),
                           "pop lift": round(d.metrics.get("popularity_lift", float("nan")), 3),
                           "lift CI": f"[{d.metrics.get('popularity_lift_low', float('nan')):.2f}, "
                                      f"{d.metrics.get('popularity_lift_high', float('nan')):.2f}]",
                           "ni diff": round(d.metrics.get("noninferiority.mean_diff", float("nan")), 4),
                           "ni p": round(d.metrics.get("noninferiority.p_value", float("nan")), 4),
                           "psi": round(d.metrics.get("psi", float("nan")), 3),
                           "failed": " | ".join(f[6:60] for f in d.failures)}
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    df = pd.DataFrame(rows)
    summary = []
    for (ds, mode, against), g in df.groupby(["ds", "mode", "against"], sort=True):
        healthy, bad = g[g["model"] == "healthy"], g[g["model"] == "shuffled"]
        summary.append({"ds": ds, "mode": mode, "against": against, "users": int(healthy["users"].iloc[0]),
                        "healthy passed": f"{int(healthy['passed'].sum())}/{len(healthy)}",
                        "same decision": round(_agreement(healthy["passed"].tolist()), 3),
                        "shuffled refused": f"{int((~bad['passed']).sum())}/{len(bad)}"})
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\n" + pd.DataFrame(summary).set_index(["ds", "mode", "against"]).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
