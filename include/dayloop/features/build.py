"""The daily feature job: landing zone -> point-in-time feature set (PySpark).

For logical date ``ds`` it reads exactly the landed partitions ``[ds - W, ds]``
(W = ``Settings.train_window_days``; later partitions are never listed nor opened) and
writes ``Settings.features_dir / "ds=YYYY-MM-DD"`` as described in
:mod:`dayloop.features.schema`.

Point in time: a training row at ``ts`` sees only the same user's events with a
timestamp strictly before ``ts``. Events that share a timestamp (MovieLens has many
same-second ratings) therefore do not see each other; across timestamps the order is
(ts, item_id), so the output never depends on the order rows arrive in. The held-out
day ``ds`` feeds only ``eval.parquet``; its history and ``seen`` come from days < ds.

The Spark transformations are in :mod:`dayloop.features.tables`; this module plans the
inputs, runs them, writes the single-file tables and publishes the set. ``pyspark`` is
imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dayloop.config import Settings, parse_day
from dayloop.data.schema import items_file, partition_dir, partition_file, users_file
from dayloop.errors import DataUnavailable
from dayloop.features.schema import (
    FEATURE_SCHEMA,
    META_FILE,
    feature_dir,
    feature_schema_hash,
    load_feature_table,
    load_meta,
    schema_problems,
    table_file,
)
from dayloop.features.tables import (
    YEAR_BUCKET_WIDTH,
    check_interactions,
    eval_table,
    items_dimension,
    read_interactions,
    train_table,
    users_dimension,
    with_unknown_items,
    with_unknown_users,
)
from serving.fileio import replace_dir

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "FeatureSetInfo",
    "InputPlan",
    "build_features",
    "build_features_with_session",
    "load_feature_table",
    "load_meta",
    "plan_inputs",
    "window_days",
]

log = logging.getLogger(__name__)

# Leftovers of a killed run (temp/trash dirs beside the target) older than this are removed.
_STALE_AFTER_S = 6 * 3600


@dataclass(frozen=True)
class FeatureSetInfo:
    """What one run of the feature job produced."""

    path: Path
    n_train: int
    n_eval_users: int
    window_start: dt.date
    window_end: dt.date  # exclusive, == ds
    feature_schema_hash: str
    missing_days: tuple[dt.date, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for XCom and logs)."""
        return {
            "path": str(self.path),
            "n_train": self.n_train,
            "n_eval_users": self.n_eval_users,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "feature_schema_hash": self.feature_schema_hash,
            "missing_days": [d.isoformat() for d in self.missing_days],
        }


@dataclass(frozen=True)
class InputPlan:
    """The landed files one run will read, decided before Spark starts."""

    ds: dt.date
    window_start: dt.date
    train_files: tuple[Path, ...]
    present_days: tuple[dt.date, ...]
    missing_days: tuple[dt.date, ...]
    heldout_file: Path
    users_file: Path
    items_file: Path
    interactions_root: Path


# ----- pure helpers -----------------------------------------------------------------------


def window_days(ds: dt.date, train_window_days: int) -> list[dt.date]:
    """The training days ``[ds - train_window_days, ds)`` in ascending order."""
    if train_window_days <= 0:
        raise ValueError(f"train_window_days must be positive, got {train_window_days}")
    return [ds - dt.timedelta(days=k) for k in range(train_window_days, 0, -1)]


def plan_inputs(ds: dt.date, settings: Settings) -> InputPlan:
    """Find the landed files for ``ds``; raise DataUnavailable when the run cannot proceed.

    Only the exact partition paths of the window are probed, so nothing after ``ds``
    is ever listed.
    """
    if settings.history_length <= 0:
        raise ValueError(f"history_length must be positive, got {settings.history_length}")
    landing = settings.landing_dir
    days = window_days(ds, settings.train_window_days)
    present = [d for d in days if partition_file(landing, d).is_file()]
    missing = sorted(set(days) - set(present))
    heldout = partition_file(landing, ds)
    if not heldout.is_file():
        raise DataUnavailable(
            f"held-out partition for {ds} is missing: {heldout} does not exist; "
            "land (and validate) that day before building features"
        )
    if not present:
        raise DataUnavailable(
            f"training window [{days[0]}, {ds}) is empty: none of its "
            f"{len(days)} partitions exist under {partition_dir(landing, days[0]).parent}"
        )
    for label, path in (("users", users_file(landing)), ("items", items_file(landing))):
        if not path.is_file():
            raise DataUnavailable(f"{label} dimension is missing: {path} does not exist")
    if missing:
        log.warning(
            "%d of %d days missing from the training window: %s",
            len(missing),
            len(days),
            ", ".join(d.isoformat() for d in missing),
        )
    return InputPlan(
        ds=ds,
        window_start=days[0],
        train_files=tuple(partition_file(landing, d) for d in present),
        present_days=tuple(present),
        missing_days=tuple(missing),
        heldout_file=heldout,
        users_file=users_file(landing),
        items_file=items_file(landing),
        interactions_root=landing / "interactions",
    )


