"""The CTR guardrail on real users: today's impression-level test against the user-level one.

Users are the real ones: the demo's panel (MovieLens-1M users active in the 7 days after the
champion's day, their relevant items their real next ratings) and, per user, the expected
clicks of a real model's real top-10 lists under the simulator's click model
(``dayloop.simulation.truth``). Two real versions are trained the way the demo trains them
(replay day 0 and day 1), or read from ``--home`` when a run already left them there.

Each simulated rollout follows a plan (demo: 10% -> 50% -> 100%, a look every 5 s; prod:
1% -> 5% -> 25% -> 50% -> 100%, a look every 5 min): users are hashed into the router's 100
bucket groups under a fresh salt, keep their clickiness for the whole rollout, and ask a
Poisson number of times per look (the simulator draws users uniformly, so every user asks at
the same rate; ``--activity`` also draws each user's rate from a heavy-tailed law). A list
earns Poisson(expected clicks) clicks; a canary earns ``ratio x`` its user's champion
expected clicks (or the real second model's, the ``v2`` row). Before the canary, the champion
serves everyone for the plan's pre-period: the user-level test's baseline. The step's
impressions per user are scaled by ``1x, 3x, 10x, 30x`` of the demo's (or prod's) traffic.

Both tests see the same counts at every look: the impression-level mSPRT
(``analysis.ctr``, canary/control totals) and the user-level test (``analysis.grouped``,
per-group counts with the baseline). A rollout is rolled back when a test rejects at any
look; a step passes at its bake time (or bakes to its maximum while under its minimum
impressions). Printed: false rollbacks of an identical model (A/A), detection of true -5%,
-10%, -20% drops, the real v2 against v1, and the share of variance the baseline removed.
No asserts.

    .venv/bin/python benchmarks/bench_rollout_analysis.py --home var            # a demo's models
    .venv/bin/python benchmarks/bench_rollout_analysis.py --quick                 # builds its own
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dayloop.rollout.analysis.ctr import CtrState, update_ctr_state
from dayloop.rollout.analysis.grouped import GroupWindow, canary_groups, start_state, update
from dayloop.rollout.analysis.inputs import Thresholds
from dayloop.rollout.bake import BASELINE_MAX_SECONDS, MIXTURE_SCALE
from dayloop.rollout.plan import PROFILES, RolloutPlan
from serving.routing import N_GROUPS, bucket, group_of_bucket

MULTIPLIERS = (1, 3, 10, 30)
# The replay day 0 a fresh home gets (as benchmarks/bench_training.py uses).
DEFAULT_REPLAY_START = "2026-11-01"
RATIOS = (1.0, 0.95, 0.90, 0.80)


@dataclass(frozen=True)
class Traffic:
    """A plan as simulated: requests per second over all users, and the pre-period length."""

    plan: RolloutPlan
    rate: float
    pre_seconds: float

    @property
    def name(self) -> str:
        return self.plan.name


# The demo's simulator sends 20 req/s; its champion-only period is the few minutes the second
# run trains for. Prod: 20 req/s over the same 551 users is ~80 lists per user per hour-long
# step; the pre-period is a day (capped by the baseline's reach).
TRAFFIC = {
    "demo": Traffic(PROFILES["demo"], rate=20.0, pre_seconds=300.0),
    "prod": Traffic(PROFILES["prod"], rate=20.0, pre_seconds=BASELINE_MAX_SECONDS["prod"]),
}


@dataclass
class Outcome:
    group_rejected: bool
    naive_rejected: bool
    variance_removed: float | None


def _lists(rng: np.random.Generator, rate_per_user: np.ndarray, seconds: float) -> np.ndarray:
    return rng.poisson(rate_per_user * seconds).astype(np.float64)


def simulate(rng: np.random.Generator, traffic: Traffic, mult: float, champion: np.ndarray,
             canary: np.ndarray, activity: np.ndarray) -> Outcome:
    """One rollout of the plan; ``champion``/``canary`` are per-user expected clicks per list,
    ``activity`` each user's share of the requests (sums to 1)."""
    plan = traffic.plan
    t = plan.thresholds
    profile = plan.name.split("+", 1)[0]
    salt = f"bench-{rng.integers(1 << 62)}"
    users = np.arange(champion.size)
    group = np.array([group_of_bucket(bucket(int(u), salt)) for u in users])
    rate = activity * traffic.rate * mult
    n0 = _lists(rng, rate, traffic.pre_seconds)
    c0 = rng.poisson(n0 * champion).astype(np.float64)
    pre = GroupWindow.of(np.bincount(group, n0, N_GROUPS), np.bincount(group, c0, N_GROUPS))
    scale = MIXTURE_SCALE.get(profile, 0.1)
    state = start_state(t["ctr_margin"], t["alpha"], scale, [s.percent for s in plan.steps],
                        [s.bake_seconds for s in plan.steps]).with_baseline(pre, traffic.pre_seconds)
    naive = CtrState.start(Thresholds(ctr_margin=t["ctr_margin"], alpha=t["alpha"], ctr_mixture_scale=scale))
    naive_rejected = False
    removed = None
    interval = plan.analysis_interval_seconds
    for i, step in enumerate(plan.steps):
        if step.percent >= 100:
            break
        mask = canary_groups(step.percent, N_GROUPS)
        on = mask[group]
        truth = np.where(on, canary, champion)
        n = np.zeros(users.size)
        c = np.zeros(users.size)
        elapsed = 0.0
        while True:
            elapsed += interval
            dn = _lists(rng, rate, interval)
            n += dn
            c += rng.poisson(dn * truth)
            post = GroupWindow.of(np.bincount(group, n, N_GROUPS), np.bincount(group, c, N_GROUPS))
            state, est, _ = update(state, i, post, mask, step.min_impressions)
            if est is not None:
                removed = est.variance_removed
            naive = update_ctr_state(naive, i, n[on].sum(), c[on].sum(), n[~on].sum(), c[~on].sum())
            naive_rejected |= naive.p_value <= t["alpha"]
            if state.rejected and naive_rejected:
                return Outcome(True, True, removed)
            enough = min(n[on].sum(), n[~on].sum()) >= step.min_impressions
            if (elapsed >= step.bake_seconds and enough) or elapsed >= step.max_bake_seconds:
                break
    return Outcome(state.rejected, naive_rejected, removed)


