"""Canary analysis: pure functions of the counts observed over one step of a rollout.

The caller (the rollout DAG) queries Prometheus for each version's counters over the step's
window ``[step_start, now]`` (``sum by (version) (increase(...))``, histogram buckets
``sum by (version, le)``), builds one :class:`VersionWindow` per version and calls
:func:`analyse`. Nothing here does I/O or reads a clock, so the same function runs in the
DAG, in the unit tests and thousands of times in ``benchmarks/bench_rollout_analysis.py``.

Every check answers ``pass``, ``fail`` or ``inconclusive`` with a message that carries its
numbers; the worst phase wins (fail > inconclusive > pass). Two rules hold throughout:

* a missing series, an invalid number or too few samples is never read as healthy: such a
  check is ``inconclusive`` (the DAG keeps baking, then fails safe);
* below the minimum sample size a check may still *fail*, but only where the failure does
  not depend on sample size: a non-finite output (zero tolerance) and the CTR test, whose
  always-valid p-value holds at every look whatever the counts.

Layout: :mod:`.inputs` (Histogram, VersionWindow, Thresholds), :mod:`.checks` (one function
per guardrail), :mod:`.ctr` (the CTR sequential test and its state), :mod:`.verdict` (phases,
Check, Analysis); :func:`analyse` here runs the checks. Every name callers use is importable
from this package. Imports: numpy at module level, scipy only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from dayloop.rollout.analysis.checks import (
    check_ctr,
    check_ctr_users,
    check_error_ratio,
    check_error_vs_control,
    check_nonfinite,
    check_p99_budget,
    check_p99_vs_control,
    check_score_drift,
    histogram_quantile,
)
from dayloop.rollout.analysis.ctr import (
    CtrBatch,
    CtrState,
    ctr_log_evidence,
    ctr_ratio_upper_bound,
    naive_fixed_horizon_pvalue,
    update_ctr_state,
)
from dayloop.rollout.analysis.grouped import GroupCtrState, GroupWindow, StepGroups
from dayloop.rollout.analysis.inputs import Histogram, Thresholds, VersionWindow, monotone_cumulative
from dayloop.rollout.analysis.verdict import FAIL, INCONCLUSIVE, PASS, Analysis, Check, Phase, worst_phase

__all__ = [
    "ADVISORY_CHECKS", "FAIL", "INCONCLUSIVE", "PASS", "Analysis", "Check", "CtrBatch", "CtrState", "GroupCtrState",
    "GroupWindow", "Histogram", "StepGroups",
    "Phase", "Thresholds", "VersionWindow", "analyse", "ctr_log_evidence", "ctr_ratio_upper_bound",
    "histogram_quantile", "monotone_cumulative", "naive_fixed_horizon_pvalue", "update_ctr_state", "worst_phase",
]


# Checks reported with every look but left out of the verdict. Score drift compares two
# different models' raw top-1 scores: a healthy retrain moves their scale (measured PSI 0.7-6
# between retrains with equal seeds, and 1.04 on a healthy canary under the real scheduler),
# so it cannot decide on its own; it is the number to read when another check fails.
ADVISORY_CHECKS = ("score_drift",)


def analyse(canary: VersionWindow, control: VersionWindow | None, thresholds: Thresholds | None = None,
            cumulative: CtrState | GroupCtrState | None = None, *, step: str | int | None = None,
            advisory: Iterable[str] = ADVISORY_CHECKS, users: StepGroups | None = None) -> Analysis:
    """Judge the canary against control over one step's window.

    Checks: ``nonfinite``, ``error_ratio``, ``latency_p99`` (absolute), and when a control
    arm exists ``error_ratio_vs_control``, ``latency_p99_vs_control``, ``score_drift`` and
    ``ctr``. ``control=None`` means the step routes no traffic to control (100 % canary):
    only the absolute checks run and the CTR state is carried over unchanged.

    Checks named in ``advisory`` (default :data:`ADVISORY_CHECKS`) run and are reported but do
    not count towards the phase; pass ``advisory=()`` to make every check decide.

    ``cumulative`` is the CTR state returned by the previous look of the same rollout
    (None at the first); ``step`` names the step whose window this is, so that a second look
    at a growing window counts only the new part (None: the window is disjoint from every
    earlier one). The returned :class:`Analysis` carries the state for the next look.

    ``users`` switches the CTR check to the test at the randomisation unit (bucket groups with
    the pre-period baseline, :mod:`.grouped`); ``cumulative`` must then be its
    :class:`GroupCtrState`. This is what a rollout decides by; without ``users`` the
    impression-level test runs, which assumes independent impressions (kept for comparison).
    Raises ValueError only for a misuse (test settings changed mid-rollout, a step revisited).
    """
    t = thresholds or Thresholds()
    checks = [check_nonfinite(canary, t), check_error_ratio(canary, t), check_p99_budget(canary, t)]
    state = cumulative
    if control is not None:
        checks += [check_error_vs_control(canary, control, t), check_p99_vs_control(canary, control, t),
                   check_score_drift(canary, control, t)]
        if users is not None:
            if not isinstance(cumulative, GroupCtrState):
                raise ValueError("the user-level CTR test needs its GroupCtrState (with the baseline)")
            ctr_check, state = check_ctr_users(users.step, users.post, users.canary, t, cumulative)
        else:
            if isinstance(cumulative, GroupCtrState):
                raise ValueError("a GroupCtrState needs the step's group counts (users=...)")
            ctr_check, state = check_ctr(canary, control, t, cumulative, step)
        checks.append(ctr_check)
    advisory = set(advisory)
    checks = [replace(c, advisory=True) if c.name in advisory else c for c in checks]
    return Analysis(phase=worst_phase(c.phase for c in checks if not c.advisory), checks=tuple(checks),
                    ctr_state=state)
