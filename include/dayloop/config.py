"""Deployment constants, read from the environment at call time.

Environment carries what the deployment decides (paths, data source, sizes);
Airflow connections carry endpoints; DAG Params carry what a person chooses at
trigger time. Nothing here touches the network or a database.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def parse_day(value: str | dt.date | dt.datetime) -> dt.date:
    """Turn '2026-11-01', a date or a datetime into a date (UTC for aware datetimes)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError as exc:
        raise ConfigError(f"not a date (YYYY-MM-DD): {value!r}") from exc


@dataclass(frozen=True)
class SyntheticSettings:
    """Size and behaviour of the synthetic world (fast tests, planted faults)."""

    n_users: int = 600
    n_items: int = 400
    dim: int = 8
    events_per_day: int = 3000
    history_days: int = 20
    replay_days: int = 30
    drift: float = 0.0
    seed: int = 7


@dataclass(frozen=True)
class Settings:
    """Where Dayloop keeps its state and how big its days are."""

    home: Path
    data_cache: Path
    source: str = "movielens"
    replay_start_override: dt.date | None = None
    events_per_day: int = 5000
    replay_days: int = 30
    train_window_days: int = 60
    history_length: int = 20
    model_name: str = "dayloop_two_tower"
    spark_conn_id: str = "dayloop_spark"
    spark_master_default: str = "local[2]"
    spark_driver_memory: str = "1g"
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    # ----- derived locations -------------------------------------------------
    @property
    def landing_dir(self) -> Path:
        return self.home / "landing"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def features_dir(self) -> Path:
        return self.home / "features"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def replay_start_file(self) -> Path:
        return self.home / "replay_start"

    @property
    def replay_start(self) -> dt.date:
        """The logical date that maps to replay day 0.

        DAYLOOP_REPLAY_START wins; otherwise the date pinned in
        ``$DAYLOOP_HOME/replay_start`` (written once by ``pin_replay_start``),
        so a deployment keeps one calendar across restarts.
        """
        if self.replay_start_override is not None:
            return self.replay_start_override
        if self.replay_start_file.exists():
            return parse_day(self.replay_start_file.read_text().strip())
        raise ConfigError(
            "replay start is not set: export DAYLOOP_REPLAY_START=YYYY-MM-DD "
            f"or write it to {self.replay_start_file}"
        )

    def with_home(self, home: Path) -> "Settings":
        return replace(self, home=Path(home))


def pin_replay_start(settings: Settings, day: dt.date) -> dt.date:
    """Write the replay start once; an existing pin is kept and returned."""
    path = settings.replay_start_file
    if path.exists():
        return parse_day(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(day.isoformat() + "\n")
    tmp.replace(path)
    return day


def load_settings() -> Settings:
    """Read the settings from the environment (each call reads it afresh)."""
    home = Path(os.environ.get("DAYLOOP_HOME") or Path.home() / ".dayloop").expanduser()
    cache = Path(
        os.environ.get("DAYLOOP_DATA_CACHE") or Path.home() / ".cache" / "dayloop"
    ).expanduser()
    source = os.environ.get("DAYLOOP_SOURCE", "movielens").strip().lower()
    if source not in {"movielens", "synthetic"}:
        raise ConfigError(f"DAYLOOP_SOURCE must be 'movielens' or 'synthetic', got {source!r}")
    start_raw = os.environ.get("DAYLOOP_REPLAY_START")
    synthetic = SyntheticSettings(
        n_users=_env_int("DAYLOOP_SYNTH_USERS", SyntheticSettings.n_users),
        n_items=_env_int("DAYLOOP_SYNTH_ITEMS", SyntheticSettings.n_items),
        dim=_env_int("DAYLOOP_SYNTH_DIM", SyntheticSettings.dim),
        events_per_day=_env_int("DAYLOOP_SYNTH_EVENTS_PER_DAY", SyntheticSettings.events_per_day),
        history_days=_env_int("DAYLOOP_SYNTH_HISTORY_DAYS", SyntheticSettings.history_days),
        replay_days=_env_int("DAYLOOP_SYNTH_REPLAY_DAYS", SyntheticSettings.replay_days),
        drift=_env_float("DAYLOOP_SYNTH_DRIFT", SyntheticSettings.drift),
        seed=_env_int("DAYLOOP_SYNTH_SEED", SyntheticSettings.seed),
    )
    settings = Settings(
        home=home,
        data_cache=cache,
        source=source,
        replay_start_override=parse_day(start_raw) if start_raw else None,
        events_per_day=_env_int("DAYLOOP_EVENTS_PER_DAY", Settings.events_per_day),
        replay_days=_env_int("DAYLOOP_REPLAY_DAYS", Settings.replay_days),
        train_window_days=_env_int("DAYLOOP_TRAIN_WINDOW_DAYS", Settings.train_window_days),
        history_length=_env_int("DAYLOOP_HISTORY_LENGTH", Settings.history_length),
        model_name=os.environ.get("DAYLOOP_MODEL_NAME", Settings.model_name),
        spark_driver_memory=os.environ.get("DAYLOOP_SPARK_DRIVER_MEMORY", "1g"),
        synthetic=synthetic,
    )
    for name in ("events_per_day", "replay_days", "train_window_days", "history_length"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(settings, name)}")
    return settings
