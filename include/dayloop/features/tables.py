"""The feature job's Spark transformations: landed partitions and dimensions in, the
feature tables of :mod:`dayloop.features.schema` out (nothing here writes a file).

:mod:`dayloop.features.build` plans the inputs, runs these on a SparkSession and publishes
the result. ``pyspark`` is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dayloop.errors import DataUnavailable

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from dayloop.features.build import InputPlan

__all__ = [
    "YEAR_BUCKET_WIDTH",
    "Dimension",
    "check_interactions",
    "decade",
    "eval_table",
    "items_dimension",
    "read_interactions",
    "sorted_vocab",
    "train_table",
    "users_dimension",
    "with_unknown_items",
    "with_unknown_users",
]

# The job's messages keep the logger they had before the split (one name for the job).
log = logging.getLogger("dayloop.features.build")

YEAR_BUCKET_WIDTH = 10


def decade(year: int | None) -> int | None:
    """Start of the decade of ``year`` (1995 -> 1990); None for missing or non-positive years.

    The plain-Python form of the year bucket :func:`items_dimension` computes in Spark."""
    if year is None or year <= 0:
        return None
    return year - year % YEAR_BUCKET_WIDTH


def sorted_vocab(values: Iterable[Any]) -> list[Any]:
    """Sorted distinct non-missing values; position ``i`` gets code ``i + 1`` (0 = unknown)."""
    out = {v for v in values if v is not None and not (isinstance(v, str) and v.strip() == "")}
    return sorted(out)


# ----- inputs -----------------------------------------------------------------------------


def read_interactions(spark: "SparkSession", plan: "InputPlan") -> "DataFrame":
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


def check_interactions(flagged: "DataFrame", plan: "InputPlan") -> None:
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


# ----- dimensions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """A landed dimension, coded: what the feature tables join and meta.json records."""

    coded: "DataFrame"  # id + integer codes, one row per id
    vocab: dict[str, list[Any]]
    n_ids: int  # distinct ids in the landed dimension


def users_dimension(spark: "SparkSession", path: Path) -> Dimension:
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
    return Dimension(dedup, vocab, int(row["ids"]))


def items_dimension(spark: "SparkSession", path: Path) -> Dimension:
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
    return Dimension(dedup, vocab, int(row["ids"]))


# ----- feature tables ---------------------------------------------------------------------


def train_table(train_ev: "DataFrame", L: int) -> "DataFrame":
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


def eval_table(train_ev: "DataFrame", held_ev: "DataFrame", L: int) -> "DataFrame":
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


def with_unknown_users(users_dim: "DataFrame", events: "DataFrame") -> "DataFrame":
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


def with_unknown_items(items_dim: "DataFrame", events: "DataFrame") -> "DataFrame":
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
