"""The daily DAG's rollout, task by task: deploy the canary, move between bake steps,
promote, retire the old version, roll back, and close the run with its outcome.

Each public function here is what one Airflow task (or one resume of the bake operator)
calls. The rollout's context travels between them as a JSON-safe dict (XCom):
``mode`` (``canary``, ``champion`` when the version is already the one serving, ``skipped``
when the run's ``deploy`` Param is off), the version and champion, the route salt, the
validated plan, and where the data plane and Prometheus are.

Facts are recorded where people look: the route store's history (every write has an actor
and a reason), MLflow version tags ``dayloop.rollout.*`` (status, per-step verdicts,
failure reason), aliases, and the task logs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.rollout.bake import now_utc, rollout_owns_routes
from dayloop.rollout.deploy import TAG_ROLLOUT, DeployFailed

log = logging.getLogger(__name__)

TAG_FAILURE = f"{TAG_ROLLOUT}failure"
DEFAULT_PROFILE_ENV = "DAYLOOP_ROLLOUT_PROFILE"
APPLY_TIMEOUT_S = 5.0


class RolloutInFlight(DayloopError):
    """Another rollout holds the route table (two versions routed, or a canary alias set)."""


class RolloutNotAllowed(DayloopError):
    """The version cannot (or must not again) be rolled out."""


def plane_file() -> Path:
    """The data plane description the control plane uses (``DAYLOOP_PLANE_FILE`` or
    ``$DAYLOOP_SERVING_HOME/plane.json``, default ``$DAYLOOP_VAR/serving``)."""
    path = os.environ.get("DAYLOOP_PLANE_FILE")
    if path:
        return Path(path)
    home = os.environ.get("DAYLOOP_SERVING_HOME") or os.path.join(
        os.environ.get("DAYLOOP_VAR", str(Path(__file__).resolve().parents[3] / "var")), "serving")
    return Path(home) / "plane.json"


def plane_client(path: Path | str | None = None):
    """A DataPlaneClient for the running data plane; DayloopError when none is described."""
    from serving.client import DataPlaneClient

    path = Path(path) if path else plane_file()
    if not path.is_file():
        raise DayloopError(f"no data plane description at {path}: start the data plane (make serve) "
                           "or set DAYLOOP_PLANE_FILE")
    return DataPlaneClient.from_plane_file(path)


def resolve_plan(params: Mapping[str, Any] | None):
    """The run's rollout plan: Param ``rollout_profile`` (default: $DAYLOOP_ROLLOUT_PROFILE, else
    prod) with the ``rollout_overrides`` object applied. InvalidPlan names a bad key or value."""
    from dayloop.rollout.plan import plan_from_params

    params = params or {}
    profile = params.get("rollout_profile") or os.environ.get(DEFAULT_PROFILE_ENV) or "prod"
    return plan_from_params(profile, params.get("rollout_overrides") or None)


def _record_failure(settings: Settings, version: int, reason: str) -> None:
    from dayloop.registry import Registry

    try:
        Registry(settings).set_tags(version, {TAG_FAILURE: reason[:4000]})
    except Exception as exc:  # noqa: BLE001 - the reason is also in the task log
        log.warning("could not record the failure reason on v%s: %s", version, exc)


# --------------------------------------------------------------------------- deploy


def start_rollout(settings: Settings, published: Mapping[str, Any], params: Mapping[str, Any] | None,
                  actor: str) -> dict[str, Any]:
    """Deploy the published version: a challenger becomes a canary at the plan's first step;
    the champion (bootstrap) is loaded and given 100%. Returns the rollout context."""
    from dayloop.registry import CHAMPION, Registry
    from dayloop.rollout import deploy
    from dayloop.rollout.serving import serve_only
    from serving.routing import RouteTable

    params = params or {}
    version = int(published["version"])
    if params.get("deploy") is False:
        log.warning("deploy=false: v%s is registered and gated but not deployed", version)
        return {"mode": "skipped", "version": version, "reason": "the run's deploy Param is false"}
    plan = resolve_plan(params)  # a bad override fails here, before any traffic moves
    path = plane_file()
    client = plane_client(path)
    reg = Registry(settings)
    champion = reg.alias_version(CHAMPION)
    if champion is None:
        raise RolloutNotAllowed("no champion alias: nothing to serve or canary against")
    stable = int(champion.version)
    base = {"version": version, "champion": stable, "plane_file": str(path),
            "prom_url": client.endpoints["prometheus_url"],
            "scrape_interval_s": float(client.endpoints.get("prometheus_scrape_interval_s", 1.0))}

    current = client.router.routes()
    table = current.get("table")
    if version == stable or table is None:
        # Bootstrap, a re-run of the champion's day, or a data plane with no table yet: the
        # champion must serve before anything can be compared with it.
        out = serve_only(settings, client, stable, actor=actor, reason=f"serve champion v{stable}")
        if version == stable:
            return {**base, "mode": "champion", "revision": out["revision"]}
        current = client.router.routes()
        table = current.get("table")

    shares = RouteTable.from_dict(table).shares()
    if set(shares) != {stable}:
        raise RolloutInFlight(
            f"another rollout holds the route table (shares {shares} at revision {current.get('revision')}, "
            f"written by {current.get('actor')}: {current.get('reason')}); not starting a second one")
    status = dict(reg.get_version(version).tags).get(f"{TAG_ROLLOUT}status")
    if status in ("rolled_back", "aborted", "promoted", "previous"):
        raise RolloutNotAllowed(f"v{version} was already rolled out once (status {status!r}); "
                                "a version is not canaried twice: retrain, or use manual_rollback")
    reg.set_tags(version, {f"{TAG_ROLLOUT}plan": plan.name, f"{TAG_ROLLOUT}actor": actor})
    try:
        dep = deploy.deploy_canary(settings, client, version, plan.steps[0].percent, actor,
                                   live_budget_ms=plan.thresholds["p99_budget_s"] * 1000)
    except DeployFailed as exc:
        _record_failure(settings, version, f"deploy: {exc}")
        raise
    started = _wait_applied(client, dep["revision"])
    ctx = {**base, "mode": "canary", "actor": actor, "salt": dep["salt"], "revision": dep["revision"], "plan": plan.to_dict(),
           "live_check": dep["live_check"], "started_at": started}
    log.info("canary v%s at %g%% (revision %s) against champion v%s; plan %s: %s", version,
             plan.steps[0].percent, dep["revision"], stable, plan.name,
             ", ".join(f"{s.percent:g}% bake {s.bake_seconds:g}s (max {s.max_bake_seconds:g}s, "
                       f">= {s.min_requests} req)" for s in plan.steps))
    return ctx


def _wait_applied(client: Any, revision: int) -> str:
    """Wait (bounded) until every router replica serves ``revision``; the step starts then."""
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            applied = client.router.applied_revisions()
            if applied and all(int(r) >= int(revision) for r in applied.values()):
                break
        except Exception as exc:  # noqa: BLE001 - a replica briefly unreachable: the drain covers it
            log.info("replica revisions unreadable: %s", exc)
        time.sleep(0.1)
    return now_utc().isoformat()


# --------------------------------------------------------------------------- ramp


def route_next_step(settings: Settings, ctx: Mapping[str, Any], step_index: int, actor: str) -> str:
    """Route the plan's next step (only while the table is still this rollout's); returns
    the step's start time (after every replica applied it)."""
    from dayloop.rollout import deploy
    from dayloop.rollout.plan import from_dict

    plan = from_dict(ctx["plan"])
    step = plan.steps[step_index]
    client = plane_client(ctx["plane_file"])
    out = deploy.route_step(settings, client, int(ctx["version"]), int(ctx["champion"]), step.percent,
                            ctx["salt"], actor)
    log.info("step %d: canary v%s now at %g%% (revision %s)", step_index, ctx["version"], step.percent,
             out["revision"])
    return _wait_applied(client, out["revision"])


