"""The simulator's ground truth for a rollout: what each version truly earns from the panel.

The user simulator clicks by a known model (:mod:`serving.simulator.core`) against each panel
user's relevant items (their real held-out future ratings, :mod:`dayloop.simulation.panel`),
and draws its users uniformly from the panel. So a version's mean expected clicks per list
over the whole panel is known exactly, without sampling noise and without the canary's bucket
split: it is the quantity the online CTR test estimates, and comparing it with the rollout's
decision says whether that decision was right.

What a version serves a user is recomputed from the version's registered bundle: its serving
tower (``serving_tower.pt``, the very file Triton runs: raw user id -> vector, with the feature
table and history snapshot built in, so a planted training-serving skew shows up here as it
does online), then the top-k items by exact inner product over the bundle's item embeddings,
k = the simulator's k (10). The served FAISS index is checked by ``rebuild_index`` to recall
>= 0.95 of this exact search (and is exact itself below 50k items, so for MovieLens' 3,706
movies the lists are the served ones). Seen items: when the version's index artifact (tag
``dayloop.index.uri``) holds the seen-items file of :mod:`serving.index_service.seen`, each
user's seen items are excluded as the index service excludes them; an artifact without it
served them, and the truth says so (``excluded_seen=False``).

Bundle files are read by name (:mod:`dayloop.bundle_layout`), not through
``dayloop.training``'s ModelBundle: the rollout report imports this module, and the layering
contract (pyproject.toml) forbids the rollout any import path to ``dayloop.training``.

Only simulated deployments (the demo, the tests) have a panel file; production has no truth.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.simulator.core import DEFAULT_P_NOISE, DEFAULT_P_RELEVANT, expected_clicks

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dayloop.config import Settings
    from dayloop.registry import Registry
    from dayloop.simulation.panel import Panel
    from serving.index_service.seen import SeenItems

# The k the demo's simulator asks the routers for (serving.launch DataPlane.start_simulator's
# default, the simulator CLI's --k default).
SIMULATOR_K = 10
PANEL_FILE = "panel.npz"
SEEN_CACHE = "truth_seen"
CTR_CHECK = "ctr"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"
# Users scored per block: bounds the (users x items) score matrix.
_BLOCK = 1024


@dataclass(frozen=True, eq=False)
class VersionTruth:
    """One version's expected clicks per list over the whole panel (``per_user`` aligned with
    ``user_ids``, the panel's sorted users)."""

    version: int
    n_users: int
    mean_expected_clicks: float
    per_user: np.ndarray
    excluded_seen: bool
    user_ids: np.ndarray
    k: int = SIMULATOR_K

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-user arrays)."""
        return {"version": self.version, "n_users": self.n_users, "k": self.k,
                "mean_expected_clicks": self.mean_expected_clicks, "excluded_seen": self.excluded_seen}


def panel_path(settings: Settings) -> Path:
    """Where a simulated deployment keeps the simulator's panel: ``<home>/serving/panel.npz``."""
    return Path(settings.home) / "serving" / PANEL_FILE


# --------------------------------------------------------------------------- pure parts


def _check_arrays(user_vectors: np.ndarray, item_embeddings: np.ndarray, item_ids: np.ndarray,
                  n_users: int) -> None:
    problems = []
    if user_vectors.ndim != 2 or user_vectors.shape[0] != n_users:
        problems.append(f"user vectors are {list(user_vectors.shape)}, expected [{n_users}, D]")
    if item_embeddings.ndim != 2 or item_embeddings.shape[0] == 0:
        problems.append(f"item embeddings are {list(item_embeddings.shape)}, expected [n_items > 0, D]")
    elif user_vectors.ndim == 2 and item_embeddings.shape[1] != user_vectors.shape[1]:
        problems.append(f"user vectors have width {user_vectors.shape[1]}, item embeddings "
                        f"{item_embeddings.shape[1]}")
    if item_ids.ndim != 1 or item_ids.shape[0] != item_embeddings.shape[0]:
        problems.append(f"{item_ids.size} item ids for {item_embeddings.shape[0]} item embeddings")
    if problems:
        raise ValueError("; ".join(problems))
    if not np.isfinite(item_embeddings).all():
        raise ValueError("item embeddings hold non-finite values")
    bad = int((~np.isfinite(user_vectors).all(axis=1)).sum())
    if bad:
        # Such a user is answered by the stable version (the router's fallback): the
        # version's own lists are not what the users saw.
        raise ValueError(f"{bad} of {n_users} panel users get a non-finite vector: the version "
                         "cannot serve them")


