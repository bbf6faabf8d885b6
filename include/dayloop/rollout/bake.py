"""One look at a baking canary step: is the rollout still ours, what did Prometheus see over
the step's window, and what does that decide.

The bake trigger (:mod:`dayloop.airflow.triggers`) calls :func:`look` every
``analysis_interval_seconds`` from the start of a step, in a thread of the triggerer:

* the route table is read first. If it is no longer this rollout's (its salt, its canary
  routed: ``RouteTable.owned_by``), someone else
  (the manual rollback DAG, an operator with the admin API) has taken the traffic over:
  the step ends ``aborted`` and the rollout stops without another write;
* the window is ``[step start + drain, now - one scrape]``: requests routed before the
  step's table reached every replica are left out, and the last scrape is complete;
* :func:`dayloop.rollout.analysis.analyse` judges canary against control (control is absent
  at the 100 % step: only the absolute guardrails run there).

:func:`decide` turns the analysis phase and the elapsed time into the step's decision:
a failure ends the step at once, whenever it is seen (early looks at small samples can only
fail on checks built for that: NaN, the always-valid CTR test); a pass counts only once the
bake time has elapsed; anything short of a pass by ``max_bake_seconds`` fails safe.
Prometheus unreachable or a router replica missing scrapes is inconclusive, never healthy.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dayloop.jsonsafe import to_plain
from dayloop.rollout.plan import RolloutPlan, RolloutStep

if TYPE_CHECKING:  # pragma: no cover
    from dayloop.rollout.context import RolloutContext

log = logging.getLogger(__name__)

CONTINUE = "continue"
PASSED = "pass"
FAILED = "fail"
ABORTED = "aborted"

# Width of the half-normal mixture of the CTR test per profile, as measured best by
# benchmarks/bench_rollout_analysis.py: demo windows only resolve large drops, prod
# windows are sized for 5-10 % drops.
MIXTURE_SCALE = {"demo": 0.2, "prod": 0.05}
# How far back the CTR test's pre-period baseline reaches at most (from the first canary
# step): a day in production (one daily cycle of every group's users), a quarter of an hour
# in the demo (its champion-only period is the few minutes the run trains for).
BASELINE_MAX_SECONDS = {"demo": 900.0, "prod": 86400.0}


def parse_time(value: str | dt.datetime) -> dt.datetime:
    """An aware UTC datetime from an ISO string (naive strings are read as UTC)."""
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def thresholds_for_step(plan: RolloutPlan, step: RolloutStep):
    """The analysis thresholds of one step: the plan's, plus the step's sample minimums."""
    from dayloop.rollout.analysis import Thresholds

    profile = plan.name.split("+", 1)[0]
    values = dict(plan.thresholds)
    values.update(min_requests=step.min_requests, min_impressions=step.min_impressions,
                  ctr_mixture_scale=MIXTURE_SCALE.get(profile, 0.1))
    return Thresholds.from_mapping(values)


def version_window(counts: Any):
    """A Prometheus :class:`~dayloop.rollout.prom.VersionCounts` as the analysis's VersionWindow."""
    from dayloop.rollout.analysis import Histogram, VersionWindow

    def hist(buckets):
        return None if buckets is None else Histogram.from_prometheus(buckets)

    return VersionWindow(requests=counts.requests, errors=counts.errors, nonfinite=counts.nonfinite,
                         impressions=counts.impressions, clicks=counts.clicks,
                         latency=hist(counts.latency_buckets), scores=hist(counts.score_buckets))


def decide(phase: str, elapsed_s: float, step: RolloutStep) -> tuple[str, str | None]:
    """(decision, why) for one look: ``fail`` at once; ``pass`` once baked; ``fail`` (safe)
    when nothing better was reached by the step's maximum bake; else ``continue``."""
    if phase == "fail":
        return FAILED, None
    if phase == "pass" and elapsed_s >= step.bake_seconds:
        return PASSED, None
    if elapsed_s >= step.max_bake_seconds:
        return FAILED, (f"no passing analysis after {elapsed_s:.0f} s (max bake {step.max_bake_seconds:g} s): "
                        f"last phase {phase}; failing safe")
    return CONTINUE, None


