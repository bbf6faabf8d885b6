"""The offline gate's run for the DAG task: evaluate, check the export, decide, report.

:func:`gate_model` wires :mod:`dayloop.training.evaluate`, the infra check
(:mod:`.infra`), the policy (:mod:`.policy`) and the HTML report
(:mod:`dayloop.quality.report`) together.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dayloop.bundle_layout import MODEL_META_FILE
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


def _bundle_meta(bundle_dir: Path) -> dict:
    """A bundle's model_meta.json ({} when unreadable: ModelBundle.load reports it later)."""
    try:
        return json.loads((Path(bundle_dir) / MODEL_META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _window_ends_by(meta: dict, window_end: pd.Timestamp) -> bool:
    """Whether a bundle's training window (``features_window`` in its meta) ended at or before
    ``window_end``: only then did it never see the held-out users' last days either."""
    import pandas as pd

    try:
        end = pd.Timestamp(str(meta["features_window"][1]), tz="UTC")
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    return bool(end <= window_end)


class _EvalSet(NamedTuple):
    """What the gate evaluates on: the users (eval.parquet layout), the popularity frame
    of the baseline, and a note (INFO reason) saying how the users were pooled."""

    eval_df: pd.DataFrame
    popularity: pd.DataFrame
    note: str


def _eval_set(fs: FeatureSet, challenger: ModelBundle, champion_dir: Path | None, t: GateThresholds) -> _EvalSet:
    """Pool the held-out day's users with the gate's user holdout when that is leak-free.

    Pooling needs the challenger and the champion (if any) to have been trained around the
    same holdout; otherwise (an older champion trained on every row, pooling disabled) the
    gate evaluates on the held-out day alone, as before. The popularity baseline never
    counts held-out rows when pooling: no model was trained on them either.
    """
    from dayloop.training.evaluate import recent_popularity
    from dayloop.training.holdout import HoldoutSpec, held_out_rows, pooled_eval_frame
    from dayloop.training.train import window_end_of

    eval_df, train = fs["eval"], fs["train"]
    window_end = window_end_of(fs)
    spec = HoldoutSpec.from_meta(challenger.meta)
    champion_meta = _bundle_meta(champion_dir) if champion_dir is not None else None
    why = None
    if not t.pool_holdout:
        why = "pooling disabled"
    elif spec is None or not spec.active:
        why = "the challenger was trained without a user holdout"
    elif champion_meta is not None and HoldoutSpec.from_meta(champion_meta) != spec:
        why = f"the champion was not trained around the challenger's holdout {spec}"
    elif champion_meta is not None and not _window_ends_by(champion_meta, window_end):
        why = "the champion's training window does not end before the challenger's (it may have seen the holdout)"
    exclude = None
    if why is None:
        eval_df, added = pooled_eval_frame(eval_df, train, window_end, spec, int(fs.meta["history_length"]))
        exclude = held_out_rows(train, window_end, spec)
        note = (f"INFO: evaluated on {len(fs['eval'])} users of the held-out day + {added} held-out users "
                f"of the last {spec.days} days (holdout share {spec.share})")
    else:
        note = f"INFO: evaluated on the {len(eval_df)} users of the held-out day only ({why})"
    if t.popularity_days is not None:
        popularity = recent_popularity(train, window_end, t.popularity_days, exclude=exclude)
    elif exclude is not None:
        # all-time counts of the rows the models saw (popularity.parquet counts every row)
        popularity = recent_popularity(train, window_end, None, exclude=exclude)
    else:
        popularity = fs["popularity"]
    return _EvalSet(eval_df, popularity, note)


def gate_model(
    challenger_dir: Path,
    champion_dir: Path | None,
    features_dir: Path,
    report_dir: Path,
    thresholds: GateThresholds | None = None,
) -> GateRun:
    """Evaluate challenger, champion and popularity on ``features_dir``'s eval day (pooled
    with the gate's user holdout, see :func:`_eval_set`), check the export, decide, and
    write the HTML report to ``report_dir``. Does not raise on a failed gate (call
    ``decision.raise_if_failed()``).

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
    evalset = _eval_set(fs, challenger, champion_dir, t)
    fs = replace(fs, tables={**fs.tables, "eval": evalset.eval_df})
    ch_eval = evaluate_bundle(challenger, evalset.eval_df, ks)
    pop_df = evaluate_popularity(evalset.popularity, evalset.eval_df, ks)
    # PSI population: every user of the window with their end-of-window history. One
    # day's ~100 eval users would leave PSI dominated by sampling noise.
    population = window_histories(fs["train"], int(fs.meta["history_length"]))
    samples = {"challenger": top1_score_sample(challenger, *population)[1]}
    champion = _ChampionComparison(None, None, None)
    if champion_dir is not None:
        champion = _compare_champion(champion_dir, fs, ks, population, samples)

    infra = check_exported_model(challenger_dir, batch=t.latency_batch, budget_ms=t.latency_budget_ms)
    decision = decide(ch_eval.per_user, champion.per_user, pop_df, t, champion.psi_value, infra)
    notes = [evalset.note] + ([champion.note] if champion.note is not None else [])
    decision = replace(decision, reasons=[*decision.reasons, *notes])
    report = write_offline_report(decision, ch_eval.per_user, champion.per_user, pop_df, samples, Path(report_dir))
    return GateRun(decision, report, ch_eval.per_user, champion.per_user, pop_df, infra)