def top_k_lists(user_ids: np.ndarray, user_vectors: np.ndarray, item_embeddings: np.ndarray,
                item_ids: np.ndarray, k: int = SIMULATOR_K,
                seen: SeenItems | None = None) -> list[np.ndarray]:
    """Per user, the item ids of the top ``k`` by exact inner product, best first, leaving out
    ``seen.items_for(user)`` when given (a user with fewer unseen items gets a shorter list)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    user_ids = np.asarray(user_ids, dtype=np.int64)
    user_vectors = np.asarray(user_vectors, dtype=np.float32)
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    _check_arrays(user_vectors, item_embeddings, item_ids, user_ids.size)
    top = min(k, item_ids.size)
    lists: list[np.ndarray] = []
    for lo in range(0, user_ids.size, _BLOCK):
        scores = user_vectors[lo:lo + _BLOCK] @ item_embeddings.T
        if seen is not None:
            for row, user in enumerate(user_ids[lo:lo + _BLOCK].tolist()):
                scores[row, np.isin(item_ids, seen.items_for(user))] = -np.inf
        cols = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        for row in range(cols.shape[0]):
            best = cols[row][np.argsort(-scores[row, cols[row]], kind="stable")]
            lists.append(item_ids[best[np.isfinite(scores[row, best])]])
    return lists


def expected_clicks_per_user(lists: Sequence[np.ndarray], relevant: Sequence[np.ndarray],
                             p_relevant: float = DEFAULT_P_RELEVANT,
                             p_noise: float = DEFAULT_P_NOISE) -> np.ndarray:
    """Expected clicks of each user's list against that user's relevant items (the simulator's
    click model, :func:`serving.simulator.core.expected_clicks`)."""
    if len(lists) != len(relevant):
        raise ValueError(f"{len(lists)} lists for {len(relevant)} users")
    return np.array([expected_clicks(items.tolist(), frozenset(rel.tolist()), p_relevant, p_noise)
                     for items, rel in zip(lists, relevant, strict=True)], dtype=np.float64)


def truth_from_arrays(version: int, panel: Panel, user_vectors: np.ndarray, item_embeddings: np.ndarray,
                      item_ids: np.ndarray, k: int = SIMULATOR_K, seen: SeenItems | None = None,
                      p_relevant: float = DEFAULT_P_RELEVANT,
                      p_noise: float = DEFAULT_P_NOISE) -> VersionTruth:
    """A version's truth from its arrays: ``user_vectors`` row i is ``panel.user_ids[i]``."""
    lists = top_k_lists(panel.user_ids, user_vectors, item_embeddings, item_ids, k, seen)
    per_user = expected_clicks_per_user(lists, panel.relevant, p_relevant, p_noise)
    return VersionTruth(version=int(version), n_users=panel.n_users, mean_expected_clicks=float(per_user.mean()),
                        per_user=per_user, excluded_seen=seen is not None, user_ids=panel.user_ids, k=k)


def true_ratio(canary: VersionTruth, control: VersionTruth) -> float:
    """Canary's mean expected clicks per list over control's, on the same panel and k."""
    if canary.k != control.k:
        raise ValueError(f"truths for different k: canary {canary.k}, control {control.k}")
    if not np.array_equal(canary.user_ids, control.user_ids):
        raise ValueError(f"truths over different panels: canary {canary.n_users} users, "
                         f"control {control.n_users}")
    if not control.mean_expected_clicks > 0:
        raise ValueError(f"control v{control.version} earns no expected click: the ratio is undefined")
    return canary.mean_expected_clicks / control.mean_expected_clicks


