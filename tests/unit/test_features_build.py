"""Pure parts of the feature job: window arithmetic, input planning, vocabularies,
schema checks, Spark master resolution. No Spark here."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from dayloop.config import Settings
from dayloop.data.schema import items_file, partition_file, users_file
from dayloop.errors import DataUnavailable
from dayloop.features.build import plan_inputs, window_days
from dayloop.features.schema import (
    arrow_type_name,
    load_feature_table,
    load_meta,
    schema_problems,
    table_file,
)
from dayloop.features.spark import master_from_connection, resolve_spark_master
from dayloop.features.tables import decade, sorted_vocab

DS = dt.date(2026, 3, 10)


def _settings(home: Path, window: int = 4) -> Settings:
    return Settings(home=home, data_cache=home / "cache", train_window_days=window)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _land(home: Path, days: list[dt.date], dims: bool = True) -> Settings:
    settings = _settings(home)
    for day in days:
        _touch(partition_file(settings.landing_dir, day))
    if dims:
        _touch(users_file(settings.landing_dir))
        _touch(items_file(settings.landing_dir))
    return settings


def test_window_days_is_the_half_open_window_before_ds():
    days = window_days(DS, 3)
    assert days == [dt.date(2026, 3, 7), dt.date(2026, 3, 8), dt.date(2026, 3, 9)]
    assert window_days(dt.date(2024, 3, 1), 1) == [dt.date(2024, 2, 29)]  # leap day
    with pytest.raises(ValueError, match="positive"):
        window_days(DS, 0)


def test_decade_and_vocab():
    assert [decade(y) for y in (1995, 1990, 2000, 1919)] == [1990, 1990, 2000, 1910]
    assert decade(None) is None and decade(0) is None and decade(-5) is None
    assert sorted_vocab(["M", "F", None, "M", " ", ""]) == ["F", "M"]
    assert sorted_vocab([56, 1, 18, 1]) == [1, 18, 56]
    assert sorted_vocab(reversed(["b", "a", "c"])) == sorted_vocab(["c", "a", "b"])


def test_plan_lists_present_and_missing_days(tmp_path):
    window = window_days(DS, 4)
    settings = _land(tmp_path, [window[0], window[2], DS, DS + dt.timedelta(days=1)])
    plan = plan_inputs(DS, settings)
    assert plan.present_days == (window[0], window[2])
    assert plan.missing_days == (window[1], window[3])
    assert plan.window_start == window[0]
    assert plan.heldout_file == partition_file(settings.landing_dir, DS)
    # Nothing after ds is planned, even though it exists.
    planned = {*plan.train_files, plan.heldout_file}
    assert partition_file(settings.landing_dir, DS + dt.timedelta(days=1)) not in planned


def test_plan_raises_for_missing_heldout_day(tmp_path):
    settings = _land(tmp_path, window_days(DS, 4))
    with pytest.raises(DataUnavailable, match=f"held-out partition for {DS} is missing"):
        plan_inputs(DS, settings)


def test_plan_raises_for_empty_window(tmp_path):
    # A partition just outside the window does not count.
    settings = _land(tmp_path, [DS - dt.timedelta(days=5), DS])
    expected = r"training window \[2026-03-06, 2026-03-10\) is empty"
    with pytest.raises(DataUnavailable, match=expected):
        plan_inputs(DS, settings)


def test_plan_raises_for_missing_dimension(tmp_path):
    settings = _land(tmp_path, [DS - dt.timedelta(days=1), DS], dims=False)
    _touch(users_file(settings.landing_dir))
    with pytest.raises(DataUnavailable, match="items dimension is missing"):
        plan_inputs(DS, settings)


def test_arrow_type_names_and_schema_problems():
    assert arrow_type_name(pa.int64()) == "int64"
    assert arrow_type_name(pa.list_(pa.int64())) == "list<int64>"
    assert arrow_type_name(pa.timestamp("us", tz="UTC")) == "timestamp"
    assert arrow_type_name(pa.timestamp("us")) != "timestamp"  # naive is not an instant
    good = pa.schema([("item_id", pa.int64()), ("count", pa.int64())])
    assert schema_problems("popularity", good) == []
    bad = pa.schema([("item_id", pa.int32()), ("extra", pa.string())])
    problems = schema_problems("popularity", bad)
    assert any("missing column 'count'" in p for p in problems)
    assert any("unexpected column 'extra'" in p for p in problems)
    assert any("item_id: type int32 != int64" in p for p in problems)
    swapped = pa.schema([("count", pa.int64()), ("item_id", pa.int64())])
    assert any("column order" in p for p in schema_problems("popularity", swapped))


def test_loaders_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown feature table 'nope'"):
        table_file("nope")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="feature table 'train' not found"):
        load_feature_table(tmp_path, "train")
    (tmp_path / "meta.json").write_text(json.dumps({"ds": "2026-03-10"}))
    assert load_meta(tmp_path) == {"ds": "2026-03-10"}


@pytest.mark.parametrize(
    ("conn_type", "host", "port", "extra", "expected"),
    [
        ("spark", "local[4]", None, None, "local[4]"),
        ("spark", "local", None, None, "local"),
        ("spark", "yarn", None, None, "yarn"),
        ("spark", "spark://h", 7077, None, "spark://h:7077"),
        ("spark", "spark://h:7078", 7077, None, "spark://h:7078"),
        ("spark", "h", 7079, None, "spark://h:7079"),
        ("spark", "h", None, None, "spark://h:7077"),
        ("generic", "h", None, None, "spark://h:7077"),
        ("spark", "k8s://https://api:443", None, None, "k8s://https://api:443"),
        ("spark", "ignored", None, {"master": "local[3]"}, "local[3]"),
        ("spark", "", None, None, None),
        ("spark", None, None, {}, None),
    ],
)
def test_master_from_connection(conn_type, host, port, extra, expected):
    assert master_from_connection(conn_type, host, port, extra) == expected


def test_resolve_spark_master_reads_connection_or_falls_back(monkeypatch, tmp_path):
    if "airflow" not in sys.modules:
        monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.delenv("AIRFLOW_CONN_DAYLOOP_TEST_SPARK_ABSENT", raising=False)
    assert resolve_spark_master("dayloop_test_spark_absent", "local[2]") == "local[2]"
    monkeypatch.setenv(
        "AIRFLOW_CONN_DAYLOOP_TEST_SPARK", json.dumps({"conn_type": "spark", "host": "local[3]"})
    )
    assert resolve_spark_master("dayloop_test_spark", "local[2]") == "local[3]"
    monkeypatch.setenv("AIRFLOW_CONN_DAYLOOP_TEST_SPARK_URI", "spark://node-1:7077")
    assert resolve_spark_master("dayloop_test_spark_uri", "local[2]") == "spark://node-1:7077"


def test_resolve_spark_master_without_airflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "airflow.sdk", None)  # makes the import fail
    assert resolve_spark_master("anything", "local[2]") == "local[2]"


def test_importing_the_job_modules_does_not_import_spark():
    import subprocess

    code = (
        "import sys, dayloop.features.build, dayloop.features.spark, dayloop.features.schema;"
        "print(any(m.split('.')[0] in ('pyspark', 'airflow', 'pandas') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
