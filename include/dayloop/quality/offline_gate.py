"""The offline gate: may the freshly trained challenger replace the champion?

:func:`decide` is a pure function of per-user evaluation frames (see
:mod:`dayloop.training.evaluate`), a PSI value and an :class:`InfraCheck`.
:func:`check_exported_model` runs the exported TorchScript in a fresh interpreter.
:func:`run_offline_gate` wires evaluation, the infra check, the decision and the report
together for the DAG task.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from dayloop.errors import OfflineGateFailed
from dayloop.training.metrics import metric_column, mlflow_key

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

TAG_PREFIX = "gate.offline"
MAX_TAG_VALUE = 5000


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
      ``alpha``. 0.15 is ~3.5 standard errors of NDCG@10 at ~100 users: equally good
      retrains pass, a drop of more than ~15 % is caught. Prefer the t-test: the
      Wilcoxon variant tests the median difference, which is 0 for zero-inflated
      per-user metrics, and then passes almost anything.
    * ``min_popularity_lift``: challenger primary mean >= lift x popularity primary mean.
      Next-day MovieLens is a very strong popularity setting (item-KNN does not beat it
      either; the two-tower measured 0.9-1.05x), so the default 0.8 rejects broken models
      (a shuffled-id model scores a small fraction of popularity) without failing every
      real day. Raise it to >= 1 where personalisation is expected to pay.
    * ``max_psi``: limit on PSI between champion and challenger top-1 scores (z-scored
      per user, over all users of the training window; see run_offline_gate). Healthy
      daily retrains measured 0.02-0.11, so the conventional 0.25 ("major shift") holds.
    * ``latency_budget_ms``: median latency of one user-tower call on ``latency_batch``
      users in a fresh process. Healthy exports measured 0.7-2.2 ms idle and up to
      ~70 ms on a 2-core box with Spark and training beside it; 200 ms catches a
      pathological export without failing on a busy CI machine.
    * ``min_eval_users``: fewer evaluable users than this and no verdict can be trusted.
    """

    k: int = 10
    primary_metric: Literal["recall", "ndcg"] = "ndcg"
    noninferiority_margin: float = 0.15
    margin_mode: Literal["relative", "absolute"] = "relative"
    alpha: float = 0.05
    test_method: Literal["t", "wilcoxon"] = "t"
    min_recall: float = 0.01
    min_ndcg: float = 0.02
    min_popularity_lift: float = 0.8
    max_psi: float = 0.25
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
        if min(self.min_recall, self.min_ndcg, self.min_popularity_lift, self.max_psi) < 0:
            raise ValueError("floors, popularity lift and max_psi must be >= 0")
        if self.latency_budget_ms <= 0 or self.latency_batch <= 0 or self.min_eval_users < 2:
            raise ValueError("latency budget and batch must be positive, min_eval_users >= 2")

    @property
    def primary_column(self) -> str:
        return metric_column(self.primary_metric, self.k)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InfraCheck:
    """Result of loading and running the exported user tower in a fresh process."""

    ok: bool
    bundle_dir: str
    batch: int
    budget_ms: float
    latency_ms: float | None = None  # median over runs
    latency_p95_ms: float | None = None
    output_shape: list[int] | None = None
    output_dtype: str | None = None
    finite: bool | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return (
                f"user tower runs in a fresh process: output {self.output_shape} "
                f"{self.output_dtype}, finite, median latency {self.latency_ms:.2f} ms "
                f"(p95 {self.latency_p95_ms:.2f} ms) for batch {self.batch}"
            )
        return "user tower check failed: " + "; ".join(self.problems)

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


