"""Paired bootstrap intervals over users for the offline gate (pure numpy).

The gate compares two rankers on the same users, so it resamples users, not scores: each
bootstrap sample draws users with replacement and recomputes both means on the same draw,
which keeps the per-user pairing (a hard user is hard for both) and makes the interval of
the ratio of means much tighter than two independent intervals would be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["RatioInterval", "paired_ratio_interval"]


@dataclass(frozen=True)
class RatioInterval:
    """``ratio = mean(a) / mean(b)`` with its percentile bootstrap interval at ``level``."""

    ratio: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, np.nan))


def paired_ratio_interval(
    a: np.ndarray, b: np.ndarray, level: float = 0.9, n_boot: int = 2000, seed: int = 0
) -> RatioInterval:
    """Paired percentile bootstrap of ``mean(a) / mean(b)`` over users (rows pair up).

    ``a`` and ``b`` are per-user metrics of the same users in the same order; users with a
    non-finite value in either are dropped. Seeded, so the same inputs give the same
    interval. Raises ValueError for mismatched lengths, a bad level or fewer than 2 users.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    if not 0.0 < level < 1.0 or n_boot < 100:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 100, got {level}, {n_boot}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        raise ValueError(f"a paired interval needs at least 2 users with finite metrics, got {a.size}")
    rng = np.random.default_rng(seed)
    # in chunks so 2000 draws of a few thousand users stay within a few MB
    ratios = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // a.size)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, a.size, size=(stop - start, a.size))
        ratios[start:stop] = _ratio(a[idx].mean(axis=1), b[idx].mean(axis=1))
    tail = (1.0 - level) / 2.0
    finite = ratios[~np.isnan(ratios)]
    low, high = (np.quantile(finite, [tail, 1.0 - tail]) if finite.size else (np.nan, np.nan))
    ratio = float(_ratio(np.array(a.mean()), np.array(b.mean())))
    return RatioInterval(ratio, float(low), float(high), float(level), int(a.size), int(n_boot))