@dataclass(frozen=True)
class TruthVerdict:
    """The truth set beside the rollout's decision. ``agrees`` is None when the decision was
    not a CTR decision (an operational guardrail, a manual abort, a failed run)."""

    canary: int
    control: int
    n_users: int
    ratio: float
    floor: float
    expected: str
    outcome: str
    ctr_decision: bool
    agrees: bool | None
    sentence: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def _decision_text(outcome: str, failed_checks: Sequence[str]) -> tuple[str, bool]:
    """(what the rollout decided, in words; whether the CTR test made that decision)."""
    others = [c for c in failed_checks if c != CTR_CHECK]
    if outcome == PROMOTED:
        return "promoted", True
    if outcome == ROLLED_BACK and CTR_CHECK in failed_checks:
        return "rolled back by the CTR test" + (f" (also failed: {', '.join(others)})" if others else ""), True
    if outcome == ROLLED_BACK and others:
        return f"rolled back on {', '.join(others)}", False
    if outcome == ROLLED_BACK:
        return "rolled back without a failed check (inconclusive up to the step's maximum bake)", False
    if outcome == "aborted":
        return "aborted (a manual rollback took the route table)", False
    return f"{outcome.replace('_', ' ')} (the run failed before or during its rollout)", False


def _ratio_text(ratio: float, floor: float) -> str:
    """``ratio`` with just enough decimals (3 to 6) that its side of ``floor`` shows: never
    "0.980 (floor 0.98): rollback expected"."""
    for d in range(3, 7):
        text = f"{ratio:.{d}f}"
        if (float(text) >= floor) == (ratio >= floor):
            break
    return text


def _check_decision(ctr_margin: float, outcome: str) -> None:
    if isinstance(ctr_margin, bool) or not isinstance(ctr_margin, (int, float)) \
            or not math.isfinite(ctr_margin) or not 0 <= ctr_margin < 1:
        raise ValueError(f"ctr_margin must be a number in [0, 1), got {ctr_margin!r}")
    if not isinstance(outcome, str) or not outcome:
        raise ValueError(f"outcome must be a non-empty string, got {outcome!r}")


def judge(canary: VersionTruth, control: VersionTruth, ctr_margin: float, outcome: str,
          failed_checks: Sequence[str] = ()) -> TruthVerdict:
    """Set the rollout's ``outcome`` (promoted, rolled_back, aborted, failed) and the names of
    the checks that failed its last step beside the truth. Promotion is expected when the true
    ratio is at least ``1 - ctr_margin`` (the plan's threshold), rollback otherwise."""
    _check_decision(ctr_margin, outcome)
    ratio = true_ratio(canary, control)
    floor = 1.0 - float(ctr_margin)
    expected = PROMOTED if ratio >= floor else ROLLED_BACK
    decided, by_ctr = _decision_text(outcome, failed_checks)
    agrees = (outcome == expected) if by_ctr else None
    head = (f"true CTR ratio v{canary.version}/v{control.version} over all {canary.n_users} panel users "
            f"{_ratio_text(ratio, floor)} (floor {floor:g} = 1 - ctr_margin): "
            f"{'promotion' if expected == PROMOTED else 'rollback'} expected; decision: {decided}")
    if agrees is None:
        tail = " — not a CTR decision: the truth concerns CTR only"
    else:
        tail = f" — the decision {'agrees with' if agrees else 'DISAGREES with'} the truth"
    unexcluded = [f"v{t.version}" for t in (canary, control) if not t.excluded_seen]
    note = (f" ({' and '.join(unexcluded)} without seen-item exclusion: no seen-items file in the "
            "index artifact)") if unexcluded else ""
    return TruthVerdict(canary=canary.version, control=control.version, n_users=canary.n_users, ratio=ratio,
                        floor=floor, expected=expected, outcome=outcome, ctr_decision=by_ctr, agrees=agrees,
                        sentence=head + tail + note)


def truth_sentence(canary: VersionTruth, control: VersionTruth, ctr_margin: float, outcome: str,
                   failed_checks: Sequence[str] = ()) -> str:
    """The one sentence of :func:`judge`."""
    return judge(canary, control, ctr_margin, outcome, failed_checks).sentence


