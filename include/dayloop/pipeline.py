"""The stages of the daily loop, one function per DAG task.

Each function is named like its DAG task, takes the logical date and references produced by
earlier stages (paths, version numbers as ``int``), does its stage, and returns a small
JSON-friendly dict that Airflow passes on through XCom. All are safe to re-run for the same date:
outputs are keyed on the date and written atomically, and the registry holds at
most one version per date. None of them imports Airflow.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from dayloop.config import Settings
from dayloop.errors import DayloopError, IndexGateFailed, OfflineGateFailed
from dayloop.planted import INDEX_FAULTS, MODEL_FAULTS, SERVING_FAULTS, faults_for

log = logging.getLogger("dayloop.pipeline")

INDEX_K = 100


def _override(obj, overrides: dict[str, Any] | None):
    """A copy of a frozen dataclass with the known, non-None overrides applied."""
    if not overrides:
        return obj
    names = {f.name for f in fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DayloopError(f"unknown setting(s) {unknown} for {type(obj).__name__}; known: {sorted(names)}")
    return replace(obj, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- data
def land_partition(ds: dt.date, settings: Settings) -> dict[str, Any]:
    """Land the day's partition; on the first run also seed the history before replay day 0."""
    from dayloop.data.landing import land_partition, seed_history
    from dayloop.data.world import open_world
    from dayloop.planted import PlantedWorld

    world = PlantedWorld(open_world(settings))
    seeded = seed_history(settings, world=world)
    path = land_partition(ds, settings, world=world)
    log.info("landed %s at %s (%d history days seeded)", ds, path, len(seeded))
    return {"ds": ds.isoformat(), "partition": str(path), "history_days_seeded": len(seeded)}


def validate_partition(ds: dt.date, settings: Settings) -> dict[str, Any]:
    """Run the data gate; a failing partition is quarantined and DataGateFailed raised."""
    from dayloop.quality.data_gate import run_data_gate

    result = run_data_gate(ds, settings)
    log.info("data gate passed for %s", ds)
    return {"ds": ds.isoformat(), "passed": True, "checks": len(result.checks)}


def build_features(ds: dt.date, settings: Settings, master: str) -> dict[str, Any]:
    """Build the point-in-time feature set with Spark."""
    from dayloop.features import build

    info = build.build_features(ds, settings, master=master)
    return {
        "features": str(info.path),
        "n_train": int(info.n_train),
        "n_eval_users": int(info.n_eval_users),
        "window": f"{info.window_start}..{info.window_end}",
        "missing_days": [str(d) for d in info.missing_days],
        "feature_schema_hash": info.feature_schema_hash,
    }


