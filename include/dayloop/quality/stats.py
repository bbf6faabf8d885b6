"""Statistics shared by the offline gate and the canary analysis: population stability index
(from samples or from counts) and a paired non-inferiority test. Pure functions (numpy +
scipy), no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

# Floor for a bin's share in PSI. An empty bin would make ln(actual/expected) infinite;
# 1e-4 keeps a bin that empties completely (0.1 -> 0) at a finite but very large
# contribution (~0.83), so a full shift of one decile alone exceeds the usual 0.25 limit.
PSI_EPSILON = 1e-4


def _finite_1d(values: np.ndarray | list[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def psi_from_counts(
    expected: np.ndarray | list[float],
    actual: np.ndarray | list[float],
    eps: float = PSI_EPSILON,
) -> float:
    """Population stability index of ``actual`` against ``expected``, both given as counts on
    the same bins: each side's shares floored at ``eps`` (see PSI_EPSILON), then
    PSI = sum((a - e) * ln(a / e)). The one PSI formula of the project: :func:`psi` bins
    samples and calls it, the canary analysis calls it on histogram buckets."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"expected and actual must be 1-d counts on the same bins, got {e.shape} and {a.shape}")
    if not (e.sum() > 0 and a.sum() > 0):
        raise ValueError("both histograms need observations")
    e_share = np.maximum(e / e.sum(), eps)
    a_share = np.maximum(a / a.sum(), eps)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def psi(
    expected: np.ndarray | list[float],
    actual: np.ndarray | list[float],
    bins: int = 10,
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population stability index of ``actual`` against the reference ``expected`` (samples).

    Bin edges are the quantiles of ``expected`` (``bins`` equal-mass bins, duplicates
    merged, outer edges open); the counts per bin go to :func:`psi_from_counts`. 0 means
    identical binned distributions; < 0.1 is usually read as stable, > 0.25 as a major shift.
    """
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    exp = _finite_1d(expected, "expected")
    act = _finite_1d(actual, "actual")
    inner = np.unique(np.quantile(exp, np.linspace(0, 1, int(bins) + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    # The open outer edges put every sample in some bin, so count / count.sum() inside
    # psi_from_counts is the same share as count / sample size.
    return psi_from_counts(np.histogram(exp, bins=edges)[0], np.histogram(act, bins=edges)[0], epsilon)


@dataclass(frozen=True)
class NoninferiorityResult:
    """Outcome of :func:`paired_noninferiority`.

    ``ci_low``/``ci_high`` bound mean(challenger - champion) with two-sided confidence
    1 - 2*alpha, so ``ci_low`` is the one-sided (1 - alpha) lower bound and
    ``noninferior`` is equivalent to ``ci_low > -margin`` for the t-test.
    """

    method: str
    statistic: float
    p_value: float
    mean_diff: float
    ci_low: float
    ci_high: float
    n: int
    margin: float
    alpha: float
    noninferior: bool

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def paired_noninferiority(
    challenger: np.ndarray | list[float],
    champion: np.ndarray | list[float],
    margin: float,
    alpha: float = 0.05,
    method: Literal["t", "wilcoxon"] = "t",
) -> NoninferiorityResult:
    """One-sided paired non-inferiority test on per-user metric values.

    H0: mean(challenger - champion) <= -margin (challenger is worse by at least ``margin``,
    absolute units of the metric); H1: it is worse by less than that, or better.
    ``noninferior`` is True iff H0 is rejected at level ``alpha``. ``method='t'`` is a
    one-sample t-test on the shifted differences (the mean is what the gate cares
    about). ``'wilcoxon'`` is the signed-rank test on the shifted differences; it tests
    the median, so with zero-inflated metrics (most users at 0 under both models) any
    positive margin makes it reject H0 easily: use it only for dense metrics.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (absolute metric units), got {margin}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if method not in ("t", "wilcoxon"):
        raise ValueError(f"method must be 't' or 'wilcoxon', got {method!r}")
    ch = _finite_1d(challenger, "challenger")
    cp = _finite_1d(champion, "champion")
    if ch.shape != cp.shape:
        raise ValueError(f"paired samples differ in length: {ch.size} vs {cp.size}")
    n = int(ch.size)
    if n < 2:
        raise ValueError(f"need at least 2 paired observations, got {n}")

    from scipy import stats as sps

    diff = ch - cp
    shifted = diff + margin
    mean_diff = float(diff.mean())
    sd = float(diff.std(ddof=1))
    t_crit = float(sps.t.ppf(1 - alpha, df=n - 1))
    half = t_crit * sd / np.sqrt(n)
    ci_low, ci_high = mean_diff - half, mean_diff + half

    if sd == 0.0:
        # every user moved by the same amount: the evidence is exact, scipy would give nan
        stat = float(np.sign(shifted[0]) * np.inf) if shifted[0] != 0 else 0.0
        p_value = 0.0 if shifted[0] > 0 else 1.0
    elif method == "t":
        res = sps.ttest_1samp(shifted, 0.0, alternative="greater")
        stat, p_value = float(res.statistic), float(res.pvalue)
    else:
        nonzero = shifted[shifted != 0]
        if nonzero.size == 0:
            stat, p_value = 0.0, 1.0
        else:
            res = sps.wilcoxon(nonzero, alternative="greater", zero_method="wilcox")
            stat, p_value = float(res.statistic), float(res.pvalue)
    return NoninferiorityResult(
        method=method,
        statistic=stat,
        p_value=p_value,
        mean_diff=mean_diff,
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        n=n,
        margin=float(margin),
        alpha=float(alpha),
        noninferior=bool(p_value < alpha),
    )
