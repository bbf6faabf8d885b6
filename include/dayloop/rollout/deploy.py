"""Canary deploy, ramp, rollback and promotion: the writes a rollout makes.

Every change of who serves goes through one compare-and-swap route write with an actor and
a reason; every outcome is recorded as version tags and aliases in MLflow. The order of
operations keeps the data plane and the registry in agreement at every instant:

* deploy: load the champion's and the canary's pairs, switch the champion to the canary's
  (fresher) seen-item history so both arms exclude the same items, check the canary live on
  the real servers, set ``challenger``, then route the first step (nothing routed before it
  is proven), keeping the champion-only table's salt (its pre-period is the CTR baseline);
* rollback: route 100% to the champion first (one write, retried on a stale revision:
  a rollback must win), then drain, unload, tag, drop ``challenger``;
* promote: route 100% to the new version with it as the stable fallback, then move the
  aliases; the old version stays loaded for a grace period so a rollback is instant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tenacity

from dayloop.bundle_layout import USER_IDS_FILE
from dayloop.config import Settings
from dayloop.errors import DayloopError
from dayloop.registry import TAG_PROMOTION, TAG_ROLLOUT
from dayloop.rollout.pairs import load_pair, serving_pair

if TYPE_CHECKING:  # pragma: no cover
    from serving.client import DataPlaneClient
    from serving.route_store import Revision
    from serving.routing import RouteTable

log = logging.getLogger(__name__)

__all__ = ["TAG_ROLLOUT", "DeployFailed", "LiveCheck", "RolloutAborted", "deploy_canary", "live_check",
           "promote", "rollback", "route_step", "taken_over", "unload_quietly", "write_routes"]

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


class RouteWriteLost(DayloopError):
    """A route write lost the compare-and-swap to other writers every time it was tried."""


def taken_over(current: Revision | None) -> str:
    """The one sentence a rollout records when someone else now holds the route table."""
    if current is None:
        return "route table taken over: the store holds no table"
    return f"route table taken over at {current.describe()}"


def write_routes(client: DataPlaneClient, make_table: Callable[[Revision | None], RouteTable], actor: str,
                 reason: str) -> Revision:
    """Compare-and-swap route write that re-reads the table and tries again when another writer
    got there first (a stale revision), up to ``ROUTE_WRITE_ATTEMPTS`` times. ``make_table``
    sees the current revision on every attempt, so it can refuse (raise) when the table is no
    longer the caller's; anything but a stale revision propagates at once."""
    from serving.client import RouteConflict

    def stale(exc: BaseException) -> bool:
        return isinstance(exc, RouteConflict) and "stale" in str(exc.detail)

    @tenacity.retry(retry=tenacity.retry_if_exception(stale), stop=tenacity.stop_after_attempt(ROUTE_WRITE_ATTEMPTS),
                    wait=tenacity.wait_none(), reraise=False)
    def attempt() -> Revision:
        current = client.router.routes()
        return client.router.write_routes(make_table(current), current.revision if current else 0, actor, reason)

    try:
        return attempt()
    except tenacity.RetryError as exc:
        raise RouteWriteLost(f"route write kept losing to other writers: {exc.last_attempt.exception()}") from exc


