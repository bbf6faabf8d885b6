"""One simulator run: the open-loop send schedule, the request tasks and their accounting.

Open loop: send ``i`` is due at ``t0 + i / rate`` whatever the answers do, so a slow router
shows up as latency and errors rather than as a quietly lower request rate. A send that is
more than ``late_tolerance`` seconds behind schedule, or that finds ``max_in_flight``
requests still open, is not made and is counted as a failure of kind ``overload`` (with the
reason under ``"overload"``): every due send is accounted for, none is dropped silently.

Each answered list gets clicks from the click model (``core.simulate_clicks``) against the
user's relevant items; each click is reported back with ``POST /feedback`` to the router
that served the list.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from serving.simulator.core import (
    DEFAULT_P_NOISE,
    DEFAULT_P_RELEVANT,
    MalformedResponse,
    Stats,
    parse_recommendation,
    simulate_clicks,
    write_json_atomic,
)
from serving.simulator.panel_format import SimPanel

# Independent RNG streams under one --seed: which user is sent, and how they click.
_USER_STREAM, _CLICK_STREAM = 1, 2
_USER_BATCH = 4096


@dataclass(frozen=True)
class Config:
    """One run's settings (the command line's options)."""

    routers: tuple[str, ...]
    panel: Path
    rate: float = 20.0
    k: int = 10
    duration: float = 0.0
    seed: int = 0
    stats_file: Path | None = None
    report_every: float = 5.0
    timeout: float = 2.0
    max_in_flight: int = 256
    late_tolerance: float = 1.0
    p_relevant: float = DEFAULT_P_RELEVANT
    p_noise: float = DEFAULT_P_NOISE


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "timeout"
    if isinstance(exc, httpx.TransportError):
        return "connection"
    return "client_error"


class Simulator:
    """One run: the send schedule, the request tasks and their accounting."""

    def __init__(self, cfg: Config, panel: SimPanel) -> None:
        self.cfg = cfg
        self.panel = panel
        self.stats = Stats()
        self.in_flight = 0
        self.stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._started: set[int] = set()
        self._t0 = 0.0

    def elapsed(self) -> float:
        return max(asyncio.get_running_loop().time() - self._t0, 0.0)

    def report(self, final: bool = False) -> dict:
        """Print the stats line and rewrite the stats file."""
        doc = self.stats.snapshot(self.elapsed(), self.cfg.rate, self.in_flight, final=final)
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
        sys.stdout.flush()
        if self.cfg.stats_file is not None:
            write_json_atomic(self.cfg.stats_file, doc)
        return doc

    async def _feedback(self, client: httpx.AsyncClient, router: str, impression_id: str,
                        item_id: int) -> None:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                resp = await client.post(f"{router}/feedback", json={
                    "impression_id": impression_id, "item_id": item_id, "event": "click"})
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
            self.stats.record_feedback(_failure_kind(exc))
            return
        self.stats.record_feedback(None if resp.is_success else f"http_{resp.status_code}")

    def _done(self, i: int, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() and i not in self._started:
            # Cancelled before its first step: _one's own accounting never ran.
            self.stats.record_failure("cancelled")
            self.in_flight -= 1
        elif not task.cancelled() and task.exception() is not None:
            print(f"simulator: request {i} crashed: {task.exception()!r}", file=sys.stderr)
        self._started.discard(i)

    async def _send(self, client: httpx.AsyncClient, router: str, user_id: int) -> tuple[httpx.Response, str]:
        """POST /recommend to ``router``; a refused connection (the replica is down, so the
        request never reached it) goes to the next replica, as a load balancer does."""
        body = {"user_id": user_id, "k": self.cfg.k}
        routers = self.cfg.routers
        start = routers.index(router) if router in routers else 0
        for n in range(len(routers)):
            target = routers[(start + n) % len(routers)]
            try:
                resp = await client.post(f"{target}/recommend", json=body)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                # refused, or the replica died with the request (a read of a list): next one
                if n + 1 == len(routers):
                    raise
                continue
            if n:
                self.stats.retried += 1
            return resp, target
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, client: httpx.AsyncClient, i: int, router: str, user_id: int) -> None:
        self._started.add(i)
        answered = False
        try:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    resp, router = await self._send(client, router, user_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                answered = True
                self.stats.record_failure(_failure_kind(exc))
                return
            latency = time.perf_counter() - start
            answered = True
            if not resp.is_success:
                self.stats.record_failure(f"http_{resp.status_code}")
                return
            try:
                rec = parse_recommendation(resp.json(), self.cfg.k)
            except (ValueError, MalformedResponse):
                self.stats.record_failure("malformed")
                return
            # A per-send generator: the same answers give the same clicks whatever order
            # the answers arrive in.
            rng = np.random.default_rng([self.cfg.seed, _CLICK_STREAM, i])
            relevant = self.panel.relevant.get(user_id, frozenset())
            clicks = simulate_clicks(rec.items, relevant, rng, self.cfg.p_relevant, self.cfg.p_noise)
            self.stats.record_ok(rec.version, latency, len(rec.items), int(clicks.size), rec.level)
            # One at a time: a task then holds at most one pooled connection.
            for pos in clicks.tolist():
                await self._feedback(client, router, rec.impression_id, rec.items[pos])
        except asyncio.CancelledError:
            # Still open when the drain ran out: counted, not lost.
            if not answered:
                self.stats.record_failure("cancelled")
            else:
                self.stats.record_feedback("cancelled")
        finally:
            self.in_flight -= 1

    async def _reporter(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_every)
            self.report()

    async def run(self) -> dict:
        """Send until the duration is over or ``stop`` is set; drain; return the final stats."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        user_rng = np.random.default_rng([cfg.seed, _USER_STREAM])
        limits = httpx.Limits(max_connections=cfg.max_in_flight,
                              max_keepalive_connections=cfg.max_in_flight)
        # trust_env=False: a proxy from the environment must not sit between us and loopback.
        async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout, trust_env=False) as client:
            self._t0 = loop.time()
            reporter = asyncio.create_task(self._reporter())
            users = np.empty(0, dtype=np.int64)
            i = 0
            try:
                while not self.stop.is_set():
                    due = self._t0 + i / cfg.rate
                    if cfg.duration and due - self._t0 >= cfg.duration:
                        break
                    # Short naps so a signal ends the run promptly even at low rates.
                    while (delay := due - loop.time()) > 0 and not self.stop.is_set():
                        await asyncio.sleep(min(delay, 0.2))
                    if self.stop.is_set():
                        break
                    if i % _USER_BATCH == 0:
                        users = self.panel.user_ids[
                            user_rng.integers(0, self.panel.n_users, size=_USER_BATCH)]
                    user_id = int(users[i % _USER_BATCH])
                    router = cfg.routers[i % len(cfg.routers)]
                    self.stats.sent += 1
                    if loop.time() - due > cfg.late_tolerance:
                        self.stats.record_overload("late")
                    elif self.in_flight >= cfg.max_in_flight:
                        self.stats.record_overload("in_flight_cap")
                    else:
                        self.in_flight += 1
                        task = asyncio.create_task(self._one(client, i, router, user_id))
                        self._tasks.add(task)
                        task.add_done_callback(functools.partial(self._done, i))
                    i += 1
                # Let open requests finish (each is bounded by the timeout); then cancel
                # and count what is left, so a signal never waits on a slow router for long.
                if self._tasks:
                    _, pending = await asyncio.wait(set(self._tasks), timeout=cfg.timeout + 1.0)
                    for task in pending:
                        task.cancel()
                    if pending:
                        await asyncio.wait(pending)
            finally:
                reporter.cancel()
        return self.report(final=True)
