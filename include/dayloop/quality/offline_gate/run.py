"""The offline gate's run for the DAG task: evaluate, check the export, decide, report.

:func:`gate_model` wires :mod:`dayloop.training.evaluate`, the infra check
(:mod:`.infra`), the policy (:mod:`.policy`) and the HTML report
(:mod:`dayloop.quality.report`) together.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dayloop.quality.offline_gate.infra import InfraCheck, check_exported_model
from dayloop.quality.offline_gate.policy import GateDecision, GateThresholds, decide
from dayloop.quality.report import write_offline_report
from dayloop.quality.stats import psi
from dayloop.training.bundle import ModelBundle
from dayloop.training.train import FeatureSet, load_features

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

__all__ = ["GateRun", "gate_model"]


class GateRun(NamedTuple):
    """Everything :func:`gate_model` produced."""

    decision: GateDecision
    report_path: Path
    challenger: pd.DataFrame
    champion: pd.DataFrame | None
    popularity: pd.DataFrame
    infra: InfraCheck


class _ChampionComparison(NamedTuple):
    per_user: pd.DataFrame | None
    psi_value: float | None
    note: str | None  # an INFO reason when the champion cannot be compared


def _load_challenger(challenger_dir: Path, schema_hash: str) -> ModelBundle:
    challenger = ModelBundle.load(challenger_dir)
    if challenger.meta.get("feature_schema_hash") != schema_hash:
        raise ValueError(
            f"challenger {challenger_dir} was trained on feature schema "
            f"{challenger.meta.get('feature_schema_hash')!r}, features are {schema_hash!r}"
        )
    return challenger


def _compare_champion(
    champion_dir: Path,
    fs: FeatureSet,
    ks: tuple[int, ...],
    population: tuple[np.ndarray, list[np.ndarray]],
    samples: dict[str, np.ndarray],
) -> _ChampionComparison:
    """Evaluate the champion on the same eval day and add its top-1 scores to ``samples``.

    ``fs`` holds the tables the challenger was evaluated on, ``population`` the users and
    histories its top-1 scores were drawn from.
    """
    from dayloop.training.evaluate import evaluate_bundle, top1_score_sample  # see gate_model

    schema_hash = fs.meta["feature_schema_hash"]
    champion = ModelBundle.load(champion_dir)
    if champion.meta.get("feature_schema_hash") != schema_hash:
        note = (
            f"INFO: champion {champion_dir} uses feature schema "
            f"{champion.meta.get('feature_schema_hash')!r} != {schema_hash!r}; not comparable, "
            "bootstrap rule applied"
        )
        return _ChampionComparison(None, None, note)
    per_user = evaluate_bundle(champion, fs["eval"], ks).per_user
    # standardised top-1 scores: raw cosine levels are not comparable between
    # models (see EvalResult)
    samples["champion"] = top1_score_sample(champion, *population)[1]
    psi_value = None
    if samples["champion"].size and samples["challenger"].size:
        psi_value = psi(samples["champion"], samples["challenger"])
    return _ChampionComparison(per_user, psi_value, None)


def gate_model(
    challenger_dir: Path,
    champion_dir: Path | None,
    features_dir: Path,
    report_dir: Path,
    thresholds: GateThresholds | None = None,
) -> GateRun:
    """Evaluate challenger, champion and popularity on ``features_dir``'s eval day, check the
    export, decide, and write the HTML report to ``report_dir``. Does not raise on a
    failed gate (call ``decision.raise_if_failed()``).

    A champion whose feature_schema_hash differs from the features' is not comparable;
    the challenger is then judged by the bootstrap rule and an INFO reason says why.
    """
    # Imported when a gate runs: dayloop.training.evaluate imports pandas at module level,
    # and importing this package for decide or decision_tags should not.
    from dayloop.training.evaluate import (
        DEFAULT_KS,
        evaluate_bundle,
        evaluate_popularity,
        top1_score_sample,
        window_histories,
    )

    t = thresholds or GateThresholds()
    fs = load_features(Path(features_dir), parts=("train", "eval", "popularity"))
    ks = tuple(sorted({*DEFAULT_KS, t.k}))
    challenger = _load_challenger(challenger_dir, fs.meta["feature_schema_hash"])
    ch_eval = evaluate_bundle(challenger, fs["eval"], ks)
    pop_df = evaluate_popularity(fs["popularity"], fs["eval"], ks)
    # PSI population: every user of the window with their end-of-window history. One
    # day's ~100 eval users would leave PSI dominated by sampling noise.
    population = window_histories(fs["train"], int(fs.meta["history_length"]))
    samples = {"challenger": top1_score_sample(challenger, *population)[1]}
    champion = _ChampionComparison(None, None, None)
    if champion_dir is not None:
        champion = _compare_champion(champion_dir, fs, ks, population, samples)

    infra = check_exported_model(challenger_dir, batch=t.latency_batch, budget_ms=t.latency_budget_ms)
    decision = decide(ch_eval.per_user, champion.per_user, pop_df, t, champion.psi_value, infra)
    if champion.note is not None:
        decision = replace(decision, reasons=[*decision.reasons, champion.note])
    report = write_offline_report(decision, ch_eval.per_user, champion.per_user, pop_df, samples, Path(report_dir))
    return GateRun(decision, report, ch_eval.per_user, champion.per_user, pop_df, infra)
