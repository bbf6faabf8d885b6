"""The daily DAG's rollout, task by task: deploy the canary, move between bake steps,
promote, retire the old version, roll back, and close the run with its outcome.

Each public function here is what one Airflow task (or one resume of the bake operator)
calls, named like its task. The rollout's state between them is a
:class:`~dayloop.rollout.context.RolloutContext` (mode, version, champion, route salt,
validated plan, endpoints, when step 0 began); :mod:`dayloop.airflow.tasks` turns it into
XCom's dict and back, nothing here sees the dict.

Facts are recorded where people look: the route store's history (every write has an actor
and a reason), MLflow version tags ``dayloop.rollout.*`` (status, per-step verdicts,
failure reason), aliases, and the task logs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.registry import TAG_ROLLOUT
from dayloop.rollout.bake import now_utc
from dayloop.rollout.context import Endpoints, RolloutContext, RolloutMode
from dayloop.rollout.deploy import DeployFailed, taken_over

if TYPE_CHECKING:  # pragma: no cover
    from dayloop.registry import Registry
    from dayloop.rollout.plan import RolloutPlan
    from serving.client import DataPlaneClient
    from serving.route_store import Revision

log = logging.getLogger(__name__)

TAG_FAILURE = f"{TAG_ROLLOUT}failure"
DEFAULT_PROFILE_ENV = "DAYLOOP_ROLLOUT_PROFILE"
APPLY_TIMEOUT_S = 5.0


class RolloutInFlight(DayloopError):
    """Another rollout holds the route table (two versions routed, or a canary alias set)."""


class RolloutNotAllowed(DayloopError):
    """The version cannot (or must not again) be rolled out."""


class RolloutFailed(DayloopError):
    """The run's version did not reach production (the reason says why)."""


def plane_client(path: Path | str | None = None) -> DataPlaneClient:
    """A DataPlaneClient for the running data plane (``path``, else
    :func:`serving.client.plane_file_path`); DayloopError when none is described."""
    from serving.client import DataPlaneClient, plane_file_path

    path = Path(path) if path else plane_file_path()
    if not path.is_file():
        raise DayloopError(f"no data plane description at {path}: start the data plane (make serve) "
                           "or set DAYLOOP_PLANE_FILE")
    return DataPlaneClient.from_plane_file(path)


def resolve_plan(params: Mapping[str, Any] | None) -> RolloutPlan:
    """The run's rollout plan: Param ``rollout_profile`` (default: $DAYLOOP_ROLLOUT_PROFILE, else
    prod) with the ``rollout_overrides`` object applied. InvalidPlan names a bad key or value."""
    from dayloop.rollout.plan import plan_from_params

    params = params or {}
    profile = params.get("rollout_profile") or os.environ.get(DEFAULT_PROFILE_ENV) or "prod"
    return plan_from_params(profile, params.get("rollout_overrides") or None)


def record_failure(settings: Settings, version: int, reason: str) -> None:
    """Keep why the rollout of ``version`` stopped on its tags (best effort: it is logged too)."""
    from dayloop.registry import Registry

    try:
        Registry(settings).set_tags(version, {TAG_FAILURE: reason[:4000]})
    except Exception as exc:  # noqa: BLE001 - the reason is also in the task log
        log.warning("could not record the failure reason on v%s: %s", version, exc)


def _client(ctx: RolloutContext) -> DataPlaneClient:
    return plane_client(ctx.require_endpoints().plane_file)


def _applied_at(client: DataPlaneClient, revision: int) -> str:
    """Wait (bounded) until every router replica serves ``revision``; the step starts then.
    A replica that stays behind is covered by the step's drain, so this never fails."""
    if not client.router.wait_applied(revision, timeout_s=APPLY_TIMEOUT_S):
        log.info("not every replica reported revision %s within %.0f s; the drain covers it",
                 revision, APPLY_TIMEOUT_S)
    return now_utc().isoformat()


# --------------------------------------------------------------------------- deploy


