"""The data gate: a landed day's partition must be well-formed and look like recent days.

Three layers:

1. **Great Expectations 1.x** (ephemeral context, pandas data source, one
   ExpectationSuite per partition): exactly the schema's columns; column types;
   no nulls; user/item ids known to the landed dimensions; rating in [1, 5]; every
   ``ts`` inside ``[ds, ds + 1 day)``; no event delivered twice (user, item, ts unique).
2. **Comparisons with the trailing landed days** (scipy): row volume against the
   median of the last days, and distribution drift of ratings, genre mix and item
   concentration. Drift is judged by EFFECT SIZE (Jensen-Shannon distance, share
   ratio) and only confirmed by a test: with thousands of rows per day, every real
   MovieLens day differs "significantly" from the previous week (chi-square
   p < 1e-6 on most of them), so a bare p-value would block healthy days.
3. **Delivery checks** (``delivery_checks``): re-delivered pairs, gaps and the
   hour-of-day profile, one account flooding or bursting, timestamp clusters, late
   and early events.

``validate_partition`` only reads. ``run_data_gate`` acts on the verdict:
quarantine + DataGateFailed on failure, a validation record on success.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dayloop.config import Settings, parse_day
from dayloop.data import landing
from dayloop.data.schema import INTERACTION_COLUMNS, RATING_MAX, RATING_MIN, partition_file
from dayloop.errors import DataGateFailed, DataUnavailable
from dayloop.jsonsafe import to_plain
from dayloop.quality.delivery_checks import DeliveryThresholds, delivery_checks
from serving.fileio import atomic_write_text

log = logging.getLogger("dayloop.data_gate")


@dataclass(frozen=True)
class DataGateThresholds:
    """Limits of the data gate. Defaults are calibrated on MovieLens-1M replay days
    0..29 (5,000 events/day), where the worst healthy day reaches rating JS 0.079,
    genre JS 0.091 and a top-10 item share 1.6x the trailing median."""

    # Volume: today's rows / median rows of the last ``volume_window_days`` landed days.
    volume_window_days: int = 7
    volume_min_ratio: float = 0.5
    volume_max_ratio: float = 2.0
    # An empty day is never valid, trailing days or not.
    min_rows: int = 1
    # Drift: today vs the pooled last ``drift_window_days`` landed days.
    drift_window_days: int = 7
    # Jensen-Shannon distance (base 2, in [0, 1]) of the 1..5 rating histogram.
    rating_js_max: float = 0.15
    # Jensen-Shannon distance of the genre mix (each event counts each of its item's genres).
    genre_js_max: float = 0.20
    # Share of events on the day's ``item_top_k`` most frequent items, as a multiple of
    # the trailing days' median share (a bot or stuck carousel piles onto a few items).
    item_top_k: int = 10
    item_top_share_max_ratio: float = 3.0
    # A drift check fails only if its effect exceeds the limit AND its test rejects
    # "same distribution" at this level (guards against noise on small days).
    drift_alpha: float = 1e-3
    # Re-deliveries, partial days, floods, bursts and clock faults (see delivery_checks).
    delivery: DeliveryThresholds = field(default_factory=DeliveryThresholds)


@dataclass
class DataGateResult:
    """Verdict of the data gate for one logical date."""

    ds: dt.date
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (dates as ISO strings, numpy scalars as Python numbers)."""
        return to_plain(dataclasses.asdict(self), strict_json=True, stringify=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- GX layer
_GX_LOCK = threading.Lock()
_GX_BATCH_DEF = None


def _batch_definition():
    """One ephemeral GX context per process; building it per call would cost ~10 ms and leak."""
    global _GX_BATCH_DEF
    with _GX_LOCK:
        if _GX_BATCH_DEF is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False)
            asset = context.data_sources.add_pandas("dayloop_landing").add_dataframe_asset(
                "interactions"
            )
            _GX_BATCH_DEF = asset.add_batch_definition_whole_dataframe("partition")
        return _GX_BATCH_DEF


# GX type names per schema dtype (GX compares the pandas dtype's scalar type).
_GX_TYPES = {"int64": "int64", "datetime64[us, UTC]": "Timestamp"}


def _id_expectation(gx, column: str, known: np.ndarray | None, notes: list[str]):
    """Ids must be known to the landed dimension: a range check when the ids are
    contiguous (exact and fast), the full set otherwise (GX serialises a value_set
    many times per run, ~1 s for 6k ids)."""
    if known is None or len(known) == 0:
        notes.append(f"{column}: no landed dimension, only checked >= 1")
        return gx.expectations.ExpectColumnValuesToBeBetween(column=column, min_value=1)
    lo, hi = int(known.min()), int(known.max())
    if hi - lo + 1 == len(known):
        return gx.expectations.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi)
    return gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=known.tolist())