# ----------------------------------------------------------------------------- model
def train_model(ds: dt.date, settings: Settings, features_path: str, overrides: dict | None = None) -> dict[str, Any]:
    """Train the two-tower model on the feature set; writes the bundle under models_dir."""
    from dayloop.training.train import TrainParams, train_two_tower

    params = _override(TrainParams(), overrides)
    if "shuffle_item_ids" in faults_for(ds, MODEL_FAULTS):
        log.warning("planted fault for %s: training on shuffled item ids", ds)
        params = replace(params, shuffle_item_ids=True)
    out = settings.models_dir / f"ds={ds.isoformat()}"
    result = train_two_tower(Path(features_path), out, params)
    if "serving_skew" in faults_for(ds, SERVING_FAULTS):
        from dayloop.training.bundle import plant_serving_skew

        log.warning("planted fault for %s: the serving export maps users to other users' rows", ds)
        plant_serving_skew(result.bundle_dir, seed=ds.toordinal())
    if "champion_copy" in faults_for(ds, SERVING_FAULTS):
        _plant_champion_copy(settings, ds, result.bundle_dir)
    summary = {
        "bundle": str(result.bundle_dir),
        "device": result.device,
        "params": asdict(result.params),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "step_metrics": {k: [float(x) for x in v] for k, v in result.history.items()},
    }
    (out / "train_result.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("trained %s on %s: %s", ds, result.device, summary["metrics"])
    return {"bundle": str(result.bundle_dir), "train_result": str(out / "train_result.json")}


def _plant_champion_copy(settings: Settings, ds: dt.date, bundle_dir: Path) -> None:
    """The A/A planted case: the day's bundle replaced by the champion's own, so the version
    registered next is the champion again under a new number (an identical model online)."""
    import shutil

    from dayloop.registry import CHAMPION, Registry

    reg = Registry(settings)
    champion = reg.version_for_alias(CHAMPION)
    if champion is None:
        log.warning("planted champion_copy for %s: no champion yet, the trained bundle stays", ds)
        return
    log.warning("planted case for %s: registering a copy of champion v%s's bundle (A/A)", ds, champion)
    source = reg.download_bundle(champion)
    shutil.rmtree(bundle_dir)
    shutil.copytree(source, bundle_dir)


def register_model(ds: dt.date, settings: Settings, train_out: dict, features_out: dict,
             airflow_run_id: str | None = None) -> dict[str, Any]:
    """Register the bundle as a model version with lineage tags (once per date)."""
    from dayloop.registry import (
        TAG_AIRFLOW_RUN,
        TAG_CODE_VERSION,
        TAG_DATA_WINDOW,
        TAG_SCHEMA_HASH,
        Registry,
        code_version,
    )

    summary = json.loads(Path(train_out["train_result"]).read_text())
    lineage = {
        TAG_DATA_WINDOW: features_out["window"],
        TAG_SCHEMA_HASH: features_out["feature_schema_hash"],
        TAG_CODE_VERSION: code_version(),
    }
    if airflow_run_id:
        lineage[TAG_AIRFLOW_RUN] = airflow_run_id
    params = {**summary["params"], "n_train": features_out["n_train"],
              "missing_days": ",".join(features_out["missing_days"]) or "none"}
    ref = Registry(settings).register_bundle(
        ds.isoformat(), Path(train_out["bundle"]), params, summary["metrics"], lineage,
        step_metrics=summary["step_metrics"],
    )
    return ref.as_dict()


# ----------------------------------------------------------------------------- gates
def gate_model(ds: dt.date, settings: Settings, version: int, features_path: str,
               overrides: dict | None = None) -> dict[str, Any]:
    """Challenger vs champion on the held-out day; tags and report on the version.

    Raises OfflineGateFailed (after recording the decision) when the gate says no.
    """
    from dayloop.quality import offline_gate
    from dayloop.registry import CHAMPION, Registry

    thresholds = _override(offline_gate.GateThresholds(), overrides)
    reg = Registry(settings)
    challenger_dir = reg.download_bundle(version)
    champion = reg.version_for_alias(CHAMPION)
    champion_version = champion if champion is not None and champion != version else None
    if champion is not None and champion_version is None:
        log.info("version %s is already the champion; re-checking it by the bootstrap rule", version)

    report_dir = settings.reports_dir / f"ds={ds.isoformat()}" / "offline_gate"
    gate = offline_gate.gate_model(
        challenger_dir,
        reg.download_bundle(champion_version) if champion_version else None,
        Path(features_path), report_dir, thresholds,
    )
    decision = gate.decision
    reg.log_artifacts(version, report_dir, "reports/offline_gate")
    tags = offline_gate.decision_tags(decision)
    tags["gate.offline.champion_version"] = str(champion_version) if champion_version else "none"
    tags["gate.offline.evaluated_on"] = ds.isoformat()
    reg.set_tags(version, tags)
    reg.log_metrics(version, {f"offline.{k}": v for k, v in decision.metrics.items()
                              if isinstance(v, (int, float)) and v == v})

    for reason in decision.reasons:
        log.info("offline gate: %s", reason)
    if not decision.passed:
        raise OfflineGateFailed(decision.reasons)
    return {
        "version": version,
        "passed": True,
        "bootstrap": bool(decision.bootstrap),
        "champion_version": champion_version,
        "report": str(gate.report_path),
    }


def rebuild_index(ds: dt.date, settings: Settings, version: int, features_path: str,
                  recall_floor: float = 0.95) -> dict[str, Any]:
    """FAISS index of the version's item embeddings, checked against exact search,
    attached to the version so model and index deploy as one unit. Beside it, the
    seen-items file: every user's history up to ds, which serving leaves out of their list."""
    from dayloop.features.schema import load_feature_table
    from dayloop.index.faiss_index import IndexSpec, build_and_check
    from dayloop.index.history import collect_seen
    from dayloop.registry import TAG_INDEX_PREFIX, Registry
    from dayloop.training.bundle import ModelBundle
    from serving.fileio import file_sha256
    from serving.index_service.seen import SEEN_FILE, write_seen_file

    reg = Registry(settings)
    bundle = ModelBundle.load(reg.download_bundle(version))
    eval_df = load_feature_table(Path(features_path), "eval")
    # Real queries: the user embeddings of the held-out day's users.
    queries = bundle.encode_users(eval_df["user_id"].to_numpy(), [list(h) for h in eval_df["hist"]])
    spec = None
    if "broken_index" in faults_for(ds, INDEX_FAULTS):
        n = len(bundle.item_ids)
        log.warning("planted fault for %s: IVF with one probe over %d lists", ds, max(2, n // 4))
        spec = IndexSpec(kind="ivf", nlist=max(2, n // 4), nprobe=1)
    out_dir = settings.models_dir / f"v{version}" / "index_build"
    seen = collect_seen(settings, ds, features_path)
    # Written before the meta, which names its sha256: a reader that finds the meta can
    # trust both files beside it.
    seen_file = write_seen_file(out_dir / SEEN_FILE, seen.user_ids, seen.offsets, seen.items, seen.last_day)
    seen_meta = seen.meta(file_sha256(seen_file))
    try:
        result = build_and_check(bundle.item_embeddings, bundle.item_ids, out_dir,
                                 recall_floor=recall_floor, k=INDEX_K, query_vectors=queries, spec=spec,
                                 meta_extra={"seen_items": seen_meta})
    except IndexGateFailed as exc:
        seen_file.unlink(missing_ok=True)  # a failed gate publishes nothing
        reg.set_tags(version, {f"{TAG_INDEX_PREFIX}status": "failed",
                               f"{TAG_INDEX_PREFIX}reason": "; ".join(exc.reasons)})
        raise
    uri = reg.log_artifacts(version, out_dir, "index")
    info = result.as_dict()
    reg.set_tags(version, {
        f"{TAG_INDEX_PREFIX}status": "ready",
        f"{TAG_INDEX_PREFIX}uri": uri,
        f"{TAG_INDEX_PREFIX}fingerprint": result.fingerprint,
        f"{TAG_INDEX_PREFIX}kind": result.spec.kind,
        f"{TAG_INDEX_PREFIX}recall_at_{INDEX_K}": f"{result.recall:.4f}",
        f"{TAG_INDEX_PREFIX}n_items": str(result.n_items),
        f"{TAG_INDEX_PREFIX}dim": str(result.dim),
        f"{TAG_INDEX_PREFIX}seen_last_day": seen.last_day,
    })
    log.info("index for version %s: %s recall@%d=%.4f; seen items of %d users (%d pairs) through %s",
             version, result.spec.kind, INDEX_K, result.recall, seen_meta["n_users"], seen_meta["n_pairs"],
             seen.last_day)
    return {"version": version, "index_uri": uri, "kind": result.spec.kind,
            "recall": float(result.recall), "fingerprint": result.fingerprint,
            "build_seconds": float(info.get("build_seconds", 0.0)), "seen_last_day": seen.last_day,
            "seen_pairs": seen_meta["n_pairs"]}


def publish_candidate(ds: dt.date, settings: Settings, version: int) -> dict[str, Any]:
    """Hand the gated, indexed version on.

    Bootstrap: when the model has no champion yet, the first version that passed
    the offline gate (floors, popularity baseline, infra check) and has its index
    becomes ``champion`` directly: there is nothing to canary against. Otherwise
    the version becomes ``challenger``, the candidate for the canary rollout.
    """
    from dayloop.registry import CHALLENGER, CHAMPION, TAG_GATE_DECISION, TAG_INDEX_PREFIX, TAG_PROMOTION, Registry

    reg = Registry(settings)
    tags = reg.version_tags(version)
    missing = []
    if tags.get(TAG_GATE_DECISION) != "pass":
        missing.append(f"offline gate decision is {tags.get(TAG_GATE_DECISION, 'absent')!r}")
    if tags.get(f"{TAG_INDEX_PREFIX}status") != "ready":
        missing.append("no ready index is linked to the version")
    if missing:
        raise DayloopError(f"version {version} cannot be published: " + "; ".join(missing))

    champion = reg.version_for_alias(CHAMPION)
    if champion is None:
        reg.set_alias(CHAMPION, version)
        reg.set_tags(version, {TAG_PROMOTION: "bootstrap", "dayloop.promoted_for": ds.isoformat()})
        role, champion = CHAMPION, version
    elif champion == version:
        role = CHAMPION
    else:
        reg.set_alias(CHALLENGER, version)
        reg.set_tags(version, {TAG_PROMOTION: "awaiting_canary"})
        role = CHALLENGER
    log.info("version %s is now %s", version, role)
    return {"version": version, "alias": role, "champion": champion}