def deploy_canary(settings: Settings, published: Mapping[str, Any], params: Mapping[str, Any] | None,
                  actor: str) -> RolloutContext:
    """Deploy the published version: a challenger becomes a canary at the plan's first step;
    the champion (bootstrap) is loaded and given 100%. Returns the rollout context."""
    from dayloop.registry import CHAMPION, Registry
    from dayloop.rollout import deploy
    from dayloop.rollout.pairs import serve_only
    from serving.client import plane_file_path

    params = params or {}
    version: int = published["version"]
    if params.get("deploy") is False:
        log.warning("deploy=false: v%s is registered and gated but not deployed", version)
        return RolloutContext(RolloutMode.SKIPPED, version, reason="the run's deploy Param is false")
    plan = resolve_plan(params)  # a bad override fails here, before any traffic moves
    path = plane_file_path()
    client = plane_client(path)
    reg = Registry(settings)
    champion = reg.version_for_alias(CHAMPION)  # read once: every later step is judged against it
    if champion is None:
        raise RolloutNotAllowed("no champion alias: nothing to serve or canary against")
    endpoints = Endpoints(plane_file=str(path), prom_url=client.endpoints["prometheus_url"],
                          scrape_interval_s=float(client.endpoints.get("prometheus_scrape_interval_s", 1.0)))

    current = client.router.routes()
    if version == champion or current is None:
        # Bootstrap, a re-run of the champion's day, or a data plane with no table yet: the
        # champion must serve before anything can be compared with it.
        out = serve_only(settings, client, champion, actor=actor, reason=f"serve champion v{champion}")
        if version == champion:
            return RolloutContext(RolloutMode.CHAMPION, version, champion=champion, endpoints=endpoints,
                                  revision=out["revision"])
        current = client.router.routes()
    _refuse_unless_free(reg, current, version, champion)
    reg.set_tags(version, {f"{TAG_ROLLOUT}plan": plan.name, f"{TAG_ROLLOUT}actor": actor})
    try:
        dep = deploy.deploy_canary(settings, client, version, plan.steps[0].percent, actor,
                                   live_budget_ms=plan.thresholds["p99_budget_s"] * 1000, champion=champion)
    except DeployFailed as exc:
        record_failure(settings, version, f"deploy: {exc}")
        raise
    ctx = RolloutContext(RolloutMode.CANARY, version, champion=champion, salt=dep["salt"], plan=plan,
                         endpoints=endpoints, started_at=_applied_at(client, dep["revision"]), actor=actor,
                         revision=dep["revision"], live_check=dep["live_check"],
                         baseline_start=dep.get("baseline_start"))
    log.info("canary v%s at %g%% (revision %s) against champion v%s; plan %s: %s", version,
             plan.steps[0].percent, dep["revision"], champion, plan.name,
             ", ".join(f"{s.percent:g}% bake {s.bake_seconds:g}s (max {s.max_bake_seconds:g}s, "
                       f">= {s.min_requests} req)" for s in plan.steps))
    return ctx


def _refuse_unless_free(reg: Registry, current: Revision, version: int, champion: int) -> None:
    """One rollout at a time, and never the same version twice."""
    shares = current.table.shares()
    if set(shares) != {champion}:
        raise RolloutInFlight(
            f"another rollout holds the route table (shares {shares} at revision {current.revision}, "
            f"written by {current.actor}: {current.reason}); not starting a second one")
    status = reg.version_tags(version).get(f"{TAG_ROLLOUT}status")
    if status in ("rolled_back", "aborted", "promoted", "previous"):
        raise RolloutNotAllowed(f"v{version} was already rolled out once (status {status!r}); "
                                "a version is not canaried twice: retrain, or use manual_rollback")


# --------------------------------------------------------------------------- ramp


def route_next_step(settings: Settings, ctx: RolloutContext, step_index: int) -> str:
    """Route the plan's next step (only while the table is still this rollout's); returns
    the step's start time (after every replica applied it)."""
    from dayloop.rollout import deploy

    step = ctx.require_plan().steps[step_index]
    client = _client(ctx)
    out = deploy.route_step(settings, client, ctx.version, ctx.champion, step.percent, ctx.salt,
                            ctx.actor or "daily_refresh")
    log.info("step %d: canary v%s now at %g%% (revision %s)", step_index, ctx.version, step.percent,
             out["revision"])
    return _applied_at(client, out["revision"])


def record_step(settings: Settings, ctx: RolloutContext, record: Mapping[str, Any]) -> None:
    """Log a finished step's verdict with every number and keep it on the version's tags."""
    from dayloop.registry import Registry

    final = record.get("result") or {}
    checks = (final.get("analysis") or {}).get("checks", [])
    lines = [f"step {record['index']} ({record['percent']:g}%): {record['decision'].upper()} after "
             f"{final.get('elapsed_s', 0):.0f}s, {len(record.get('looks', []))} looks"]
    lines += [f"  {c['name']}: {c['phase']}{' (advisory)' if c.get('advisory') else ''}: {c['message']}"
              for c in checks]
    lines += [f"  {r}" for r in final.get("reasons", []) if not any(r.endswith(c["message"]) for c in checks)]
    (log.warning if record["decision"] != "pass" else log.info)("\n".join(lines))
    summary = "; ".join([f"{record['decision']} at {final.get('elapsed_s', 0):.0f}s",
                         *[f"{c['name']}={c['phase']}" for c in checks]])
    tags = {f"{TAG_ROLLOUT}step{record['index']}": summary, f"{TAG_ROLLOUT}percent": f"{record['percent']:g}"}
    ctr = next((c.get("values") or {} for c in checks if c["name"] == "ctr"), {})
    if ctr.get("adjusted_ratio") is not None:
        tags[f"{TAG_ROLLOUT}step{record['index']}.ctr"] = ctr_tag(ctr)
    Registry(settings).set_tags(ctx.version, tags)


