"""MLflow registry access: versions, aliases, lineage and gate tags.

A thin client over ``mlflow.MlflowClient``. One registered model holds every
daily version; a version is created at most once per logical date (looked up by
its ``dayloop.logical_date`` tag), so a re-run of the same day finds the version
it made before instead of registering a second one.

Aliases: ``champion`` (serves production), ``previous`` (the champion before),
``challenger`` (the candidate awaiting its canary).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dayloop.bundle_layout import MODEL_META_FILE
from dayloop.config import Settings
from dayloop.errors import DayloopError

log = logging.getLogger("dayloop.registry")

EXPERIMENT_NAME = "dayloop-daily-refresh"
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"

TAG_LOGICAL_DATE = "dayloop.logical_date"
TAG_DATA_WINDOW = "dayloop.data_window"
TAG_SCHEMA_HASH = "dayloop.feature_schema_hash"
TAG_CODE_VERSION = "dayloop.code_version"
TAG_RUN_ID = "dayloop.run_id"
TAG_AIRFLOW_RUN = "dayloop.airflow_run_id"
TAG_INDEX_PREFIX = "dayloop.index."
TAG_GATE_DECISION = "gate.offline.decision"
TAG_ROLLOUT = "dayloop.rollout."
TAG_PROMOTION = "dayloop.promotion"
BUNDLE_ARTIFACT = "bundle"
INDEX_ARTIFACT = "index"
MAX_TAG_VALUE = 5000


class RegistryError(DayloopError):
    """The registry refused or lacks what was asked for."""


@dataclass(frozen=True)
class VersionRef:
    """What downstream tasks need to find a registered version again. The version number is
    an ``int`` everywhere in Dayloop; it becomes MLflow's string only at the MLflow call."""

    name: str
    version: int
    run_id: str
    logical_date: str
    created: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "logical_date": self.logical_date,
            "created": self.created,
        }


def tracking_uri(settings: Settings) -> str:
    """MLFLOW_TRACKING_URI when set (the server in the embedded stack), else a local
    SQLite store under DAYLOOP_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{settings.home / 'mlflow.db'}"


def code_version() -> str:
    """DAYLOOP_CODE_VERSION, else the git commit of the checkout the package runs from."""
    pinned = os.environ.get("DAYLOOP_CODE_VERSION")
    if pinned:
        return pinned
    import dayloop

    root = Path(dayloop.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"dayloop-{dayloop.__version__}"


def _mlflow_version(version: int) -> str:
    """MLflow's form of a version number: the one place an ``int`` version becomes a string."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise RegistryError(f"a model version number must be an int, got {version!r}")
    return str(version)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_TAG_VALUE]


