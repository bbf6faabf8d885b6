"""The guardrail checks of the canary analysis, one function per check, each returning a
:class:`~dayloop.rollout.analysis.verdict.Check` with its numbers: non-finite outputs, the
error ratio (absolute and against control), the p99 latency (absolute and against control,
read from Prometheus histograms the way ``histogram_quantile`` does), the score drift and
the CTR test: at the randomisation unit with a pre-period baseline
(:mod:`dayloop.rollout.analysis.grouped`, what the rollout decides by), or per impression
(:mod:`dayloop.rollout.analysis.ctr`, kept for comparison: it assumes independent impressions).

A missing series, an invalid number or too few samples makes a check ``inconclusive``,
never ``pass``. scipy loads inside the functions that use it.
"""

from __future__ import annotations

import math

import numpy as np

from dayloop.quality.stats import psi_from_counts
from dayloop.rollout.analysis.ctr import CtrState, ctr_ratio_upper_bound, update_ctr_state
from dayloop.rollout.analysis.grouped import GroupCtrState, GroupWindow
from dayloop.rollout.analysis.grouped import update as grouped_update
from dayloop.rollout.analysis.inputs import Histogram, Thresholds, VersionWindow, why_unusable
from dayloop.rollout.analysis.verdict import FAIL, INCONCLUSIVE, PASS, Check

# Merge adjacent score bins until every cell of the 2 x bins table expects this many
# observations: the chi-square approximation behind the drift test needs it (Cochran).
_MIN_EXPECTED_PER_CELL = 5.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _two(value: float, limit: float, digits: int = 3) -> tuple[str, str]:
    """``value`` and ``limit`` with just enough decimals that a breach never reads as
    "0.010 > max 0.010"."""
    for d in range(digits, digits + 4):
        a, b = f"{value:.{d}f}", f"{limit:.{d}f}"
        if a != b:
            break
    return a, b


def histogram_quantile(q: float, hist: Histogram) -> float:
    """The q-quantile the way Prometheus's ``histogram_quantile`` computes it: NaN without
    a ``+Inf`` bucket or observations; linear interpolation inside the bucket holding rank
    ``q * total`` (the first bucket starts at 0 when its bound is positive); a rank in the
    ``+Inf`` bucket answers the largest finite bound."""
    value, _ = _quantile(q, hist)
    return value


def _quantile(q: float, hist: Histogram) -> tuple[float, bool]:
    """(value, above_top): ``above_top`` when the rank fell in the +Inf bucket, so the true
    quantile is only known to exceed ``value``."""
    if math.isnan(q):
        return math.nan, False
    if q < 0:
        return -math.inf, False
    if q > 1:
        return math.inf, False
    if not hist.complete or len(hist.upper_bounds) < 2:
        return math.nan, False
    bounds = hist.upper_bounds
    counts = hist.monotone()
    total = counts[-1]
    if not total > 0:
        return math.nan, False
    rank = q * total
    # first bucket whose cumulative count reaches the rank, searched among the finite ones
    b = int(np.searchsorted(counts[:-1], rank, side="left"))
    if b == len(bounds) - 1:
        return bounds[-2], True
    if b == 0 and bounds[0] <= 0:
        return bounds[0], False
    start, end, in_bucket = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        in_bucket -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / in_bucket), False


def _merge_sparse_bins(table: np.ndarray) -> np.ndarray:
    """Merge adjacent columns of a 2 x bins count table until every cell's expected count
    under homogeneity reaches _MIN_EXPECTED_PER_CELL (a short last group joins the previous
    one). The merge looks at pooled counts only, so it cannot favour either arm."""
    pooled = table.sum(axis=0)
    total = pooled.sum()
    need = _MIN_EXPECTED_PER_CELL * total / table.sum(axis=1).min()
    groups: list[list[int]] = []
    acc = 0.0
    current: list[int] = []
    for j, n in enumerate(pooled):
        current.append(j)
        acc += n
        if acc >= need:
            groups.append(current)
            current, acc = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return np.stack([table[:, g].sum(axis=1) for g in groups], axis=1)