def _expectation_reason(er) -> str:
    cfg = er.expectation_config
    kw = cfg.kwargs
    columns = kw.get("column") or ", ".join(kw.get("column_list") or [])
    name = f"{cfg.type}({columns})" if columns else cfg.type
    res = er.result or {}
    message = _exception_message(er.exception_info)
    if message:
        return f"{name} could not be evaluated: {message}"
    if cfg.type == "expect_table_columns_to_match_set":
        mismatch = (res.get("details") or {}).get("mismatched") or {}
        return (f"{name}: columns {res.get('observed_value')} do not match the schema "
                f"{sorted(INTERACTION_COLUMNS)} (missing {mismatch.get('missing', [])}, "
                f"unexpected {mismatch.get('unexpected', [])})")
    if cfg.type == "expect_column_values_to_be_of_type":
        return f"{name}: observed type {res.get('observed_value')}, expected {kw.get('type_')}"
    bounds = ""
    if "min_value" in kw or "max_value" in kw:
        bounds = (f" outside [{_fmt(kw.get('min_value'))}, {_fmt(kw.get('max_value'))}"
                  f"{')' if kw.get('strict_max') else ']'}")
    examples = to_plain((res.get("partial_unexpected_list") or [])[:5], strict_json=True, stringify=True)
    return (f"{name}: {res.get('unexpected_count')} of {res.get('element_count')} rows "
            f"({float(res.get('unexpected_percent') or 0.0):.2f}%){bounds}, e.g. {examples}")


def _fmt(value: Any) -> str:
    # GX stores numeric bounds as floats; show whole numbers as ints.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "unbounded" if value is None else str(value)


def _exception_message(info: Any) -> str | None:
    if not info:
        return None
    if isinstance(info, dict):
        if info.get("raised_exception"):
            return str(info.get("exception_message"))
        for value in info.values():
            if isinstance(value, dict) and value.get("raised_exception"):
                return str(value.get("exception_message"))
    return None


def _run_expectations(df: pd.DataFrame, ds: dt.date, known_users, known_items,
                      notes: list[str]) -> list[dict]:
    import great_expectations as gx

    batch_definition = _batch_definition()  # the suite needs an active context
    E = gx.expectations
    suite = gx.ExpectationSuite(name=f"landing_interactions_{ds.isoformat()}")
    suite.add_expectation(E.ExpectTableColumnsToMatchSet(
        column_set=list(INTERACTION_COLUMNS), exact_match=True))
    present = [c for c in INTERACTION_COLUMNS if c in df.columns]
    for col in present:
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
        suite.add_expectation(E.ExpectColumnValuesToBeOfType(
            column=col, type_=_GX_TYPES[INTERACTION_COLUMNS[col]]))
    if {"user_id", "item_id", "ts"} <= set(present):
        # A re-delivered batch repeats rows exactly; real days have none (MovieLens: one
        # rating per pair; re-timed events are all distinct).
        suite.add_expectation(E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "ts"]))
    # Value checks only where the dtype allows the comparison; a wrong dtype is
    # already reported by the type expectation and would only raise here.
    numeric = {c for c in present if c != "ts" and pd.api.types.is_numeric_dtype(df[c].dtype)}
    if "user_id" in numeric:
        suite.add_expectation(_id_expectation(gx, "user_id", known_users, notes))
    if "item_id" in numeric:
        suite.add_expectation(_id_expectation(gx, "item_id", known_items, notes))
    if "rating" in numeric:
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(
            column="rating", min_value=RATING_MIN, max_value=RATING_MAX))
    if "ts" in present and isinstance(df["ts"].dtype, pd.DatetimeTZDtype):
        start = dt.datetime.combine(ds, dt.time(), tzinfo=dt.timezone.utc)
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(
            column="ts", min_value=start, max_value=start + dt.timedelta(days=1), strict_max=True))

    try:
        batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
        outcome = batch.validate(suite, result_format="SUMMARY")
    except Exception as exc:  # GX choked on this frame's content: a finding, not a crash
        log.warning("Great Expectations could not validate %s: %s", ds, exc)
        return [{"name": "expectations", "kind": "expectation", "passed": False,
                 "reason": f"expectations: Great Expectations failed on the partition: "
                           f"{type(exc).__name__}: {exc}"}]
    checks = []
    for er in outcome.results:
        cfg = er.expectation_config
        res = er.result or {}
        ok = bool(er.success) and not _exception_message(er.exception_info)
        checks.append({
            "name": cfg.type,
            "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_list"),
            "kind": "expectation",
            "passed": ok,
            "observed": to_plain({k: res[k] for k in (
                "observed_value", "unexpected_count", "unexpected_percent",
                "partial_unexpected_list", "element_count") if k in res}, strict_json=True, stringify=True),
            "reason": None if ok else _expectation_reason(er),
        })
    return checks


