"""PSI properties and the direction of the paired non-inferiority test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dayloop.quality.stats import PSI_EPSILON, paired_noninferiority, psi, psi_from_counts


def test_psi_hand_computed() -> None:
    # one inner edge at the median 0.5: expected shares (.5, .5), actual (.75, .25)
    value = psi([0, 0, 1, 1], [0, 0, 0, 1], bins=2)
    assert value == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2.0))


def test_psi_from_counts_hand_computed() -> None:
    assert psi_from_counts([50, 50], [75, 25]) == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2.0))
    assert psi_from_counts([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        psi_from_counts([1, 2], [1, 2, 3])


def test_psi_of_samples_is_psi_of_their_bin_counts() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=3000), rng.normal(0.2, size=2000)
    edges = np.concatenate([[-np.inf], np.unique(np.quantile(x, np.linspace(0, 1, 11)[1:-1])), [np.inf]])
    counts = np.histogram(x, bins=edges)[0], np.histogram(y, bins=edges)[0]
    assert psi(x, y) == psi_from_counts(*counts)


def test_psi_properties() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert psi(x, rng.normal(size=5000)) < 0.02  # same distribution: tiny
    small, large = psi(x, x + 0.3), psi(x, x + 1.0)
    assert 0 < small < large
    assert large > 0.25
    # a total collapse into one bin stays finite thanks to the epsilon floor
    collapsed = psi(x, np.full(100, 10.0))
    assert math.isfinite(collapsed) and collapsed > 5
    # ties in the reference (duplicate quantile edges) are merged, not an error
    assert psi(np.repeat([0.0, 1.0], 50), np.repeat([0.0, 1.0], 50)) == pytest.approx(0.0)


def test_psi_epsilon_is_documented_value() -> None:
    exp = np.repeat(np.arange(10.0), 10)  # ten equal-mass bins
    act = np.repeat(np.arange(1.0, 10.0), 10)  # bin 0 empty, others 1/9
    e, a = 0.1, 1 / 9
    expected = (PSI_EPSILON - e) * math.log(PSI_EPSILON / e) + 9 * (a - e) * math.log(a / e)
    assert psi(exp, act, bins=10) == pytest.approx(expected, rel=1e-9)


def test_psi_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        psi([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        psi([1.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="bins"):
        psi([1.0], [1.0], bins=1)


def test_noninferiority_direction() -> None:
    rng = np.random.default_rng(1)
    champion = rng.uniform(0.2, 0.6, size=300)
    noise = rng.normal(scale=0.02, size=300)
    slightly_worse = paired_noninferiority(champion - 0.005 + noise, champion, margin=0.03)
    assert slightly_worse.noninferior and slightly_worse.p_value < 0.05
    assert slightly_worse.mean_diff == pytest.approx(-0.005 + noise.mean())
    much_worse = paired_noninferiority(champion - 0.10 + noise, champion, margin=0.03)
    assert not much_worse.noninferior and much_worse.p_value > 0.5
    better = paired_noninferiority(champion + 0.05 + noise, champion, margin=0.0)
    assert better.noninferior and better.p_value < 1e-6
    # swapping the roles flips the verdict: the test is one-sided
    swapped = paired_noninferiority(champion, champion + 0.10 + noise, margin=0.03)
    assert not swapped.noninferior


def test_noninferiority_matches_textbook_t_test_and_ci() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=80), rng.uniform(size=80)
    margin, alpha = 0.05, 0.05
    res = paired_noninferiority(a, b, margin=margin, alpha=alpha)
    d = a - b
    se = d.std(ddof=1) / math.sqrt(d.size)
    t = (d.mean() + margin) / se
    assert res.statistic == pytest.approx(t)
    assert res.p_value == pytest.approx(1 - sps.t.cdf(t, df=d.size - 1))
    assert res.ci_low == pytest.approx(d.mean() - sps.t.ppf(1 - alpha, d.size - 1) * se)
    assert res.noninferior == (res.ci_low > -margin)
    assert res.n == 80 and res.method == "t"


def test_noninferiority_wilcoxon_and_degenerate_cases() -> None:
    rng = np.random.default_rng(3)
    champion = rng.uniform(size=200)
    good = paired_noninferiority(champion + rng.normal(scale=0.01, size=200), champion, 0.02, method="wilcoxon")
    bad = paired_noninferiority(champion - 0.1, champion + rng.normal(scale=0.01, size=200), 0.02, method="wilcoxon")
    assert good.noninferior and not bad.noninferior
    # identical models: zero variance, the shifted difference is +margin everywhere
    same = paired_noninferiority(champion, champion, margin=0.01)
    assert same.noninferior and same.p_value == 0.0
    no_margin = paired_noninferiority(champion, champion, margin=0.0)
    assert not no_margin.noninferior


def test_noninferiority_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_noninferiority([1.0, 2.0], [1.0], margin=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        paired_noninferiority([1.0], [1.0], margin=0.1)
    with pytest.raises(ValueError, match="margin"):
        paired_noninferiority([1.0, 2.0], [1.0, 2.0], margin=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        paired_noninferiority([1.0, 2.0], [1.0, 2.0], margin=0.1, alpha=0.7)