# ----- entry points -----------------------------------------------------------------------


def build_features(
    ds: dt.date | str, settings: Settings, master: str | None = None
) -> FeatureSetInfo:
    """Build the feature set for ``ds`` in its own SparkSession and publish it atomically.

    ``master`` defaults to ``settings.spark_master_default``; inside Airflow pass
    ``resolve_spark_master(settings.spark_conn_id, settings.spark_master_default)``.
    """
    from dayloop.features.spark import spark_session

    day = parse_day(ds)
    plan = plan_inputs(day, settings)  # fail fast, before paying for a JVM
    with spark_session(
        master=master or settings.spark_master_default,
        app_name=f"dayloop-features-{day.isoformat()}",
        driver_memory=settings.spark_driver_memory,
    ) as spark:
        return build_features_with_session(spark, day, settings, plan=plan)


def build_features_with_session(
    spark: "SparkSession",
    ds: dt.date | str,
    settings: Settings,
    plan: InputPlan | None = None,
) -> FeatureSetInfo:
    """Same as :func:`build_features` on a caller-owned SparkSession (tests, notebooks)."""
    day = parse_day(ds)
    plan = plan or plan_inputs(day, settings)
    target = feature_dir(settings.features_dir, day)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(target)
    stage = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    started = time.perf_counter()
    try:
        meta = _build_into(spark, plan, settings, stage)
        # rename(2) cannot replace a non-empty directory: replace_dir moves the old set
        # aside, renames the stage in and puts the old set back if that fails; readers
        # see the old or the new set, or briefly none -- never a mix.
        replace_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    info = FeatureSetInfo(
        path=target,
        n_train=meta["n_train"],
        n_eval_users=meta["n_eval_users"],
        window_start=plan.window_start,
        window_end=day,
        feature_schema_hash=meta["feature_schema_hash"],
        missing_days=plan.missing_days,
    )
    log.info(
        "feature set for %s published at %s in %.1fs: %d train rows, %d eval users, "
        "%d users, %d items, %d missing days",
        day,
        target,
        time.perf_counter() - started,
        info.n_train,
        info.n_eval_users,
        meta["n_users"],
        meta["n_items"],
        len(info.missing_days),
    )
    return info


# ----- the Spark job ----------------------------------------------------------------------


