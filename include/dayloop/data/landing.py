"""The landing zone: one Parquet partition per logical day, plus user/item snapshots.

Every write goes to a temporary file in the destination directory and is renamed
into place (``serving.fileio``), so readers never see half a file and a failed write
changes nothing. The read_* functions are the one way to read it back; the data gate
uses them.
Re-landing identical content leaves the existing file untouched (same bytes, same
mtime), which keeps re-runs and Airflow retries free of side effects.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dayloop.config import Settings, parse_day
from dayloop.data.schema import (
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    PART_NAME,
    USER_COLUMNS,
    items_file,
    partition_dir,
    partition_file,
    users_file,
)
from dayloop.errors import DataUnavailable
from serving.fileio import atomic_write_bytes, replace_dir

if TYPE_CHECKING:
    from dayloop.data.world import World

log = logging.getLogger(__name__)

VALIDATION_NAME = "validation.json"
_DS_DIR = re.compile(r"^ds=(\d{4}-\d{2}-\d{2})$")


# --------------------------------------------------------------------------- helpers
def _atomic_parquet(df: pd.DataFrame, target: Path) -> Path:
    # Encoded in memory (a day is a few hundred kB), then written atomically.
    return atomic_write_bytes(target, df.to_parquet(index=False, engine="pyarrow"))


def frame_digest(df: pd.DataFrame) -> str:
    """Content hash of a frame: column names, dtypes and values (row order matters, index not)."""
    h = hashlib.sha256()
    h.update(json.dumps([[c, str(t)] for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _check_schema(df: pd.DataFrame, schema: dict[str, str], what: str) -> pd.DataFrame:
    """Return ``df`` with exactly the schema's columns; refuse anything that does not fit."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; has {list(df.columns)}")
    df = df[list(schema)]
    wrong = {c: str(df[c].dtype) for c, t in schema.items() if str(df[c].dtype) != t}
    if wrong:
        # pandas 3 infers 'str' for text; the schema stores it as object.
        text_only = all(schema[c] == "object" for c in wrong)
        if not text_only:
            raise ValueError(f"{what} has dtypes {wrong}, schema requires "
                             f"{ {c: schema[c] for c in wrong} }")
        df = df.astype({c: object for c in wrong})
    return df


def _world(settings: Settings, world: World | None) -> World:
    if world is not None:
        return world
    from dayloop.data.world import open_world

    return open_world(settings)


def _write_dimensions(settings: Settings, world: World) -> None:
    root = settings.landing_dir
    if not users_file(root).exists():
        _atomic_parquet(_check_schema(world.users(), USER_COLUMNS, "users"), users_file(root))
    if not items_file(root).exists():
        _atomic_parquet(_check_schema(world.items(), ITEM_COLUMNS, "items"), items_file(root))


# --------------------------------------------------------------------------- public API
def write_partition(df: pd.DataFrame, ds: dt.date, settings: Settings) -> Path:
    """Write ``df`` as the partition of ``ds`` as-is (no schema check; tests plant faults with it)."""
    return _atomic_parquet(df.reset_index(drop=True), partition_file(settings.landing_dir, parse_day(ds)))