class Registry:
    """Versions, aliases and tags of one registered model."""

    def __init__(self, settings: Settings, model_name: str | None = None):
        # Progress bars only clutter Airflow task logs.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow
        from mlflow import MlflowClient

        self.settings = settings
        self.name = model_name or settings.model_name
        self.uri = tracking_uri(settings)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # ----- experiments and model -------------------------------------------------
    def experiment_id(self) -> str:
        """The experiment the daily runs log to, created on first use."""
        exp = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            # A bare SQLite store would put artifacts under the process cwd.
            location = (self.settings.home / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT_NAME, artifact_location=location)
        except Exception:  # created concurrently: read it back
            exp = self.client.get_experiment_by_name(EXPERIMENT_NAME)
            if exp is None:
                raise
            return exp.experiment_id

    def ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name,
                    description="Dayloop two-tower retrieval model; one version per logical date.",
                )
            except MlflowException:
                self.client.get_registered_model(self.name)

    # ----- versions ---------------------------------------------------------------
    def version_for_date(self, logical_date: str):
        """The version registered for a logical date, or None."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(
                f"name = '{self.name}' and tags.`{TAG_LOGICAL_DATE}` = '{logical_date}'"
            )
        except MlflowException:
            return None
        found = sorted(found, key=lambda v: int(v.version))
        return found[0] if found else None

    def get_version(self, version: int):
        """A version by number; RegistryError naming the model when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, _mlflow_version(version))
        except (MlflowException, ValueError) as exc:
            raise RegistryError(f"model {self.name!r} has no version {version!r}") from exc

    def version_tags(self, version: int) -> dict[str, str]:
        """A version's tags (RegistryError when it does not exist)."""
        return dict(self.get_version(version).tags)

    def alias_version(self, alias: str):
        """The MLflow model version an alias points at, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def version_for_alias(self, alias: str) -> int | None:
        """The version number an alias points at, or None."""
        mv = self.alias_version(alias)
        return int(mv.version) if mv is not None else None

    def set_alias(self, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(self.name, alias, _mlflow_version(version))

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(self.name, alias)
        except MlflowException:
            pass

    def set_tags(self, version: int, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, _mlflow_version(version), key, _tag_value(value))

    def register_bundle(
        self,
        logical_date: str,
        bundle_dir: Path,
        params: dict[str, Any],
        metrics: dict[str, float],
        lineage: dict[str, str],
        step_metrics: dict[str, list[float]] | None = None,
        extra_artifacts: list[Path] | None = None,
    ) -> VersionRef:
        """Log a trained bundle as a run and register it as a version.

        Idempotent per logical date: when a version already carries this date,
        it is returned with ``created=False`` and nothing is logged.
        """
        existing = self.version_for_date(logical_date)
        if existing is not None:
            log.info("version %s already registered for %s; not registering again",
                     existing.version, logical_date)
            return VersionRef(self.name, int(existing.version), existing.run_id, logical_date, False)

        bundle_dir = Path(bundle_dir)
        if not (bundle_dir / MODEL_META_FILE).exists():
            raise RegistryError(f"{bundle_dir} is not a model bundle (no {MODEL_META_FILE})")
        experiment_id = self.experiment_id()
        self.ensure_registered_model()
        run = self.client.create_run(
            experiment_id,
            run_name=f"daily-{logical_date}",
            tags={TAG_LOGICAL_DATE: logical_date, **lineage},
        )
        run_id = run.info.run_id
        try:
            for key, value in params.items():
                self.client.log_param(run_id, key, _tag_value(value)[:6000])
            for key, value in metrics.items():
                self.client.log_metric(run_id, key, float(value))
            for key, series in (step_metrics or {}).items():
                for step, value in enumerate(series):
                    self.client.log_metric(run_id, key, float(value), step=step)
            self.client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT)
            for path in extra_artifacts or []:
                self.client.log_artifact(run_id, str(path))
            tags = {TAG_LOGICAL_DATE: logical_date, TAG_RUN_ID: run_id, **lineage}
            mv = self.client.create_model_version(
                self.name,
                source=f"{run.info.artifact_uri}/{BUNDLE_ARTIFACT}",
                run_id=run_id,
                tags={k: _tag_value(v) for k, v in tags.items()},
                description=f"Daily refresh for {logical_date}",
            )
            self.client.set_terminated(run_id, "FINISHED")
        except Exception:
            self.client.set_terminated(run_id, "FAILED")
            raise
        log.info("registered %s version %s for %s (run %s)", self.name, mv.version, logical_date, run_id)
        return VersionRef(self.name, int(mv.version), run_id, logical_date, True)

    # ----- artifacts ---------------------------------------------------------------
    def download_artifacts(self, version: int, artifact: str) -> Path:
        """Download a version run's artifact folder into a local cache (re-used when present)."""
        mv = self.get_version(version)
        dest = self.settings.models_dir / f"v{mv.version}" / artifact
        if dest.exists() and any(dest.iterdir()):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{artifact}-", dir=dest.parent))
        try:
            local = self.client.download_artifacts(mv.run_id, artifact, str(tmp))
            shutil.rmtree(dest, ignore_errors=True)
            Path(local).rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def download_bundle(self, version: int) -> Path:
        return self.download_artifacts(version, BUNDLE_ARTIFACT)

    def log_artifacts(self, version: int, local_dir: Path, artifact_path: str) -> str:
        """Attach a folder to the version's run; returns its artifact URI."""
        mv = self.get_version(version)
        self.client.log_artifacts(mv.run_id, str(local_dir), artifact_path)
        run = self.client.get_run(mv.run_id)
        return f"{run.info.artifact_uri}/{artifact_path}"

    def log_metrics(self, version: int, metrics: dict[str, float]) -> None:
        mv = self.get_version(version)
        for key, value in metrics.items():
            self.client.log_metric(mv.run_id, key, float(value))