def ctr_tag(values: Mapping[str, Any]) -> str:
    """The CTR test's numbers of a step, as its version tag shows them."""
    def num(key: str, fmt: str) -> str:
        v = values.get(key)
        return "n/a" if v is None else format(v, fmt)
    return (f"adjusted ratio {num('adjusted_ratio', '.3f')} (raw {num('raw_ratio', '.3f')}), upper bound "
            f"{num('upper_bound', '.3f')}, baseline removed {num('variance_removed', '.0%')} of the variance, "
            f"p {num('p_value', '.3g')}, groups {values.get('canary_groups')}/{values.get('control_groups')}")


def step_failure_reason(record: Mapping[str, Any]) -> str:
    """The sentence a rollback and an alert carry for a failed or aborted step."""
    final = record.get("result") or {}
    reasons = final.get("reasons") or ["no reason recorded"]
    verb = "aborted" if record["decision"] == "aborted" else "failed"
    return f"step {record['index']} ({record['percent']:g}%) {verb}: " + "; ".join(reasons)


def fail_step(settings: Settings, ctx: RolloutContext, record: Mapping[str, Any]) -> str:
    """Record why the rollout stops at this step; returns the reason."""
    reason = step_failure_reason(record)
    record_failure(settings, ctx.version, reason)
    return reason


# --------------------------------------------------------------------------- promote / retire


def promote_canary(settings: Settings, ctx: RolloutContext | None, baked: Mapping[str, Any] | None,
                   actor: str) -> dict[str, Any]:
    """After the last step passed: 100% to the canary as the stable version, aliases moved."""
    from dayloop.rollout import deploy

    if ctx is None or not ctx.is_canary:
        return {"promoted": False, "mode": ctx.mode.value if ctx else None, "why": "no canary in this run"}
    if not baked or baked.get("outcome") != "passed":
        raise DayloopError(f"bake result is {baked!r}: refusing to promote")
    client = _client(ctx)
    current = client.router.routes()
    if not ctx.owns(current):
        raise DayloopError(f"{taken_over(current)}: not promoting")
    out = deploy.promote(settings, client, ctx.version, actor, expect_salt=ctx.salt)
    log.info("promoted v%s to champion (previous: v%s) at revision %s", out["version"], out["previous"],
             out["revision"])
    return {"promoted": True, "promoted_at": now_utc().isoformat(), **out}


def retire_due(ctx: RolloutContext | None, promoted: Mapping[str, Any] | None) -> str | None:
    """When the old champion may be unloaded (ISO time: promotion + grace), or None when
    nothing is to be retired. The old version stays loaded meanwhile so a manual rollback
    to it needs no reload."""
    if ctx is None or not promoted or not promoted.get("promoted") or not promoted.get("previous"):
        return None
    grace = ctx.require_plan().promote_grace_seconds
    since = dt.datetime.fromisoformat(promoted.get("promoted_at") or now_utc().isoformat())
    return (since + dt.timedelta(seconds=grace)).isoformat()


def retire_previous(settings: Settings, ctx: RolloutContext | None, promoted: Mapping[str, Any] | None) -> dict:
    """Unload the old champion (once its grace period is over) unless a route names it again."""
    if ctx is None or retire_due(ctx, promoted) is None:
        return {"retired": None}
    client = _client(ctx)
    old: int = promoted["previous"]
    current = client.router.routes()
    if current is not None and old in current.table.versions:
        log.warning("v%s is routed again (a manual rollback?): keeping it loaded", old)
        return {"retired": None, "kept": old}
    client.unload_version(old)
    log.info("retired v%s: unloaded from Triton and the index service", old)
    return {"retired": old}


# --------------------------------------------------------------------------- rollback


