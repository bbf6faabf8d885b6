"""Canary deploy, ramp, rollback and promotion: the writes a rollout makes.

Every change of who serves goes through one compare-and-swap route write with an actor and
a reason; every outcome is recorded as version tags and aliases in MLflow. The order of
operations keeps the data plane and the registry in agreement at every instant:

* deploy: load the champion's and the canary's pairs, check the canary live on the real
  servers, set ``challenger``, then route the first step (nothing routed before it is proven);
* rollback: route 100% to the champion first (one write, retried on a stale revision:
  a rollback must win), then drain, unload, tag, drop ``challenger``;
* promote: route 100% to the new version with it as the stable fallback, then move the
  aliases; the old version stays loaded for a grace period so a rollback is instant.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.rollout.serving import load_pair, serving_pair

if TYPE_CHECKING:  # pragma: no cover
    from serving.client import DataPlaneClient

log = logging.getLogger(__name__)

TAG_ROLLOUT = "dayloop.rollout."
ROUTE_WRITE_ATTEMPTS = 5


class DeployFailed(DayloopError):
    """The canary could not be put on the serving tier (nothing was routed to it)."""


@dataclass(frozen=True)
class LiveCheck:
    """What the canary did on the real servers before any user was routed to it."""

    n: int
    p99_ms: float
    finite: bool
    items_per_query: float
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "p99_ms": round(self.p99_ms, 3), "finite": self.finite,
                "items_per_query": self.items_per_query, "problems": list(self.problems)}


def live_check(client: DataPlaneClient, version: int, user_ids: np.ndarray, k: int = 10,
               p99_budget_ms: float = 200.0, warmup: int = 5) -> LiveCheck:
    """Warm a loaded pair up and time it on the live Triton + index service."""
    ids = np.asarray(user_ids, dtype=np.int64)[:64]
    for uid in ids[:warmup]:
        client.triton.infer(version, [uid])
    times, finite, items = [], True, []
    for uid in ids:
        t0 = time.perf_counter()
        emb = client.triton.infer(version, [uid])
        result = client.index.search(version, emb, k)
        times.append((time.perf_counter() - t0) * 1000)
        finite &= bool(np.isfinite(emb).all())
        got_ids, scores = _ids_scores(result)
        finite &= bool(np.isfinite(np.asarray(scores, dtype=np.float64)).all())
        items.append(len(got_ids))
    p99 = float(np.percentile(times, 99)) if times else float("inf")
    problems = []
    if not finite:
        problems.append("non-finite embedding or scores")
    if p99 > p99_budget_ms:
        problems.append(f"live p99 {p99:.1f} ms over the {p99_budget_ms:.0f} ms budget")
    if items and min(items) < k:
        problems.append(f"index returned {min(items)} items for k={k}")
    return LiveCheck(len(times), p99, finite, float(np.mean(items)) if items else 0.0, tuple(problems))


def _ids_scores(result: Any) -> tuple[list[int], list[float]]:
    """Accept the index client's result shapes (object with ids/scores, or a dict)."""
    if isinstance(result, dict):
        ids, scores = result["ids"], result["scores"]
    else:
        ids, scores = result.ids, result.scores
    if ids and isinstance(ids[0], (list, tuple, np.ndarray)):
        ids, scores = ids[0], scores[0]
    return list(ids), list(scores)


def _write_with_retry(client: DataPlaneClient, make_table: Any, actor: str, reason: str) -> dict[str, Any]:
    """Route write that re-reads the revision when another writer got there first."""
    from serving.client import RouteConflict

    last: Exception | None = None
    for _ in range(ROUTE_WRITE_ATTEMPTS):
        current = client.router.routes()
        try:
            return client.router.write_routes(make_table(current), int(current.get("revision", 0)), actor, reason)
        except RouteConflict as exc:
            last = exc
            if "stale" not in str(exc.detail):
                raise
    raise DayloopError(f"route write kept losing to other writers: {last}")