def _means(df: pd.DataFrame) -> dict[str, float]:
    from dayloop.training.metrics import aggregate

    return aggregate(df)


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
    floors on recall@k and ndcg@k; primary mean >= min_popularity_lift x popularity's;
    paired non-inferiority against the champion on the primary metric; PSI of top-1
    scores <= max_psi; the infra check is ok and within the latency budget.

    Bootstrap rule (``champion is None``, nothing to compare with): pass iff enough users,
    the floors, the popularity lift and the infra check hold; non-inferiority and PSI are
    skipped (reported as INFO). A check that could not run (no PSI although a champion
    exists, no infra result) fails: the gate never passes on a check it did not perform.
    """
    from dayloop.quality.stats import paired_noninferiority

    t = thresholds
    primary = t.primary_column
    recall_col, ndcg_col = metric_column("recall", t.k), metric_column("ndcg", t.k)
    needed = sorted({primary, recall_col, ndcg_col})
    _check_frame(challenger, "challenger", needed)
    _check_frame(popularity, "popularity", needed)
    _same_users(challenger, popularity, "popularity")
    if champion is not None:
        _check_frame(champion, "champion", needed)
        _same_users(challenger, champion, "champion")

    reasons: list[str] = []
    ok = True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        reasons.append(("PASS: " if passed else "FAIL: ") + text)

    metrics: dict[str, float] = {}
    ch_means = _means(challenger)
    pop_means = _means(popularity)
    for col, value in ch_means.items():
        metrics[mlflow_key(col)] = value
    for col, value in pop_means.items():
        metrics[f"popularity.{mlflow_key(col)}"] = value
    n_users = int(len(challenger))
    metrics["n_eval_users"] = float(n_users)

    check(
        n_users >= t.min_eval_users,
        f"{n_users} evaluable users (minimum {t.min_eval_users})",
    )
    for col, floor in ((recall_col, t.min_recall), (ndcg_col, t.min_ndcg)):
        value = ch_means.get(col, float("nan"))
        check(
            math.isfinite(value) and value >= floor,
            f"challenger {col} = {value:.4f} (floor {floor:.4f})",
        )

    ch_primary, pop_primary = ch_means.get(primary, float("nan")), pop_means.get(primary, float("nan"))
    lift = ch_primary / pop_primary if pop_primary > 0 else (math.inf if ch_primary > 0 else float("nan"))
    metrics["popularity_lift"] = lift
    check(
        math.isfinite(ch_primary) and ch_primary >= t.min_popularity_lift * pop_primary,
        f"challenger {primary} = {ch_primary:.4f} vs popularity {pop_primary:.4f}: lift "
        f"{lift:.3f}x (required >= {t.min_popularity_lift:.3f}x)",
    )

    bootstrap = champion is None
    if bootstrap:
        reasons.append(
            "INFO: no champion: bootstrap rule (floors + popularity + infra); "
            "non-inferiority and PSI skipped"
        )
    else:
        cp_means = _means(champion)
        for col, value in cp_means.items():
            metrics[f"champion.{mlflow_key(col)}"] = value
        merged = challenger[["user_id", primary]].merge(
            champion[["user_id", primary]], on="user_id", suffixes=("_ch", "_cp")
        )
        merged = merged.dropna()
        cp_primary = cp_means.get(primary, float("nan"))
        margin = t.noninferiority_margin * cp_primary if t.margin_mode == "relative" else t.noninferiority_margin
        margin = max(float(margin), 0.0) if math.isfinite(margin) else 0.0
        metrics["noninferiority.margin_abs"] = margin
        if len(merged) < 2:
            check(False, f"non-inferiority on {primary}: only {len(merged)} paired users")
        else:
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
            check(
                res.noninferior,
                f"non-inferiority on {primary}: challenger {ch_primary:.4f} vs champion "
                f"{cp_primary:.4f}, mean diff {res.mean_diff:+.4f} "
                f"({1 - 2 * t.alpha:.0%} CI [{res.ci_low:+.4f}, {res.ci_high:+.4f}]), margin "
                f"{margin:.4f} ({mode}), {res.method}-test p = {res.p_value:.4g} "
                f"(alpha {t.alpha}, n = {res.n})",
            )
        if psi_value is None or not math.isfinite(psi_value):
            check(False, f"PSI of top-1 scores was not computed ({psi_value}) although a champion exists")
        else:
            metrics["psi"] = float(psi_value)
            check(psi_value <= t.max_psi, f"PSI of top-1 scores = {psi_value:.4f} (max {t.max_psi})")

    if infra is None:
        check(False, "exported model was not checked (no infra result)")
    else:
        if infra.latency_ms is not None:
            metrics["infra.latency_ms"] = float(infra.latency_ms)
        if not infra.ok:
            check(False, infra.summary())
        else:
            latency = infra.latency_ms if infra.latency_ms is not None else math.inf
            check(
                latency <= t.latency_budget_ms,
                f"{infra.summary()}; budget {t.latency_budget_ms:.1f} ms",
            )

    metrics["decision_passed"] = 1.0 if ok else 0.0
    metrics["decision_bootstrap"] = 1.0 if bootstrap else 0.0
    return GateDecision(passed=ok, bootstrap=bootstrap, reasons=reasons, metrics=metrics)


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


# Runs in a fresh interpreter: only json/time/sys/torch, never dayloop, exactly like a
# server would. argv: bundle_dir batch n_runs; prints one line prefixed with the marker.
_CHILD_MARKER = "DAYLOOP_INFRA_RESULT="
_CHILD_SCRIPT = r"""
import json, sys, time
import torch
bundle, batch, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
meta = json.load(open(bundle + "/model_meta.json"))
torch.manual_seed(0)
tower = torch.jit.load(bundle + "/user_tower.pt", map_location="cpu")
tower.eval()
sizes = meta["feature_vocab_sizes"]
L, D = int(meta["history_length"]), int(meta["embedding_dim"])
user_idx = torch.randint(0, int(meta["n_users"]) + 1, (batch,))
hist_idx = torch.randint(0, int(meta["n_items"]) + 1, (batch, L))
feats = torch.stack([torch.randint(0, int(sizes[c]), (batch,))
                     for c in ("gender_idx", "age_idx", "occupation_idx")], dim=1)
