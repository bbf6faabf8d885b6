"""The router: per-user version assignment, paired model+index calls, a fallback chain.

Request path (``POST /recommend``): bucket the user under the current route table's salt,
pick the version, embed the user with that version on Triton and search that version's
index (a version's embedding is only ever searched in its own index). A non-stable version
that errors, returns a non-finite value or passes its timeout is answered by the stable
version; the failure is still counted against it, the user never sees it.

Each version has a circuit breaker in each replica (:mod:`serving.router.breaker`): hard
faults over a short window open it, and while it is open the version gets no requests at
all; its users go straight to the next level. The chain, top to bottom: the routed version,
the stable version (never a canary), the stable version's popularity list (level 1, built
here from the seen-items table of its index), the static list shipped with the deployment
(level 2). Every answer says its ``level``; level 1 and 2 answers are counted apart and are
never a version's impressions or clicks, so no analysis reads them as a version's success.

Route table: read from the revisioned store, polled by every replica; admin writes are
compare-and-swap on the revision and refused when the table names a version whose model or
index is not loaded, or whose embedding width does not match its index.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import os
import random
import time
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from serving.http_guards import BAD_TOKEN_DETAIL, BEARER_CHALLENGE, BodyLimit, bearer_matches
from serving.route_store import RouteStore, StaleRevision
from serving.router.breaker import STATE_VALUE, Breaker, BreakerConfig
from serving.router.fallback import (
    LEVEL_MODEL,
    LEVEL_NAMES,
    LEVEL_POPULARITY,
    LEVEL_STATIC,
    PopularityList,
    StaticList,
)
from serving.router.metrics import RouterMetrics
from serving.routing import N_GROUPS, RouteTable, RouteTableError, bucket, group_of_bucket
from serving.triton.model_config import INPUT_NAME, MODEL_NAME, OUTPUT_NAME

log = logging.getLogger("dayloop.router")

MAX_USER_ID = 2**31 - 1
MAX_ITEM_ID = 2**31 - 1


@dataclass
class RouterSettings:
    triton_grpc: str                 # host:port of Triton's gRPC endpoint
    index_url: str                   # http://host:port of the index service
    store_url: str                   # route store URL (sqlite:///... or postgresql://...)
    token: str                       # admin bearer token (also keys impression ids)
    replica: str = "router-0"
    canary_timeout_s: float = 0.25   # a slower canary answer is replaced by the stable one
    stable_timeout_s: float = 2.0
    poll_interval_s: float = 0.2     # route store polling: new revisions apply within ~this
    max_k: int = 100
    faults_enabled: bool = False     # the fault-injection admin endpoint exists only if set
    max_body_bytes: int = 4096       # public endpoints
    max_admin_body_bytes: int = 65536
    impression_cache: int = 200_000
    breaker: BreakerConfig = BreakerConfig()
    static_items: StaticList | None = None  # level 2 of the chain (None: the chain ends at level 1)
    popularity_retry_s: float = 2.0         # retry fetching a version's seen-items table this often


class AttemptFailed(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Fault:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    nan_rate: float = 0.0


@dataclass
class RouteState:
    revision: int
    table: RouteTable
    applied_at: float


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: int = Field(ge=0, le=MAX_USER_ID)
    k: int = Field(default=10, ge=1)


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    impression_id: str = Field(min_length=8, max_length=200)
    item_id: int = Field(ge=0, le=MAX_ITEM_ID)
    event: Literal["click"]


class RouteWriteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expected_revision: int = Field(ge=0)
    table: dict[str, Any]
    actor: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=2000)


class FaultIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=10**9)
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    nan_rate: float = Field(default=0.0, ge=0.0, le=1.0)


class Router:
    """State and behaviour of one router replica (the FastAPI app wraps it)."""

    def __init__(self, settings: RouterSettings) -> None:
        self.s = settings
        self.metrics = RouterMetrics()
        self.store = RouteStore(settings.store_url)
        self.state: RouteState | None = None
        self.faults: dict[int, Fault] = {}
        self._rng = random.Random()
        self._imp_key = hashlib.sha256(b"dayloop-impression:" + settings.token.encode()).digest()
        self._impressions: OrderedDict[str, tuple[int, frozenset[int]]] = OrderedDict()
        self._clicked: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._triton: Any = None
        self._http: Any = None
        self._poller: asyncio.Task | None = None
        self.breakers: dict[int, Breaker] = {}
        self.trips: deque[dict[str, Any]] = deque(maxlen=100)
        self.popular: dict[int, PopularityList] = {}
        self._popular_tasks: dict[int, asyncio.Task] = {}
        self.static = settings.static_items

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        import httpx
        import tritonclient.grpc.aio as grpcclient

        self._triton = grpcclient.InferenceServerClient(self.s.triton_grpc)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.s.index_url, limits=limits, timeout=5.0)
        await self.refresh_routes()
        self._poller = asyncio.create_task(self._poll_routes())

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        for task in self._popular_tasks.values():
            task.cancel()
        if self._http:
            await self._http.aclose()
        if self._triton:
            await self._triton.close()

    async def refresh_routes(self) -> None:
        latest = await asyncio.to_thread(self.store.latest_revision)
        if latest and (self.state is None or latest != self.state.revision):
            rev = await asyncio.to_thread(self.store.current)
            if rev is not None:
                self._apply(rev.revision, rev.table)

    def _apply(self, revision: int, table: RouteTable) -> None:
        if self.state is not None and revision <= self.state.revision:
            return
        old = self.state.table.versions if self.state else set()
        self.state = RouteState(revision, table, time.time())
        self.metrics.revision.set(revision)
        shares = table.shares()
        for v in old | set(shares):
            self.metrics.share.labels(str(v)).set(shares.get(v, 0.0))
        for v in old | table.versions:
            self.metrics.stable.labels(str(v)).set(1 if v == table.stable else 0)
        m = self.metrics
        for v in table.versions:
            # a routed version's counters exist from the start at 0, so "no clicks / no NaN yet"
            # reads as 0 in Prometheus instead of a missing series (which means "unknown")
            for counter in (m.requests, m.nonfinite, m.impressions, m.clicks, m.fallbacks):
                counter.labels(str(v))
            # the groups a version serves (the stable one may answer any group as fallback)
            groups = range(N_GROUPS) if v == table.stable else table.groups_of(v)
            for g in groups:
                m.group_impressions.labels(str(v), str(g))
                m.group_clicks.labels(str(v), str(g))
            self._breaker(v)
            m.breaker_trips.labels(str(v))
            m.breaker_rejected.labels(str(v))
            self._ensure_popularity(v)
        for v in old - table.versions:
            # no longer routed: its circuit and fallback list start afresh if it comes back
            self.breakers.pop(v, None)
            self.metrics.breaker_state.labels(str(v)).set(0)
            self.popular.pop(v, None)
        log.info("%s applied route revision %d: %s", self.s.replica, revision, table.as_dict())

    # ------------------------------------------------------------------ breakers and fallback lists
    def _breaker(self, version: int) -> Breaker:
        br = self.breakers.get(version)
        if br is None:
            br = self.breakers[version] = Breaker(self.s.breaker)
            self.metrics.breaker_state.labels(str(version)).set(STATE_VALUE[br.state])
        return br

    def _breaker_success(self, version: int) -> None:
        br = self._breaker(version)
        if br.success():
            self.metrics.breaker_state.labels(str(version)).set(STATE_VALUE[br.state])
            log.warning("%s: circuit of v%d closed again (half-open probe answered)", self.s.replica, version)

    def _breaker_failure(self, version: int, reason: str) -> None:
        br = self._breaker(version)
        if br.failure(reason):
            label = str(version)
            self.metrics.breaker_trips.labels(label).inc()
            self.metrics.breaker_state.labels(label).set(STATE_VALUE[br.state])
            event = {"replica": self.s.replica, "version": version, **(br.last_trip or {}),
                     "revision": self.state.revision if self.state else 0}
            self.trips.append(event)
            log.warning("%s: circuit of v%d OPEN: %s %s; its users go to the next level for %.0f s",
                        self.s.replica, version, event.get("why"), event.get("faults"), br.config.cooldown_s)

    def _allowed(self, version: int) -> bool:
        br = self._breaker(version)
        was = br.state
        ok = br.allow()
        if br.state != was:
            self.metrics.breaker_state.labels(str(version)).set(STATE_VALUE[br.state])
        if not ok:
            self.metrics.breaker_rejected.labels(str(version)).inc()
        return ok

    def _ensure_popularity(self, version: int) -> None:
        if version in self.popular or version in self._popular_tasks or self._http is None:
            return
        self._popular_tasks[version] = asyncio.get_running_loop().create_task(self._fetch_popularity(version))

    async def _fetch_popularity(self, version: int) -> None:
        """Build ``version``'s popularity list from its index's seen-items table; retried
        while the version is routed and the index service cannot give it."""
        from serving.index_service.seen import SeenFormatError, parse_seen

        try:
            while True:
                try:
                    resp = await self._http.get(f"/admin/indexes/{version}/seen",
                                                headers={"Authorization": f"Bearer {self.s.token}"})
                    if resp.status_code == 200:
                        data, sha = resp.content, resp.headers.get("x-seen-sha256", "")
                        seen = await asyncio.to_thread(parse_seen, data, f"v{version} seen items")
                        pop = await asyncio.to_thread(PopularityList.build, version, seen, sha)
                        self.popular[version] = pop
                        log.info("%s: popularity fallback for v%d ready: %s", self.s.replica, version, pop.info())
                        return
                    why = f"index service answered {resp.status_code}"
                except (SeenFormatError, ValueError) as exc:
                    why = str(exc)
                except Exception as exc:  # noqa: BLE001 - unreachable: retried below
                    why = f"{type(exc).__name__}: {exc}"
                st = self.state
                if st is None or version not in st.table.versions:
                    return
                log.info("%s: no popularity fallback for v%d yet (%s); retrying", self.s.replica, version, why[:200])
                await asyncio.sleep(self.s.popularity_retry_s)
        finally:
            self._popular_tasks.pop(version, None)

    async def _poll_routes(self) -> None:
        while True:
            try:
                await self.refresh_routes()
            except Exception:  # noqa: BLE001 - keep serving the last table if the store hiccups
                log.exception("route store poll failed; keeping revision %s",
                              self.state.revision if self.state else None)
            await asyncio.sleep(self.s.poll_interval_s)

    # ------------------------------------------------------------------ request path
    async def _embed(self, version: int, user_id: int, timeout: float) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient

        inp = grpcclient.InferInput(INPUT_NAME, [1, 1], "INT64")
        inp.set_data_from_numpy(np.array([[user_id]], dtype=np.int64))
        result = await self._triton.infer(MODEL_NAME, [inp], model_version=str(version),
                                          client_timeout=timeout)
        return result.as_numpy(OUTPUT_NAME)[0]

    async def _search(self, version: int, vector: np.ndarray, k: int, user_id: int) -> tuple[list[int], list[float]]:
        # user_ids: the index service drops what the user had seen by the index's build.
        resp = await self._http.post("/search", json={"version": version, "vectors": [vector.tolist()], "k": k,
                                                      "user_ids": [user_id]})
        if resp.status_code != 200:
            raise AttemptFailed("index_error", f"index service answered {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        return body["ids"][0], body["scores"][0]

    async def _attempt_inner(self, version: int, user_id: int, k: int, timeout: float) -> tuple[list[int], list[float]]:
        fault = self.faults.get(version)
        if fault is not None:
            if fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000.0)
            if fault.error_rate and self._rng.random() < fault.error_rate:
                raise AttemptFailed("injected_error", "fault injection")
        try:
            vector = await self._embed(version, user_id, timeout)
        except AttemptFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any Triton/transport failure is a failed attempt
            raise AttemptFailed("model_error", str(exc)[:200]) from exc
        if fault is not None and fault.nan_rate and self._rng.random() < fault.nan_rate:
            vector = np.full_like(vector, np.nan)
        if not np.isfinite(vector).all():
            raise AttemptFailed("nonfinite", "embedding holds NaN/Inf")
        try:
            ids, scores = await self._search(version, vector, k, user_id)
        except AttemptFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            raise AttemptFailed("index_error", str(exc)[:200]) from exc
        if not all(math.isfinite(s) for s in scores):
            raise AttemptFailed("nonfinite", "scores hold NaN/Inf")
        return ids, scores

    async def attempt(self, version: int, user_id: int, k: int, timeout: float,
                      record: bool = True) -> tuple[list[int], list[float]]:
        """One version's answer within ``timeout``; failures recorded against ``version``."""
        label = str(version)
        t0 = time.perf_counter()
        if record:
            self.metrics.requests.labels(label).inc()
        settled = False
        try:
            async with asyncio.timeout(timeout):
                out = await self._attempt_inner(version, user_id, k, timeout)
            settled = True
            self._breaker_success(version)
            return out
        except TimeoutError as exc:
            failure = AttemptFailed("timeout", f"no answer within {timeout:.3f}s")
            settled = True
            self._breaker_failure(version, "timeout")
            if record:
                self.metrics.errors.labels(label, "timeout").inc()
            raise failure from exc
        except AttemptFailed as exc:
            settled = True
            self._breaker_failure(version, exc.reason)
            if record:
                self.metrics.errors.labels(label, exc.reason).inc()
                if exc.reason == "nonfinite":
                    self.metrics.nonfinite.labels(label).inc()
            raise
        finally:
            if not settled:  # cancelled (the client went away): neither an answer nor a fault
                self._breaker(version).probe_abandoned()
            if record:
                self.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    async def recommend(self, user_id: int, k: int) -> dict[str, Any]:
        state = self.state
        if state is None:
            raise HTTPException(503, "no route table has been written yet")
        table = state.table
        user_bucket = bucket(user_id, table.salt)
        version = table.version_for_bucket(user_bucket)
        group = group_of_bucket(user_bucket)
        stable = table.stable
        t0 = time.perf_counter()
        failures: list[str] = []
        if version != stable:
            if self._allowed(version):
                try:
                    ids, scores = await self.attempt(version, user_id, k, self.s.canary_timeout_s)
                    return self._answer(state, version, group, ids, scores, LEVEL_MODEL, t0, user_id)
                except AttemptFailed as exc:
                    failures.append(f"v{version}: {exc.reason}")
            else:
                failures.append(f"v{version}: circuit open")
            self.metrics.fallbacks.labels(str(version)).inc()
        if self._allowed(stable):
            try:
                # a canary user's fallback is not a control-group request: not recorded as one
                ids, scores = await self.attempt(stable, user_id, k, self.s.stable_timeout_s,
                                                 record=version == stable)
                return self._answer(state, stable, group, ids, scores, LEVEL_MODEL, t0, user_id)
            except AttemptFailed as exc:
                failures.append(f"v{stable}: {exc.reason}")
        else:
            failures.append(f"v{stable}: circuit open")
        pop = self.popular.get(stable)
        if pop is not None:
            ids, scores = pop.answer(user_id, k)
            return self._answer(state, stable, group, ids, scores, LEVEL_POPULARITY, t0, user_id)
        if self.static is not None:
            ids, scores = self.static.answer(k)
            return self._answer(state, stable, group, ids, scores, LEVEL_STATIC, t0, user_id)
        self.metrics.unanswered.labels(str(stable)).inc()
        raise HTTPException(503, "no level of the fallback chain could answer: " + "; ".join(failures))

    def _answer(self, state: RouteState, version: int, group: int, ids: list[int], scores: list[float],
                level: int, t0: float, user_id: int) -> dict[str, Any]:
        if level == LEVEL_MODEL:
            label = str(version)
            self.metrics.impressions.labels(label).inc()
            self.metrics.group_impressions.labels(label, str(group)).inc()
            if scores:
                self.metrics.score.labels(label).observe(scores[0])
        self.metrics.level_answers.labels(LEVEL_NAMES[level]).inc()
        self.metrics.e2e.observe(time.perf_counter() - t0)
        impression = self._new_impression(version, state.revision, group, ids, level)
        return {"user_id": user_id, "items": ids, "scores": scores, "version": version, "level": level,
                "impression_id": impression, "revision": state.revision}

    # ------------------------------------------------------------------ impressions / clicks
    def _sign(self, body: str) -> str:
        mac = hmac.new(self._imp_key, body.encode(), hashlib.sha256).digest()[:9]
        return base64.urlsafe_b64encode(mac).decode()

    def _new_impression(self, version: int, revision: int, group: int, items: list[int], level: int = 0) -> str:
        # The group travels in the signed id, so a click is credited to the group the user was
        # in when served, whatever table applies when the click arrives. A fallback-level
        # answer's id starts "L<level>-<version>": its clicks are counted by level only.
        head = str(version) if level == LEVEL_MODEL else f"L{level}-{version}"
        body = f"{head}.{revision}.{group}.{os.urandom(9).hex()}"
        imp = f"{body}.{self._sign(body)}"
        self._impressions[imp] = (version, frozenset(items))
        if len(self._impressions) > self.s.impression_cache:
            self._impressions.popitem(last=False)
        return imp

    def feedback(self, impression_id: str, item_id: int) -> dict[str, Any]:
        parts = impression_id.split(".")
        level = LEVEL_MODEL
        head = parts[0] if parts else ""
        if head[:1] == "L" and head[1:2].isdigit() and head[2:3] == "-":
            level, head = int(head[1]), head[3:]
        if len(parts) != 5 or not head.isdigit() or not parts[2].isdigit() or level not in LEVEL_NAMES:
            raise HTTPException(400, "malformed impression_id")
        body = ".".join(parts[:4])
        if not hmac.compare_digest(self._sign(body), parts[4]):
            raise HTTPException(400, "impression_id was not issued by this service")
        version, group = int(head), int(parts[2])
        local = self._impressions.get(impression_id)
        if local is not None and item_id not in local[1]:
            raise HTTPException(400, f"item {item_id} was not in impression {impression_id}")
        key = (impression_id, item_id)
        if key in self._clicked:
            return {"recorded": False, "version": version, "detail": "duplicate click"}
        self._clicked[key] = None
        if len(self._clicked) > self.s.impression_cache:
            self._clicked.popitem(last=False)
        if level != LEVEL_MODEL:  # not the version's own list: never its click
            self.metrics.level_clicks.labels(LEVEL_NAMES[level]).inc()
            return {"recorded": True, "version": version, "level": level}
        self.metrics.clicks.labels(str(version)).inc()
        self.metrics.group_clicks.labels(str(version), str(group)).inc()
        return {"recorded": True, "version": version}

    # ------------------------------------------------------------------ admin
    async def pairing_problems(self, table: RouteTable) -> list[str]:
        """Why each version in ``table`` cannot serve (model or index missing, widths differ)."""
        problems: list[str] = []
        for v in sorted(table.versions):
            try:
                ready = await self._triton.is_model_ready(MODEL_NAME, str(v))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"v{v}: Triton unreachable ({str(exc)[:100]})")
                continue
            if not ready:
                problems.append(f"v{v}: model not loaded in Triton")
                continue
            try:
                resp = await self._http.get(f"/indexes/{v}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"v{v}: index service unreachable ({str(exc)[:100]})")
                continue
            if resp.status_code == 404:
                problems.append(f"v{v}: index not loaded in the index service")
                continue
            if resp.status_code != 200:
                problems.append(f"v{v}: index service answered {resp.status_code}")
                continue
            index_dim = resp.json().get("dim")
            try:
                width = int((await self._embed(v, 0, self.s.stable_timeout_s)).shape[0])
            except Exception as exc:  # noqa: BLE001
                problems.append(f"v{v}: model does not answer ({str(exc)[:100]})")
                continue
            if index_dim != width:
                problems.append(f"v{v}: model embeds {width}-d vectors but its index is {index_dim}-d")
        return problems

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: the latest route table is applied and every version it names is loaded and
        answers (the launcher waits for this after a start or a restart)."""
        st = self.state
        try:
            latest = await asyncio.to_thread(self.store.latest_revision)
        except Exception as exc:  # noqa: BLE001
            return False, {"detail": f"route store unreadable: {exc}"}
        if not latest:
            return True, {"revision": 0, "detail": "no route table written yet"}
        if st is None or st.revision < latest:
            return False, {"detail": f"route revision {latest} not applied yet"}
        problems = await self.pairing_problems(st.table)
        body = {"revision": st.revision, "versions": sorted(st.table.versions),
                "popularity_fallback": sorted(self.popular)}
        if problems:
            return False, body | {"detail": "not every routed version serves: " + "; ".join(problems)}
        return True, body

    async def probe(self, version: int) -> dict[str, Any]:
        """Does ``version`` truly serve from this replica: model loaded and ready, index loaded
        with the model's width, and one real request (embed + search) answered with finite
        scores? Recorded nowhere (no metric, no breaker): an operator's check, not traffic."""
        from serving.routing import single_version_table

        problems = await self.pairing_problems(single_version_table(version))
        if not problems:
            try:
                async with asyncio.timeout(self.s.stable_timeout_s):
                    ids, _ = await self._attempt_inner(version, 0, 1, self.s.stable_timeout_s)
                if not ids:
                    problems.append(f"v{version}: the index answered an empty list")
            except TimeoutError:
                problems.append(f"v{version}: no answer within {self.s.stable_timeout_s:.1f} s")
            except AttemptFailed as exc:
                problems.append(f"v{version}: a probe request failed: {exc}")
        br = self.breakers.get(version)
        return {"replica": self.s.replica, "version": version, "serving": not problems, "problems": problems,
                "breaker": br.state if br is not None else None}

    def breaker_report(self) -> dict[str, Any]:
        return {"replica": self.s.replica,
                "config": {"failures": self.s.breaker.failures, "window_s": self.s.breaker.window_s,
                           "cooldown_s": self.s.breaker.cooldown_s},
                "breakers": {str(v): b.as_dict() for v, b in sorted(self.breakers.items())},
                "trips": list(self.trips),
                "fallback": {"popularity": {str(v): p.info() for v, p in sorted(self.popular.items())},
                             "static": {"items": len(self.static.items), "source": self.static.source}
                             if self.static is not None else None}}

    async def write_routes(self, body: RouteWriteIn) -> dict[str, Any]:
        try:
            table = RouteTable.from_dict(body.table)
        except RouteTableError as exc:
            raise HTTPException(422, f"invalid route table: {exc}") from exc
        problems = await self.pairing_problems(table)
        if problems:
            raise HTTPException(409, "route table refused, versions not servable: " + "; ".join(problems))
        try:
            rev = await asyncio.to_thread(self.store.write, table, body.expected_revision, body.actor, body.reason)
        except StaleRevision as exc:
            raise HTTPException(409, {"message": str(exc), "current_revision": exc.current}) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        self._apply(rev.revision, rev.table)
        return rev.as_dict()


def create_app(settings: RouterSettings) -> FastAPI:  # noqa: C901
    """The router's FastAPI app. Long and branchy because every endpoint is a closure over the
    one Router instance (FastAPI's idiom for per-app state); the logic each endpoint runs lives
    in Router's methods. Issue 11 reworks this request path for speed, so it is kept as is."""
    router = Router(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="Dayloop router", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        router.metrics.bad_requests.labels(request.url.path).inc()
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not bearer_matches(authorization, settings.token):
            raise HTTPException(401, BAD_TOKEN_DETAIL, headers=dict(BEARER_CHALLENGE))

    admin = [Depends(require_token)]

    @app.post("/recommend")
    async def recommend(body: RecommendIn) -> dict[str, Any]:
        if body.k > settings.max_k:
            router.metrics.bad_requests.labels("/recommend").inc()
            raise HTTPException(422, f"k must be at most {settings.max_k}")
        return await router.recommend(body.user_id, body.k)

    @app.post("/feedback")
    async def feedback(body: FeedbackIn) -> dict[str, Any]:
        return router.feedback(body.impression_id, body.item_id)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        st = router.state
        return {"status": "ok" if st else "no_routes", "replica": settings.replica,
                "revision": st.revision if st else 0, "applied_at": st.applied_at if st else None,
                "breakers": {str(v): b.state for v, b in sorted(router.breakers.items())}}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok, body = await router.readiness()
        return JSONResponse({"ready": ok, "replica": settings.replica, **body}, status_code=200 if ok else 503)

    @app.get("/admin/versions/{version}/probe", dependencies=admin)
    async def probe(version: Annotated[int, FastAPIPath(ge=1, le=10**9)]) -> dict[str, Any]:
        return await router.probe(version)

    @app.get("/admin/breakers", dependencies=admin)
    async def breakers() -> dict[str, Any]:
        return router.breaker_report()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/routes", dependencies=admin)
    async def get_routes() -> dict[str, Any]:
        rev = await asyncio.to_thread(router.store.current)
        if rev is None:
            return {"revision": 0, "table": None, "applied_revision": 0}
        out = rev.as_dict()
        out["applied_revision"] = router.state.revision if router.state else 0
        return out

    @app.put("/admin/routes", dependencies=admin)
    async def put_routes(body: RouteWriteIn) -> dict[str, Any]:
        return await router.write_routes(body)

    @app.get("/admin/routes/history", dependencies=admin)
    async def history(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        revs = await asyncio.to_thread(router.store.history, limit)
        return {"revisions": [r.as_dict() for r in revs]}

    @app.get("/admin/faults", dependencies=admin)
    async def get_faults() -> dict[str, Any]:
        if not settings.faults_enabled:
            raise HTTPException(404, "fault injection is disabled by configuration")
        return {"faults": {str(v): f.__dict__ for v, f in router.faults.items()}}

    @app.put("/admin/faults", dependencies=admin)
    async def put_fault(body: FaultIn) -> dict[str, Any]:
        if not settings.faults_enabled:
            raise HTTPException(404, "fault injection is disabled by configuration")
        router.faults[body.version] = Fault(body.latency_ms, body.error_rate, body.nan_rate)
        log.warning("%s: fault injected on v%d: %s", settings.replica, body.version, router.faults[body.version])
        return {"version": body.version, **router.faults[body.version].__dict__}

    @app.delete("/admin/faults", dependencies=admin)
    async def clear_faults() -> dict[str, Any]:
        if not settings.faults_enabled:
            raise HTTPException(404, "fault injection is disabled by configuration")
        cleared = sorted(router.faults)
        router.faults.clear()
        return {"cleared": cleared}

    return BodyLimit(app, settings.max_body_bytes, settings.max_admin_body_bytes)  # type: ignore[return-value]
