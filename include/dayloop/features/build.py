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

``pyspark`` is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
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

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "FeatureSetInfo",
    "InputPlan",
    "build_features",
    "build_features_with_session",
    "decade",
    "load_feature_table",
    "load_meta",
    "plan_inputs",
    "sorted_vocab",
    "window_days",
]

log = logging.getLogger(__name__)

YEAR_BUCKET_WIDTH = 10
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


def decade(year: int | None) -> int | None:
    """Start of the decade of ``year`` (1995 -> 1990); None for missing or non-positive years."""
    if year is None or year <= 0:
        return None
    return year - year % YEAR_BUCKET_WIDTH


def sorted_vocab(values: Iterable[Any]) -> list[Any]:
    """Sorted distinct non-missing values; position ``i`` gets code ``i + 1`` (0 = unknown)."""
    out = {v for v in values if v is not None and not (isinstance(v, str) and v.strip() == "")}
    return sorted(out)


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
        _publish(stage, target)
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

    flagged = _read_interactions(spark, plan)
    try:
        _check_interactions(flagged, plan)
        timer.lap("read interactions")
        events = flagged.filter(F.col("usable")).select("user_id", "item_id", "ts", "day")
        train_ev = events.filter(F.col("day") < F.lit(ds)).select("user_id", "item_id", "ts")
        held_ev = events.filter(F.col("day") == F.lit(ds)).select("user_id", "item_id")

        users = _users_dimension(spark, plan.users_file)
        items = _items_dimension(spark, plan.items_file)
        timer.lap("read dimensions")

        tables: dict[str, tuple[DataFrame, list[Column]]] = {
            "train": (_train_table(train_ev, L), [F.col("user_id"), F.col("ts"), F.col("item_id")]),
            "eval": (_eval_table(train_ev, held_ev, L), [F.col("user_id")]),
            "users": (_with_unknown_users(users.coded, events), [F.col("user_id")]),
            "items": (_with_unknown_items(items.coded, events), [F.col("item_id")]),
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


def _read_interactions(spark: "SparkSession", plan: InputPlan) -> "DataFrame":
    """The planned partitions, typed, with ``day`` from the path and a ``usable`` flag.

    The result is persisted (the caller unpersists) so the files are scanned once.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    files = [str(p) for p in (*plan.train_files, plan.heldout_file)]
    # Explicit file paths plus basePath: Spark derives ds from each path without
    # listing the interactions directory, so later partitions are never touched.
    raw = spark.read.option("basePath", str(plan.interactions_root)).parquet(*files)
    _require_columns(raw, {"user_id", "item_id", "ts", "ds"}, plan.interactions_root)
    typed = raw.select(
        F.col("user_id").cast("bigint").alias("user_id"),
        F.col("item_id").cast("bigint").alias("item_id"),
        F.col("ts").cast("timestamp").alias("ts"),
        F.to_date(F.col("ds"), "yyyy-MM-dd").alias("day"),
    )
    # Usable: keys present and event time inside the partition's (UTC) day; anything
    # else would blur the boundary between training days and the held-out day.
    usable = F.coalesce(
        F.col("user_id").isNotNull()
        & F.col("item_id").isNotNull()
        & (F.to_date(F.col("ts")) == F.col("day")),
        F.lit(False),
    )
    return typed.withColumn("usable", usable).persist(StorageLevel.MEMORY_AND_DISK)


def _check_interactions(flagged: "DataFrame", plan: InputPlan) -> None:
    """Log what was read; raise DataUnavailable when either side has no usable row."""
    from pyspark.sql import functions as F

    ds = plan.ds
    usable, day = F.col("usable"), F.col("day")
    stats = flagged.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(~usable, 1).otherwise(0)).alias("dropped"),
        F.sum(F.when(usable & (day < F.lit(ds)), 1).otherwise(0)).alias("train"),
        F.sum(F.when(usable & (day == F.lit(ds)), 1).otherwise(0)).alias("held"),
    ).first()
    n_rows, n_dropped = int(stats["rows"]), int(stats["dropped"] or 0)
    n_train, n_held = int(stats["train"] or 0), int(stats["held"] or 0)
    log.info(
        "read %d interaction rows from %d partitions (%d train, %d held-out)",
        n_rows,
        len(plan.train_files) + 1,
        n_train,
        n_held,
    )
    if n_dropped:
        log.warning(
            "dropped %d of %d interaction rows with a null key or a ts outside their "
            "partition's day",
            n_dropped,
            n_rows,
        )
    if n_train == 0:
        raise DataUnavailable(
            f"training window [{plan.window_start}, {ds}) has no usable interactions "
            f"({len(plan.train_files)} partitions; {n_rows} rows read in all, "
            f"{n_dropped} unusable)"
        )
    if n_held == 0:
        raise DataUnavailable(f"held-out partition for {ds} has no usable interactions")


@dataclass(frozen=True)
class _Dimension:
    coded: "DataFrame"  # id + integer codes, one row per id
    vocab: dict[str, list[Any]]
    n_ids: int  # distinct ids in the landed dimension


def _users_dimension(spark: "SparkSession", path: Path) -> _Dimension:
    """User features (coded) and the gender/age/occupation vocabularies, from users.parquet."""
    from pyspark.sql import functions as F

    raw = spark.read.parquet(str(path))
    _require_columns(raw, {"user_id", "gender", "age", "occupation"}, path)
    users = raw.select(
        F.col("user_id").cast("bigint").alias("user_id"),
        F.upper(F.trim(F.col("gender").cast("string"))).alias("gender"),
        F.col("age").cast("bigint").alias("age"),
        F.col("occupation").cast("bigint").alias("occupation"),
    ).filter(F.col("user_id").isNotNull())
    row = users.agg(
        F.collect_set("gender").alias("gender"),
        F.collect_set("age").alias("age"),
        F.collect_set("occupation").alias("occupation"),
        F.count(F.lit(1)).alias("rows"),
        # size(collect_set) keeps this a single-shuffle aggregate (countDistinct adds one).
        F.size(F.collect_set("user_id")).alias("ids"),
    ).first()
    vocab = {
        "gender_vocab": sorted_vocab(row["gender"]),
        "age_vocab": [int(v) for v in sorted_vocab(row["age"])],
        "occupation_vocab": [int(v) for v in sorted_vocab(row["occupation"])],
    }
    if row["rows"] != row["ids"]:
        log.warning(
            "users dimension has %d rows for %d user ids; keeping one per id",
            row["rows"],
            row["ids"],
        )
    coded = users.select(
        "user_id",
        _code(F.col("gender"), vocab["gender_vocab"], "string").alias("gender_idx"),
        _code(F.col("age"), vocab["age_vocab"], "bigint").alias("age_idx"),
        _code(F.col("occupation"), vocab["occupation_vocab"], "bigint").alias("occupation_idx"),
    )
    # Duplicate ids: keep the smallest code tuple, which does not depend on row order.
    best = F.min(F.struct("gender_idx", "age_idx", "occupation_idx")).alias("best")
    dedup = coded.groupBy("user_id").agg(best).select("user_id", "best.*")
    return _Dimension(dedup, vocab, int(row["ids"]))


def _items_dimension(spark: "SparkSession", path: Path) -> _Dimension:
    """Item features (year bucket, genre codes) and their vocabularies, from items.parquet."""
    from pyspark.sql import functions as F

    raw = spark.read.parquet(str(path))
    _require_columns(raw, {"item_id", "year", "genres"}, path)
    year = F.col("year").cast("bigint")
    items = raw.select(
        F.col("item_id").cast("bigint").alias("item_id"),
        F.when(year > 0, year - F.pmod(year, F.lit(YEAR_BUCKET_WIDTH))).alias("decade"),
        F.filter(
            F.transform(
                F.split(F.coalesce(F.col("genres").cast("string"), F.lit("")), r"\|"),
                lambda g: F.trim(g),
            ),
            lambda g: g != F.lit(""),
        ).alias("genre_names"),
    ).filter(F.col("item_id").isNotNull())
    row = items.agg(
        F.collect_set("decade").alias("decade"),
        F.array_distinct(F.flatten(F.collect_list("genre_names"))).alias("genres"),
        F.count(F.lit(1)).alias("rows"),
        F.size(F.collect_set("item_id")).alias("ids"),
    ).first()
    vocab = {
        "year_buckets": [int(v) for v in sorted_vocab(row["decade"])],
        "genre_vocab": sorted_vocab(row["genres"]),
    }
    if row["rows"] != row["ids"]:
        log.warning(
            "items dimension has %d rows for %d item ids; keeping one per id",
            row["rows"],
            row["ids"],
        )
    genre_map = _literal_map(vocab["genre_vocab"], "string")
    if genre_map is None:
        genre_ids = F.array().cast("array<bigint>")
    else:
        genre_ids = F.array_sort(
            F.array_distinct(
                F.filter(
                    F.transform("genre_names", lambda g: F.try_element_at(genre_map, g)),
                    lambda c: c.isNotNull(),
                )
            )
        )
    coded = items.select(
        "item_id",
        _code(F.col("decade"), vocab["year_buckets"], "bigint").alias("year_idx"),
        genre_ids.alias("genre_ids"),
    )
    best = F.min(F.struct("year_idx", "genre_ids")).alias("best")
    dedup = coded.groupBy("item_id").agg(best).select("item_id", "best.*")
    return _Dimension(dedup, vocab, int(row["ids"]))


def _train_table(train_ev: "DataFrame", L: int) -> "DataFrame":
    """One row per training event with the user's last ``L`` earlier items, newest first.

    Events are first grouped into (user, ts) moments; the window then runs over
    moments, so events sharing a timestamp never see each other. Any L earlier
    items lie within the previous L moments (each holds >= 1 event), hence the frame
    ``rowsBetween(-L, -1)`` is exact and bounded.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # Hash-partitioning by user up front serves both the (user, ts) grouping and the
    # per-user window, saving one shuffle.
    moments = (
        train_ev.repartition("user_id")
        .groupBy("user_id", "ts")
        .agg(F.array_sort(F.collect_list("item_id")).alias("items"))
    )
    earlier = Window.partitionBy("user_id").orderBy("ts").rowsBetween(-L, -1)
    # Three separate projections on purpose: with the window and explode() in one
    # select, Spark's analyzer plans the explode *below* the window, so tied events
    # would become separate frame rows and see each other.
    with_prev = moments.withColumn("prev", F.flatten(F.collect_list("items").over(earlier)))
    # slice() with a negative start returns [] when the array is shorter than L,
    # so the start is computed explicitly; prev is oldest first.
    n = F.size("prev")
    with_hist = with_prev.select(
        "user_id",
        "ts",
        "items",
        F.reverse(F.slice("prev", F.greatest(n - F.lit(L - 1), F.lit(1)), L))
        .cast("array<bigint>")
        .alias("hist"),
    )
    return with_hist.select("user_id", F.explode("items").alias("item_id"), "ts", "hist")


def _eval_table(train_ev: "DataFrame", held_ev: "DataFrame", L: int) -> "DataFrame":
    """Per user active on ds: history and seen items from days < ds, targets on ds."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    newest_first = Window.partitionBy("user_id").orderBy(
        F.col("ts").desc(), F.col("item_id").desc()
    )
    ranked = train_ev.withColumn("rn", F.row_number().over(newest_first))
    recent = F.when(F.col("rn") <= L, F.struct("rn", "item_id"))
    before = ranked.groupBy("user_id").agg(
        F.transform(F.array_sort(F.collect_list(recent)), lambda s: s["item_id"]).alias("hist"),
        F.array_sort(F.collect_set("item_id")).alias("seen"),
    )
    targets = held_ev.groupBy("user_id").agg(
        F.array_sort(F.collect_set("item_id")).alias("targets")
    )
    empty = F.array().cast("array<bigint>")
    return targets.join(before, "user_id", "left").select(
        "user_id",
        F.coalesce(F.col("hist"), empty).cast("array<bigint>").alias("hist"),
        F.coalesce(F.col("seen"), empty).cast("array<bigint>").alias("seen"),
        F.col("targets").cast("array<bigint>").alias("targets"),
    )


def _with_unknown_users(users_dim: "DataFrame", events: "DataFrame") -> "DataFrame":
    """The users dimension plus any active user it lacks (all codes 0), so joins never miss."""
    from pyspark.sql import functions as F

    active = events.select("user_id").distinct()
    unknown = active.join(users_dim.select("user_id"), "user_id", "left_anti")
    zero = F.lit(0).cast("bigint")
    return users_dim.unionByName(
        unknown.select(
            "user_id",
            zero.alias("gender_idx"),
            zero.alias("age_idx"),
            zero.alias("occupation_idx"),
        )
    )


def _with_unknown_items(items_dim: "DataFrame", events: "DataFrame") -> "DataFrame":
    """The items dimension plus any interacted item it lacks (year 0, no genres)."""
    from pyspark.sql import functions as F

    active = events.select("item_id").distinct()
    unknown = active.join(items_dim.select("item_id"), "item_id", "left_anti")
    return items_dim.unionByName(
        unknown.select(
            "item_id",
            F.lit(0).cast("bigint").alias("year_idx"),
            F.array().cast("array<bigint>").alias("genre_ids"),
        )
    )


# ----- Spark helpers ----------------------------------------------------------------------


def _literal_map(vocab: Sequence[Any], key_type: str) -> "Column | None":
    """A literal map value -> 1-based code, or None for an empty vocabulary."""
    from pyspark.sql import functions as F

    if not vocab:
        return None
    pairs: list[Column] = []
    for code, value in enumerate(vocab, start=1):
        pairs += [F.lit(value).cast(key_type), F.lit(code).cast("bigint")]
    return F.create_map(*pairs)


def _code(col: "Column", vocab: Sequence[Any], key_type: str) -> "Column":
    """Map ``col`` through ``vocab`` to 1-based codes; unknown or null -> 0."""
    from pyspark.sql import functions as F

    mapping = _literal_map(vocab, key_type)
    if mapping is None:
        return F.lit(0).cast("bigint")
    return F.coalesce(F.try_element_at(mapping, col.cast(key_type)), F.lit(0).cast("bigint"))


def _require_columns(df: "DataFrame", needed: set[str], path: Path) -> None:
    missing = needed - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (has {df.columns})")


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


def _publish(stage: Path, target: Path) -> None:
    """Swap ``stage`` in as ``target``.

    rename(2) cannot replace a non-empty directory, so an existing target is first
    renamed aside (atomic), then the stage renamed in (atomic); readers see either
    the old or the new set, or briefly none -- never a mix.
    """
    trash = None
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        target.rename(trash)
    try:
        stage.rename(target)
    except BaseException:
        if trash is not None:
            trash.rename(target)  # put the previous set back
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


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