def deploy_canary(settings: Settings, client: DataPlaneClient, version: int, first_percent: float, actor: str,
                  live_budget_ms: float = 200.0, champion: int | None = None) -> dict[str, Any]:
    """Load, prove and route the first canary step against ``champion`` (the caller's reading
    of the alias; read here when not given). Raises DeployFailed with nothing routed."""
    from dayloop.registry import CHALLENGER, CHAMPION, Registry
    from serving.routing import canary_table, new_salt

    reg = Registry(settings)
    champion = champion if champion is not None else reg.version_for_alias(CHAMPION)
    if champion is None:
        raise DeployFailed("no champion to canary against")
    if version == champion:
        raise DeployFailed(f"version {version} is already the champion")
    try:
        load_pair(client, serving_pair(settings, champion))
        pair = serving_pair(settings, version)
        loaded = load_pair(client, pair)
        from dayloop.rollout.seen_sync import share_seen  # both arms exclude the same history

        share_seen(client, champion, pair)
        users = np.load(pair.model_file.parent / USER_IDS_FILE)
        check = live_check(client, version, users, p99_budget_ms=live_budget_ms)
    except DeployFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - any load/check failure means "not deployable"
        raise DeployFailed(f"could not load version {version} on the serving tier: {exc}") from exc
    if check.problems:
        unload_quietly(client, version)
        raise DeployFailed(f"version {version} failed its live check: " + "; ".join(check.problems))
    reg.set_alias(CHALLENGER, version)
    chosen: dict[str, str | None] = {}

    def make_table(current: Revision | None) -> RouteTable:
        # Keep the salt of the champion-only table: its users have been in the canary's future
        # bucket groups since it was written, which is the CTR test's pre-period baseline. The
        # salt is fresh per rollout all the same: every table that ends a rollout (promotion,
        # rollback, manual rollback, bootstrap) draws a new one.
        if current is not None and current.table.routed_versions() == {champion}:
            chosen.update(salt=current.table.salt, since=current.created_at or None)
        else:
            chosen.update(salt=new_salt(version), since=None)
        return canary_table(champion, version, first_percent, str(chosen["salt"]))

    rev = write_routes(client, make_table, actor, f"canary v{version} at {first_percent:g}% against champion v{champion}")
    salt = str(chosen["salt"])
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "canary", f"{TAG_ROLLOUT}salt": salt,
                           f"{TAG_ROLLOUT}percent": f"{first_percent:g}",
                           f"{TAG_ROLLOUT}live_p99_ms": f"{check.p99_ms:.2f}"})
    log.info("canary v%s live (p99 %.1f ms), routed %g%% at revision %s", version, check.p99_ms,
             first_percent, rev.revision)
    return {"version": version, "champion": champion, "salt": salt, "revision": rev.revision,
            "baseline_start": chosen["since"], "live_check": check.as_dict(), "loaded": bool(loaded)}


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

    def make_table(current: Revision | None) -> RouteTable:
        if current is None or not current.table.owned_by(salt, version):
            raise RolloutAborted(taken_over(current))
        return canary_table(champion, version, percent, salt)

    rev = write_routes(client, make_table, actor, f"ramp canary v{version} to {percent:g}%")
    Registry(settings).set_tags(version, {f"{TAG_ROLLOUT}percent": f"{percent:g}"})
    return {"revision": rev.revision, "percent": percent}


def rollback(settings: Settings, client: DataPlaneClient, version: int, reason: str, actor: str,
             drain_seconds: float = 2.0) -> dict[str, Any]:
    """Send 100% to the champion in one write, then drain and unload the canary and record why.

    The write happens only while the table still routes to ``version``: when someone else
    has already taken the traffic away (a manual rollback), nothing is written over them, and
    the canary is only unloaded and tagged. ``routed`` in the result says which it was."""
    from dayloop.registry import CHALLENGER, CHAMPION, Registry
    from serving.routing import new_salt, single_version_table

    reg = Registry(settings)
    stable = reg.version_for_alias(CHAMPION)
    if stable is None:
        raise DayloopError("cannot roll back: no champion")
    load_pair(client, serving_pair(settings, stable))  # the target must serve before it gets traffic
    salt = new_salt(stable)

    def make_table(current: Revision | None) -> RouteTable:
        if current is None or version not in current.table.versions:
            raise _NotRouted(current)
        return single_version_table(stable, salt)

    try:
        rev: Revision | None = write_routes(client, make_table, actor, f"rollback of v{version}: {reason}")
        routed = True
    except _NotRouted as gone:
        rev, routed = gone.current, False
        log.info("v%s no longer routed (%s): rollback writes no route", version,
                 rev.describe() if rev else "no table")
    revision = rev.revision if rev else None
    if routed:
        time.sleep(drain_seconds)  # replicas apply within a second; in-flight canary calls finish
    if version != stable:
        unload_quietly(client, version)
    status = reg.version_tags(version).get(f"{TAG_ROLLOUT}status")
    if status not in ("rolled_back", "aborted") or routed:
        reg.set_tags(version, {f"{TAG_ROLLOUT}status": "rolled_back", f"{TAG_ROLLOUT}reason": reason[:4000],
                               f"{TAG_ROLLOUT}rolled_back_at_revision": str(revision)})
    if reg.version_for_alias(CHALLENGER) == version:
        reg.delete_alias(CHALLENGER)
    log.warning("rolled back v%s to champion v%s (revision %s): %s", version, stable, revision, reason)
    return {"version": version, "champion": stable, "revision": revision, "routed": routed}


