"""The offline gate's policy: may the freshly trained challenger replace the champion?

:func:`decide` is a pure function of per-user evaluation frames (see
:mod:`dayloop.training.evaluate`), a PSI value and an :class:`InfraCheck`. Each check is
its own small function returning a :class:`GateCheck` (verdict, reason, the figures it
measured); :func:`decide` runs them in a fixed order and collects their reasons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dayloop.errors import OfflineGateFailed
from dayloop.quality.offline_gate.intervals import paired_ratio_interval
from dayloop.quality.stats import paired_noninferiority
from dayloop.training.metrics import aggregate, metric_column, mlflow_key

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from dayloop.quality.offline_gate.infra import InfraCheck

__all__ = [
    "MAX_TAG_VALUE",
    "TAG_PREFIX",
    "GateCheck",
    "GateDecision",
    "GateThresholds",
    "decide",
    "decision_tags",
]

TAG_PREFIX = "gate.offline"
MAX_TAG_VALUE = 5000
BOOTSTRAP_NOTE = "no champion: bootstrap rule (floors + popularity + infra); non-inferiority and PSI skipped"


@dataclass(frozen=True)
class GateThresholds:
    """Limits of the offline gate. Defaults were calibrated on MovieLens replay days
    (~80-120 evaluable users a day; see benchmarks/bench_offline_quality.py).

    * ``k`` / ``primary_metric``: the decision metric is ``f"{primary_metric}@{k}"``,
      used for non-inferiority and the popularity lift. Default ``ndcg@10``: with ~100
      users the paired standard error of NDCG@10 measured 4-5 % of its mean on every
      day, that of recall@10 3-34 % (a few heavy raters dominate it), so a recall@10
      test rejected a challenger that was 30 % *better*. recall@k and ndcg@k both keep
      absolute floors (``min_recall``, ``min_ndcg``), sanity floors well above a random
      ranking.
    * ``noninferiority_margin``: how much worse than the champion (mean per-user primary
      metric) the challenger may be. ``margin_mode='relative'`` (default) reads it as a
      fraction of the champion's mean; ``'absolute'`` in metric units. The one-sided
      paired test (``test_method``) must reject "worse by at least the margin" at level
      ``alpha``. 0.25: retraining the same day with another seed moves the model's own
      NDCG@10 by up to +/-10 % (four seeds on 2026-11-15: 0.105-0.125 on 366 pooled
      users, -12 % to +5 % against the champion), so the former 0.15 refused three of
      four healthy retrains (benchmarks/bench_gate_reproducibility.py) while a planted
      shuffled-id model is ~90 % worse; 0.25 passes the seed spread and still catches a
      drop of ~30 % and more. Prefer the t-test: the
      Wilcoxon variant tests the median difference, which is 0 for zero-inflated
      per-user metrics, and then passes almost anything.
    * ``min_popularity_lift``: the floor on challenger primary mean / popularity primary
      mean, decided on a paired bootstrap interval over users (``popularity_level``,
      ``bootstrap_samples``): the challenger fails when the whole interval lies below the
      floor, i.e. when it is confidently worse than ``lift`` x popularity (without a
      champion the point lift must reach the floor too). A point estimate alone flips
      with the seed on days where the lift sits near the floor (one day's ~105 users
      give +/-30 % relative noise). Next-day MovieLens is a very
      strong popularity setting (item-KNN does not beat it either; EASE measured 1.04x
      7-day popularity's NDCG@10, the two-tower 0.9-1.05x), so the default 0.8 rejects
      broken models (a shuffled-id model scores a small fraction of popularity) without
      failing every real day. Raise it to >= 1 where personalisation is expected to pay.
    * ``popularity_days``: which popularity baseline: ``n`` (default 7) counts the last
      n days before ds only (time-aware popularity, the stronger baseline on MovieLens:
      all-time popularity measured 0.90x its NDCG@10 pooled over 14 replay days);
      ``None`` counts the whole training window (the feature set's popularity.parquet).
    * ``pool_holdout``: evaluate on the gate's user holdout too
      (:mod:`dayloop.training.holdout`) when champion and challenger were trained around
      the same one: about 2x the held-out day's users.
    * ``max_psi``: limit on PSI between champion and challenger top-1 scores (z-scored
      per user, over all users of the training window; see
      :func:`dayloop.quality.offline_gate.run.gate_model`). ``None`` (default) reports
      the PSI as INFO and decides nothing: it does not tell a good model from a bad one
      here. Healthy retrains of one day with another seed measured 0.04-0.56 (the item
      tower's popularity codes move the top-1 scores), a clearly better challenger in the
      synthetic end-to-end world 1.59, and planted shuffled-id models 0.10 and 0.84
      (``benchmarks/bench_gate_reproducibility.py``): a cut-off refuses healthy models
      and passes broken ones, which the metric checks refuse anyway. Set it (the
      conventional 0.25 = "major shift") where a downstream consumer depends on the
      score scale.
    * ``latency_budget_ms``: median latency of one user-tower call on ``latency_batch``
      users in a fresh process. Healthy exports measured 0.7-2.2 ms idle and up to
      ~70 ms on a 2-core box with Spark and training beside it; 200 ms catches a
      pathological export without failing on a busy CI machine.
    * ``min_eval_users``: fewer evaluable users than this and no verdict can be trusted.
    """

    k: int = 10
    primary_metric: Literal["recall", "ndcg"] = "ndcg"
    noninferiority_margin: float = 0.25
    margin_mode: Literal["relative", "absolute"] = "relative"
    alpha: float = 0.05
    test_method: Literal["t", "wilcoxon"] = "t"
    min_recall: float = 0.01
    min_ndcg: float = 0.02
    min_popularity_lift: float = 0.8
    popularity_days: int | None = 7
    popularity_level: float = 0.9
    bootstrap_samples: int = 2000
    pool_holdout: bool = True
    max_psi: float | None = None
    latency_budget_ms: float = 200.0
    latency_batch: int = 256
    min_eval_users: int = 30

    def __post_init__(self) -> None:
        metric_column(self.primary_metric, self.k)  # validates both
        if self.margin_mode not in ("relative", "absolute"):
            raise ValueError(f"margin_mode must be 'relative' or 'absolute', got {self.margin_mode!r}")
        if self.test_method not in ("t", "wilcoxon"):
            raise ValueError(f"test_method must be 't' or 'wilcoxon', got {self.test_method!r}")
        if self.noninferiority_margin < 0 or not 0 < self.alpha < 0.5:
            raise ValueError("noninferiority_margin must be >= 0 and alpha in (0, 0.5)")
        if min(self.min_recall, self.min_ndcg, self.min_popularity_lift,
               0.0 if self.max_psi is None else self.max_psi) < 0:
            raise ValueError("floors, popularity lift and max_psi must be >= 0")
        if self.popularity_days is not None and int(self.popularity_days) <= 0:
            raise ValueError(f"popularity_days must be positive or None, got {self.popularity_days}")
        if not 0.5 <= self.popularity_level < 1.0 or self.bootstrap_samples < 100:
            raise ValueError("popularity_level must be in [0.5, 1) and bootstrap_samples >= 100")
        if self.latency_budget_ms <= 0 or self.latency_batch <= 0 or self.min_eval_users < 2:
            raise ValueError("latency budget and batch must be positive, min_eval_users >= 2")

    @property
    def primary_column(self) -> str:
        return metric_column(self.primary_metric, self.k)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """Verdict of the offline gate.

    ``reasons`` lists every check, prefixed ``PASS:``, ``FAIL:`` or ``INFO:``, each with
    its numbers; ``failures`` is the FAIL subset. ``metrics`` keys are MLflow-safe
    (``recall_at_10`` is the challenger's, ``champion.recall_at_10``, ``popularity.…``).
    """

    passed: bool
    bootstrap: bool
    reasons: list[str]
    metrics: dict[str, float]

    @property
    def failures(self) -> list[str]:
        return [r for r in self.reasons if r.startswith("FAIL")]

    def raise_if_failed(self) -> None:
        """Raise OfflineGateFailed listing every failed check."""
        if not self.passed:
            raise OfflineGateFailed(self.failures or ["no check passed"])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateCheck:
    """One check's outcome: ``passed`` (None for a note that decides nothing), the text with
    its numbers, and the figures it measured (MLflow-safe keys, merged into the decision)."""

    passed: bool | None
    text: str
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The text prefixed ``PASS:``, ``FAIL:`` or ``INFO:``."""
        prefix = "INFO" if self.passed is None else ("PASS" if self.passed else "FAIL")
        return f"{prefix}: {self.text}"


# ----------------------------------------------------------------------------- inputs


def _check_frame(df: pd.DataFrame | None, name: str, columns: Sequence[str]) -> None:
    if df is None:
        raise ValueError(f"{name} per-user frame is required")
    missing = [c for c in ("user_id", *columns) if c not in df.columns]
    if missing:
        raise ValueError(f"{name} per-user frame lacks columns {missing}")
    if df["user_id"].duplicated().any():
        raise ValueError(f"{name} per-user frame repeats user ids")


def _same_users(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    ua, ub = set(a["user_id"].tolist()), set(b["user_id"].tolist())
    if ua != ub:
        raise ValueError(
            f"challenger and {name} were evaluated on different users "
            f"({len(ua - ub)} only in challenger, {len(ub - ua)} only in {name}); "
            "evaluate both on the same eval.parquet"
        )


def _validate_frames(
    challenger: pd.DataFrame, champion: pd.DataFrame | None, popularity: pd.DataFrame, t: GateThresholds
) -> None:
    """Raise ValueError for frames that cannot be compared (a misuse, not a failed gate)."""
    needed = sorted({t.primary_column, metric_column("recall", t.k), metric_column("ndcg", t.k)})
    _check_frame(challenger, "challenger", needed)
    _check_frame(popularity, "popularity", needed)
    _same_users(challenger, popularity, "popularity")
    if champion is not None:
        _check_frame(champion, "champion", needed)
        _same_users(challenger, champion, "champion")


def _keyed(means: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{mlflow_key(col)}": value for col, value in means.items()}


# ----------------------------------------------------------------------------- checks


def _check_users(n_users: int, t: GateThresholds) -> GateCheck:
    return GateCheck(
        n_users >= t.min_eval_users,
        f"{n_users} evaluable users (minimum {t.min_eval_users})",
        {"n_eval_users": float(n_users)},
    )


def _check_floor(ch_means: Mapping[str, float], column: str, floor: float) -> GateCheck:
    value = ch_means.get(column, float("nan"))
    return GateCheck(math.isfinite(value) and value >= floor, f"challenger {column} = {value:.4f} (floor {floor:.4f})")


def _check_popularity(
    challenger: pd.DataFrame, popularity: pd.DataFrame, ch_means: Mapping[str, float],
    pop_means: Mapping[str, float], t: GateThresholds, bootstrap: bool,
) -> GateCheck:
    """The popularity floor on a paired bootstrap interval of the lift (see GateThresholds).

    Without a champion (``bootstrap``) the point lift must reach the floor as well: a
    refused bootstrap only waits for the next day, while a passed one becomes the model
    every later challenger is held to."""
    primary = t.primary_column
    ch_primary, pop_primary = ch_means.get(primary, float("nan")), pop_means.get(primary, float("nan"))
    lift = ch_primary / pop_primary if pop_primary > 0 else (math.inf if ch_primary > 0 else float("nan"))
    merged = challenger[["user_id", primary]].merge(
        popularity[["user_id", primary]], on="user_id", suffixes=("_ch", "_pop")
    )
    low = high = float("nan")
    if len(merged.dropna()) >= 2:
        interval = paired_ratio_interval(
            merged[f"{primary}_ch"].to_numpy(), merged[f"{primary}_pop"].to_numpy(),
            level=t.popularity_level, n_boot=t.bootstrap_samples,
        )
        low, high = interval.low, interval.high
    # nan (no interval) compares False: a check that could not run never passes
    passed = math.isfinite(ch_primary) and high >= t.min_popularity_lift
    rule = f"fails when the whole interval is below {t.min_popularity_lift:.3f}x"
    if bootstrap:
        passed = passed and lift >= t.min_popularity_lift
        rule += f"; bootstrap: the lift itself must reach {t.min_popularity_lift:.3f}x"
    baseline = "all-time" if t.popularity_days is None else f"{t.popularity_days}-day"
    return GateCheck(
        bool(passed),
        f"challenger {primary} = {ch_primary:.4f} vs {baseline} popularity {pop_primary:.4f}: lift "
        f"{lift:.3f}x ({t.popularity_level:.0%} paired bootstrap interval [{low:.3f}, {high:.3f}], "
        f"n = {len(merged)}; {rule})",
        {"popularity_lift": lift, "popularity_lift_low": low, "popularity_lift_high": high},
    )


def _margin(cp_primary: float, t: GateThresholds) -> float:
    """The non-inferiority margin in metric units (never negative, 0 when undefined)."""
    margin = t.noninferiority_margin * cp_primary if t.margin_mode == "relative" else t.noninferiority_margin
    return max(float(margin), 0.0) if math.isfinite(margin) else 0.0


def _check_noninferiority(
    challenger: pd.DataFrame, champion: pd.DataFrame, ch_means: Mapping[str, float], t: GateThresholds
) -> GateCheck:
    """Paired one-sided test of "challenger worse than champion by at least the margin".

    Its figures start with the champion's means: they are what the challenger is held to.
    """
    primary = t.primary_column
    cp_means = aggregate(champion)
    merged = (
        challenger[["user_id", primary]]
        .merge(champion[["user_id", primary]], on="user_id", suffixes=("_ch", "_cp"))
        .dropna()
    )
    ch_primary, cp_primary = ch_means.get(primary, float("nan")), cp_means.get(primary, float("nan"))
    margin = _margin(cp_primary, t)
    metrics = {**_keyed(cp_means, "champion."), "noninferiority.margin_abs": margin}
    if len(merged) < 2:
        return GateCheck(False, f"non-inferiority on {primary}: only {len(merged)} paired users", metrics)
    res = paired_noninferiority(
        merged[f"{primary}_ch"].to_numpy(),
        merged[f"{primary}_cp"].to_numpy(),
        margin=margin,
        alpha=t.alpha,
        method=t.test_method,
    )
    metrics.update(
        {
            "noninferiority.mean_diff": res.mean_diff,
            "noninferiority.p_value": res.p_value,
            "noninferiority.statistic": res.statistic,
            "noninferiority.ci_low": res.ci_low,
            "noninferiority.ci_high": res.ci_high,
        }
    )
    mode = f"{t.noninferiority_margin:.1%} of champion" if t.margin_mode == "relative" else "absolute"
    return GateCheck(
        res.noninferior,
        f"non-inferiority on {primary}: challenger {ch_primary:.4f} vs champion "
        f"{cp_primary:.4f}, mean diff {res.mean_diff:+.4f} "
        f"({1 - 2 * t.alpha:.0%} CI [{res.ci_low:+.4f}, {res.ci_high:+.4f}]), margin "
        f"{margin:.4f} ({mode}), {res.method}-test p = {res.p_value:.4g} "
        f"(alpha {t.alpha}, n = {res.n})",
        metrics,
    )


def _check_psi(psi_value: float | None, t: GateThresholds) -> GateCheck:
    computed = psi_value is not None and math.isfinite(psi_value)
    if t.max_psi is None:
        text = (f"PSI of top-1 scores = {psi_value:.4f} (advisory: no max_psi set)" if computed
                else f"PSI of top-1 scores was not computed ({psi_value}; advisory)")
        return GateCheck(None, text, {"psi": float(psi_value)} if computed else {})
    if not computed:
        return GateCheck(False, f"PSI of top-1 scores was not computed ({psi_value}) although a champion exists")
    return GateCheck(
        psi_value <= t.max_psi,
        f"PSI of top-1 scores = {psi_value:.4f} (max {t.max_psi})",
        {"psi": float(psi_value)},
    )


def _check_infra(infra: InfraCheck | None, t: GateThresholds) -> GateCheck:
    if infra is None:
        return GateCheck(False, "exported model was not checked (no infra result)")
    metrics = {} if infra.latency_ms is None else {"infra.latency_ms": float(infra.latency_ms)}
    if not infra.ok:
        return GateCheck(False, infra.summary(), metrics)
    latency = infra.latency_ms if infra.latency_ms is not None else math.inf
    return GateCheck(latency <= t.latency_budget_ms, f"{infra.summary()}; budget {t.latency_budget_ms:.1f} ms", metrics)


# ----------------------------------------------------------------------------- verdict


def decide(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    popularity: pd.DataFrame,
    thresholds: GateThresholds,
    psi_value: float | None,
    infra: InfraCheck | None,
) -> GateDecision:
    """Decide whether the challenger may be promoted.

    With a champion, the challenger passes iff ALL hold: enough evaluable users; absolute
    floors on recall@k and ndcg@k; the popularity lift is not confidently below min_popularity_lift;
    paired non-inferiority against the champion on the primary metric; PSI of top-1
    scores <= max_psi where one is set (otherwise PSI is reported as INFO); the infra
    check is ok and within the latency budget. The popularity floor is decided on a
    paired bootstrap interval (see GateThresholds).

    Bootstrap rule (``champion is None``, nothing to compare with): pass iff enough users,
    the floors, the popularity lift (its point estimate too) and the infra check hold; non-inferiority and PSI are
    skipped (reported as INFO). A check that could not run (no PSI although a champion
    exists and max_psi is set, no infra result) fails: the gate never passes on a check it did not perform.
    """
    t = thresholds
    _validate_frames(challenger, champion, popularity, t)
    ch_means, pop_means = aggregate(challenger), aggregate(popularity)
    checks = [
        _check_users(int(len(challenger)), t),
        _check_floor(ch_means, metric_column("recall", t.k), t.min_recall),
        _check_floor(ch_means, metric_column("ndcg", t.k), t.min_ndcg),
        _check_popularity(challenger, popularity, ch_means, pop_means, t, champion is None),
    ]
    bootstrap = champion is None
    if champion is None:
        checks.append(GateCheck(None, BOOTSTRAP_NOTE))
    else:
        checks += [_check_noninferiority(challenger, champion, ch_means, t), _check_psi(psi_value, t)]
    checks.append(_check_infra(infra, t))

    passed = all(c.passed for c in checks if c.passed is not None)
    metrics = {**_keyed(ch_means), **_keyed(pop_means, "popularity.")}
    for c in checks:
        metrics.update(c.metrics)
    metrics["decision_passed"] = 1.0 if passed else 0.0
    metrics["decision_bootstrap"] = 1.0 if bootstrap else 0.0
    return GateDecision(passed=passed, bootstrap=bootstrap, reasons=[c.reason for c in checks], metrics=metrics)


def decision_tags(decision: GateDecision) -> dict[str, str]:
    """Flatten a decision into MLflow tags (``gate.offline.*``, values <= 5000 chars)."""

    def clip(text: str) -> str:
        return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."

    tags = {
        f"{TAG_PREFIX}.decision": "pass" if decision.passed else "fail",
        f"{TAG_PREFIX}.bootstrap": "true" if decision.bootstrap else "false",
        f"{TAG_PREFIX}.n_reasons": str(len(decision.reasons)),
    }
    for i, reason in enumerate(decision.reasons):
        tags[f"{TAG_PREFIX}.reason.{i}"] = clip(reason)
    for key, value in decision.metrics.items():
        tags[f"{TAG_PREFIX}.{mlflow_key(key)}"] = clip(f"{value:.6g}")
    return tags
