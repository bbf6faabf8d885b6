"""Deployment constants, read from the environment at call time.

Environment carries what the deployment decides (paths, data source, sizes);
Airflow connections carry endpoints; DAG Params carry what a person chooses at
trigger time. Nothing here touches the network or a database.

The settings are frozen pydantic-settings models. Each field that the environment may set
names its variable (``validation_alias``, the README's Configuration table); the others are
constants. Constructing a model by keyword never reads the environment (tests build them
that way); :func:`load_settings` does, on every call.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal, Self, get_origin

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from serving.fileio import atomic_write_text


class ConfigError(ValueError):
    """A setting is missing or malformed."""


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


class _DeclaredEnvironment(EnvSettingsSource):
    """The environment, limited to the fields that name their variable.

    A field without a ``validation_alias`` is a constant: no variable sets it. An empty
    variable counts as unset, except for a string setting, which keeps the empty string
    (as the hand-written parser did, so an empty DAYLOOP_SOURCE is still refused)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if not isinstance(field.validation_alias, str):
            return None, field_name, False
        value, key, is_complex = super().get_field_value(field, field_name)
        keeps_empty = field.annotation is str or get_origin(field.annotation) is Literal
        if value == "" and not keeps_empty:
            value = None
        return value, key, is_complex


# What a rejected value should have been, by pydantic error type (the wording of the old parser).
_EXPECTED = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "greater_than": "positive",
}


def _config_error(model: type[BaseSettings], exc: ValidationError, given: dict[str, Any]) -> ConfigError:
    """One ConfigError naming each bad variable and the value it had."""
    problems = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else model.__name__
        field = model.model_fields.get(key)
        variable = field.validation_alias if field is not None and field.validation_alias else key
        raw = given.get(key, given.get(str(variable), error.get("input")))
        if error["type"] == "literal_error":
            expected = error["ctx"]["expected"]
        elif error["type"] in _EXPECTED:
            expected = _EXPECTED[error["type"]]
        else:  # a validator's own message, e.g. parse_day's
            cause = error.get("ctx", {}).get("error")
            problems.append(f"{variable}: {cause or error['msg']}")
            continue
        problems.append(f"{variable} must be {expected}, got {raw!r}")
    return ConfigError("; ".join(problems))


class _Settings(BaseSettings):
    """Frozen, no unknown keys, keyword construction by field name (the alias is the variable)."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True, case_sensitive=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments only: a model built in code means exactly what it says, whatever
        # the environment of the process; from_env is the one place that reads it.
        return (init_settings,)

    @classmethod
    def from_env(cls, **given: Any) -> Self:
        """The model from the declared environment variables, ``given`` fields on top."""
        values = _DeclaredEnvironment(cls)()
        try:
            return cls(**values, **given)
        except ValidationError as exc:
            raise _config_error(cls, exc, values) from None


class SyntheticSettings(_Settings):
    """Size and behaviour of the synthetic world (fast tests, planted faults)."""

    n_users: int = Field(600, validation_alias="DAYLOOP_SYNTH_USERS", description="users in the world")
    n_items: int = Field(400, validation_alias="DAYLOOP_SYNTH_ITEMS", description="items in the catalogue")
    dim: int = Field(8, validation_alias="DAYLOOP_SYNTH_DIM", description="dimension of the hidden tastes")
    events_per_day: int = Field(
        3000, validation_alias="DAYLOOP_SYNTH_EVENTS_PER_DAY", description="interactions per replay day"
    )
    history_days: int = Field(
        20, validation_alias="DAYLOOP_SYNTH_HISTORY_DAYS", description="days of history before replay day 0"
    )
    replay_days: int = Field(
        30, validation_alias="DAYLOOP_SYNTH_REPLAY_DAYS", description="days available from replay day 0 on"
    )
    drift: float = Field(
        0.0, validation_alias="DAYLOOP_SYNTH_DRIFT", description="how fast the tastes move, per day"
    )
    seed: int = Field(7, validation_alias="DAYLOOP_SYNTH_SEED", description="seed of the world")


class Settings(_Settings):
    """Where Dayloop keeps its state and how big its days are."""

    home: Path = Field(
        default_factory=lambda: Path.home() / ".dayloop",
        validation_alias="DAYLOOP_HOME",
        description="landing zone, quarantine, features, models, reports",
    )
    data_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "dayloop",
        validation_alias="DAYLOOP_DATA_CACHE",
        description="where MovieLens-1M is unpacked",
    )
    source: Literal["movielens", "synthetic"] = Field(
        "movielens", validation_alias="DAYLOOP_SOURCE", description="the interaction source"
    )
    replay_start_override: dt.date | None = Field(
        None,
        validation_alias="DAYLOOP_REPLAY_START",
        description="logical date of replay day 0; unset: the date pinned in $DAYLOOP_HOME/replay_start",
    )
    events_per_day: int = Field(
        5000,
        gt=0,
        validation_alias="DAYLOOP_EVENTS_PER_DAY",
        description="replay slice size (by count: timestamps are front-heavy)",
    )
    replay_days: int = Field(
        30, gt=0, validation_alias="DAYLOOP_REPLAY_DAYS", description="days available from replay day 0 on"
    )
    train_window_days: int = Field(
        60, gt=0, validation_alias="DAYLOOP_TRAIN_WINDOW_DAYS", description="trailing training window"
    )
    history_length: int = Field(
        20, gt=0, validation_alias="DAYLOOP_HISTORY_LENGTH", description="items in a user's history feature"
    )
    model_name: str = Field(
        "dayloop_two_tower", validation_alias="DAYLOOP_MODEL_NAME", description="registered model name"
    )
    spark_conn_id: str = Field("dayloop_spark", description="Airflow connection naming the Spark master")
    spark_master_default: str = Field("local[2]", description="Spark master when that connection is absent")
    spark_driver_memory: str = Field(
        "1g", validation_alias="DAYLOOP_SPARK_DRIVER_MEMORY", description="spark.driver.memory"
    )
    synthetic: SyntheticSettings = Field(
        default_factory=SyntheticSettings, description="the synthetic world, when source is synthetic"
    )

    @field_validator("home", "data_cache")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("source", mode="before")
    @classmethod
    def _normalise_source(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("replay_start_override", mode="before")
    @classmethod
    def _parse_replay_start(cls, value: Any) -> Any:
        return parse_day(value) if isinstance(value, str) else value

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

    def with_home(self, home: Path) -> Settings:
        return self.model_copy(update={"home": Path(home)})


def pin_replay_start(settings: Settings, day: dt.date) -> dt.date:
    """Write the replay start once; an existing pin is kept and returned."""
    path = settings.replay_start_file
    if path.exists():
        return parse_day(path.read_text().strip())
    atomic_write_text(path, day.isoformat() + "\n")
    return day


def load_settings() -> Settings:
    """Read the settings from the environment (each call reads it afresh)."""
    return Settings.from_env(synthetic=SyntheticSettings.from_env())
