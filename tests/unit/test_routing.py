"""Deterministic bucketing and route tables (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.routing import (
    MAX_SALT_LENGTH,
    N_BUCKETS,
    Route,
    RouteTable,
    RouteTableError,
    bucket,
    canary_table,
    new_salt,
    single_version_table,
)

USERS = np.arange(1, 50_001)


def test_bucket_is_deterministic_and_in_range():
    assert all(bucket(u, "s1") == bucket(u, "s1") for u in range(1000))
    b = np.array([bucket(int(u), "s1") for u in USERS[:5000]])
    assert b.min() >= 0 and b.max() < N_BUCKETS


def test_same_user_same_version_across_1000_requests():
    table = canary_table(stable=1, canary=2, percent=25, salt="rollout-7")
    for user in (3, 77, 123456, 2**31 - 1):
        versions = {table.version_for(user) for _ in range(1000)}
        assert len(versions) == 1


def test_ramp_keeps_every_early_canary_user_on_the_canary():
    salt = "rollout-9"
    steps = [canary_table(1, 2, p, salt) for p in (1, 5, 25, 50, 100)]
    on_canary = [{int(u) for u in USERS if t.version_for(int(u)) == 2} for t in steps]
    for earlier, later in zip(on_canary, on_canary[1:]):
        assert earlier <= later, "a ramp step moved users off the canary"
    assert on_canary[-1] == set(int(u) for u in USERS)


@pytest.mark.parametrize("percent", [1, 5, 25, 50])
def test_bucket_shares_match_the_table(percent):
    table = canary_table(1, 2, percent, "share-check")
    share = np.mean([table.version_for(int(u)) == 2 for u in USERS])
    p = percent / 100
    # 5 binomial standard deviations over 50k users
    assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / USERS.size), (share, p)
    assert table.shares()[2] == pytest.approx(p)


def test_salts_give_independent_assignments():
    a = np.array([bucket(int(u), "salt-a") < 2500 for u in USERS])
    b = np.array([bucket(int(u), "salt-b") < 2500 for u in USERS])
    both = np.mean(a & b)
    # independent 25% x 25% -> 6.25%; identical assignments would give 25%
    assert abs(both - 0.0625) < 5 * np.sqrt(0.0625 * 0.9375 / USERS.size)
    # chi-square test of independence on the 2x2 table
    from scipy.stats import chi2_contingency

    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    assert chi2_contingency(table)[1] > 0.001


def test_table_round_trip_and_versions():
    t = canary_table(4, 5, 5, "x")
    assert RouteTable.from_dict(t.as_dict()) == t
    assert t.versions == {4, 5}
    assert single_version_table(3).shares() == {3: 1.0}
    assert canary_table(4, 5, 100, "x").versions == {4, 5}  # stable stays the fallback


@pytest.mark.parametrize("bad, match", [
    ({"salt": "s", "stable": 1, "routes": [{"start": 0, "end": 5000, "version": 1}]}, "end at bucket"),
    ({"salt": "s", "stable": 1, "routes": [{"start": 1, "end": 10000, "version": 1}]}, "contiguously"),
    ({"salt": "s", "stable": 1, "routes": [{"start": 0, "end": 6000, "version": 1},
                                           {"start": 5000, "end": 10000, "version": 2}]}, "contiguously"),
    ({"salt": "s", "stable": 0, "routes": [{"start": 0, "end": 10000, "version": 1}]}, "stable"),
    ({"salt": "s", "stable": True, "routes": [{"start": 0, "end": 10000, "version": 1}]}, "stable"),
    ({"salt": "", "stable": 1, "routes": [{"start": 0, "end": 10000, "version": 1}]}, "salt"),
    ({"salt": "s", "stable": 1, "routes": []}, "at least one"),
    ({"salt": "s", "stable": 1, "routes": [{"start": 0, "end": 10000, "version": "1"}]}, "version"),
    ({"salt": "s", "stable": 1, "routes": [{"start": 0, "end": 10000}]}, "start, end, version"),
    ({"salt": "s", "stable": 1, "routes": "all"}, "list"),
    ({"salt": "s", "stable": 1, "extra": 1, "routes": []}, "unknown"),
    ([], "JSON object"),
])
def test_bad_tables_are_refused_with_a_reason(bad, match):
    with pytest.raises(RouteTableError, match=match):
        RouteTable.from_dict(bad)


def test_canary_table_rejects_bad_input():
    with pytest.raises(RouteTableError):
        canary_table(1, 1, 5, "s")
    with pytest.raises(RouteTableError):
        canary_table(1, 2, 101, "s")
    assert RouteTable(salt="s", stable=1, routes=(Route(0, N_BUCKETS, 1),)).version_for(5) == 1


def test_owned_by_needs_the_salt_and_the_version_routed():
    table = canary_table(4, 5, 10, "v5-ab")
    assert table.owned_by("v5-ab", 5)
    assert not table.owned_by("v5-other", 5)
    assert not single_version_table(4, "v5-ab").owned_by("v5-ab", 5)
    assert table.owned_by("v5-ab", 4)  # the stable version owns the rest of the range


def test_new_salts_name_the_version_and_never_repeat():
    salts = {new_salt(7) for _ in range(200)}
    assert len(salts) == 200 and all(s.startswith("v7-") for s in salts)
    manual = new_salt(3, "manual")
    assert manual.startswith("v3-manual-") and len(manual) <= MAX_SALT_LENGTH
    single_version_table(3, manual)  # a valid salt for a table