def check_nonfinite(canary: VersionWindow, t: Thresholds) -> Check:
    name = "nonfinite"
    why = why_unusable(canary.nonfinite)
    if why:
        return Check(name, INCONCLUSIVE, f"canary non-finite outputs: {why}", {"nonfinite": None})
    n = float(canary.nonfinite)  # type: ignore[arg-type]
    values = {"nonfinite": n, "max": t.max_nonfinite}
    if n > t.max_nonfinite:
        return Check(name, FAIL, f"{n:g} non-finite outputs > tolerance {t.max_nonfinite:g}", values)
    return Check(name, PASS, f"{n:g} non-finite outputs (tolerance {t.max_nonfinite:g})", values)


def _error_ratio(w: VersionWindow, who: str, t: Thresholds) -> tuple[float | None, str | None]:
    """(ratio, None) or (None, why not)."""
    for label, v in (("requests", w.requests), ("errors", w.errors)):
        why = why_unusable(v)
        if why:
            return None, f"{who} {label}: {why}"
    req, err = float(w.requests), float(w.errors)  # type: ignore[arg-type]
    if req < t.min_requests:
        return None, f"too few {who} requests: {req:g} < {t.min_requests:g}"
    return min(err / req, 1.0), None


def check_error_ratio(canary: VersionWindow, t: Thresholds) -> Check:
    name = "error_ratio"
    ratio, why = _error_ratio(canary, "canary", t)
    if ratio is None:
        return Check(name, INCONCLUSIVE, why or "", {"requests": canary.requests, "errors": canary.errors})
    values = {"ratio": ratio, "max": t.max_error_ratio, "requests": canary.requests, "errors": canary.errors}
    detail = f"({canary.errors:g} of {canary.requests:g} requests)"
    shown, limit = _two(ratio, t.max_error_ratio)
    if ratio > t.max_error_ratio:
        return Check(name, FAIL, f"error ratio {shown} > max {limit} {detail}", values)
    return Check(name, PASS, f"error ratio {shown} <= max {limit} {detail}", values)


