"""Delivery checks of the data gate: the ways an event delivery goes wrong in production.

A day can have the right schema, a plausible row count and the usual rating mix and
still be a broken delivery. These checks look at WHEN and FROM WHOM the events came,
each against the trailing landed days where a day's shape is not fixed in advance:

* ``pair_duplicates``: rows repeating a (user, item) pair already in the day, in
  excess of the trailing days' share: a batch re-delivered with new timestamps. Re-delivered rows
  with their original timestamps are exact duplicates, which the Great Expectations
  suite refuses (``ExpectCompoundColumnsToBeUnique`` on user, item, ts).
* ``time_gap``: the longest stretch of the day without an event (the day's edges
  included), judged by how many events the trailing days' time-of-day profile puts in
  it: part of the day missing, or the partition's edge cut off by a skewed clock.
* ``hour_profile``: the hour-of-day histogram against the pooled trailing days
  (Jensen-Shannon distance confirmed by chi-square, like the drift checks): part of
  the day thinned out while the total still looks plausible.
* ``user_concentration``: the most active user's share of the day against the
  trailing days' median top share (confirmed by a binomial test): one account or a
  stuck producer flooding the day.
* ``user_burst``: the most events one user sent inside any ``burst_window_s``.
* ``timestamp_cluster``: the most events stamped with one exact second, against a
  Poisson rate at the day's busiest hour: a stuck clock or a default timestamp.
* ``out_of_day_events``: events dated outside the day, split into late (before the
  day: a late delivery or a clock behind) and early (after it: a clock ahead), with how
  far. The suite already refuses them; this check names the cause.

What "hour" and "gap" mean on the real replay days: the replay calendar slices
MovieLens by COUNT and re-times each slice linearly in rank over the day
(``dayloop.data.replay.retime``), so a real replay day is flat by construction (5,000
events 17.28 s apart, 208-209 per hour, one per second, at most 4 from one user in a
minute). Measured on the 30 real replay days the checks therefore sit far from their
limits; the absolute limits are set from what real people did in the ORIGINAL MovieLens
times of the same 30 slices (a user submitting a page of ratings: up to 30 events in
60 s, 27 at one second), and the trailing-days comparisons adapt to whatever profile
the source has. The synthetic world (uniform random times, items drawn with
replacement) is the noisier calibration: e.g. 2-33 % of its rows repeat a pair.

Every function only reads its inputs and returns check dicts in the data gate's
format (``name``, ``kind``, ``passed``, ``observed``, ``threshold``, ``reason``).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

_DAY_S = 86_400.0
_US = 1_000_000


@dataclass(frozen=True)
class DeliveryThresholds:
    """Limits of the delivery checks; the margins measured on MovieLens-1M replay days
    0..29 and on the synthetic worlds the tests use are in each field's comment."""

    # Trailing landed days the checks compare with.
    window_days: int = 7
    # Rows repeating a (user, item) pair already seen that day, as a share of the day
    # minus the trailing median share; fails above the share AND with at least
    # ``pair_duplicate_min_rows`` rows in excess (small days repeat pairs by chance).
    # Real days: 0.0 (MovieLens has one rating per pair). Synthetic worlds repeat 2-33 %
    # of rows; over 30 days their excess reached +0.020 at 2,000 events/day (39 rows),
    # +0.045 at 400 (18 rows). A 2-hour slice re-delivered adds +0.077 on a real day.
    pair_duplicate_max_excess: float = 0.05
    pair_duplicate_min_rows: int = 50
    # A gap fails only if it lasts at least this long AND the trailing profile expects
    # at least ``gap_min_expected_events`` in it (a quiet night on a small source is
    # no outage). Real days: longest gap 17.28 s (~1 expected event); synthetic worlds:
    # at most ~14 expected (3,000 events/day), and 2.2 h long at 100 events/day with ~11.
    gap_min_minutes: float = 30.0
    gap_min_expected_events: float = 50.0
    # Jensen-Shannon distance (base 2) of the 24-bin hour-of-day histogram.
    # Real days: 0.000 (flat); synthetic: up to 0.065 at 2,000 events/day, 0.34 at 100
    # where chi-square (p >= 0.009 over 30 days) keeps it from failing.
    hour_js_max: float = 0.10
    # Top user's share as a multiple of the trailing days' median top share, and an
    # absolute floor below which a share is never a flood. Real days: top user up to
    # 15.9 % of a day (MovieLens users rate hundreds of movies), ratio up to 2.25x.
    user_share_max_ratio: float = 4.0
    user_share_min: float = 0.05
    # Events by one user inside any window of ``burst_window_s``. Real days: 4
    # (re-timed); the same slices in their original times: up to 30 (a page of ratings
    # submitted at once), so the limit is twice that.
    burst_window_s: float = 60.0
    burst_max_events: int = 60
    # Events at one exact second: fail at ``cluster_min_events`` or more when a
    # Poisson count at the busiest hour's rate (Bonferroni over the day's seconds)
    # rejects. Real days: 1 (original times: 27, one user's page); synthetic: 3.
    cluster_min_events: int = 50
    # Level of the confirming tests.
    alpha: float = 1e-3