times = []
with torch.inference_mode():
    for i in range(runs + 3):
        t0 = time.perf_counter()
        out = tower(user_idx, hist_idx, feats)
        dt = (time.perf_counter() - t0) * 1000.0
        if i >= 3:  # warm-up calls pay for the TorchScript profiling executor
            times.append(dt)
times.sort()
res = {
    "shape": list(out.shape),
    "dtype": str(out.dtype).replace("torch.", ""),
    "finite": bool(torch.isfinite(out).all()),
    "max_norm_error": float((out.norm(dim=1) - 1).abs().max()) if out.numel() else 0.0,
    "expected_dim": D,
    "median_ms": times[len(times) // 2],
    "p95_ms": times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))],
    "dayloop_imported": any(m == "dayloop" or m.startswith("dayloop.") for m in sys.modules),
}
print("%MARKER%" + json.dumps(res))
""".replace("%MARKER%", _CHILD_MARKER)


def check_exported_model(
    bundle_dir: Path | str,
    batch: int = 256,
    budget_ms: float = 200.0,
    n_runs: int = 20,
    timeout_s: float = 180.0,
) -> InfraCheck:
    """Load ``user_tower.pt`` in a fresh ``sys.executable`` process and run random inputs.

    Checks output shape [batch, D], float32, finite, unit norm, and the median latency
    of ``n_runs`` calls against ``budget_ms``. Never raises for a broken bundle: every
    problem (missing/corrupt file, crash, timeout) is reported in ``problems``.
    """
    bundle_dir = Path(bundle_dir)
    base = {"bundle_dir": str(bundle_dir), "batch": int(batch), "budget_ms": float(budget_ms)}
    if batch <= 0 or n_runs <= 0:
        raise ValueError(f"batch and n_runs must be positive, got {batch}, {n_runs}")
    problems = []
    for name in ("user_tower.pt", "model_meta.json"):
        if not (bundle_dir / name).is_file():
            problems.append(f"{bundle_dir / name} is missing")
    if not problems:
        try:
            meta = json.loads((bundle_dir / "model_meta.json").read_text())
            int(meta["history_length"]), int(meta["embedding_dim"]), int(meta["n_users"])
            int(meta["n_items"]), dict(meta["feature_vocab_sizes"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"model_meta.json is unreadable or incomplete: {exc!r}")
    if problems:
        return InfraCheck(ok=False, problems=problems, **base)

    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD_SCRIPT, str(bundle_dir), str(batch), str(n_runs)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return InfraCheck(ok=False, problems=[f"fresh-process check timed out after {timeout_s:.0f} s"], **base)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return InfraCheck(
            ok=False,
            problems=[f"loading/running user_tower.pt failed (exit {proc.returncode}): " + " | ".join(tail)],
            **base,
        )
    res = json.loads(lines[-1][len(_CHILD_MARKER) :])
    expected = [int(batch), int(res["expected_dim"])]
    if res["shape"] != expected:
        problems.append(f"output shape {res['shape']} != expected {expected}")
    if res["dtype"] != "float32":
        problems.append(f"output dtype {res['dtype']} != float32")
    if not res["finite"]:
        problems.append("output contains NaN or Inf")
    elif res["max_norm_error"] > 1e-3:
        problems.append(f"output rows are not unit-norm (max |norm - 1| = {res['max_norm_error']:.2e})")
    if res["dayloop_imported"]:
        problems.append("the TorchScript model pulled in the dayloop package")
    if res["median_ms"] > budget_ms:
        problems.append(f"median latency {res['median_ms']:.2f} ms > budget {budget_ms:.1f} ms")
    return InfraCheck(
        ok=not problems,
        latency_ms=float(res["median_ms"]),
        latency_p95_ms=float(res["p95_ms"]),
        output_shape=res["shape"],
        output_dtype=res["dtype"],
        finite=bool(res["finite"]),
        problems=problems,
        **base,
    )


class GateRun(NamedTuple):
    """Everything :func:`run_offline_gate` produced."""

    decision: GateDecision
    report_path: Path
    challenger: pd.DataFrame
    champion: pd.DataFrame | None
    popularity: pd.DataFrame
    infra: InfraCheck


def run_offline_gate(
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
    from dataclasses import replace

    from dayloop.quality.report import write_offline_report
    from dayloop.quality.stats import psi
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.evaluate import (
        DEFAULT_KS,
        evaluate_bundle,
        evaluate_popularity,
        top1_score_sample,
        window_histories,
    )
    from dayloop.training.train import load_features

    t = thresholds or GateThresholds()
    fs = load_features(Path(features_dir), parts=("train", "eval", "popularity"))
    ks = tuple(sorted({*DEFAULT_KS, t.k}))
    schema_hash = fs.meta["feature_schema_hash"]

    challenger = ModelBundle.load(challenger_dir)
    if challenger.meta.get("feature_schema_hash") != schema_hash:
        raise ValueError(
            f"challenger {challenger_dir} was trained on feature schema "
            f"{challenger.meta.get('feature_schema_hash')!r}, features are {schema_hash!r}"
        )
    ch_eval = evaluate_bundle(challenger, fs["eval"], ks)
    pop_df = evaluate_popularity(fs["popularity"], fs["eval"], ks)
    # PSI population: every user of the window with their end-of-window history. One
    # day's ~100 eval users would leave PSI dominated by sampling noise.
    pop_users, pop_hists = window_histories(fs["train"], int(fs.meta["history_length"]))
    samples = {"challenger": top1_score_sample(challenger, pop_users, pop_hists)[1]}

    note = None
    cp_df, psi_value = None, None
    if champion_dir is not None:
        champion = ModelBundle.load(champion_dir)
        if champion.meta.get("feature_schema_hash") != schema_hash:
            note = (
                f"INFO: champion {champion_dir} uses feature schema "
                f"{champion.meta.get('feature_schema_hash')!r} != {schema_hash!r}; not comparable, "
                "bootstrap rule applied"
            )
        else:
            cp_df = evaluate_bundle(champion, fs["eval"], ks).per_user
            # standardised top-1 scores: raw cosine levels are not comparable between
            # models (see EvalResult)
            samples["champion"] = top1_score_sample(champion, pop_users, pop_hists)[1]
            if samples["champion"].size and samples["challenger"].size:
                psi_value = psi(samples["champion"], samples["challenger"])

    infra = check_exported_model(challenger_dir, batch=t.latency_batch, budget_ms=t.latency_budget_ms)
    decision = decide(ch_eval.per_user, cp_df, pop_df, t, psi_value, infra)
    if note is not None:
        decision = replace(decision, reasons=[*decision.reasons, note])
    report = write_offline_report(decision, ch_eval.per_user, cp_df, pop_df, samples, Path(report_dir))
    return GateRun(decision, report, ch_eval.per_user, cp_df, pop_df, infra)