def real_user_clicks(home: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-user expected clicks of the champion (v1) and a real challenger (v2) over the panel,
    from ``home``'s registry and panel when a run left them there, else built now the way the
    demo builds them (land, features, train, register, index for replay days 0 and 1)."""
    os.environ["DAYLOOP_HOME"] = str(home)
    if not (home / "replay_start").is_file():
        os.environ.setdefault("DAYLOOP_REPLAY_START", DEFAULT_REPLAY_START)
    from dayloop.config import load_settings
    from dayloop.registry import Registry
    from dayloop.simulation.panel import panel_from_replay, read_panel
    from dayloop.simulation.truth import panel_path, version_truth

    settings = load_settings()
    reg = Registry(settings)
    try:
        versions = sorted(int(v.version) for v in reg.client.search_model_versions(f"name = '{reg.name}'"))
    except Exception:  # noqa: BLE001 - no registered model yet: build one below
        versions = []
    path = panel_path(settings)
    day0 = settings.replay_start
    if len(versions) < 2 or not path.is_file():
        from dayloop import pipeline

        versions = []
        for ds in (day0, day0 + dt.timedelta(days=1)):
            t0 = time.perf_counter()
            pipeline.land_partition(ds, settings)
            feats = pipeline.build_features(ds, settings, "local[2]")
            trained = pipeline.train_model(ds, settings, feats["features"])
            ref = pipeline.register_model(ds, settings, trained, feats)
            pipeline.rebuild_index(ds, settings, int(ref["version"]), feats["features"])
            versions.append(int(ref["version"]))
            print(f"built v{versions[-1]} for {ds} in {time.perf_counter() - t0:.0f} s", flush=True)
        panel_from_replay(settings, after=day0, days=7).write(path)
    panel = read_panel(path)
    v1, v2 = versions[0], versions[1]
    # as served during v2's canary: both arms exclude v2's (fresher) seen history
    t1 = version_truth(settings, v1, panel, registry=reg, seen_from=v2)
    t2 = version_truth(settings, v2, panel, registry=reg)
    info = {"v1": v1, "v2": v2, "users": t1.n_users, "mean_v1": t1.mean_expected_clicks,
            "mean_v2": t2.mean_expected_clicks, "excluded_seen": t1.excluded_seen and t2.excluded_seen}
    return t1.per_user, t2.per_user, info


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="DAYLOOP_HOME of a run with two versions "
                        "and the panel (default: a temp dir, built now)")
    parser.add_argument("--rollouts", type=int, default=1000, help="simulated rollouts per row")
    parser.add_argument("--quick", action="store_true", help="200 rollouts per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activity", action="store_true", help="also rows with heavy-tailed user activity")
    args = parser.parse_args(argv)
    n = 200 if args.quick else args.rollouts
    home = args.home or Path(tempfile.mkdtemp(prefix="dayloop-bench-ctr-"))
    t0 = time.perf_counter()
    e1, e2, info = real_user_clicks(home.resolve())
    print(f"panel: {info['users']} real users; expected clicks per list v{info['v1']} {info['mean_v1']:.4f}, "
          f"v{info['v2']} {info['mean_v2']:.4f} (true ratio {info['mean_v2'] / info['mean_v1']:.4f}); "
          f"per-user sd v1 {e1.std():.3f}, {np.mean(e1 < 0.05):.0%} of users earn only noise clicks; "
          f"seen items excluded: {info['excluded_seen']}; correlation v1/v2 per user "
          f"{np.corrcoef(e1, e2)[0, 1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed)
    uniform = np.full(e1.size, 1.0 / e1.size)
    activities = [("uniform users (as the simulator draws them)", uniform)]
    if args.activity:
        heavy = rng.lognormal(0.0, 1.2, e1.size)
        activities.append(("heavy-tailed activity (lognormal sigma 1.2)", heavy / heavy.sum()))
    print(f"\n{n} rollouts per cell; rolled back (any look, any step), impression-level test / user-level test")
    for label, activity in activities:
        print(f"\n## {label}")
        for name, traffic in TRAFFIC.items():
            plan = traffic.plan
            per_user = traffic.rate * plan.steps[0].bake_seconds / e1.size
            print(f"\n{name} plan: steps {[s.percent for s in plan.steps]}, look every "
                  f"{plan.analysis_interval_seconds:g} s, {traffic.rate:g} req/s at 1x "
                  f"({per_user:.1f} lists per user in the first step's bake), pre-period "
                  f"{traffic.pre_seconds:g} s, margin {plan.thresholds['ctr_margin']:g}, alpha "
                  f"{plan.thresholds['alpha']:g}")
            print(f"{'canary':<22}" + "".join(f"{f'{m}x':>22}" for m in MULTIPLIERS))
            rows = [("A/A (identical)", e1, 1.0)] + [(f"true {r - 1:+.0%}", e1, r) for r in RATIOS[1:]] \
                + [(f"real v{info['v2']} ({info['mean_v2'] / info['mean_v1'] - 1:+.1%})", e2, 1.0)]
            removed: dict[int, list[float]] = {m: [] for m in MULTIPLIERS}
            for row, canary_base, ratio in rows:
                cells = []
                for m in MULTIPLIERS:
                    outs = [simulate(rng, traffic, m, e1, canary_base * ratio, activity) for _ in range(n)]
                    naive = np.mean([o.naive_rejected for o in outs])
                    grp = np.mean([o.group_rejected for o in outs])
                    removed[m] += [o.variance_removed for o in outs if o.variance_removed is not None]
                    cells.append(f"{_pct(naive)} / {_pct(grp)}")
                print(f"{row:<22}" + "".join(f"{c:>22}" for c in cells), flush=True)
            print(f"{'variance removed':<22}" + "".join(
                f"{np.mean(removed[m]) if removed[m] else float('nan'):>22.0%}" for m in MULTIPLIERS))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
