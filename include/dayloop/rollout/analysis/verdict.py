"""What the canary analysis answers: the three phases, one :class:`Check` per guardrail and the
:class:`Analysis` of one look. Plain frozen dataclasses, JSON-ready through ``as_dict``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dayloop.rollout.analysis.ctr import CtrState

Phase = Literal["pass", "fail", "inconclusive"]
PASS: Phase = "pass"
FAIL: Phase = "fail"
INCONCLUSIVE: Phase = "inconclusive"
_SEVERITY = {PASS: 0, INCONCLUSIVE: 1, FAIL: 2}


def worst_phase(phases: Iterable[str]) -> Phase:
    """The most severe of ``phases`` (fail > inconclusive > pass); no phases at all is
    ``inconclusive``, since nothing was checked."""
    worst: Phase | None = None
    for phase in phases:
        if phase not in _SEVERITY:
            raise ValueError(f"unknown phase {phase!r}")
        if worst is None or _SEVERITY[phase] > _SEVERITY[worst]:
            worst = phase  # type: ignore[assignment]
    return INCONCLUSIVE if worst is None else worst


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``name``, ``phase``, a message with its numbers, and the
    numbers themselves in ``values``."""

    name: str
    phase: Phase
    message: str
    values: Mapping[str, float | int | str | bool | None] = field(default_factory=dict)
    advisory: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for strict JSON (XCom): NaN and infinite values become None (the
        message keeps them)."""
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.values.items()}
        return {"name": self.name, "phase": self.phase, "message": self.message, "values": values,
                "advisory": self.advisory}


@dataclass(frozen=True)
class Analysis:
    """The verdict on one look: the worst phase of ``checks``, and the CTR test's state to
    pass to the next look of the same rollout."""

    phase: Phase
    checks: tuple[Check, ...]
    ctr_state: CtrState | None = None

    @property
    def reasons(self) -> list[str]:
        """``"name: message"`` of every check that did not pass (advisory ones marked so)."""
        return [f"{c.name}{' (advisory)' if c.advisory else ''}: {c.message}"
                for c in self.checks if c.phase != PASS]

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if it did not run)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON, XCom); the CTR state as :meth:`CtrState.to_dict`."""
        return {
            "phase": self.phase,
            "checks": [c.as_dict() for c in self.checks],
            "ctr_state": None if self.ctr_state is None else self.ctr_state.to_dict(),
        }
