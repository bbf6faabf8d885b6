"""Manual rollback: put an earlier version back on 100% of users, on a person's say-so.

Two steps, so nothing moves until everything is known to be right:

* :func:`plan_rollback` validates the request against the registry and the live route
  table and returns what would happen (or raises :class:`RollbackRefused` with the reason):
  the model is this deployment's, the reason is given, the target resolves (``previous``,
  ``champion`` or a version number) to a version that exists, has its index and was once
  champion (unless ``force``);
* :func:`execute_rollback` re-validates (state may have moved since) and does it: load the
  pair if needed, one compare-and-swap route write of 100% to the target (retried until it
  wins: it takes the table from any rollout in flight, whose bake sees the foreign salt and
  stops), aliases moved, the aborted canary tagged and unloaded, and who/when/why recorded
  in the route history and on the version's tags. ``dry_run`` stops after the plan.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.rollout.deploy import TAG_ROLLOUT

log = logging.getLogger(__name__)

TAG_MANUAL = "dayloop.manual_rollback."
MIN_REASON = 5
MAX_REASON = 2000
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


class RollbackRefused(DayloopError):
    """The request is invalid or unsafe; nothing was changed."""


def _was_champion(tags: Mapping[str, str]) -> bool:
    return (tags.get("dayloop.promotion") in ("bootstrap", "canary", "manual")
            or tags.get(f"{TAG_ROLLOUT}status") in ("promoted", "previous", "champion"))


def plan_rollback(settings: Settings, client: Any, *, model: str | None, target: Any, reason: Any,
                  force: bool = False) -> dict[str, Any]:
    """Validate a rollback request and describe it; raises RollbackRefused (nothing changed)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from dayloop.rollout.serving import serving_pair
    from serving.routing import RouteTable

    problems = []
    if model not in (None, "", settings.model_name):
        problems.append(f"unknown model {model!r}: this deployment serves {settings.model_name!r}")
    if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON:
        problems.append(f"a reason of at least {MIN_REASON} characters is required")
    elif len(reason) > MAX_REASON:
        problems.append(f"reason longer than {MAX_REASON} characters")
    target_text = str(target if target not in (None, "") else PREVIOUS).strip()
    if target_text not in (PREVIOUS, CHAMPION) and not _VERSION.match(target_text):
        problems.append(f"target version must be 'previous', 'champion' or a version number, got {target!r}")
    if problems:
        raise RollbackRefused("; ".join(problems))

    reg = Registry(settings)
    if target_text in (PREVIOUS, CHAMPION):
        mv = reg.alias_version(target_text)
        if mv is None:
            raise RollbackRefused(f"alias {target_text!r} is not set on {settings.model_name}: name a version")
        version = int(mv.version)
    else:
        version = int(target_text)
    try:
        tags = dict(reg.get_version(version).tags)
    except DayloopError as exc:
        raise RollbackRefused(f"version {version} does not exist in {settings.model_name}") from exc
    if not force and not _was_champion(tags):
        raise RollbackRefused(f"v{version} was never champion (promotion {tags.get('dayloop.promotion')!r}, "
                              f"rollout status {tags.get(f'{TAG_ROLLOUT}status')!r}); set force to use it anyway")
    try:
        serving_pair(settings, version, require_gate=not force)
    except DayloopError as exc:
        raise RollbackRefused(str(exc)) from exc

    current = client.router.routes()
    table = current.get("table")
    shares = RouteTable.from_dict(table).shares() if table else {}
    champion = reg.alias_version(CHAMPION)
    challenger = reg.alias_version(CHALLENGER)
    canary = None
    if len(shares) > 1:
        stable = int(table["stable"])
        canary = next((v for v in shares if v != stable), None)
    elif challenger is not None and int(challenger.version) in shares and int(challenger.version) != version:
        canary = int(challenger.version)
    return {
        "target": version, "target_alias": target_text if target_text in (PREVIOUS, CHAMPION) else None,
        "champion": int(champion.version) if champion else None,
        "revision": int(current.get("revision", 0)), "shares": {str(k): v for k, v in shares.items()},
        "canary_in_flight": canary,
        "already_serving": shares == {version: 1.0} and champion is not None and int(champion.version) == version,
        "forced": bool(force),
    }


