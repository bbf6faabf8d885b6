"""Deterministic traffic split: users -> buckets -> versions.

``bucket(user_id, salt) = blake2b(salt:user_id) % 10000``: stable across processes and
machines (Python's ``hash`` is salted per process), and a new salt per rollout gives an
independent assignment, so the same users are not always the first to see a canary.

A :class:`RouteTable` maps contiguous bucket ranges covering ``[0, 10000)`` to versions and
names the ``stable`` version that answers whenever another version fails. A canary's range
always starts at bucket 0 and only grows, so ramping 5% -> 25% keeps every 5% user on it.
Pure functions, stdlib only.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

N_BUCKETS = 10_000
# Bucket groups: G contiguous ranges of N_BUCKETS / G buckets each under the table's salt. The
# router counts impressions and clicks per group, so the canary analysis can take its variance
# over the unit users are randomised by (groups of users), not over impressions; a canary step
# of a whole percent owns whole groups. 100 keeps the series bounded (versions x 100).
N_GROUPS = 100
BUCKETS_PER_GROUP = N_BUCKETS // N_GROUPS
MAX_VERSION = 10**9
MAX_SALT_LENGTH = 64


class RouteTableError(ValueError):
    """A route table that must not be applied (with what is wrong)."""


def bucket(user_id: int, salt: str) -> int:
    """The user's bucket in [0, N_BUCKETS) under ``salt``."""
    digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % N_BUCKETS


def group_of_bucket(b: int) -> int:
    """The bucket group (0..N_GROUPS-1) of bucket ``b``: groups are contiguous bucket ranges."""
    return b // BUCKETS_PER_GROUP


def _version(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise RouteTableError(f"{what} must be an integer version in 1..{MAX_VERSION}, got {value!r}")
    return value


@dataclass(frozen=True)
class Route:
    start: int  # first bucket, inclusive
    end: int    # last bucket, exclusive
    version: int

    def as_dict(self) -> dict[str, int]:
        return {"start": self.start, "end": self.end, "version": self.version}


@dataclass(frozen=True)
class RouteTable:
    """Bucket ranges -> versions, plus the stable version used as fallback."""

    salt: str
    stable: int
    routes: tuple[Route, ...]
    _starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str) or not 1 <= len(self.salt) <= MAX_SALT_LENGTH:
            raise RouteTableError(f"salt must be a string of 1..{MAX_SALT_LENGTH} characters")
        _version(self.stable, "stable")
        if not self.routes:
            raise RouteTableError("a route table needs at least one route")
        expect = 0
        for i, r in enumerate(self.routes):
            _version(r.version, f"routes[{i}].version")
            for name in ("start", "end"):
                v = getattr(r, name)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise RouteTableError(f"routes[{i}].{name} must be an integer, got {v!r}")
            if r.start != expect:
                raise RouteTableError(
                    f"routes must cover [0, {N_BUCKETS}) contiguously in order: routes[{i}] starts at "
                    f"{r.start}, expected {expect}")
            if r.end <= r.start:
                raise RouteTableError(f"routes[{i}] is empty or reversed: [{r.start}, {r.end})")
            expect = r.end
        if expect != N_BUCKETS:
            raise RouteTableError(f"routes end at bucket {expect}, must end at {N_BUCKETS}")
        object.__setattr__(self, "_starts", tuple(r.start for r in self.routes))

    @classmethod
    def from_dict(cls, data: Any) -> RouteTable:
        """Validate a JSON-shaped table: {"salt", "stable", "routes": [{"start","end","version"}]}."""
        if not isinstance(data, dict):
            raise RouteTableError("route table must be a JSON object")
        unknown = set(data) - {"salt", "stable", "routes"}
        if unknown:
            raise RouteTableError(f"unknown route table fields: {sorted(unknown)}")
        routes = data.get("routes")
        if not isinstance(routes, list) or len(routes) > 64:
            raise RouteTableError("routes must be a list of at most 64 ranges")
        parsed = []
        for i, r in enumerate(routes):
            if not isinstance(r, dict) or set(r) != {"start", "end", "version"}:
                raise RouteTableError(f"routes[{i}] must be an object with start, end, version")
            parsed.append(Route(r["start"], r["end"], r["version"]))
        return cls(salt=data.get("salt"), stable=data.get("stable"), routes=tuple(parsed))

    def as_dict(self) -> dict[str, Any]:
        return {"salt": self.salt, "stable": self.stable, "routes": [r.as_dict() for r in self.routes]}

    @property
    def versions(self) -> set[int]:
        """Every version the table can send a request to (routes and the stable fallback)."""
        return {r.version for r in self.routes} | {self.stable}

    def version_for_bucket(self, b: int) -> int:
        return self.routes[bisect.bisect_right(self._starts, b) - 1].version

    def version_for(self, user_id: int) -> int:
        return self.version_for_bucket(bucket(user_id, self.salt))

    def routed_versions(self) -> set[int]:
        """The versions that own a bucket range (the stable fallback only if it owns one)."""
        return {r.version for r in self.routes}

    def owned_by(self, salt: str, version: int) -> bool:
        """Is this the table a rollout wrote: its salt, with its ``version`` still routed?

        A rollout's writes are guarded by this: anyone who takes the table over (a manual
        rollback, another rollout) writes a new salt, so the rollout sees it and stops."""
        return self.salt == salt and version in self.routed_versions()

    def groups_of(self, version: int) -> list[int]:
        """The bucket groups that hold at least one bucket routed to ``version``."""
        out: set[int] = set()
        for r in self.routes:
            if r.version == version:
                out.update(range(group_of_bucket(r.start), group_of_bucket(r.end - 1) + 1))
        return sorted(out)

    def shares(self) -> dict[int, float]:
        """Fraction of buckets per version."""
        out: dict[int, float] = {}
        for r in self.routes:
            out[r.version] = out.get(r.version, 0.0) + (r.end - r.start) / N_BUCKETS
        return out


def new_salt(version: int, purpose: str | None = None) -> str:
    """A fresh salt for a table that routes ``version`` (``v7-1a2b3c4d``, ``v7-manual-...``):
    a new salt gives an independent assignment of users, and names the table's writer."""
    middle = f"{purpose}-" if purpose else ""
    return f"v{int(version)}-{middle}{os.urandom(4).hex()}"


def single_version_table(version: int, salt: str = "stable") -> RouteTable:
    """100% of traffic to one version, which is also the fallback."""
    return RouteTable(salt=salt, stable=version, routes=(Route(0, N_BUCKETS, version),))


def canary_table(stable: int, canary: int, percent: float, salt: str) -> RouteTable:
    """``percent`` of buckets (from bucket 0) to ``canary``, the rest to ``stable``."""
    if not 0 <= percent <= 100:
        raise RouteTableError(f"percent must be in [0, 100], got {percent}")
    if canary == stable:
        raise RouteTableError("canary and stable must be different versions")
    cut = round(percent * N_BUCKETS / 100)
    routes = []
    if cut > 0:
        routes.append(Route(0, cut, canary))
    if cut < N_BUCKETS:
        routes.append(Route(cut, N_BUCKETS, stable))
    return RouteTable(salt=salt, stable=stable, routes=tuple(routes))