def read_partition(ds: dt.date, settings: Settings, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the landed partition of ``ds`` exactly as stored (only ``columns`` when given);
    DataUnavailable if absent."""
    path = partition_file(settings.landing_dir, parse_day(ds))
    if not path.is_file():
        raise DataUnavailable(f"no landed partition for {parse_day(ds)} at {path}")
    return pd.read_parquet(path, engine="pyarrow", columns=None if columns is None else list(columns))


def read_users(settings: Settings) -> pd.DataFrame:
    """The landed user dimension in schema dtypes."""
    path = users_file(settings.landing_dir)
    if not path.is_file():
        raise DataUnavailable(f"no user dimension at {path}")
    return _check_schema(pd.read_parquet(path), USER_COLUMNS, str(path))


def read_items(settings: Settings) -> pd.DataFrame:
    """The landed item dimension in schema dtypes."""
    path = items_file(settings.landing_dir)
    if not path.is_file():
        raise DataUnavailable(f"no item dimension at {path}")
    return _check_schema(pd.read_parquet(path), ITEM_COLUMNS, str(path))


def land_partition(ds: dt.date, settings: Settings, world: World | None = None) -> Path:
    """Land the interactions of ``ds`` (and the user/item snapshots if missing).

    The partition is written exactly as the source delivered it, even when malformed.
    An existing partition with identical content is left untouched; different or
    unreadable content is replaced atomically. Raises DataUnavailable outside the data.
    """
    ds = parse_day(ds)
    world = _world(settings, world)
    # Land what the source delivered, as delivered: judging it is the data gate's job,
    # and a malformed partition must reach the gate to be quarantined with its reasons.
    df = world.interactions(ds).reset_index(drop=True)
    if list(df.columns) != list(INTERACTION_COLUMNS) or any(
        str(df[c].dtype) != t for c, t in INTERACTION_COLUMNS.items() if c in df.columns
    ):
        log.warning("interactions of %s do not match the landing schema; landing as delivered "
                    "for the data gate to judge", ds)
    _write_dimensions(settings, world)
    target = partition_file(settings.landing_dir, ds)
    if target.is_file():
        try:
            same = frame_digest(pd.read_parquet(target)) == frame_digest(df.reset_index(drop=True))
        except Exception:  # an unreadable leftover is simply replaced
            same = False
        if same:
            log.info("partition %s already landed with identical content", ds)
            return target
        log.warning("replacing landed partition %s: content differs", ds)
    _atomic_parquet(df, target)
    log.info("landed %d events for %s at %s", len(df), ds, target)
    return target


def history_dates(settings: Settings, world: World | None = None) -> list[dt.date]:
    """History dates (before replay day 0) of the configured source, oldest first.

    For MovieLens this needs no data: the pinned dataset's size fixes the calendar.
    """
    if world is not None:
        return list(world.history_days)
    if settings.source == "movielens":
        from dayloop.data.movielens import EXPECTED_RATINGS
        from dayloop.data.replay import ReplayCalendar

        return ReplayCalendar(EXPECTED_RATINGS, settings.events_per_day, settings.replay_days,
                              settings.replay_start).history_days
    return list(_world(settings, None).history_days)


def seed_history(settings: Settings, world: World | None = None,
                 until: dt.date | None = None) -> list[Path]:
    """Land every history day not yet landed (only days before ``until`` when given).

    Returns the partitions written by this call (empty when everything was there);
    already-landed days are only checked for existence, so a repeat call is cheap.
    """
    days = history_dates(settings, world)
    if until is not None:
        until = parse_day(until)
        days = [d for d in days if d < until]
    root = settings.landing_dir
    todo = [d for d in days if not partition_file(root, d).is_file()]
    if not todo and users_file(root).is_file() and items_file(root).is_file():
        return []
    world = _world(settings, world)
    _write_dimensions(settings, world)
    written = []
    for d in todo:
        df = _check_schema(world.interactions(d), INTERACTION_COLUMNS, f"interactions of {d}")
        written.append(_atomic_parquet(df, partition_file(root, d)))
    if written:
        log.info("seeded %d history days (%s .. %s)", len(written), todo[0], todo[-1])
    return written


def landed_days(settings: Settings) -> list[dt.date]:
    """Dates with a landed partition file, ascending."""
    base = settings.landing_dir / "interactions"
    if not base.is_dir():
        return []
    out = []
    for child in base.iterdir():
        m = _DS_DIR.match(child.name)
        if m and (child / PART_NAME).is_file():
            try:
                out.append(dt.date.fromisoformat(m.group(1)))
            except ValueError:
                continue
    return sorted(out)


def quarantine_partition(ds: dt.date, settings: Settings, validation: dict) -> Path:
    """Move the partition directory of ``ds`` to quarantine with ``validation.json`` beside it.

    Replaces an older quarantine of the same day. When no partition was landed,
    the quarantine directory holds only the validation record. Returns that directory.
    """
    ds = parse_day(ds)
    src = partition_dir(settings.landing_dir, ds)
    dst = partition_dir(settings.quarantine_dir, ds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    # The record is written first: a failure here leaves the landed partition where it was.
    try:
        (staging / VALIDATION_NAME).write_text(
            json.dumps(validation, indent=2, sort_keys=True, default=str)
        )
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if src.is_dir():
        for child in src.iterdir():
            # Same filesystem in every sane deployment (both under $DAYLOOP_HOME);
            # shutil.move falls back to copy+delete otherwise.
            shutil.move(str(child), str(staging / child.name))
        src.rmdir()
    replace_dir(staging, dst)
    log.warning("quarantined partition %s to %s", ds, dst)
    return dst
