"""The offline gate: may the freshly trained challenger replace the champion?

Three modules, one concern each:

* :mod:`.policy`: the thresholds, the checks and :func:`decide` (pure, no I/O), and
  :func:`decision_tags` for MLflow;
* :mod:`.infra`: :func:`check_exported_model` runs the exported TorchScript in a fresh
  interpreter;
* :mod:`.run`: :func:`gate_model` evaluates, runs the infra check, decides and writes the
  report (:mod:`dayloop.quality.report`, which depends on the policy only).
"""

from dayloop.quality.offline_gate.infra import InfraCheck, check_exported_model
from dayloop.quality.offline_gate.policy import (
    MAX_TAG_VALUE,
    TAG_PREFIX,
    GateCheck,
    GateDecision,
    GateThresholds,
    decide,
    decision_tags,
)
from dayloop.quality.offline_gate.run import GateRun, gate_model

__all__ = [
    "MAX_TAG_VALUE",
    "TAG_PREFIX",
    "GateCheck",
    "GateDecision",
    "GateRun",
    "GateThresholds",
    "InfraCheck",
    "check_exported_model",
    "decide",
    "decision_tags",
    "gate_model",
]