def _wilson_lower(successes: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Wilson score lower bound of a proportion.

    Written out rather than ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``:
    scipy takes integer counts only, and ``increase()`` counts are fractional. On integer
    counts the two agree to 1e-15 (with scipy's two-sided level 1 - 2 alpha; unit-tested)."""
    from scipy.special import ndtri

    if n <= 0:
        return 0.0
    z = float(ndtri(1.0 - alpha))
    p = min(max(successes / n, 0.0), 1.0)
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


def check_error_vs_control(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "error_ratio_vs_control"
    c_ratio, why = _error_ratio(canary, "canary", t)
    k_ratio, why_k = _error_ratio(control, "control", t)
    if c_ratio is None or k_ratio is None:
        return Check(name, INCONCLUSIVE, "; ".join(w for w in (why, why_k) if w), {})
    lower = _wilson_lower(float(canary.errors), float(canary.requests), t.alpha)  # type: ignore[arg-type]
    excess = lower - k_ratio
    values = {"canary_ratio": c_ratio, "canary_lower_bound": lower, "control_ratio": k_ratio,
              "excess": excess, "max_excess": t.max_error_ratio_vs_control}
    shown, limit = _two(excess, t.max_error_ratio_vs_control, 4)
    text = (f"canary error ratio {c_ratio:.4f} ({1 - t.alpha:.0%} lower bound {lower:.4f}) vs control "
            f"{k_ratio:.4f}: excess {shown}")
    if excess > t.max_error_ratio_vs_control:
        return Check(name, FAIL, f"{text} > max {limit}", values)
    return Check(name, PASS, f"{text} <= max {limit}", values)


def _p99(w: VersionWindow, who: str, t: Thresholds) -> tuple[float | None, bool, str | None]:
    """(p99, above_top, None) or (None, False, why not)."""
    h = w.latency
    if h is None:
        return None, False, f"{who} latency histogram: series missing"
    if not h.valid():
        return None, False, f"{who} latency histogram: invalid counts"
    if not h.complete:
        return None, False, f"{who} latency histogram has no +Inf bucket"
    if h.count < t.min_requests:
        return None, False, f"too few {who} latency observations: {h.count:g} < {t.min_requests:g}"
    value, above = _quantile(0.99, h)
    return value, above, None


def _count_above(h: Histogram, x: float) -> float:
    """Observations above ``x``, interpolating linearly inside the bucket that holds ``x``
    (above the top finite bound, everything past it counts)."""
    cum = h.monotone()
    total = float(cum[-1])
    lower, below = 0.0, 0.0
    for bound, count in zip(h.upper_bounds, cum, strict=True):
        if x <= bound:
            if math.isinf(bound):
                return total - below
            share = (x - lower) / (bound - lower) if bound > lower else 1.0
            return total - (below + (float(count) - below) * share)
        lower, below = bound, float(count)
    return total - below


def _exceedance_pvalue(h: Histogram, limit: float) -> tuple[float, float, float]:
    """(observations above ``limit``, total, p) where p is the chance of seeing that many or more
    above it if the true p99 were at the limit (1 % above): small windows have a noisy p99 (with
    40 requests it is their maximum), so one slow request must not read as a breach."""
    from scipy.special import bdtrc

    total = h.count
    above = _count_above(h, limit)
    k, n = math.floor(above + 1e-9), max(1, round(total))
    p_value = 1.0 if k <= 0 else float(bdtrc(k - 1, n, 0.01))
    return above, total, p_value


def check_p99_budget(canary: VersionWindow, t: Thresholds) -> Check:
    name = "latency_p99"
    p99, above, why = _p99(canary, "canary", t)
    if p99 is None:
        return Check(name, INCONCLUSIVE, why or "", {})
    shown = f">= {_ms(p99)} (above the top bucket)" if above else _ms(p99)
    values = {"p99_s": p99, "above_top_bucket": above, "budget_s": t.p99_budget_s}
    if p99 > t.p99_budget_s or (above and p99 >= t.p99_budget_s):
        n_above, n, p_value = _exceedance_pvalue(canary.latency, t.p99_budget_s)
        values.update(above_budget=n_above, observations=n, p_value=p_value)
        text = (f"p99 {shown} > budget {_ms(t.p99_budget_s)} ({n_above:.0f} of {n:.0f} above it, "
                f"p = {p_value:.2g} if the true p99 were at the budget)")
        if p_value < t.alpha:
            return Check(name, FAIL, text, values)
        return Check(name, INCONCLUSIVE, f"{text}: not yet significant at {t.alpha:g}", values)
    if above:
        return Check(name, INCONCLUSIVE, f"p99 {shown}: the buckets cannot tell it from the budget "
                     f"{_ms(t.p99_budget_s)}", values)
    return Check(name, PASS, f"p99 {shown} <= budget {_ms(t.p99_budget_s)}", values)


def check_p99_vs_control(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "latency_p99_vs_control"
    c, c_above, why = _p99(canary, "canary", t)
    k, k_above, why_k = _p99(control, "control", t)
    if c is None or k is None:
        return Check(name, INCONCLUSIVE, "; ".join(w for w in (why, why_k) if w), {})
    limit = t.max_p99_ratio_vs_control * k + t.p99_slack_s
    values = {"canary_p99_s": c, "control_p99_s": k, "limit_s": limit, "canary_above_top_bucket": c_above,
              "control_above_top_bucket": k_above}
    text = (f"canary p99 {_ms(c)} vs control {_ms(k)}: limit {t.max_p99_ratio_vs_control:g} x control + "
            f"{_ms(t.p99_slack_s)} = {_ms(limit)}")
    # Above the top bucket a p99 is only a lower bound: the canary's can still prove a
    # breach, control's can only prove a pass.
    if c > limit and not k_above:
        n_above, n, p_value = _exceedance_pvalue(canary.latency, limit)
        values.update(canary_above_limit=n_above, canary_observations=n, p_value=p_value)
        text = f"{text}; {n_above:.0f} of {n:.0f} canary requests above the limit (p = {p_value:.2g})"
        if p_value < t.alpha:
            return Check(name, FAIL, f"{text} (canary above)", values)
        return Check(name, INCONCLUSIVE, f"{text}: canary above, not yet significant at {t.alpha:g}", values)
    if c <= limit and not c_above:
        return Check(name, PASS, text, values)
    return Check(name, INCONCLUSIVE, f"{text}; a p99 above the top bucket leaves it undecided", values)


def check_score_drift(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "score_drift"
    problems = []
    for who, h in (("canary", canary.scores), ("control", control.scores)):
        if h is None:
            problems.append(f"{who} score histogram: series missing")
        elif not h.valid():
            problems.append(f"{who} score histogram: invalid counts")
        elif h.count < t.min_impressions:
            problems.append(f"too few {who} scores: {h.count:g} < {t.min_impressions:g}")
    if problems:
        return Check(name, INCONCLUSIVE, "; ".join(problems), {})
    assert canary.scores is not None and control.scores is not None
    if canary.scores.upper_bounds != control.scores.upper_bounds:
        return Check(name, INCONCLUSIVE, "canary and control score buckets differ", {})
    from scipy.stats import chi2_contingency

    table = _merge_sparse_bins(np.stack([control.scores.bin_counts(), canary.scores.bin_counts()]))
    psi_value = psi_from_counts(table[0], table[1])
    bins = table.shape[1]
    if bins >= 2:
        # Pearson's statistic without Yates' correction (scipy applies it at one degree of
        # freedom by default), as the merged table already meets Cochran's rule.
        test = chi2_contingency(table, correction=False)
        chi2, p_value = float(test.statistic), float(test.pvalue)
    else:
        chi2, p_value = 0.0, 1.0
    values = {"psi": psi_value, "max_psi": t.max_score_drift, "chi2": chi2, "p_value": p_value, "bins": bins,
              "drift_alpha": t.drift_alpha}
    text = f"score PSI {psi_value:.3f} (chi-square p = {p_value:.2g} over {bins} bins)"
    if psi_value > t.max_score_drift and p_value < t.drift_alpha:
        return Check(name, FAIL, f"{text}: PSI > max {t.max_score_drift:.2f} and p < {t.drift_alpha:g}", values)
    if psi_value > t.max_score_drift:
        return Check(name, INCONCLUSIVE, f"{text}: PSI > max {t.max_score_drift:.2f} but not significant at "
                     f"{t.drift_alpha:g} on these counts", values)
    return Check(name, PASS, f"{text} <= max {t.max_score_drift:.2f}", values)


def check_ctr(canary: VersionWindow, control: VersionWindow, t: Thresholds, state: CtrState | None,
               step: str | int | None) -> tuple[Check, CtrState]:
    name = "ctr"
    if state is None:
        state = CtrState.start(t)
    elif (state.margin, state.mixture_scale, state.dispersion) != (t.ctr_margin, t.ctr_mixture_scale,
                                                                   t.ctr_dispersion):
        raise ValueError("CTR test settings changed during the rollout: state has margin/scale/dispersion "
                         f"{state.margin}/{state.mixture_scale}/{state.dispersion}, thresholds "
                         f"{t.ctr_margin}/{t.ctr_mixture_scale}/{t.ctr_dispersion}")
    problems = [f"{who} {label}: {why}" for who, w in (("canary", canary), ("control", control))
                for label, v in (("impressions", w.impressions), ("clicks", w.clicks)) if (why := why_unusable(v))]
    if problems:
        # Earlier evidence still stands: a previous rejection keeps failing.
        if state.p_value <= t.alpha:
            return Check(name, FAIL, f"rejected earlier (always-valid p = {state.p_value:.3g}); now "
                         + "; ".join(problems), {"p_value": state.p_value}), state
        return Check(name, INCONCLUSIVE, "; ".join(problems), {"p_value": state.p_value}), state
    ci, cc = float(canary.impressions), float(canary.clicks)  # type: ignore[arg-type]
    ki, kc = float(control.impressions), float(control.clicks)  # type: ignore[arg-type]
    state = update_ctr_state(state, step, ci, cc, ki, kc)
    ti, tc, tki, tkc = state.totals()
    ratio = state.rate_ratio()
    upper = ctr_ratio_upper_bound(state, t.alpha)
    floor = 1.0 - t.ctr_margin
    values = {"window_canary_ctr": cc / ci if ci > 0 else None, "window_control_ctr": kc / ki if ki > 0 else None,
              "rate_ratio": ratio, "upper_bound": upper, "floor": floor, "p_value": state.p_value,
              "alpha": t.alpha, "canary_impressions": ti, "canary_clicks": tc, "control_impressions": tki,
              "control_clicks": tkc, "looks": state.looks}
    text = (f"CTR ratio canary/control {ratio:.3f} over {ti:g} vs {tki:g} impressions "
            f"({tc:g} vs {tkc:g} clicks, look {state.looks}); always-valid {1 - t.alpha:.0%} upper bound "
            f"{upper:.3f}, p = {state.p_value:.3g} for 'worse than {floor:.2f} x control'")
    if state.p_value <= t.alpha:
        return Check(name, FAIL, f"{text} <= alpha {t.alpha:g}", values), state
    if ci < t.min_impressions or ki < t.min_impressions:
        return Check(name, INCONCLUSIVE, f"too few impressions in the window: canary {ci:g}, control {ki:g} "
                     f"(min {t.min_impressions:g}); {text}", values), state
    return Check(name, PASS, f"{text} > alpha {t.alpha:g}", values), state


# Checks reported with every look but left out of the verdict. Score drift compares two
# different models' raw top-1 scores: a healthy retrain moves their scale (measured PSI 0.7-6


def check_ctr_users(step: int, post: GroupWindow, canary: np.ndarray, t: Thresholds,
                    state: GroupCtrState) -> tuple[Check, GroupCtrState]:
    """The CTR guardrail at the randomisation unit (:mod:`dayloop.rollout.analysis.grouped`):
    fail once any step's always-valid evidence that the canary is worse than the margin
    reaches its share of alpha; pass when judged, not rejected and both arms have the step's
    minimum impressions; else inconclusive (missing groups, no baseline, too few lists)."""
    name = "ctr"
    if (state.margin, state.alpha) != (t.ctr_margin, t.alpha):
        raise ValueError(f"CTR test settings changed during the rollout: state margin/alpha {state.margin}/"
                         f"{state.alpha}, thresholds {t.ctr_margin}/{t.alpha}")
    state, est, why = grouped_update(state, step, post, canary, t.min_impressions)
    floor = 1.0 - t.ctr_margin
    record = state.steps.get(str(step))
    p = state.p_value
    base: dict[str, float | int | str | bool | None] = {"unit": "bucket group", "p_value": p, "alpha": t.alpha,
                                                        "floor": floor, "looks": state.looks}
    if est is None:
        earlier = f"rejected earlier (p = {p:.3g}); now " if state.rejected else ""
        return Check(name, FAIL if state.rejected else INCONCLUSIVE, earlier + str(why), base), state
    upper = math.exp(record.min_upper_log) if record is not None else math.inf
    values = {**base, **est.as_dict(), "rate_ratio": est.ratio, "upper_bound": upper,
              "step_alpha": record.alpha if record else None}
    text = (f"user-level CTR ratio canary/control {est.ratio:.3f} adjusted by the pre-period baseline "
            f"(raw {est.raw_ratio:.3f}; the baseline removed {est.variance_removed:.0%} of the variance, "
            f"theta {est.theta:.2f}) over {est.canary_groups} vs {est.control_groups} groups, "
            f"{est.canary_impressions:g} vs {est.control_impressions:g} lists; always-valid upper bound "
            f"{upper:.3f} at this step's alpha {values['step_alpha']:.3g}, p = {p:.3g} for "
            f"'worse than {floor:.2f} x control'")
    if state.rejected:
        return Check(name, FAIL, f"{text} <= alpha {t.alpha:g}", values), state
    return Check(name, PASS, f"{text} > alpha {t.alpha:g}", values), state