def _build_into(
    spark: "SparkSession", plan: InputPlan, settings: Settings, stage: Path
) -> dict[str, Any]:
    """Compute every table into ``stage`` and return the meta written beside them."""
    from pyspark.sql import functions as F

    timer = _Timer()
    ds, L = plan.ds, settings.history_length

    flagged = read_interactions(spark, plan)
    try:
        check_interactions(flagged, plan)
        timer.lap("read interactions")
        events = flagged.filter(F.col("usable")).select("user_id", "item_id", "ts", "day")
        train_ev = events.filter(F.col("day") < F.lit(ds)).select("user_id", "item_id", "ts")
        held_ev = events.filter(F.col("day") == F.lit(ds)).select("user_id", "item_id")

        users = users_dimension(spark, plan.users_file)
        items = items_dimension(spark, plan.items_file)
        timer.lap("read dimensions")

        tables: dict[str, tuple[DataFrame, list[Column]]] = {
            "train": (train_table(train_ev, L), [F.col("user_id"), F.col("ts"), F.col("item_id")]),
            "eval": (eval_table(train_ev, held_ev, L), [F.col("user_id")]),
            "users": (with_unknown_users(users.coded, events), [F.col("user_id")]),
            "items": (with_unknown_items(items.coded, events), [F.col("item_id")]),
            "popularity": (
                train_ev.groupBy("item_id").agg(F.count(F.lit(1)).alias("count")),
                [F.col("count").desc(), F.col("item_id")],
            ),
        }
        counts: dict[str, int] = {}
        spark_out = stage / "_spark"
        for name, (df, order) in tables.items():
            counts[name] = _write_single_file(df, order, spark_out, stage, name)
            timer.lap(f"write {name} ({counts[name]} rows)")
        shutil.rmtree(spark_out, ignore_errors=True)
    finally:
        flagged.unpersist()

    # Output rows beyond a dimension's distinct ids are active ids it lacks.
    for name, dim in (("users", users), ("items", items)):
        if counts[name] > dim.n_ids:
            log.warning(
                "%d active %s have no row in %s.parquet; their features are coded 0 (unknown)",
                counts[name] - dim.n_ids,
                name,
                name,
            )
    problems = [
        problem
        for name in FEATURE_SCHEMA
        for problem in schema_problems(name, _read_arrow_schema(stage / table_file(name)))
    ]
    if problems:
        raise RuntimeError("feature job broke its output contract: " + "; ".join(problems))

    meta = _meta(plan, settings, counts, users.vocab | items.vocab)
    (stage / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("feature job timings: %s", timer.summary())
    return meta


def _write_single_file(
    df: "DataFrame", order: Sequence["Column"], spark_out: Path, stage: Path, name: str
) -> int:
    """Write ``df`` as the single sorted file ``stage/<name>.parquet``; return its row count.

    Sorting inside one partition makes the file's bytes independent of how upstream
    partitions were scheduled, which is what makes re-runs byte-identical.
    """
    out = spark_out / name
    columns = list(FEATURE_SCHEMA[name])
    df.select(*columns).repartition(1).sortWithinPartitions(*order).write.mode(
        "errorifexists"
    ).parquet(str(out))
    parts = sorted(out.glob("part-*.parquet"))
    if len(parts) != 1:
        raise RuntimeError(
            f"expected one Parquet part for {name!r} under {out}, found {len(parts)}"
        )
    target = stage / table_file(name)
    parts[0].replace(target)
    return _row_count(target)


def _row_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _read_arrow_schema(path: Path):  # -> pa.Schema
    import pyarrow.parquet as pq

    return pq.read_schema(path)


# ----- meta, publishing -------------------------------------------------------------------


def _meta(
    plan: InputPlan, settings: Settings, counts: dict[str, int], vocabs: dict[str, list[Any]]
) -> dict[str, Any]:
    """meta.json content; only inputs and outputs, no clock, so re-runs are identical."""
    vocab_hash = _short_hash(vocabs | {"year_bucket_width": YEAR_BUCKET_WIDTH})
    return {
        "ds": plan.ds.isoformat(),
        "window_start": plan.window_start.isoformat(),
        "window_end": plan.ds.isoformat(),
        "history_length": settings.history_length,
        "n_train": counts["train"],
        "n_eval_users": counts["eval"],
        "n_users": counts["users"],
        "n_items": counts["items"],
        **vocabs,
        "year_bucket_width": YEAR_BUCKET_WIDTH,
        "cardinalities": {
            "gender_idx": len(vocabs["gender_vocab"]) + 1,
            "age_idx": len(vocabs["age_vocab"]) + 1,
            "occupation_idx": len(vocabs["occupation_vocab"]) + 1,
            "year_idx": len(vocabs["year_buckets"]) + 1,
            "genre_ids": len(vocabs["genre_vocab"]) + 1,
        },
        "vocab_hash": vocab_hash,
        "feature_schema": FEATURE_SCHEMA,
        "feature_schema_hash": feature_schema_hash(settings.history_length),
        "missing_days": [d.isoformat() for d in plan.missing_days],
        "source_days": [d.isoformat() for d in (*plan.present_days, plan.ds)],
        "tables": {name: table_file(name) for name in FEATURE_SCHEMA},
    }


def _short_hash(payload: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _remove_stale_leftovers(target: Path) -> None:
    """Remove temp/trash dirs of killed runs for this ds (only old ones: a concurrent
    run may still be writing a fresh one)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_AFTER_S:
                log.info("removing stale leftover %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            continue


class _Timer:
    """Lap timer for the job's log line."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, label: str) -> None:
        now = time.perf_counter()
        self._laps.append((label, now - self._last))
        log.info("%s: %.2fs", label, now - self._last)
        self._last = now

    def summary(self) -> str:
        total = time.perf_counter() - self._start
        return ", ".join(f"{k} {v:.2f}s" for k, v in self._laps) + f"; total {total:.2f}s"