def _check(name: str, failed: bool, observed: dict, threshold: dict, reason: str | None) -> dict:
    return {"name": name, "kind": "delivery", "passed": not failed, "observed": observed,
            "threshold": threshold, "reason": reason if failed else None}


def day_seconds(ts: pd.Series, ds: dt.date) -> np.ndarray:
    """Seconds since ``ds`` 00:00 UTC of each timestamp (float; outside [0, 86400) = another
    day; NaT = NaN, which every comparison here leaves out: nulls are the suite's to report)."""
    naive = ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[us]")
    us = naive.astype(np.int64).astype(np.float64)
    us[np.isnat(naive)] = np.nan
    return (us - pd.Timestamp(ds).value // 1000) / _US


def usable(df: pd.DataFrame) -> bool:
    """True when user_id, item_id and ts are there with integer ids and tz-aware times
    (anything else is reported by the schema checks and would only raise here)."""
    return (
        all(c in df.columns for c in ("user_id", "item_id", "ts"))
        and pd.api.types.is_integer_dtype(df["user_id"].dtype)
        and pd.api.types.is_integer_dtype(df["item_id"].dtype)
        and isinstance(df["ts"].dtype, pd.DatetimeTZDtype)
        and len(df) > 0
    )


@dataclass
class DayShape:
    """What the delivery checks need of one day: in-day seconds, users, pair-repeat share."""

    ds: dt.date
    seconds: np.ndarray  # in-day events only, sorted
    users: np.ndarray  # user of each in-day event, same order
    n_rows: int
    pair_dup_share: float
    top_user_share: float

    @classmethod
    def of(cls, df: pd.DataFrame, ds: dt.date) -> DayShape:
        secs = day_seconds(df["ts"], ds)
        inside = (secs >= 0) & (secs < _DAY_S)
        order = np.argsort(secs[inside], kind="stable")
        counts = df["user_id"].value_counts()
        n = len(df)
        return cls(
            ds=ds,
            seconds=secs[inside][order],
            users=df["user_id"].to_numpy()[inside][order],
            n_rows=n,
            pair_dup_share=float(df.duplicated(["user_id", "item_id"]).mean()) if n else 0.0,
            top_user_share=float(counts.iloc[0] / n) if n else 0.0,
        )


# --------------------------------------------------------------------------- duplicates
def pair_duplicates_check(df: pd.DataFrame, ref: list[DayShape], th: DeliveryThresholds) -> dict:
    """Rows repeating a (user, item) pair already in the day, in excess of the trailing median share."""
    dup = df.duplicated(["user_id", "item_id"]).to_numpy()
    share = float(dup.mean())
    ref_share = float(np.median([r.pair_dup_share for r in ref]))
    excess = share - ref_share
    excess_rows = excess * len(df)
    observed = {"rows": int(dup.sum()), "share": share, "trailing_median_share": ref_share,
                "excess": excess, "excess_rows": excess_rows, "trailing_days": len(ref)}
    failed = excess > th.pair_duplicate_max_excess and excess_rows >= th.pair_duplicate_min_rows
    reason = None
    if failed:
        times = df["ts"][dup]
        observed["span"] = [times.min().isoformat(), times.max().isoformat()]
        reason = (f"pair_duplicates: {int(dup.sum())} rows ({share:.1%}) repeat a (user, item) pair vs a "
                  f"trailing median of {ref_share:.1%} (+{excess:.1%} > +{th.pair_duplicate_max_excess:.0%}, "
                  f"{excess_rows:.0f} rows >= {th.pair_duplicate_min_rows}); "
                  f"repeats dated {times.min():%H:%M}..{times.max():%H:%M}: a re-delivered batch?")
    return _check("pair_duplicates", failed, observed,
                  {"max_excess": th.pair_duplicate_max_excess, "min_rows": th.pair_duplicate_min_rows}, reason)


# --------------------------------------------------------------------------- time of day
def _profile_cdf(ref: list[DayShape]) -> np.ndarray | None:
    """Cumulative share of the trailing days' events at each minute boundary (1441 points)."""
    secs = np.concatenate([r.seconds for r in ref]) if ref else np.empty(0)
    if len(secs) == 0:
        return None
    hist = np.bincount(np.minimum((secs // 60).astype(np.int64), 1439), minlength=1440)
    return np.concatenate([[0.0], np.cumsum(hist) / hist.sum()])


def _mass(cdf: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of the profile inside [a, b) seconds (uniform when there is no profile)."""
    if cdf is None:
        return (b - a) / _DAY_S
    grid = np.arange(1441) * 60.0
    return np.interp(b, grid, cdf) - np.interp(a, grid, cdf)


def time_gap_check(today: DayShape, ref: list[DayShape], th: DeliveryThresholds) -> dict:
    """The event-free stretch of the day (edges included) the trailing profile expected most events in."""
    s = today.seconds
    bounds = np.concatenate([[0.0], s, [_DAY_S]])
    starts, ends = bounds[:-1], bounds[1:]
    length = ends - starts
    cdf = _profile_cdf(ref)
    frac = _mass(cdf, starts, ends)
    # The events the rest of the day implies for the gap: n * f / (1 - f).
    expected = len(s) * frac / np.maximum(1.0 - frac, 1e-9)
    longest = int(np.argmax(length))
    long_enough = length >= th.gap_min_minutes * 60
    worst = int(np.argmax(np.where(long_enough, expected, -1.0))) if long_enough.any() else longest

    def at(i: int) -> dict:
        return {"start_s": float(starts[i]), "end_s": float(ends[i]), "minutes": float(length[i] / 60),
                "expected_events": float(expected[i])}

    observed = {"longest": at(longest), "worst": at(worst), "profile": "trailing" if cdf is not None
                else "uniform (no trailing landed days)", "trailing_days": len(ref)}
    failed = bool(long_enough[worst]) and expected[worst] >= th.gap_min_expected_events
    reason = None
    if failed:
        a, b = (pd.Timestamp(today.ds, tz="UTC") + pd.Timedelta(seconds=float(x)) for x in (starts[worst],
                                                                                             ends[worst]))
        edge = " (at the day's edge: a clock skew or a cut-off delivery?)" if worst in (0, len(length) - 1) else ""
        reason = (f"time_gap: no events from {a:%H:%M:%S} to {b:%H:%M:%S} UTC ({length[worst] / 3600:.1f} h) "
                  f"where the {'trailing days put' if cdf is not None else 'day rate puts'} "
                  f"{expected[worst]:.0f} events (limit {th.gap_min_expected_events:.0f} in "
                  f"{th.gap_min_minutes:.0f} min or more){edge}")
    return _check("time_gap", failed, observed,
                  {"min_minutes": th.gap_min_minutes, "min_expected_events": th.gap_min_expected_events}, reason)


def _hours(seconds: np.ndarray) -> np.ndarray:
    return np.bincount(np.minimum((seconds // 3600).astype(np.int64), 23), minlength=24).astype(np.float64)


def hour_profile_check(today: DayShape, ref: list[DayShape], th: DeliveryThresholds) -> dict:
    """Hour-of-day mix vs the pooled trailing days: Jensen-Shannon distance confirmed by chi-square."""
    from dayloop.quality.data_gate import _hist_drift  # here: data_gate imports this module

    check = _hist_drift("hour_profile", _hours(today.seconds),
                        _hours(np.concatenate([r.seconds for r in ref])),
                        th.hour_js_max, th.alpha, len(ref), list(range(24)))
    check.update(name="hour_profile", kind="delivery")
    if check["reason"]:
        check["reason"] = check["reason"].replace("drift_hour_profile", "hour_profile", 1) + \
            ": part of the day missing or thinned?"
    return check


# --------------------------------------------------------------------------- users
def user_concentration_check(df: pd.DataFrame, ref: list[DayShape], th: DeliveryThresholds) -> dict:
    """The most active user's share of the day vs the trailing median top share (binomial test)."""
    from scipy.stats import binomtest

    counts = df["user_id"].value_counts()
    user, top, n = int(counts.index[0]), int(counts.iloc[0]), len(df)
    share = top / n
    ref_share = float(np.median([r.top_user_share for r in ref]))
    ratio = share / ref_share if ref_share > 0 else math.inf
    p_value = float(binomtest(top, n, min(max(ref_share, 1e-12), 1.0), alternative="greater").pvalue)
    failed = share > th.user_share_min and ratio > th.user_share_max_ratio and p_value < th.alpha
    observed = {"user_id": user, "events": top, "share": share, "trailing_median_share": ref_share,
                "ratio": ratio, "binomial_p": p_value, "trailing_days": len(ref)}
    reason = (f"user_concentration: user {user} sent {top} of {n} events ({share:.1%}) vs a trailing "
              f"median top share of {ref_share:.1%} ({ratio:.1f}x > {th.user_share_max_ratio:.1f}x, "
              f"binomial p={p_value:.2g}): one account or a stuck producer flooding the day?")
    return _check("user_concentration", failed, observed,
                  {"max_ratio": th.user_share_max_ratio, "min_share": th.user_share_min, "alpha": th.alpha},
                  reason)


def user_burst_check(today: DayShape, th: DeliveryThresholds) -> dict:
    """The most events one user sent inside any ``burst_window_s`` window."""
    order = np.lexsort((today.seconds, today.users))
    users, secs = today.users[order], today.seconds[order]
    # One sorted key per (user, time): users apart by more than a day, so windows never mix users.
    _, rank = np.unique(users, return_inverse=True)
    key = rank * (2 * _DAY_S) + secs
    within = np.searchsorted(key, key + th.burst_window_s, side="left") - np.arange(len(key))
    i = int(np.argmax(within)) if len(key) else 0
    worst = int(within[i]) if len(key) else 0
    observed = {"events": worst, "window_s": th.burst_window_s}
    if len(key):
        observed.update(user_id=int(users[i]), start_s=float(secs[i]))
    failed = worst > th.burst_max_events
    reason = None
    if failed:
        at = pd.Timestamp(today.ds, tz="UTC") + pd.Timedelta(seconds=float(secs[i]))
        reason = (f"user_burst: user {int(users[i])} sent {worst} events within {th.burst_window_s:.0f} s "
                  f"from {at:%H:%M:%S} UTC (limit {th.burst_max_events}): a bot or a stuck producer?")
    return _check("user_burst", failed, observed,
                  {"window_s": th.burst_window_s, "max_events": th.burst_max_events}, reason)


# --------------------------------------------------------------------------- clocks
def timestamp_cluster_check(today: DayShape, th: DeliveryThresholds) -> dict:
    """The most events at one exact second vs a Poisson count at the day's busiest hour."""
    from scipy.stats import poisson

    secs = np.floor(today.seconds).astype(np.int64)
    values, counts = np.unique(secs, return_counts=True)
    i = int(np.argmax(counts)) if len(counts) else 0
    worst = int(counts[i]) if len(counts) else 0
    rate = float(_hours(today.seconds).max()) / 3600.0
    # Bonferroni over the day's seconds: the max of 86,400 counts, not one count.
    p_value = min(1.0, _DAY_S * float(poisson.sf(worst - 1, rate))) if worst else 1.0
    failed = worst >= th.cluster_min_events and p_value < th.alpha
    observed = {"events": worst, "busiest_hour_rate_per_s": rate, "poisson_p": p_value}
    reason = None
    if failed:
        at = pd.Timestamp(today.ds, tz="UTC") + pd.Timedelta(seconds=int(values[i]))
        observed["second"] = at.isoformat()
        reason = (f"timestamp_cluster: {worst} events stamped {at:%H:%M:%S} UTC, one second "
                  f"(limit {th.cluster_min_events}; busiest hour {rate:.2f} events/s, Poisson p={p_value:.2g}): "
                  f"a stuck clock or a default timestamp?")
    return _check("timestamp_cluster", failed, observed,
                  {"min_events": th.cluster_min_events, "alpha": th.alpha}, reason)


def out_of_day_check(df: pd.DataFrame, ds: dt.date) -> dict:
    """Events dated before the day (late) or on/after the next day (early), with how far."""
    secs = day_seconds(df["ts"], ds)
    late_h = -secs[secs < 0] / 3600
    early_h = (secs[secs >= _DAY_S] - _DAY_S) / 3600
    n = len(df)
    observed = {"before_day": int(len(late_h)), "after_day": int(len(early_h)),
                "max_hours_before": float(late_h.max()) if len(late_h) else 0.0,
                "max_hours_after": float(early_h.max()) if len(early_h) else 0.0}
    parts = []
    if len(late_h):
        parts.append(f"{len(late_h)} events ({len(late_h) / n:.1%}) dated before {ds}, up to "
                     f"{late_h.max():.1f} h (median {np.median(late_h):.1f} h): late arrivals or a clock behind")
    if len(early_h):
        parts.append(f"{len(early_h)} events ({len(early_h) / n:.1%}) dated after {ds}, up to "
                     f"{early_h.max() + 24:.1f} h past its start: a clock ahead")
    return _check("out_of_day_events", bool(parts), observed, {"max_events": 0},
                  "out_of_day_events: " + "; ".join(parts) if parts else None)


# --------------------------------------------------------------------------- entry point
def delivery_checks(df: pd.DataFrame, ds: dt.date, trailing: list[tuple[dt.date, pd.DataFrame]],
                    th: DeliveryThresholds) -> list[dict]:
    """Every delivery check of ``df`` (the partition of ``ds``) against ``trailing`` (date, frame)
    pairs of earlier landed days, read with user_id, item_id and ts."""
    if not usable(df):
        return [{"name": "delivery", "kind": "delivery", "passed": True, "reason": None,
                 "note": "delivery checks skipped: user_id/item_id/ts missing, empty or mistyped (reported above)"}]
    ref = [DayShape.of(f, d) for d, f in trailing if usable(f)]
    ref = [r for r in ref if len(r.seconds)]
    today = DayShape.of(df, ds)
    checks = [out_of_day_check(df, ds)]
    if ref:
        checks += [pair_duplicates_check(df, ref, th), user_concentration_check(df, ref, th)]
    else:
        checks.append({"name": "delivery_trailing", "kind": "delivery", "passed": True, "reason": None,
                       "note": "no trailing landed days: pair duplicates, user concentration and "
                               "hour profile not compared"})
    if len(today.seconds) == 0:
        checks.append({"name": "delivery_time", "kind": "delivery", "passed": True, "reason": None,
                       "note": "no events inside the day: time-of-day checks skipped"})
        return checks
    checks.append(time_gap_check(today, ref, th))
    if ref:
        checks.append(hour_profile_check(today, ref, th))
    checks += [user_burst_check(today, th), timestamp_cluster_check(today, th)]
    return checks
