"""The canary analysis's operational guardrails on simulated rollouts: false rollbacks and
detection at demo and prod sizes.

Its world draws every impression independently of users, which is right for errors, NaN
and latency (per request) and is the impression-level CTR test's own assumption: the CTR
columns here measure that test under its assumption only. How the CTR tests fare on real
users who repeat and differ is ``benchmarks/bench_rollout_analysis.py``.

Every rollout is a stream of per-version counts drawn from a simple world (Poisson traffic
split by the step's canary share, binomial errors, Poisson or over-dispersed clicks,
multinomial latency and score histograms with the router's buckets) and judged by
``dayloop.rollout.analysis.analyse`` exactly as the DAG will: one look per bake interval,
the step window growing while a look is inconclusive (up to ``max_looks`` per step, then
fail safe), a fail ending the rollout. A step at 100 % has no control arm: only the absolute
checks run there.

Printed, per profile and world, over ``--rollouts`` rollouts (1,000 by default):

1. the whole analysis: share of rollouts promoted, rolled back on a failed check (and by
   which: CTR or any other), failed safe after inconclusive bakes; the mean look and
   minutes at a CTR rollback; and, on the same looks, how often a fixed-horizon z-test in
   place of the CTR test would have rolled back;
2. the CTR test alone, one look per step with a control arm, next to the naive z-test;
3. the CTR test's sensitivity to its mixture scale, and to over-dispersed clicks.

No asserts: it reports. ``--quick`` runs 200 rollouts per row.

    .venv/bin/python benchmarks/bench_rollout_guardrails.py
    .venv/bin/python benchmarks/bench_rollout_guardrails.py --quick --seed 7
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats as sps

from dayloop.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    CtrState,
    Histogram,
    Thresholds,
    VersionWindow,
    analyse,
    naive_fixed_horizon_pvalue,
    update_ctr_state,
)

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
# The router's buckets (serving/router/metrics.py), each histogram closed by +Inf.
from serving_helpers import LATENCY_LE, SCORE_LE  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """A rollout plan as the simulation needs it: total request rate over all versions,
    bake per look, canary share per step, looks per step before failing safe."""

    name: str
    rate: float
    bake_s: float
    shares: tuple[float, ...]
    max_looks: int
    thresholds: Thresholds

    def describe(self) -> str:
        per_look = self.rate * self.bake_s
        arms = ", ".join(f"{s:.0%}: {per_look * s:,.0f}/{per_look * (1 - s):,.0f}" for s in self.shares)
        return (f"{self.name}: {self.rate:g} req/s, {self.bake_s:g} s per look, up to {self.max_looks} looks per "
                f"step, min {self.thresholds.min_requests:g} requests/lists per arm, CTR mixture scale "
                f"{self.thresholds.ctr_mixture_scale:g}; lists per look canary/control by step: {arms}")


@dataclass(frozen=True)
class World:
    """What the versions do. The canary differs from control only by ``ctr_ratio``."""

    label: str
    ctr: float = 0.3  # clicks per list served by control
    ctr_ratio: float = 1.0  # canary / control clicks per list
    error_ratio: float = 0.0005
    latency_median_s: float = 0.0085
    latency_sigma: float = 0.35  # log-normal: p99 ~ 19 ms, the router's measured figure
    score_mean: float = 0.55
    score_sd: float = 0.12
    click_dispersion: float = 1.0  # variance / mean of clicks (gamma-Poisson when > 1)


def _bucket_probs(bounds: tuple[float, ...], cdf) -> np.ndarray:
    cum = np.array([cdf(b) if math.isfinite(b) else 1.0 for b in bounds])
    return np.diff(cum, prepend=0.0)


@dataclass(frozen=True)
class _Probs:
    latency: np.ndarray
    scores: np.ndarray


def _probs(world: World) -> _Probs:
    return _Probs(
        latency=_bucket_probs(LATENCY_LE, sps.lognorm(s=world.latency_sigma, scale=world.latency_median_s).cdf),
        scores=_bucket_probs(SCORE_LE, sps.norm(world.score_mean, world.score_sd).cdf),
    )


def _clicks(rng: np.random.Generator, mean: np.ndarray | float, lists: np.ndarray | float,
            dispersion: float) -> np.ndarray:
    """Total clicks on ``lists`` lists with the given mean: Poisson, or gamma-Poisson with
    variance ``dispersion x mean`` (per-list shape k = ctr / (dispersion - 1), summed)."""
    mean = np.asarray(mean, dtype=np.float64)
    if dispersion <= 1.0:
        return np.asarray(rng.poisson(mean), dtype=np.float64)
    lists = np.asarray(lists, dtype=np.float64)
    per_list = np.divide(mean, lists, out=np.zeros_like(mean), where=lists > 0)
    shape = lists * per_list / (dispersion - 1.0)
    lam = np.where(shape > 0, rng.gamma(np.maximum(shape, 1e-300), dispersion - 1.0), 0.0)
    return np.asarray(rng.poisson(lam), dtype=np.float64)


def simulate_interval(rng: np.random.Generator, world: World, probs: _Probs, lists: float,
                      canary: bool) -> np.ndarray:
    """One arm's counts over one bake interval with ``lists`` expected requests:
    [requests, errors, nonfinite, impressions, clicks, *latency bins, *score bins]."""
    n = int(rng.poisson(lists))
    errors = int(rng.binomial(n, world.error_ratio))
    impressions = n - errors
    ctr = world.ctr * (world.ctr_ratio if canary else 1.0)
    clicks = float(_clicks(rng, ctr * impressions, impressions, world.click_dispersion))
    lat = rng.multinomial(n, probs.latency)
    scores = rng.multinomial(impressions, probs.scores)
    return np.concatenate([[n, errors, 0, impressions, clicks], lat, scores]).astype(np.float64)


def _window(counts: np.ndarray) -> VersionWindow:
    n_lat = len(LATENCY_LE)
    return VersionWindow(
        requests=counts[0], errors=counts[1], nonfinite=counts[2], impressions=counts[3], clicks=counts[4],
        latency=Histogram(LATENCY_LE, tuple(np.cumsum(counts[5:5 + n_lat]))),
        scores=Histogram(SCORE_LE, tuple(np.cumsum(counts[5 + n_lat:]))),
    )


@dataclass
class RolloutOutcome:
    outcome: str  # promoted | rollback | failsafe
    failed: tuple[str, ...]
    look: int  # 1-based look at which the rollout ended
    minutes: float
    naive_rollback: bool  # the CTR check as a z-test at every look would have failed


def simulate_rollout(rng: np.random.Generator, profile: Profile, world: World, probs: _Probs) -> RolloutOutcome:
    """One rollout judged by ``analyse`` at every look, as the DAG runs it."""
    t = profile.thresholds
    state: CtrState | None = None
    look = 0
    naive = False
    per_look = profile.rate * profile.bake_s
    for step, share in enumerate(profile.shares):
        canary = np.zeros(5 + len(LATENCY_LE) + len(SCORE_LE))
        control = np.zeros_like(canary)
        for _ in range(profile.max_looks):
            look += 1
            canary += simulate_interval(rng, world, probs, per_look * share, canary=True)
            has_control = share < 1.0
            if has_control:
                control += simulate_interval(rng, world, probs, per_look * (1 - share), canary=False)
            result = analyse(_window(canary), _window(control) if has_control else None, t, state, step=step)
            state = result.ctr_state
            if state is not None and state.batches:
                naive = naive or naive_fixed_horizon_pvalue(*state.totals(), margin=t.ctr_margin) <= t.alpha
            minutes = look * profile.bake_s / 60
            if result.phase == FAIL:
                failed = tuple(c.name for c in result.checks if c.phase == FAIL)
                return RolloutOutcome("rollback", failed, look, minutes, naive)
            if result.phase != INCONCLUSIVE:
                break
        else:
            return RolloutOutcome("failsafe", (), look, look * profile.bake_s / 60, naive)
    return RolloutOutcome("promoted", (), look, look * profile.bake_s / 60, naive)


def simulate_ctr_streams(rng: np.random.Generator, profile: Profile, world: World, n: int) -> np.ndarray:
    """Per rollout and step with a control arm, one bake's impressions and clicks per arm:
    shape (n, steps, 4) = canary impressions, canary clicks, control impressions, control clicks."""
    shares = np.array([s for s in profile.shares if s < 1.0])
    per_look = profile.rate * profile.bake_s
    out = np.empty((n, shares.size, 4))
    for j, (share, ratio) in enumerate(((shares, world.ctr_ratio), (1 - shares, 1.0))):
        lists = rng.poisson(per_look * share, size=(n, shares.size)).astype(np.float64)
        impressions = lists - rng.binomial(lists.astype(np.int64), world.error_ratio)
        out[:, :, 2 * j] = impressions
        out[:, :, 2 * j + 1] = _clicks(rng, world.ctr * ratio * impressions, impressions, world.click_dispersion)
    return out


def ctr_alone(streams: np.ndarray, t: Thresholds) -> tuple[float, float, float, float]:
    """(mSPRT rejection rate, its mean look at rejection, naive rate, naive mean look)."""
    ms_looks, nv_looks = [], []
    for sim in streams:
        state = CtrState.start(t)
        totals = np.zeros(4)
        ms_at = nv_at = None
        for look, counts in enumerate(sim, start=1):
            state = update_ctr_state(state, look, *counts)
            totals += counts
            if ms_at is None and state.p_value <= t.alpha:
                ms_at = look
            if nv_at is None and naive_fixed_horizon_pvalue(*totals, margin=t.ctr_margin,
                                                             dispersion=t.ctr_dispersion) <= t.alpha:
                nv_at = look
        if ms_at:
            ms_looks.append(ms_at)
        if nv_at:
            nv_looks.append(nv_at)
    n = len(streams)

    def mean(v: list[int]) -> float:
        return float(np.mean(v)) if v else math.nan

    return len(ms_looks) / n, mean(ms_looks), len(nv_looks) / n, mean(nv_looks)


PROFILES = (
    # 20 req/s simulator, 45 s bakes: 900 lists a look. A step needs 150 requests and lists
    # per arm, so the 10 % step bakes twice before its first verdict. At these counts only
    # large drops are detectable, hence a wide mixture (table 3).
    Profile("demo", rate=20, bake_s=45, shares=(0.10, 0.25, 0.50, 1.00), max_looks=3,
            thresholds=Thresholds(min_requests=150, min_impressions=150, ctr_mixture_scale=0.2)),
    # 200 req/s, 5 min bakes: 60,000 lists a look; 1 % is 600 canary lists. Drops of 5-10 %
    # are within reach, hence a narrow mixture (table 3).
    Profile("prod", rate=200, bake_s=300, shares=(0.01, 0.05, 0.25, 0.50, 1.00), max_looks=3,
            thresholds=Thresholds(min_requests=500, min_impressions=500, ctr_mixture_scale=0.05)),
)
WORLDS = (
    World("A/A (identical)"),
    World("canary -2% (at the margin)", ctr_ratio=0.98),
    World("canary -5%", ctr_ratio=0.95),
    World("canary -10%", ctr_ratio=0.90),
    World("canary -30%", ctr_ratio=0.70),
)


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 rollouts per row")
    parser.add_argument("--seed", type=int, default=20240604)
    args = parser.parse_args(argv)
    n = 200 if args.quick else args.rollouts
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    t0 = PROFILES[0].thresholds
    w0 = WORLDS[0]
    print(f"{n} simulated rollouts per row; alpha {t0.alpha}, CTR margin {t0.ctr_margin:.0%}; both versions: "
          f"{w0.ctr} clicks/list on control, error ratio {w0.error_ratio:.2%}, log-normal latency p99 "
          f"{w0.latency_median_s * math.exp(2.326 * w0.latency_sigma) * 1000:.0f} ms, top-1 score "
          f"N({w0.score_mean}, {w0.score_sd})")

    print("\n1. Whole analysis (every check, keep baking while inconclusive, fail on any failed check)")
    for profile in PROFILES:
        print(f"\n  {profile.describe()}")
        print(f"  {'world':28} {'promoted':>8} {'rollback':>8} {'by CTR':>7} {'other':>7} {'failsafe':>8} "
              f"{'CTR look':>8} {'min':>5} {'naive-z':>8}")
        for world in WORLDS:
            probs = _probs(world)
            outs = [simulate_rollout(rng, profile, world, probs) for _ in range(n)]
            rb = [o for o in outs if o.outcome == "rollback"]
            by_ctr = [o for o in rb if "ctr" in o.failed]
            other = [o for o in rb if any(f != "ctr" for f in o.failed)]
            naive = sum(o.naive_rollback or (o.outcome == "rollback" and "ctr" not in o.failed) for o in outs)
            look = np.mean([o.look for o in by_ctr]) if by_ctr else math.nan
            minutes = np.mean([o.minutes for o in by_ctr]) if by_ctr else math.nan
            print(f"  {world.label:28} {_pct(sum(o.outcome == 'promoted' for o in outs) / n):>8} "
                  f"{_pct(len(rb) / n):>8} {_pct(len(by_ctr) / n):>7} {_pct(len(other) / n):>7} "
                  f"{_pct(sum(o.outcome == 'failsafe' for o in outs) / n):>8} {look:8.2f} {minutes:5.1f} "
                  f"{_pct(naive / n):>8}")
    print("  (rollback = any check failed; 'CTR look'/'min' = mean look / minutes at a CTR rollback; naive-z = "
          "rollbacks had the CTR check been a fixed-horizon z-test read at every one of the same looks)")

    print("\n2. CTR test alone, one look per step with a control arm (cumulative over the rollout)")
    for profile in PROFILES:
        steps = sum(s < 1.0 for s in profile.shares)
        print(f"\n  {profile.name}: {steps} looks")
        print(f"  {'world':28} {'mSPRT':>7} {'at look':>7} {'naive z':>7} {'at look':>7}")
        for world in WORLDS:
            ms, ms_look, nv, nv_look = ctr_alone(simulate_ctr_streams(rng, profile, world, n), profile.thresholds)
            print(f"  {world.label:28} {_pct(ms):>7} {ms_look:7.2f} {_pct(nv):>7} {nv_look:7.2f}")

    print("\n3. CTR test alone: mixture scale (rows) vs world (columns), rejection rate")
    sens_worlds = (WORLDS[1], WORLDS[2], WORLDS[3], WORLDS[4])
    for profile in PROFILES:
        print(f"\n  {profile.name:6} {'tau':>5} " + " ".join(f"{w.label.split(' (')[0]:>12}" for w in sens_worlds))
        for tau in (0.05, 0.1, 0.2, 0.4):
            t = replace(profile.thresholds, ctr_mixture_scale=tau)
            cells = [ctr_alone(simulate_ctr_streams(rng, profile, w, n), t)[0] for w in sens_worlds]
            print(f"  {'':6} {tau:5.2f} " + " ".join(f"{_pct(c):>12}" for c in cells))

    print("\n4. CTR test alone, A/A at the margin (true ratio 0.98) with over-dispersed clicks")
    print(f"  {'profile':8} {'clicks var/mean':>15} {'test assumes':>12} {'mSPRT':>7} {'naive z':>7}")
    for profile in PROFILES:
        for true_disp, assumed in ((1.0, 1.0), (1.5, 1.0), (1.5, 1.5), (2.5, 1.0), (2.5, 2.5)):
            world = replace(WORLDS[1], click_dispersion=true_disp)
            t = replace(profile.thresholds, ctr_dispersion=assumed)
            ms, _, nv, _ = ctr_alone(simulate_ctr_streams(rng, profile, world, n), t)
            print(f"  {profile.name:8} {true_disp:15.1f} {assumed:12.1f} {_pct(ms):>7} {_pct(nv):>7}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