def _exact_dtypes(df: pd.DataFrame) -> dict:
    # GX's type check sees int64 / Timestamp; the schema also fixes the unit and zone
    # (Spark refuses nanosecond Parquet timestamps), so compare the full dtype too.
    wrong = {c: str(df[c].dtype) for c, t in INTERACTION_COLUMNS.items()
             if c in df.columns and str(df[c].dtype) != t}
    return {
        "name": "schema_dtypes",
        "kind": "schema",
        "passed": not wrong,
        "observed": {c: str(t) for c, t in df.dtypes.items()},
        "reason": None if not wrong else (
            "schema_dtypes: " + ", ".join(
                f"{c} is {t}, schema requires {INTERACTION_COLUMNS[c]}" for c, t in wrong.items())),
    }


# --------------------------------------------------------------------------- trailing days
def _trailing(ds: dt.date, settings: Settings, window: int) -> list[dt.date]:
    return [d for d in landing.landed_days(settings) if d < ds][-window:] if window > 0 else []


def _volume_check(n_rows: int, ds: dt.date, settings: Settings, th: DataGateThresholds) -> dict:
    import pyarrow.parquet as pq

    counts, skipped = [], []
    for d in _trailing(ds, settings, th.volume_window_days):
        try:
            counts.append(pq.read_metadata(partition_file(settings.landing_dir, d)).num_rows)
        except Exception:
            skipped.append(d.isoformat())
    check = {"name": "volume", "kind": "volume", "observed": {"rows": n_rows},
             "threshold": {"min_ratio": th.volume_min_ratio, "max_ratio": th.volume_max_ratio,
                           "min_rows": th.min_rows}, "reason": None}
    if skipped:
        check["note"] = f"unreadable trailing partitions ignored: {skipped}"
    if n_rows < th.min_rows:
        check.update(passed=False, reason=f"volume: {n_rows} rows, at least {th.min_rows} required")
        return check
    if not counts:
        check.update(passed=True, note="no trailing landed days: volume not compared")
        return check
    median = float(np.median(counts))
    ratio = n_rows / median if median > 0 else math.inf
    check["observed"].update(trailing_median=median, trailing_days=len(counts), ratio=ratio)
    ok = th.volume_min_ratio <= ratio <= th.volume_max_ratio
    check["passed"] = ok
    if not ok:
        check["reason"] = (
            f"volume: {n_rows} rows is {ratio:.2f}x the median {median:.0f} of the "
            f"{len(counts)} trailing landed days (allowed {th.volume_min_ratio:.2f}x.."
            f"{th.volume_max_ratio:.2f}x)")
    return check


def _genre_matrix(settings: Settings) -> tuple[np.ndarray, list[str]] | None:
    """Dense item_id -> genre indicator matrix from the landed item dimension."""
    try:
        items = landing.read_items(settings)
    except DataUnavailable:
        return None
    split = items["genres"].astype(str).str.split("|")
    vocab = sorted({g for gs in split for g in gs if g})
    index = {g: i for i, g in enumerate(vocab)}
    mat = np.zeros((int(items["item_id"].max()) + 1, len(vocab)), dtype=np.float64)
    for iid, gs in zip(items["item_id"].to_numpy(), split, strict=True):
        for g in gs:
            if g:
                mat[iid, index[g]] = 1.0
    return mat, vocab


def _hist_drift(name: str, today: np.ndarray, ref: np.ndarray, limit: float,
                alpha: float, n_days: int, labels: list) -> dict:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency

    keep = (today + ref) > 0
    t, r = today[keep], ref[keep]
    js = float(jensenshannon(t, r, base=2)) if t.sum() > 0 and r.sum() > 0 else 0.0
    p_value = 1.0
    if keep.sum() > 1 and t.sum() > 0 and r.sum() > 0:
        p_value = float(chi2_contingency(np.vstack([t, r]))[1])
    failed = js > limit and p_value < alpha
    return {
        "name": f"drift_{name}",
        "kind": "drift",
        "passed": not failed,
        "observed": {"js_distance": js, "chi2_p": p_value, "trailing_days": n_days,
                     "today": dict(zip(map(str, labels), today.tolist(), strict=True)),
                     "trailing": dict(zip(map(str, labels), ref.tolist(), strict=True))},
        "threshold": {"js_max": limit, "alpha": alpha},
        "reason": None if not failed else (
            f"drift_{name}: Jensen-Shannon distance {js:.3f} > {limit:.3f} vs the "
            f"{n_days} trailing landed days (chi-square p={p_value:.2g})"),
    }


