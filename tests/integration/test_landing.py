"""Landing zone on real Parquet files: idempotency, seeding, quarantine."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from dayloop.config import Settings, SyntheticSettings
from dayloop.data import landing
from dayloop.data.schema import INTERACTION_COLUMNS, items_file, partition_dir, partition_file, users_file
from dayloop.data.synthetic import SyntheticWorld
from dayloop.errors import DataUnavailable

pytestmark = pytest.mark.integration

START = dt.date(2026, 2, 1)
SYNTH = SyntheticSettings(n_users=120, n_items=90, dim=6, events_per_day=400,
                          history_days=5, replay_days=4, seed=11)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", data_cache=tmp_path / "cache", source="synthetic",
                    replay_start_override=START, synthetic=SYNTH)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, sha(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_land_partition_writes_schema_and_dimensions(settings: Settings) -> None:
    path = landing.land_partition(START, settings)
    assert path == partition_file(settings.landing_dir, START)
    df = landing.read_partition(START, settings)
    assert {c: str(t) for c, t in df.dtypes.items()} == INTERACTION_COLUMNS
    expected = SyntheticWorld(SYNTH, START).interactions(START)
    pd.testing.assert_frame_equal(df, expected)
    assert users_file(settings.landing_dir).is_file() and items_file(settings.landing_dir).is_file()
    assert landing.read_users(settings)["user_id"].tolist() == list(range(1, 121))
    assert str(landing.read_items(settings)["title"].dtype) == "object"


def test_relanding_identical_content_leaves_files_untouched(settings: Settings) -> None:
    landing.land_partition(START, settings)
    before = tree(settings.landing_dir)
    landing.land_partition(START, settings)
    assert tree(settings.landing_dir) == before


def test_relanding_changed_content_replaces_the_partition(settings: Settings) -> None:
    path = landing.land_partition(START, settings)
    landing.write_partition(landing.read_partition(START, settings).iloc[:10], START, settings)
    assert len(landing.read_partition(START, settings)) == 10
    landing.land_partition(START, settings)
    assert len(landing.read_partition(START, settings)) == SYNTH.events_per_day
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp leftovers


def test_landing_outside_the_data_raises_and_writes_nothing(settings: Settings) -> None:
    with pytest.raises(DataUnavailable, match="valid dates"):
        landing.land_partition(START + dt.timedelta(days=30), settings)
    assert not (settings.landing_dir / "interactions").exists()


def test_seed_history_lands_every_history_day_once(settings: Settings) -> None:
    written = landing.seed_history(settings)
    history = [START - dt.timedelta(days=k) for k in range(5, 0, -1)]
    assert written == [partition_file(settings.landing_dir, d) for d in history]
    assert landing.landed_days(settings) == history
    before = tree(settings.landing_dir)
    assert landing.seed_history(settings) == []
    assert tree(settings.landing_dir) == before


def test_seed_history_until_is_exclusive(settings: Settings) -> None:
    written = landing.seed_history(settings, until=START - dt.timedelta(days=3))
    assert len(written) == 2
    assert landing.landed_days(settings) == [START - dt.timedelta(days=5),
                                            START - dt.timedelta(days=4)]
    # The remaining days are added later, the first ones are not rewritten.
    first = partition_file(settings.landing_dir, START - dt.timedelta(days=5))
    mtime = first.stat().st_mtime_ns
    assert len(landing.seed_history(settings)) == 3
    assert first.stat().st_mtime_ns == mtime


def test_seed_history_uses_a_given_world(settings: Settings) -> None:
    other = SyntheticWorld(SYNTH.model_copy(update={"history_days": 2}), START)
    assert len(landing.seed_history(settings, world=other)) == 2


def test_quarantine_moves_the_partition_and_records_why(settings: Settings) -> None:
    landing.land_partition(START, settings)
    original = sha(partition_file(settings.landing_dir, START))
    dst = landing.quarantine_partition(START, settings, {"passed": False, "reasons": ["first"]})
    assert dst == partition_dir(settings.quarantine_dir, START)
    assert not partition_dir(settings.landing_dir, START).exists()
    assert START not in landing.landed_days(settings)
    assert sha(dst / "part-00000.parquet") == original
    assert json.loads((dst / "validation.json").read_text())["reasons"] == ["first"]
    with pytest.raises(DataUnavailable):
        landing.read_partition(START, settings)

    # A second quarantine of the same day replaces the first one.
    landing.write_partition(SyntheticWorld(SYNTH, START).interactions(START).iloc[:5], START, settings)
    landing.quarantine_partition(START, settings, {"passed": False, "reasons": ["second"]})
    assert json.loads((dst / "validation.json").read_text())["reasons"] == ["second"]
    assert len(pd.read_parquet(dst / "part-00000.parquet")) == 5
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no staging leftovers


def test_quarantine_without_a_partition_keeps_the_record(settings: Settings) -> None:
    dst = landing.quarantine_partition(START, settings, {"reasons": ["missing"]})
    assert [p.name for p in dst.iterdir()] == ["validation.json"]


def test_landed_days_ignores_stray_entries(settings: Settings) -> None:
    landing.land_partition(START, settings)
    base = settings.landing_dir / "interactions"
    (base / "ds=not-a-date").mkdir()
    (base / "ds=2026-02-02").mkdir()  # a directory without a part file
    (base / ".ds=2026-02-03.tmp").mkdir()
    assert landing.landed_days(settings) == [START]
