"""The control plane's side of the serving tier: turn a registered version into a loaded
model + index pair and route traffic to it, only through :mod:`serving.client`.

A version is deployable when its offline gate passed and its index is ready: the serving
TorchScript comes from the version's bundle, the index from the artifact the registry
links (fetched by the index service itself over MLflow's artifact proxy).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dayloop.config import Settings
from dayloop.errors import DayloopError

if TYPE_CHECKING:  # pragma: no cover
    from serving.client import DataPlaneClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingPair:
    """Everything the data plane needs to serve one version."""

    version: int
    model_file: Path
    index_source: str
    dim: int
    fingerprint: str


def index_source(uri: str, tracking_uri: str) -> str:
    """Where the index service fetches a version's index folder from.

    ``mlflow-artifacts:/...`` (the proxied artifact store of an MLflow server) becomes the
    server's HTTP artifact URL; local paths and ``file://`` URIs pass through.
    """
    if uri.startswith("mlflow-artifacts:"):
        if not tracking_uri.startswith(("http://", "https://")):
            raise DayloopError(f"index artifact {uri} needs an MLflow server URL, tracking is {tracking_uri}")
        path = uri.removeprefix("mlflow-artifacts:").lstrip("/")
        return f"{tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{path}"
    if uri.startswith(("file://", "/", "http://", "https://")):
        return uri
    raise DayloopError(f"index artifact URI {uri!r} is not one the index service can read")


def serving_pair(settings: Settings, version: int, require_gate: bool = True) -> ServingPair:
    """Resolve a registered version to its deployable pair (or say why it is not deployable).

    ``require_gate=False`` (a forced manual rollback) accepts a version whose offline gate did
    not pass; the index is always required."""
    from dayloop.bundle_layout import MODEL_META_FILE, SERVING_TOWER_FILE
    from dayloop.registry import TAG_GATE_DECISION, TAG_INDEX_PREFIX, Registry, tracking_uri

    reg = Registry(settings)
    try:
        mv = reg.get_version(version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for unknown versions
        raise DayloopError(f"model version {version} does not exist in {reg.name}: {exc}") from exc
    tags = dict(mv.tags)
    problems = []
    if tags.get(f"{TAG_INDEX_PREFIX}status") != "ready" or not tags.get(f"{TAG_INDEX_PREFIX}uri"):
        problems.append("no ready index is linked to it")
    if require_gate and tags.get(TAG_GATE_DECISION) != "pass":
        problems.append(f"its offline gate decision is {tags.get(TAG_GATE_DECISION, 'absent')!r}")
    if problems:
        raise DayloopError(f"version {mv.version} is not deployable: " + "; ".join(problems))
    bundle = reg.download_bundle(version)
    model_file = bundle / SERVING_TOWER_FILE
    if not model_file.is_file():
        raise DayloopError(f"version {mv.version}'s bundle has no {SERVING_TOWER_FILE} (exported before "
                           "the serving tier existed); retrain it")
    dim = int(json.loads((bundle / MODEL_META_FILE).read_text())["embedding_dim"])
    return ServingPair(
        version=int(mv.version), model_file=model_file,
        index_source=index_source(tags[f"{TAG_INDEX_PREFIX}uri"], tracking_uri(settings)),
        dim=dim, fingerprint=tags.get(f"{TAG_INDEX_PREFIX}fingerprint", ""),
    )


def load_pair(client: DataPlaneClient, pair: ServingPair) -> dict[str, Any]:
    """Load model and index (idempotent; a version is loaded as a pair or not at all)."""
    return client.load_version(pair.version, pair.model_file, pair.index_source, pair.dim,
                               pair.fingerprint or None)


def serve_only(settings: Settings, client: DataPlaneClient, version: int, actor: str,
               reason: str) -> dict[str, Any]:
    """Load a version's pair and route 100% of users to it (no-op if it already has them)."""
    from serving.routing import new_salt, single_version_table

    pair = serving_pair(settings, version)
    loaded = load_pair(client, pair)
    current = client.router.routes()
    if current is not None and current.table.shares() == {pair.version: 1.0}:
        return {"version": pair.version, "revision": current.revision, "routed": False, "loaded": loaded}
    rev = client.router.write_routes(single_version_table(pair.version, new_salt(pair.version)),
                                     current.revision if current else 0, actor, reason)
    log.info("routed 100%% to v%s (revision %s): %s", pair.version, rev.revision, reason)
    return {"version": pair.version, "revision": rev.revision, "routed": True, "loaded": loaded}