def _top_share(item_ids: np.ndarray, k: int) -> tuple[int, float]:
    counts = np.sort(np.unique(item_ids, return_counts=True)[1])[::-1]
    top = int(counts[:k].sum())
    return top, top / max(len(item_ids), 1)


def _concentration_check(df: pd.DataFrame, frames: list[pd.DataFrame], th: DataGateThresholds) -> dict:
    """Item concentration: today's top-k share vs the median per-day share of ``frames``."""
    from scipy.stats import binomtest

    n_days = len(frames)
    top_today, share_today = _top_share(df["item_id"].to_numpy(), th.item_top_k)
    ref_shares = [_top_share(f["item_id"].to_numpy(), th.item_top_k)[1] for f in frames if len(f)]
    ref_share = float(np.median(ref_shares)) if ref_shares else 0.0
    ratio = share_today / ref_share if ref_share > 0 else math.inf
    p_value = float(binomtest(top_today, len(df), min(max(ref_share, 1e-12), 1.0),
                              alternative="greater").pvalue)
    failed = ratio > th.item_top_share_max_ratio and p_value < th.drift_alpha
    return {
        "name": "drift_item_concentration",
        "kind": "drift",
        "passed": not failed,
        "observed": {"top_k": th.item_top_k, "share": share_today, "trailing_median_share": ref_share,
                     "ratio": ratio, "binomial_p": p_value, "trailing_days": n_days},
        "threshold": {"max_ratio": th.item_top_share_max_ratio, "alpha": th.drift_alpha},
        "reason": None if not failed else (
            f"drift_item_concentration: the top {th.item_top_k} items take {share_today:.1%} of "
            f"events vs a trailing median of {ref_share:.1%} ({ratio:.1f}x > "
            f"{th.item_top_share_max_ratio:.1f}x, binomial p={p_value:.2g})"),
    }


def _drift_checks(df: pd.DataFrame, ds: dt.date, settings: Settings,
                  th: DataGateThresholds) -> list[dict]:
    usable = (
        all(c in df.columns for c in ("item_id", "rating"))
        and pd.api.types.is_integer_dtype(df["item_id"].dtype)
        and pd.api.types.is_integer_dtype(df["rating"].dtype)
        and len(df) > 0
    )
    if not usable:
        return [{"name": "drift", "kind": "drift", "passed": True, "reason": None,
                 "note": "skipped: item_id/rating missing, empty or mistyped (reported above)"}]
    frames, skipped = [], []
    for d in _trailing(ds, settings, th.drift_window_days):
        try:
            frames.append(landing.read_partition(d, settings, columns=["item_id", "rating"]))
        except Exception:
            skipped.append(d.isoformat())
    if not frames:
        return [{"name": "drift", "kind": "drift", "passed": True, "reason": None,
                 "note": "no trailing landed days: drift not compared"}]
    ref = pd.concat(frames, ignore_index=True)
    n_days = len(frames)
    checks = []

    ratings = range(RATING_MIN, RATING_MAX + 1)
    def rating_hist(values: pd.Series) -> np.ndarray:
        return np.array([(values == r).sum() for r in ratings], dtype=np.float64)
    checks.append(_hist_drift("rating", rating_hist(df["rating"]), rating_hist(ref["rating"]),
                              th.rating_js_max, th.drift_alpha, n_days, list(ratings)))

    genres = _genre_matrix(settings)
    if genres is None:
        checks.append({"name": "drift_genre", "kind": "drift", "passed": True, "reason": None,
                       "note": "no landed item dimension: genre mix not compared"})
    else:
        mat, vocab = genres
        def genre_hist(ids: np.ndarray) -> np.ndarray:
            ids = ids[(ids >= 0) & (ids < len(mat))]
            return mat[ids].sum(axis=0)
        checks.append(_hist_drift("genre", genre_hist(df["item_id"].to_numpy()),
                                  genre_hist(ref["item_id"].to_numpy()),
                                  th.genre_js_max, th.drift_alpha, n_days, vocab))

    checks.append(_concentration_check(df, frames, th))
    if skipped:
        for c in checks:
            c["note"] = f"unreadable trailing partitions ignored: {skipped}"
    return checks