def look(ctx: RolloutContext, step_index: int, started_at: str, ctr_state: Mapping[str, Any] | None,
         now: dt.datetime | None = None) -> dict[str, Any]:
    """Read the route table and Prometheus once and judge the step. Returns a JSON-safe dict:
    ``decision`` (continue/pass/fail/aborted), ``phase``, ``elapsed_s``, ``reasons``,
    ``analysis`` (Analysis.as_dict or None) and the CTR state to carry to the next look."""
    from dayloop.rollout.analysis import INCONCLUSIVE, GroupWindow, StepGroups, analyse
    from dayloop.rollout.analysis.grouped import canary_groups
    from dayloop.rollout.deploy import taken_over
    from dayloop.rollout.prom import PrometheusUnavailable, read_groups, read_window, scrape_health
    from serving.client import DataPlaneClient
    from serving.routing import N_GROUPS

    plan = ctx.require_plan()
    endpoints = ctx.require_endpoints()
    step = plan.steps[step_index]
    now = now or now_utc()
    start = parse_time(started_at)
    elapsed = (now - start).total_seconds()
    out: dict[str, Any] = {"at": now.isoformat(timespec="seconds"), "step": step_index, "percent": step.percent,
                           "elapsed_s": round(elapsed, 1), "analysis": None, "ctr_state": ctr_state}

    client = DataPlaneClient.from_plane_file(endpoints.plane_file)
    try:
        current = client.router.routes()
    except Exception as exc:  # noqa: BLE001 - the routers unreachable: cannot judge, cannot be healthy
        return _finish(out, INCONCLUSIVE, [f"route table unreadable: {exc}"], step, elapsed)
    if not ctx.owns(current):
        out.update(decision=ABORTED, phase=ABORTED, reasons=[taken_over(current)])
        return to_plain(out)
    tripped = breaker_trips(client, ctx.version, start)
    if tripped:
        return _finish(out, "fail", tripped, step, elapsed)

    scrape = endpoints.scrape_interval_s
    window_start = start + dt.timedelta(seconds=plan.drain_seconds)
    window_end = now - dt.timedelta(seconds=scrape + 0.5)
    if window_end <= window_start:
        return _finish(out, INCONCLUSIVE, ["window not open yet (drain)"], step, elapsed)
    canary, control = ctx.version, ctx.champion
    prom_url = endpoints.prom_url
    try:
        health = scrape_health(prom_url, start=window_start, end=window_end, scrape_interval_seconds=scrape)
        counts = read_window(prom_url, [canary, control], window_start, window_end,
                             scrape_interval_seconds=scrape)
    except PrometheusUnavailable as exc:
        return _finish(out, INCONCLUSIVE, [f"Prometheus unavailable: {exc}"], step, elapsed)
    thresholds = thresholds_for_step(plan, step)
    control_window = version_window(counts[control]) if step.percent < 100 else None
    try:
        state = user_ctr_state(ctx, ctr_state, thresholds)
        users = None
        if control_window is not None:
            state = with_baseline(ctx, state)
            groups = read_groups(prom_url, [canary, control], window_start, window_end, n_groups=N_GROUPS,
                                 scrape_interval_seconds=scrape)
            users = StepGroups(step_index, GroupWindow.of(groups.impressions, groups.clicks),
                               canary_groups(step.percent, N_GROUPS))
    except PrometheusUnavailable as exc:
        return _finish(out, INCONCLUSIVE, [f"Prometheus unavailable: {exc}"], step, elapsed)
    analysis = analyse(version_window(counts[canary]), control_window, thresholds, state, step=step_index,
                       users=users)
    reasons = list(analysis.reasons)
    phase = analysis.phase
    if not health["healthy"]:
        reasons.append(f"router scrapes incomplete in the window: {health['up']}/{health['total']} targets "
                       f"up throughout ({health['targets']})")
        if phase == "pass":
            phase = INCONCLUSIVE
    out["analysis"] = analysis.as_dict()
    out["ctr_state"] = analysis.ctr_state.to_dict() if analysis.ctr_state is not None else ctr_state
    return _finish(out, phase, reasons, step, elapsed)


def breaker_trips(client: Any, version: int, since: dt.datetime) -> list[str]:
    """One sentence per circuit-breaker trip of ``version`` any router replica reports since
    ``since`` (a hard fault: errors, NaN, timeouts over a short window). A replica that does
    not answer reports nothing here; the look's scrape check covers it."""
    out = []
    for url, report in client.router.breakers().items():
        for trip in (report or {}).get("trips", []):
            if trip.get("version") != version or float(trip.get("at", 0)) < since.timestamp():
                continue
            at = dt.datetime.fromtimestamp(float(trip["at"]), dt.timezone.utc).isoformat(timespec="milliseconds")
            faults = ", ".join(f"{k} {n}" for k, n in sorted((trip.get("faults") or {}).items()))
            out.append(f"circuit breaker opened on v{version} in {trip.get('replica', url)} at {at}: "
                       f"{trip.get('why')} ({faults})")
    return out


def watch_breakers(ctx: RolloutContext, started_at: str) -> list[str]:
    """The trips of the canary since its step began (the bake trigger polls this between
    looks); [] when none, or when the routers cannot be read right now."""
    from serving.client import DataPlaneClient

    client = DataPlaneClient.from_plane_file(ctx.require_endpoints().plane_file)
    try:
        return breaker_trips(client, ctx.version, parse_time(started_at))
    except Exception as exc:  # noqa: BLE001 - the next look reads the routers again
        log.info("breaker watch: routers unreadable (%s)", exc)
        return []


