"""A per-version circuit breaker for one router replica (pure logic, stdlib only).

States: ``closed`` (requests go to the version), ``open`` (none do: the version's users
are answered by the next level down at once), ``half_open`` (after ``cooldown_s``, one
probe request at a time is let through; its success closes the circuit, its failure opens
it again for another cool-down).

What opens it: ``failures`` hard faults (errors, non-finite outputs, timeouts) inside a
sliding ``window_s``. A success does not reset the count: a version failing every other
request is as unfit to serve as one failing every request, only slower to show it. The
window forgets faults older than ``window_s``, so a rare transient error never adds up.

Each opening is a *trip*: a record (when, why, the fault counts in the window) kept for
the admin API and counted in Prometheus, so the rollout's next look can cite it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
#: Gauge values for ``dayloop_router_breaker_state``.
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 3         # hard faults inside the window that open the circuit
    window_s: float = 10.0    # sliding window over which they are counted
    cooldown_s: float = 30.0  # open this long before a half-open probe is let through

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or self.failures < 1:
            raise ValueError(f"breaker failures must be an integer >= 1, got {self.failures!r}")
        if not self.window_s > 0:
            raise ValueError(f"breaker window must be > 0 s, got {self.window_s!r}")
        if not self.cooldown_s > 0:
            raise ValueError(f"breaker cool-down must be > 0 s, got {self.cooldown_s!r}")


@dataclass
class Breaker:
    """The circuit of one version (see the module doc)."""

    config: BreakerConfig = field(default_factory=BreakerConfig)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    state: str = CLOSED
    opened_at: float = 0.0       # clock() when it last opened
    trips: int = 0
    last_trip: dict[str, Any] | None = None
    _faults: deque = field(default_factory=deque)  # (clock, reason) inside the window
    _probe_out: bool = False

    def _forget(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._faults and self._faults[0][0] < horizon:
            self._faults.popleft()

    def allow(self) -> bool:
        """May a request go to this version now? In half-open, True once per probe."""
        if self.state == CLOSED:
            return True
        now = self.clock()
        if self.state == OPEN:
            if now - self.opened_at < self.config.cooldown_s:
                return False
            self.state = HALF_OPEN
            self._probe_out = False
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def success(self) -> bool:
        """Record an answer; True when it closed a half-open circuit."""
        if self.state == HALF_OPEN:
            self.state = CLOSED
            self._probe_out = False
            self._faults.clear()
            return True
        return False

    def failure(self, reason: str) -> bool:
        """Record a hard fault; True when it opened the circuit (a trip)."""
        now = self.clock()
        if self.state == HALF_OPEN:
            self._open(now, f"half-open probe failed ({reason})", Counter({reason: 1}))
            return True
        if self.state == OPEN:
            return False
        self._faults.append((now, reason))
        self._forget(now)
        if len(self._faults) < self.config.failures:
            return False
        counts = Counter(r for _, r in self._faults)
        span = now - self._faults[0][0]
        self._open(now, f"{len(self._faults)} hard faults in {span:.2f} s", counts)
        return True

    def probe_abandoned(self) -> None:
        """The half-open probe ended with neither an answer nor a fault (e.g. cancelled)."""
        self._probe_out = False

    def _open(self, now: float, why: str, counts: Counter) -> None:
        self.state = OPEN
        self.opened_at = now
        self.trips += 1
        self._faults.clear()
        self._probe_out = False
        self.last_trip = {"at": self.wall(), "why": why, "faults": dict(sorted(counts.items())),
                          "cooldown_s": self.config.cooldown_s}

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "trips": self.trips, "last_trip": self.last_trip}
        if self.state != CLOSED:
            out["open_for_s"] = round(self.clock() - self.opened_at, 3)
        return out