def deploy_canary(settings: Settings, client: DataPlaneClient, version: int | str, first_percent: float,
                  actor: str, live_budget_ms: float = 200.0) -> dict[str, Any]:
    """Load, prove and route the first canary step. Raises DeployFailed with nothing routed."""
    from dayloop.registry import CHALLENGER, CHAMPION, Registry
    from serving.routing import canary_table

    reg = Registry(settings)
    champion = reg.alias_version(CHAMPION)
    if champion is None:
        raise DeployFailed("no champion to canary against")
    version, stable = int(version), int(champion.version)
    if version == stable:
        raise DeployFailed(f"version {version} is already the champion")
    try:
        load_pair(client, serving_pair(settings, stable))
        pair = serving_pair(settings, version)
        loaded = load_pair(client, pair)
        users = np.load(pair.model_file.parent / "user_ids.npy")
        check = live_check(client, version, users, p99_budget_ms=live_budget_ms)
    except DeployFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - any load/check failure means "not deployable"
        raise DeployFailed(f"could not load version {version} on the serving tier: {exc}") from exc
    if check.problems:
        _unload_quietly(client, version)
        raise DeployFailed(f"version {version} failed its live check: " + "; ".join(check.problems))
    reg.set_alias(CHALLENGER, version)
    salt = f"v{version}-{os.urandom(4).hex()}"
    rev = _write_with_retry(client, lambda _cur: canary_table(stable, version, first_percent, salt), actor,
                            f"canary v{version} at {first_percent:g}% against champion v{stable}")
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "canary", f"{TAG_ROLLOUT}salt": salt,
                           f"{TAG_ROLLOUT}percent": f"{first_percent:g}",
                           f"{TAG_ROLLOUT}live_p99_ms": f"{check.p99_ms:.2f}"})
    log.info("canary v%s live (p99 %.1f ms), routed %g%% at revision %s", version, check.p99_ms,
             first_percent, rev["revision"])
    return {"version": version, "champion": stable, "salt": salt, "revision": rev["revision"],
            "live_check": check.as_dict(), "loaded": bool(loaded)}


class RolloutAborted(DayloopError):
    """Someone else (the manual rollback DAG, an operator) took the route table from this rollout."""


def route_step(settings: Settings, client: DataPlaneClient, version: int, champion: int, percent: float,
               salt: str, actor: str) -> dict[str, Any]:
    """Grow the canary's range to ``percent`` (same salt: nobody already on it moves).

    Refuses (RolloutAborted, nothing written) when the current table is no longer this
    rollout's: the compare-and-swap re-reads the table on every attempt, so a manual rollback
    written a moment earlier is seen and never overwritten."""
    from dayloop.registry import Registry
    from serving.routing import canary_table

    def make_table(current: dict[str, Any]):
        table = current.get("table") or {}
        routed = {int(r["version"]) for r in table.get("routes", [])}
        if table.get("salt") != salt or int(version) not in routed:
            raise RolloutAborted(f"route table taken over at revision {current.get('revision')} by "
                                 f"{current.get('actor', '?')}: {current.get('reason', '')}")
        return canary_table(champion, version, percent, salt)

    rev = _write_with_retry(client, make_table, actor, f"ramp canary v{version} to {percent:g}%")
    Registry(settings).set_tags(version, {f"{TAG_ROLLOUT}percent": f"{percent:g}"})
    return {"revision": rev["revision"], "percent": percent}