def cut_off(ctx: RolloutContext, step_index: int, started_at: str, trips: list[str]) -> dict[str, Any]:
    """Fail the step on breaker trips and send 100% to the champion at once (one route write,
    only while the table is still this rollout's); the result is the step's decision."""
    from dayloop.rollout import deploy
    from serving.client import DataPlaneClient

    plan = ctx.require_plan()
    step = plan.steps[step_index]
    now = now_utc()
    elapsed = (now - parse_time(started_at)).total_seconds()
    client = DataPlaneClient.from_plane_file(ctx.require_endpoints().plane_file)
    out: dict[str, Any] = {"at": now.isoformat(timespec="seconds"), "step": step_index, "percent": step.percent,
                           "elapsed_s": round(elapsed, 1), "analysis": None, "ctr_state": None}
    reasons = list(trips)
    try:
        rev = deploy.cut_off(client, ctx.version, ctx.champion, ctx.owns, trips[0],
                             f"rollout/v{ctx.version}/breaker")
        reasons.append(f"cut off: 100% to champion v{ctx.champion} at revision {rev.revision} by the bake"
                       if rev is not None else "the route table was no longer this rollout's: no cut-off written")
    except Exception as exc:  # noqa: BLE001 - the DAG's rollback task still puts the champion back
        reasons.append(f"cut-off write failed ({type(exc).__name__}: {exc}); the rollback task routes instead")
    out.update(decision=FAILED, phase="fail", reasons=reasons)
    return to_plain(out)


def user_ctr_state(ctx: RolloutContext, doc: Mapping[str, Any] | None, thresholds: Any):
    """The user-level CTR test's state carried from the previous look, or a fresh one with
    the plan's per-step alpha split (also when an older rollout carried another kind)."""
    from dayloop.rollout.analysis.grouped import GroupCtrState, start_state

    if doc and doc.get("unit") == GroupCtrState.unit:
        return GroupCtrState.from_dict(doc)
    plan = ctx.require_plan()
    return start_state(thresholds.ctr_margin, thresholds.alpha, thresholds.ctr_mixture_scale,
                       [s.percent for s in plan.steps], [s.bake_seconds for s in plan.steps])


def with_baseline(ctx: RolloutContext, state: Any) -> Any:
    """``state`` with the pre-period baseline read once from Prometheus: the champion's
    per-group counts from when its champion-only table (whose salt the rollout kept) was
    written, at most ``BASELINE_MAX_SECONDS`` back, to when the first canary step began.
    Without a recorded start (the rollout had to take a fresh salt) there is none, and the
    CTR check stays inconclusive. Raises PrometheusUnavailable (caller: inconclusive)."""
    from dayloop.rollout.analysis import GroupWindow
    from dayloop.rollout.prom import read_groups
    from serving.routing import N_GROUPS

    if state.baseline is not None or not ctx.baseline_start or not ctx.started_at:
        return state
    plan = ctx.require_plan()
    endpoints = ctx.require_endpoints()
    end = parse_time(ctx.started_at)
    reach = BASELINE_MAX_SECONDS.get(plan.name.split("+", 1)[0], BASELINE_MAX_SECONDS["prod"])
    start = max(parse_time(ctx.baseline_start) + dt.timedelta(seconds=plan.drain_seconds),
                end - dt.timedelta(seconds=reach))
    if (end - start).total_seconds() < 2 * endpoints.scrape_interval_s:
        return state
    got = read_groups(endpoints.prom_url, [ctx.champion], start, end, n_groups=N_GROUPS,
                      scrape_interval_seconds=endpoints.scrape_interval_s)
    return state.with_baseline(GroupWindow.of(got.impressions, got.clicks), (end - start).total_seconds())


def _finish(out: dict[str, Any], phase: str, reasons: list[str], step: RolloutStep, elapsed: float) -> dict[str, Any]:
    decision, why = decide(phase, elapsed, step)
    if why:
        reasons = [why, *reasons]
    out.update(decision=decision, phase=phase, reasons=reasons)
    return to_plain(out)


def summary_line(result: Mapping[str, Any]) -> str:
    """One log line for a look: decision, phase and every check's message."""
    head = (f"step {result['step']} ({result['percent']:g}%) at {result['elapsed_s']:.0f}s: "
            f"{result['decision'].upper()} (analysis {result['phase']})")
    analysis = result.get("analysis") or {}
    checks = [f"{c['name']}={c['phase']}{' (advisory)' if c.get('advisory') else ''}: {c['message']}"
              for c in analysis.get("checks", [])]
    extra = [r for r in result.get("reasons", []) if not any(r.endswith(c["message"]) for c in analysis.get("checks", []))]
    return " | ".join([head, *extra, *checks])