def cut_off(client: DataPlaneClient, version: int, champion: int, owns: Callable[[Revision | None], bool],
            why: str, actor: str) -> Revision | None:
    """One route write sending 100% to ``champion`` while the table is still the rollout's
    (``owns``): the bake's answer to a circuit-breaker trip, before the DAG's rollback task
    runs (which then finds the canary unrouted and only drains, unloads and tags it). No
    load: the champion is the table's stable version, serving throughout, and the router
    refuses the write if it is not. None when the table is no longer the rollout's."""
    from serving.routing import new_salt, single_version_table

    def make_table(current: Revision | None) -> RouteTable:
        if not owns(current):
            raise _NotRouted(current)
        return single_version_table(champion, new_salt(champion, "cutoff"))

    try:
        rev = write_routes(client, make_table, actor, f"circuit-breaker cut-off of v{version}: {why}")
    except _NotRouted:
        return None
    log.warning("cut v%s off: 100%% to champion v%s (revision %s): %s", version, champion, rev.revision, why)
    return rev


class _NotRouted(Exception):
    def __init__(self, current: Revision | None) -> None:
        super().__init__("version not routed")
        self.current = current


def promote(settings: Settings, client: DataPlaneClient, version: int, actor: str,
            expect_salt: str | None = None) -> dict[str, Any]:
    """Make ``version`` the stable one at 100% and move the aliases (old champion -> previous).

    With ``expect_salt`` the write happens only while the table is still that rollout's
    (RolloutAborted otherwise, nothing written)."""
    from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry
    from serving.routing import new_salt, single_version_table

    reg = Registry(settings)
    old = reg.version_for_alias(CHAMPION)
    load_pair(client, serving_pair(settings, version))
    salt = new_salt(version)

    def make_table(current: Revision | None) -> RouteTable:
        if expect_salt is not None and (current is None or current.table.salt != expect_salt):
            raise RolloutAborted(taken_over(current))
        return single_version_table(version, salt)

    rev = write_routes(client, make_table, actor, f"promote v{version}" + (f" (was v{old})" if old else ""))
    if old is not None and old != version:
        reg.set_alias(PREVIOUS, old)
        reg.set_tags(old, {f"{TAG_ROLLOUT}status": "previous"})
    reg.set_alias(CHAMPION, version)
    if reg.version_for_alias(CHALLENGER) == version:
        reg.delete_alias(CHALLENGER)
    reg.set_tags(version, {f"{TAG_ROLLOUT}status": "promoted", f"{TAG_ROLLOUT}percent": "100",
                           TAG_PROMOTION: "canary",
                           f"{TAG_ROLLOUT}promoted_at_revision": str(rev.revision)})
    return {"version": version, "previous": old, "revision": rev.revision}


def unload_quietly(client: DataPlaneClient, version: int) -> None:
    """Unload both halves of a version no route names any more; failures are logged, not raised
    (the route table no longer sends it anyone, so a leftover costs memory, not users)."""
    try:
        client.index.unload_index(version)
    except Exception as exc:  # noqa: BLE001 - best effort: the route table no longer names it
        log.info("index of v%s not unloaded: %s", version, exc)
    try:
        client.triton.unload_version(version)
    except Exception as exc:  # noqa: BLE001
        log.warning("model v%s not unloaded: %s", version, exc)