def rollback(settings: Settings, client: DataPlaneClient, version: int | str, reason: str, actor: str,
             drain_seconds: float = 2.0) -> dict[str, Any]:
    """Send 100% to the champion in one write, then drain and unload the canary and record why.

    The write happens only while the table still routes to ``version``: when someone else
    has already taken the traffic away (a manual rollback), nothing is written over them, and
    the canary is only unloaded and tagged. ``routed`` in the result says which it was."""
    from dayloop.registry import CHALLENGER, CHAMPION, Registry
    from serving.routing import single_version_table

    reg = Registry(settings)
    champion = reg.alias_version(CHAMPION)
    if champion is None:
        raise DayloopError("cannot roll back: no champion")
    version, stable = int(version), int(champion.version)
    load_pair(client, serving_pair(settings, stable))  # the target must serve before it gets traffic
    salt = f"v{stable}-{os.urandom(4).hex()}"

    def make_table(current: dict[str, Any]):
        table = current.get("table") or {}
        if version not in {int(r["version"]) for r in table.get("routes", [])} | {int(table.get("stable", 0))}:
            raise _NotRouted(current)
        return single_version_table(stable, salt)

    try:
        rev = _write_with_retry(client, make_table, actor, f"rollback of v{version}: {reason}")
        routed = True
    except _NotRouted as gone:
        rev, routed = gone.current, False
        log.info("v%s no longer routed (revision %s by %s): rollback writes no route", version,
                 rev.get("revision"), rev.get("actor"))
    if routed:
        time.sleep(drain_seconds)  # replicas apply within a second; in-flight canary calls finish
    if version != stable:
        _unload_quietly(client, version)
    status = dict(reg.get_version(version).tags).get(f"{TAG_ROLLOUT}status")
    if status not in ("rolled_back", "aborted") or routed:
        reg.set_tags(version, {f"{TAG_ROLLOUT}status": "rolled_back", f"{TAG_ROLLOUT}reason": reason[:4000],
                               f"{TAG_ROLLOUT}rolled_back_at_revision": str(rev.get("revision"))})
    challenger = reg.alias_version(CHALLENGER)
    if challenger is not None and int(challenger.version) == version:
        reg.delete_alias(CHALLENGER)
    log.warning("rolled back v%s to champion v%s (revision %s): %s", version, stable, rev.get("revision"), reason)
    return {"version": version, "champion": stable, "revision": rev.get("revision"), "routed": routed}


class _NotRouted(Exception):
    def __init__(self, current: dict[str, Any]) -> None:
        super().__init__("version not routed")
        self.current = current


def promote(settings: Settings, client: DataPlaneClient, version: int | str, actor: str,
            expect_salt: str | None = None) -> dict[str, Any]:
    """Make ``version`` the stable one at 100% and move the aliases (old champion -> previous).

    With ``expect_salt`` the write happens only while the table is still that rollout's
    (RolloutAborted otherwise, nothing written)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from serving.routing import single_version_table

    reg = Registry(settings)
    champion = reg.alias_version(CHAMPION)
    version = int(version)
    old = int(champion.version) if champion is not None else None
    load_pair(client, serving_pair(settings, version))
    salt = f"v{version}-{os.urandom(4).hex()}"
    def make_table(current: dict[str, Any]):
        table = current.get("table") or {}
        if expect_salt is not None and table.get("salt") != expect_salt:
            raise RolloutAborted(f"route table taken over at revision {current.get('revision')} by "
                                 f"{current.get('actor', '?')}: {current.get('reason', '')}")
        return single_version_table(version, salt)

    rev = _write_with_retry(client, make_table, actor, f"promote v{version}" + (f" (was v{old})" if old else ""))
    if old is not None and old != version:
        reg.set_alias(PREVIOUS, old)
        reg.set_tags(old, {f"{TAG_ROLLOUT}status": "previous"})
    reg.set_alias(CHAMPION, version)
    challenger = reg.alias_version(CHALLENGER)
    if challenger is not None and int(challenger.version) == version:
        reg.delete_alias(CHALLENGER)
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "promoted", f"{TAG_ROLLOUT}percent": "100",
                           "dayloop.promotion": "canary",
                           f"{TAG_ROLLOUT}promoted_at_revision": str(rev["revision"])})
    return {"version": version, "previous": old, "revision": rev["revision"]}


def retire(client: DataPlaneClient, version: int) -> dict[str, Any]:
    """Unload a version no route names any more (after a promotion's grace period)."""
    return client.unload_version(int(version))


def _unload_quietly(client: DataPlaneClient, version: int) -> None:
    try:
        client.index.unload_index(version)
    except Exception as exc:  # noqa: BLE001 - best effort: the route table no longer names it
        log.info("index of v%s not unloaded: %s", version, exc)
    try:
        client.triton.unload_version(version)
    except Exception as exc:  # noqa: BLE001
        log.warning("model v%s not unloaded: %s", version, exc)
