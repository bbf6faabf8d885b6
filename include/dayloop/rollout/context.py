"""The rollout's state between its tasks, typed.

One :class:`RolloutContext` is made by ``deploy_canary`` and read by every later rollout task,
the bake operator and its trigger. It crosses process boundaries twice, as XCom and inside a
serialised trigger, and only there is it a dict: :meth:`RolloutContext.to_dict` writes the
flat JSON object those carry (the same keys the XCom has always had), and
:meth:`RolloutContext.from_dict` reads one back, validating it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dayloop.errors import DayloopError
from dayloop.rollout.plan import RolloutPlan
from dayloop.rollout.plan import from_dict as plan_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from serving.route_store import Revision


class RolloutMode(str, enum.Enum):
    """What this run's rollout is doing."""

    CANARY = "canary"      # a challenger being ramped against the champion
    CHAMPION = "champion"  # the run's version already is the champion: it was (re)served at 100 %
    SKIPPED = "skipped"    # the run's ``deploy`` Param is off: nothing deployed


class InvalidContext(DayloopError, ValueError):
    """A rollout context that cannot be read back (a corrupt or foreign XCom)."""


@dataclass(frozen=True)
class Endpoints:
    """Where this rollout's data plane and its Prometheus are."""

    plane_file: str
    prom_url: str
    scrape_interval_s: float = 1.0


@dataclass(frozen=True)
class RolloutContext:
    """A run's rollout: its version, the champion it is judged against, the salt that marks
    the route table as its own, the validated plan, the endpoints and when step 0 began.

    Only ``mode`` and ``version`` are always present; a canary has every field."""

    mode: RolloutMode
    version: int
    champion: int | None = None
    salt: str | None = None
    plan: RolloutPlan | None = None
    endpoints: Endpoints | None = None
    started_at: str | None = None
    actor: str | None = None
    revision: int | None = None
    live_check: Mapping[str, Any] | None = field(default=None, compare=False)
    reason: str | None = None
    # When the champion-only table whose salt this rollout kept was written (ISO): the
    # pre-period baseline of the user-level CTR test runs from here to ``started_at``.
    # None: the rollout had to take a fresh salt, so there is no baseline.
    baseline_start: str | None = None

    @property
    def is_canary(self) -> bool:
        return self.mode is RolloutMode.CANARY

    def owns(self, current: Revision | None) -> bool:
        """Is the route table still this rollout's: its salt, with its canary routed?"""
        return (current is not None and self.salt is not None
                and current.table.owned_by(self.salt, self.version))

    def require_plan(self) -> RolloutPlan:
        if self.plan is None:
            raise InvalidContext(f"rollout context of v{self.version} ({self.mode.value}) carries no plan")
        return self.plan

    def require_endpoints(self) -> Endpoints:
        if self.endpoints is None:
            raise InvalidContext(f"rollout context of v{self.version} ({self.mode.value}) names no data plane")
        return self.endpoints

    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-safe form carried by XCom and the bake trigger (unset fields left out)."""
        out: dict[str, Any] = {"mode": self.mode.value, "version": self.version}
        for name in ("champion", "salt", "started_at", "actor", "revision", "reason", "baseline_start"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        if self.endpoints is not None:
            out.update(plane_file=self.endpoints.plane_file, prom_url=self.endpoints.prom_url,
                       scrape_interval_s=self.endpoints.scrape_interval_s)
        if self.live_check is not None:
            out["live_check"] = dict(self.live_check)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutContext:
        """Read :meth:`to_dict`'s form back; InvalidContext says what is wrong with it."""
        if not isinstance(data, Mapping):
            raise InvalidContext(f"a rollout context must be a JSON object, got {type(data).__name__}")
        try:
            mode = RolloutMode(data.get("mode"))
            version = _int(data["version"], "version")
            endpoints = None
            if data.get("plane_file"):
                endpoints = Endpoints(plane_file=str(data["plane_file"]), prom_url=str(data.get("prom_url") or ""),
                                      scrape_interval_s=float(data.get("scrape_interval_s") or 1.0))
            return cls(
                mode=mode, version=version,
                champion=_int(data["champion"], "champion") if data.get("champion") is not None else None,
                salt=data.get("salt"),
                plan=plan_from_dict(data["plan"]) if data.get("plan") else None,
                endpoints=endpoints, started_at=data.get("started_at"), actor=data.get("actor"),
                revision=_int(data["revision"], "revision") if data.get("revision") is not None else None,
                live_check=data.get("live_check"), reason=data.get("reason"),
                baseline_start=data.get("baseline_start"))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidContext):
                raise
            raise InvalidContext(f"unreadable rollout context ({exc}): {dict(data)!r:.300}") from exc


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidContext(f"rollout context {name} must be an integer, got {value!r}")
    return value


def context_or_none(data: Mapping[str, Any] | RolloutContext | None) -> RolloutContext | None:
    """The context from an XCom value that may be missing (its task failed before pushing)."""
    if data is None or isinstance(data, RolloutContext):
        return data
    return RolloutContext.from_dict(data)