# --------------------------------------------------------------------------- public API
def _known_ids(read: Callable[[Settings], pd.DataFrame], settings: Settings,
               column: str) -> np.ndarray | None:
    """The ids of a landed dimension; None when it is absent or unreadable (the id check
    then falls back to ids >= 1 and says so)."""
    try:
        return np.unique(read(settings)[column].to_numpy())
    except Exception:
        return None


def validate_partition(ds: dt.date, settings: Settings,
                       thresholds: DataGateThresholds = DataGateThresholds()) -> DataGateResult:
    """Validate the landed partition of ``ds``; pure read, never raises on bad data."""
    started = time.perf_counter()
    ds = parse_day(ds)
    path = partition_file(settings.landing_dir, ds)
    stats: dict[str, Any] = {"path": str(path)}
    notes: list[str] = []

    def finish(checks: list[dict]) -> DataGateResult:
        reasons = [c["reason"] for c in checks if not c["passed"]]
        notes.extend(c["note"] for c in checks if c.get("note"))
        stats["notes"] = notes
        stats["elapsed_s"] = round(time.perf_counter() - started, 4)
        return DataGateResult(ds=ds, passed=not reasons, reasons=reasons, checks=checks, stats=stats)

    try:
        df = landing.read_partition(ds, settings)
    except DataUnavailable:
        return finish([{"name": "partition_exists", "kind": "io", "passed": False,
                        "reason": f"partition_exists: no partition landed for {ds} at {path}"}])
    except Exception as exc:  # corrupt file, wrong format, truncated write by a third party
        return finish([{"name": "partition_readable", "kind": "io", "passed": False,
                        "reason": f"partition_readable: cannot read {path}: "
                                  f"{type(exc).__name__}: {exc}"}])
    stats["rows"] = int(len(df))
    if "user_id" in df.columns:
        stats["distinct_users"] = int(df["user_id"].nunique())
    if "item_id" in df.columns:
        stats["distinct_items"] = int(df["item_id"].nunique())
    if "rating" in df.columns and pd.api.types.is_numeric_dtype(df["rating"].dtype):
        stats["rating_mean"] = float(df["rating"].mean()) if len(df) else None

    checks = [_exact_dtypes(df)]
    known_users = _known_ids(landing.read_users, settings, "user_id")
    known_items = _known_ids(landing.read_items, settings, "item_id")
    checks.extend(_run_expectations(df, ds, known_users, known_items, notes))
    checks.append(_volume_check(len(df), ds, settings, thresholds))
    checks.extend(_drift_checks(df, ds, settings, thresholds))
    checks.extend(_delivery_checks(df, ds, settings, thresholds.delivery))
    return finish(checks)


def _delivery_checks(df: pd.DataFrame, ds: dt.date, settings: Settings, th: DeliveryThresholds) -> list[dict]:
    """The delivery checks against the trailing landed days (unreadable ones noted, not fatal)."""
    trailing, skipped = [], []
    for d in _trailing(ds, settings, th.window_days):
        try:
            trailing.append((d, landing.read_partition(d, settings, columns=["user_id", "item_id", "ts"])))
        except Exception:
            skipped.append(d.isoformat())
    checks = delivery_checks(df, ds, trailing, th)
    if skipped:
        for c in checks:
            c["note"] = f"unreadable trailing partitions ignored: {skipped}"
    return checks


def validation_record_path(ds: dt.date, settings: Settings) -> Path:
    """Where a passed validation is recorded: ``$DAYLOOP_HOME/validations/ds=YYYY-MM-DD.json``."""
    return settings.home / "validations" / f"ds={parse_day(ds).isoformat()}.json"


def run_data_gate(ds: dt.date, settings: Settings,
                  thresholds: DataGateThresholds = DataGateThresholds()) -> DataGateResult:
    """Validate ``ds``; quarantine and raise DataGateFailed on failure, record the result on success."""
    ds = parse_day(ds)
    result = validate_partition(ds, settings, thresholds)
    if not result.passed:
        for reason in result.reasons:
            log.error("data gate %s: %s", ds, reason)
        where = landing.quarantine_partition(ds, settings, result.to_dict())
        log.error("data gate %s failed (%d checks); partition quarantined at %s",
                  ds, len(result.reasons), where)
        raise DataGateFailed(result.reasons)
    atomic_write_text(validation_record_path(ds, settings), result.to_json() + "\n")
    log.info("data gate %s passed: %d rows, %d checks in %.2fs", ds, result.stats.get("rows", 0),
             len(result.checks), result.stats.get("elapsed_s", 0.0))
    return result
