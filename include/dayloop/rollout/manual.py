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
import re
import time
from collections.abc import Mapping
from typing import Any

from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.registry import TAG_PROMOTION, TAG_ROLLOUT

log = logging.getLogger(__name__)

TAG_MANUAL = "dayloop.manual_rollback."
APPLY_TIMEOUT_S = 5.0
MIN_REASON = 5
MAX_REASON = 2000
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


class RollbackRefused(DayloopError):
    """The request is invalid or unsafe; nothing was changed."""


def _was_champion(tags: Mapping[str, str]) -> bool:
    return (tags.get(TAG_PROMOTION) in ("bootstrap", "canary", "manual")
            or tags.get(f"{TAG_ROLLOUT}status") in ("promoted", "previous", "champion"))


def plan_rollback(settings: Settings, client: Any, *, model: str | None, target: Any, reason: Any,
                  force: bool = False) -> dict[str, Any]:
    """Validate a rollback request and describe it; raises RollbackRefused (nothing changed)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from dayloop.rollout.pairs import serving_pair

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
        aliased = reg.version_for_alias(target_text)
        if aliased is None:
            raise RollbackRefused(f"alias {target_text!r} is not set on {settings.model_name}: name a version")
        version = aliased
    else:
        version = int(target_text)
    try:
        tags = reg.version_tags(version)
    except DayloopError as exc:
        raise RollbackRefused(f"version {version} does not exist in {settings.model_name}") from exc
    if not force and not _was_champion(tags):
        raise RollbackRefused(f"v{version} was never champion (promotion {tags.get(TAG_PROMOTION)!r}, "
                              f"rollout status {tags.get(f'{TAG_ROLLOUT}status')!r}); set force to use it anyway")
    try:
        serving_pair(settings, version, require_gate=not force)
    except DayloopError as exc:
        raise RollbackRefused(str(exc)) from exc

    current = client.router.routes()
    shares = current.table.shares() if current else {}
    champion = reg.version_for_alias(CHAMPION)
    challenger = reg.version_for_alias(CHALLENGER)
    canary = None
    if current is not None and len(shares) > 1:
        canary = next((v for v in shares if v != current.table.stable), None)
    elif challenger is not None and challenger in shares and challenger != version:
        canary = challenger
    return {
        "target": version, "target_alias": target_text if target_text in (PREVIOUS, CHAMPION) else None,
        "champion": champion,
        "revision": current.revision if current else 0, "shares": {str(k): v for k, v in shares.items()},
        "canary_in_flight": canary,
        "already_serving": shares == {version: 1.0} and champion == version,
        "forced": bool(force),
    }


def execute_rollback(settings: Settings, client: Any, *, model: str | None, target: Any, reason: str,
                     actor: str, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Validate again, then route 100% to the target and move the aliases (see module doc)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from dayloop.rollout.deploy import unload_quietly, write_routes
    from dayloop.rollout.pairs import load_pair, serving_pair
    from serving.routing import new_salt, single_version_table

    t0 = time.monotonic()
    plan = plan_rollback(settings, client, model=model, target=target, reason=reason, force=force)
    version = plan["target"]
    if dry_run:
        log.warning("DRY RUN: would route 100%% to v%s (now %s at revision %s), champion -> v%s, previous -> "
                    "v%s%s; nothing changed", version, plan["shares"], plan["revision"], version, plan["champion"],
                    f", abort canary v{plan['canary_in_flight']}" if plan["canary_in_flight"] else "")
        return {**plan, "dry_run": True, "changed": False}
    reg = Registry(settings)
    if plan["already_serving"]:
        # The table says so; what serves decides. Probe the pair on every replica and
        # repair (reload what is missing) when it does not truly serve.
        probe = client.router.probe(version)
        if probe["serving"]:
            log.info("v%s already serves 100%% as champion, and answers a probe on every replica: "
                     "nothing to change", version)
            return {**plan, "dry_run": False, "changed": False, "verified": True}
        return _repair(settings, client, reg, plan, probe["problems"], actor, reason, force, t0)

    pair = serving_pair(settings, version, require_gate=not force)
    load_pair(client, pair)  # the target serves before it is given users
    salt = new_salt(version, "manual")
    route_reason = f"manual rollback to v{version} by {actor}: {reason.strip()}"
    rev = write_routes(client, lambda _cur: single_version_table(version, salt), f"manual_rollback/{actor}",
                       route_reason)
    if not client.router.wait_applied(rev.revision, timeout_s=APPLY_TIMEOUT_S):
        log.warning("not every replica reported revision %s within %.0f s", rev.revision, APPLY_TIMEOUT_S)
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
        if reg.version_for_alias(CHALLENGER) == canary:
            reg.delete_alias(CHALLENGER)
        time.sleep(1.0)  # in-flight canary calls finish; the table no longer names it
        unload_quietly(client, canary)
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "champion", TAG_PROMOTION: "manual",
                           f"{TAG_MANUAL}actor": actor, f"{TAG_MANUAL}at": now,
                           f"{TAG_MANUAL}reason": reason.strip()[:4000],
                           f"{TAG_MANUAL}from_version": str(old), f"{TAG_MANUAL}revision": str(rev.revision)})
    log.warning("manual rollback: v%s serves 100%% (revision %s, %.1f s after the request) by %s: %s",
                version, rev.revision, routed_s, actor, reason.strip())
    return {**plan, "dry_run": False, "changed": True, "revision": rev.revision,
            "routed_after_s": round(routed_s, 2), "actor": actor, "at": now}


def _repair(settings: Settings, client: Any, reg: Any, plan: dict[str, Any], problems: list[str], actor: str,
            reason: str, force: bool, t0: float) -> dict[str, Any]:
    """The table routes 100% to the target, which does not truly serve: load its pair again
    (only what is missing is loaded), probe again, record it. Raises DayloopError when the
    pair still does not serve (the table is left as it is: it names the right version)."""
    from dayloop.rollout.pairs import load_pair, serving_pair

    version = plan["target"]
    log.warning("v%s is routed 100%% but does not truly serve: %s; reloading its pair", version,
                "; ".join(problems))
    pair = serving_pair(settings, version, require_gate=not force)
    loaded = load_pair(client, pair)
    after = client.router.probe(version)
    if not after["serving"]:
        raise DayloopError(f"v{version} still does not serve after reloading its pair: "
                           + "; ".join(after["problems"]))
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    reg.set_tags(version, {f"{TAG_MANUAL}actor": actor, f"{TAG_MANUAL}at": now,
                           f"{TAG_MANUAL}reason": reason.strip()[:4000],
                           f"{TAG_MANUAL}repaired": "; ".join(problems)[:4000]})
    took = time.monotonic() - t0
    log.warning("manual rollback: repaired v%s (was: %s); it answers on every replica again, %.1f s after the "
                "request, by %s: %s", version, "; ".join(problems), took, actor, reason.strip())
    return {**plan, "dry_run": False, "changed": True, "repaired": problems, "verified": True,
            "loaded": {"triton": loaded.get("triton"), "index": loaded.get("index")},
            "repaired_after_s": round(took, 2), "actor": actor, "at": now}