def rollback_canary(settings: Settings, published: Mapping[str, Any] | None, ctx: RolloutContext | None,
                    actor: str) -> dict[str, Any]:
    """Put the champion back at 100% after any failure of the rollout; no-op when nothing of this
    run's version was deployed. ``rolled_back`` says whether anything was undone."""
    from dayloop.registry import Registry
    from dayloop.rollout import deploy

    version = ctx.version if ctx else (published or {}).get("version")
    if version is None:
        return {"rolled_back": False, "why": "the run failed before a version was published"}
    if ctx is not None and ctx.mode in (RolloutMode.CHAMPION, RolloutMode.SKIPPED):
        return {"rolled_back": False, "version": version, "why": f"mode {ctx.mode.value}: no canary to undo"}
    tags = Registry(settings).version_tags(version)
    if ctx is None and tags.get(f"{TAG_ROLLOUT}status") is None and tags.get(TAG_FAILURE) is None:
        return {"rolled_back": False, "version": version, "why": "the version was never deployed"}
    reason = tags.get(TAG_FAILURE) or "a rollout task failed without a recorded reason (see its log)"
    path = ctx.endpoints.plane_file if ctx is not None and ctx.endpoints else None
    out = deploy.rollback(settings, plane_client(path), version, reason, actor, drain_seconds=2.0)
    return {"rolled_back": True, "reason": reason, **out}


def clear_orphaned_rollout(settings: Settings, run_actor: str, why: str,
                           path: Path | str | None = None) -> dict[str, Any]:
    """A run ended without its rollback task (timed out, or marked failed by a person): if the
    route table's last write is still that run's and it routes a version other than the
    champion, send 100% back to the champion (one CAS write, canary drained, unloaded and
    tagged). Anything else (the run's own rollback already ran, a manual rollback took over,
    a promotion completed) is left alone. ``cleared`` says whether anything was undone."""
    from dayloop.registry import CHAMPION, Registry
    from dayloop.rollout import deploy

    client = plane_client(path)
    current = client.router.routes()
    if current is None or current.actor != run_actor:
        writer = current.actor if current else None
        return {"cleared": False, "why": f"the route table's last writer is {writer!r}, not {run_actor!r}"}
    champion = Registry(settings).version_for_alias(CHAMPION)
    if champion is None:
        return {"cleared": False, "why": "no champion alias to return to"}
    stray = sorted(set(current.table.shares()) - {champion})
    if not stray:
        return {"cleared": False, "why": f"only the champion v{champion} is routed"}
    version = stray[0]
    reason = f"run {run_actor} ended ({why}) with v{version} still routed; rolled back by the run listener"
    record_failure(settings, version, reason)
    out = deploy.rollback(settings, client, version, reason, f"{run_actor}/listener", drain_seconds=2.0)
    return {"cleared": True, "rolled_back": out["routed"], "reason": reason, **out}


# --------------------------------------------------------------------------- outcome


def _outcome(steps: list[Mapping[str, Any]] | None, promoted: Mapping[str, Any] | None,
             rolled_back: Mapping[str, Any] | None) -> tuple[str, str]:
    aborted = [s for s in steps or [] if s.get("decision") == "aborted"]
    if promoted and promoted.get("promoted"):
        return "promoted", ""
    if aborted:
        return "aborted", step_failure_reason(aborted[0])
    if rolled_back and rolled_back.get("rolled_back"):
        return "rolled_back", rolled_back.get("reason", "")
    return "failed", "the run failed before or during its rollout (see the failed task)"


def report_rollout(settings: Settings, published: Mapping[str, Any] | None, ctx: RolloutContext | None,
                   steps: list[Mapping[str, Any]] | None, promoted: Mapping[str, Any] | None,
                   rolled_back: Mapping[str, Any] | None, out_dir: Path) -> dict[str, Any]:
    """Decide the run's rollout outcome, write the rollout report, and raise RolloutFailed
    when the run did not end with its version serving (so a rolled-back or broken rollout can
    never end the run green)."""
    version = ctx.version if ctx else (published or {}).get("version")
    if ctx is not None and ctx.mode is RolloutMode.SKIPPED:
        return {"outcome": "not_deployed", "version": version, "why": ctx.reason}
    if ctx is not None and ctx.mode is RolloutMode.CHAMPION:
        return {"outcome": "serving", "version": version}
    outcome, reason = _outcome(steps, promoted, rolled_back)
    report = None
    if ctx is not None and ctx.is_canary and steps:
        from dayloop.rollout.report import write_and_log_report

        try:
            report = write_and_log_report(
                settings, ctx.require_endpoints().prom_url,
                {"version": ctx.version, "champion": ctx.champion, "salt": ctx.salt,
                 "plan": ctx.require_plan().to_dict(), "outcome": outcome, "reason": reason},
                steps, out_dir)
        except Exception as exc:  # noqa: BLE001 - a missing report must not hide the outcome
            log.warning("rollout report not written: %s", exc)
    result = {"outcome": outcome, "version": version, "reason": reason, "report": report}
    if outcome != "promoted":
        raise RolloutFailed(f"rollout of v{version} {outcome.replace('_', ' ')}" + (f": {reason}" if reason else ""))
    return result