# --------------------------------------------------------------------------- registry


def serving_vectors(serving_tower: Path, user_ids: np.ndarray) -> np.ndarray:
    """User vectors float32[B, D] from a bundle's serving tower, exactly as Triton computes them."""
    import torch

    tower = torch.jit.load(str(serving_tower), map_location="cpu").eval()
    ids = torch.from_numpy(np.ascontiguousarray(user_ids, dtype=np.int64).reshape(-1, 1))
    with torch.inference_mode():
        return tower(ids).numpy().astype(np.float32)


def _seen_items(reg: Registry, version: int) -> SeenItems | None:
    """The seen items of the version's index artifact, None when the artifact has no such file."""
    import mlflow.artifacts

    from dayloop.registry import TAG_INDEX_PREFIX
    from serving.index_service.seen import SEEN_FILE, read_seen_file

    uri = reg.version_tags(version).get(f"{TAG_INDEX_PREFIX}uri")
    if not uri:
        raise ValueError(f"version {version} has no index artifact (tag {TAG_INDEX_PREFIX}uri): "
                         "it was never servable")
    names = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=reg.uri)}
    if SEEN_FILE not in names:
        return None
    local = reg.settings.models_dir / f"v{version}" / SEEN_CACHE / SEEN_FILE
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        # Downloaded aside, then renamed: an interrupted download never passes for the file.
        tmp = Path(tempfile.mkdtemp(prefix=".seen-", dir=local.parent))
        try:
            got = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{SEEN_FILE}",
                                                      dst_path=str(tmp), tracking_uri=reg.uri)
            os.replace(got, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return read_seen_file(local)


def version_truth(settings: Settings, version: int, panel: Panel, k: int = SIMULATOR_K,
                  p_relevant: float = DEFAULT_P_RELEVANT, p_noise: float = DEFAULT_P_NOISE,
                  registry: Registry | None = None, seen_from: int | None = None) -> VersionTruth:
    """The truth of a registered version over ``panel``: its bundle's serving tower and item
    embeddings, excluding the seen items of its own index artifact, or of version
    ``seen_from``'s (during a canary both arms exclude the canary's, fresher, history: the
    deploy switches the champion to it, so that is what the champion's users were shown)."""
    from dayloop.bundle_layout import ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE, SERVING_TOWER_FILE
    from dayloop.registry import Registry

    reg = registry or Registry(settings)
    seen = _seen_items(reg, version if seen_from is None else seen_from)
    bundle = reg.download_bundle(version)
    missing = [n for n in (SERVING_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE) if not (bundle / n).is_file()]
    if missing:
        raise ValueError(f"version {version}'s bundle {bundle} lacks {', '.join(missing)}")
    vectors = serving_vectors(bundle / SERVING_TOWER_FILE, panel.user_ids)
    item_embeddings = np.load(bundle / ITEM_EMBEDDINGS_FILE, allow_pickle=False)
    item_ids = np.load(bundle / ITEM_IDS_FILE, allow_pickle=False)
    return truth_from_arrays(version, panel, vectors, item_embeddings, item_ids, k, seen, p_relevant, p_noise)


def judge_rollout(settings: Settings, canary: int, control: int, ctr_margin: float, outcome: str,
                  failed_checks: Sequence[str] = (), panel_file: Path | None = None,
                  k: int = SIMULATOR_K) -> TruthVerdict | None:
    """The truth of a rollout of ``canary`` against ``control`` beside its decision; None when
    there is no panel file (``panel_path(settings)`` unless given): no simulated users, no truth."""
    from dayloop.registry import Registry
    from dayloop.simulation.panel import read_panel

    _check_decision(ctr_margin, outcome)
    path = Path(panel_file) if panel_file is not None else panel_path(settings)
    if not path.is_file():
        return None
    panel = read_panel(path)
    reg = Registry(settings)
    # Both arms as they were served during the canary: the canary's seen set for both.
    truths = [version_truth(settings, v, panel, k, registry=reg, seen_from=canary) for v in (canary, control)]
    return judge(truths[0], truths[1], ctr_margin, outcome, failed_checks)