def execute_rollback(settings: Settings, client: Any, *, model: str | None, target: Any, reason: str,
                     actor: str, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Validate again, then route 100% to the target and move the aliases (see module doc)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from dayloop.rollout.deploy import _unload_quietly, _write_with_retry
    from dayloop.rollout.serving import load_pair, serving_pair
    from serving.routing import single_version_table

    t0 = time.monotonic()
    plan = plan_rollback(settings, client, model=model, target=target, reason=reason, force=force)
    version = plan["target"]
    if dry_run:
        log.warning("DRY RUN: would route 100%% to v%s (now %s at revision %s), champion -> v%s, previous -> "
                    "v%s%s; nothing changed", version, plan["shares"], plan["revision"], version, plan["champion"],
                    f", abort canary v{plan['canary_in_flight']}" if plan["canary_in_flight"] else "")
        return {**plan, "dry_run": True, "changed": False}
    if plan["already_serving"]:
        log.info("v%s already serves 100%% as champion: nothing to change", version)
        return {**plan, "dry_run": False, "changed": False}

    reg = Registry(settings)
    pair = serving_pair(settings, version, require_gate=not force)
    load_pair(client, pair)  # the target serves before it is given users
    salt = f"v{version}-manual-{os.urandom(3).hex()}"
    route_reason = f"manual rollback to v{version} by {actor}: {reason.strip()}"
    rev = _write_with_retry(client, lambda _cur: single_version_table(version, salt), f"manual_rollback/{actor}",
                            route_reason)
    _wait_applied(client, int(rev["revision"]))
    routed_s = time.monotonic() - t0
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    old = plan["champion"]
    if old is not None and old != version:
        reg.set_alias(PREVIOUS, old)
        reg.set_tags(old, {f"{TAG_ROLLOUT}status": "previous"})
    reg.set_alias(CHAMPION, version)
    canary = plan["canary_in_flight"]
    if canary is not None and canary != version:
        reg.set_tags(canary, {f"{TAG_ROLLOUT}status": "aborted",
                              f"{TAG_ROLLOUT}reason": f"aborted by manual rollback to v{version} ({actor}): "
                                                      f"{reason.strip()}"[:4000]})
        challenger = reg.alias_version(CHALLENGER)
        if challenger is not None and int(challenger.version) == canary:
            reg.delete_alias(CHALLENGER)
        time.sleep(1.0)  # in-flight canary calls finish; the table no longer names it
        _unload_quietly(client, canary)
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "champion", "dayloop.promotion": "manual",
                           f"{TAG_MANUAL}actor": actor, f"{TAG_MANUAL}at": now,
                           f"{TAG_MANUAL}reason": reason.strip()[:4000],
                           f"{TAG_MANUAL}from_version": str(old), f"{TAG_MANUAL}revision": str(rev["revision"])})
    log.warning("manual rollback: v%s serves 100%% (revision %s, %.1f s after the request) by %s: %s",
                version, rev["revision"], routed_s, actor, reason.strip())
    return {**plan, "dry_run": False, "changed": True, "revision": int(rev["revision"]),
            "routed_after_s": round(routed_s, 2), "actor": actor, "at": now}


def _wait_applied(client: Any, revision: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            applied = client.router.applied_revisions()
            if applied and all(int(r) >= revision for r in applied.values()):
                return
        except Exception:  # noqa: BLE001 - a replica briefly unreachable: keep waiting
            pass
        time.sleep(0.1)
    log.warning("not every replica reported revision %s within %.0f s", revision, timeout_s)