def record_step(settings: Settings, ctx: Mapping[str, Any], record: Mapping[str, Any]) -> None:
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
    Registry(settings).set_tags(int(ctx["version"]), {f"{TAG_ROLLOUT}step{record['index']}": summary,
                                                      f"{TAG_ROLLOUT}percent": f"{record['percent']:g}"})


def step_failure_reason(record: Mapping[str, Any]) -> str:
    """The sentence a rollback and an alert carry for a failed or aborted step."""
    final = record.get("result") or {}
    reasons = final.get("reasons") or ["no reason recorded"]
    verb = "aborted" if record["decision"] == "aborted" else "failed"
    return f"step {record['index']} ({record['percent']:g}%) {verb}: " + "; ".join(reasons)


def fail_step(settings: Settings, ctx: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    """Record why the rollout stops at this step; returns the reason."""
    reason = step_failure_reason(record)
    _record_failure(settings, int(ctx["version"]), reason)
    return reason


# --------------------------------------------------------------------------- promote / retire


def promote_rollout(settings: Settings, ctx: Mapping[str, Any] | None, baked: Mapping[str, Any] | None,
                    actor: str) -> dict[str, Any]:
    """After the last step passed: 100% to the canary as the stable version, aliases moved."""
    from dayloop.rollout import deploy

    if not ctx or ctx.get("mode") != "canary":
        return {"promoted": False, "mode": (ctx or {}).get("mode"), "why": "no canary in this run"}
    if not baked or baked.get("outcome") != "passed":
        raise DayloopError(f"bake result is {baked!r}: refusing to promote")
    client = plane_client(ctx["plane_file"])
    current = client.router.routes()
    if not rollout_owns_routes(current, ctx):
        raise DayloopError("route table no longer belongs to this rollout (revision "
                           f"{current.get('revision')} by {current.get('actor')}): not promoting")
    out = deploy.promote(settings, client, int(ctx["version"]), actor, expect_salt=ctx["salt"])
    log.info("promoted v%s to champion (previous: v%s) at revision %s", out["version"], out["previous"],
             out["revision"])
    return {"promoted": True, "promoted_at": now_utc().isoformat(), **out}


def retire_due(ctx: Mapping[str, Any] | None, promoted: Mapping[str, Any] | None) -> str | None:
    """When the old champion may be unloaded (ISO time: promotion + grace), or None when
    nothing is to be retired. The old version stays loaded meanwhile so a manual rollback
    to it needs no reload."""
    from dayloop.rollout.plan import from_dict

    if not promoted or not promoted.get("promoted") or not promoted.get("previous"):
        return None
    grace = from_dict(ctx["plan"]).promote_grace_seconds
    since = dt.datetime.fromisoformat(promoted.get("promoted_at") or now_utc().isoformat())
    return (since + dt.timedelta(seconds=grace)).isoformat()


def retire_previous(settings: Settings, ctx: Mapping[str, Any] | None, promoted: Mapping[str, Any] | None) -> dict:
    """Unload the old champion (once its grace period is over) unless a route names it again."""
    if retire_due(ctx, promoted) is None:
        return {"retired": None}
    client = plane_client(ctx["plane_file"])
    old = int(promoted["previous"])
    table = client.router.routes().get("table") or {}
    routed = {int(r["version"]) for r in table.get("routes", [])} | {int(table.get("stable", 0))}
    if old in routed:
        log.warning("v%s is routed again (a manual rollback?): keeping it loaded", old)
        return {"retired": None, "kept": old}
    client.unload_version(old)
    log.info("retired v%s: unloaded from Triton and the index service", old)
    return {"retired": old}


# --------------------------------------------------------------------------- rollback


def rollback_rollout(settings: Settings, published: Mapping[str, Any] | None, ctx: Mapping[str, Any] | None,
                     actor: str) -> dict[str, Any]:
    """Put the champion back at 100% after any failure of the rollout; no-op when nothing of this
    run's version was deployed. ``rolled_back`` says whether anything was undone."""
    from dayloop.registry import Registry
    from dayloop.rollout import deploy

    version = (ctx or {}).get("version") or (published or {}).get("version")
    if version is None:
        return {"rolled_back": False, "why": "the run failed before a version was published"}
    version = int(version)
    if ctx and ctx.get("mode") in ("champion", "skipped"):
        return {"rolled_back": False, "version": version, "why": f"mode {ctx['mode']}: no canary to undo"}
    reg = Registry(settings)
    tags = dict(reg.get_version(version).tags)
    if not ctx and tags.get(f"{TAG_ROLLOUT}status") is None and tags.get(TAG_FAILURE) is None:
        return {"rolled_back": False, "version": version, "why": "the version was never deployed"}
    reason = tags.get(TAG_FAILURE) or "a rollout task failed without a recorded reason (see its log)"
    path = (ctx or {}).get("plane_file") or plane_file()
    out = deploy.rollback(settings, plane_client(path), version, reason, actor,
                          drain_seconds=2.0)
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
    from serving.routing import RouteTable

    client = plane_client(path)
    current = client.router.routes()
    table = current.get("table")
    if not table or current.get("actor") != run_actor:
        return {"cleared": False, "why": f"the route table's last writer is {current.get('actor')!r}, "
                                         f"not {run_actor!r}"}
    champion = Registry(settings).alias_version(CHAMPION)
    if champion is None:
        return {"cleared": False, "why": "no champion alias to return to"}
    stray = sorted(set(RouteTable.from_dict(table).shares()) - {int(champion.version)})
    if not stray:
        return {"cleared": False, "why": f"only the champion v{champion.version} is routed"}
    version = stray[0]
    reason = f"run {run_actor} ended ({why}) with v{version} still routed; rolled back by the run listener"
    _record_failure(settings, version, reason)
    out = deploy.rollback(settings, client, version, reason, f"{run_actor}/listener", drain_seconds=2.0)
    return {"cleared": True, "rolled_back": out["routed"], "reason": reason, **out}


# --------------------------------------------------------------------------- outcome


def finish_rollout(settings: Settings, published: Mapping[str, Any] | None, ctx: Mapping[str, Any] | None,
                   steps: list[Mapping[str, Any]] | None, promoted: Mapping[str, Any] | None,
                   rolled_back: Mapping[str, Any] | None, out_dir: Path) -> dict[str, Any]:
    """Decide the run's rollout outcome, write the rollout report, and raise RolloutFailed
    when the run did not end with its version serving (so a rolled-back or broken rollout can
    never end the run green)."""
    version = (ctx or {}).get("version") or (published or {}).get("version")
    mode = (ctx or {}).get("mode")
    if mode == "skipped":
        return {"outcome": "not_deployed", "version": version, "why": ctx.get("reason")}
    if mode == "champion":
        return {"outcome": "serving", "version": version}
    aborted = [s for s in steps or [] if s.get("decision") == "aborted"]
    if promoted and promoted.get("promoted"):
        outcome, reason = "promoted", ""
    elif aborted:
        outcome, reason = "aborted", step_failure_reason(aborted[0])
    elif rolled_back and rolled_back.get("rolled_back"):
        outcome, reason = "rolled_back", rolled_back.get("reason", "")
    else:
        outcome, reason = "failed", "the run failed before or during its rollout (see the failed task)"
    report = None
    if ctx and ctx.get("mode") == "canary" and steps:
        from dayloop.rollout.report import write_and_log_report

        try:
            report = write_and_log_report(
                settings, ctx.get("prom_url"),
                {"version": int(ctx["version"]), "champion": int(ctx["champion"]), "salt": ctx["salt"],
                 "plan": ctx["plan"], "outcome": outcome, "reason": reason},
                steps, out_dir)
        except Exception as exc:  # noqa: BLE001 - a missing report must not hide the outcome
            log.warning("rollout report not written: %s", exc)
    result = {"outcome": outcome, "version": version, "reason": reason, "report": report}
    if outcome != "promoted":
        raise RolloutFailed(f"rollout of v{version} {outcome.replace('_', ' ')}" + (f": {reason}" if reason else ""))
    return result


class RolloutFailed(DayloopError):
    """The run's version did not reach production (the reason says why)."""
