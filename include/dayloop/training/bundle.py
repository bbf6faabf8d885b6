"""The exported model bundle: what is logged to MLflow, indexed by FAISS and served.

Layout of a bundle directory (format version 1)::

    user_tower.pt        TorchScript; forward(user_idx int64[B], hist_idx int64[B, L],
                         user_feats int64[B, 3]) -> float32[B, D], rows L2-normalised.
                         Loads with plain ``torch.jit.load`` (no dayloop import needed).
    item_embeddings.npy  float32 [n_items, D], L2-normalised, row j = item_ids[j]
    item_ids.npy         int64 [n_items]
    user_ids.npy         int64 [n_users]
    user_features.npy    int64 [n_users, 3] (gender_idx, age_idx, occupation_idx) of user_ids[j]
    user_history.npy     int64 [n_users, L] model item indices: each user's history as of the
                         end of the training window (the serving-time feature snapshot)
    serving_tower.pt     TorchScript; forward(user_id int64[B, 1]) -> float32[B, D]: the user
                         tower with the id lookup, feature table and history snapshot built in,
                         so a server needs nothing but this file (Triton runs it as is)
    model_meta.json      shapes, names, vocab conventions, feature_schema_hash, train params

Index convention: the id at row j of ``user_ids``/``item_ids`` has model index j + 1;
index 0 means unknown user / padding or unknown history item and embeds to zero.
``hist_idx`` rows are most-recent-first and right-padded with 0. Scores are dot products
(= cosine similarity) between a user vector and ``item_embeddings``.

Consumers use :class:`ModelBundle`, never the raw files.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# The file names have their home in dayloop.bundle_layout (the rollout reads bundles but
# must not import training); re-exported here for the writer and ModelBundle's users.
from dayloop.bundle_layout import (
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    MODEL_META_FILE,
    SERVING_TOWER_FILE,
    USER_FEATURES_FILE,
    USER_HISTORY_FILE,
    USER_IDS_FILE,
    USER_TOWER_FILE,
)
from serving.fileio import atomic_write_bytes, replace_dir

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dayloop.training.model import TowerConfig, TwoTowerModel

INPUT_NAMES = ("user_idx", "hist_idx", "user_feats")
OUTPUT_NAME = "user_embedding"


def _check_vocab(ids: np.ndarray, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{name} contains duplicate ids")
    return ids.astype(np.int64)


def export_bundle(
    model: TwoTowerModel,
    user_ids: np.ndarray,
    user_features: np.ndarray,
    item_ids: np.ndarray,
    out_dir: Path,
    extra_meta: dict[str, Any] | None = None,
    user_history: np.ndarray | None = None,
) -> Path:
    """Write the bundle for a trained model to ``out_dir`` atomically and return it.

    The user tower is compiled with ``torch.jit.script`` and checked against the eager
    model on a sample batch before anything becomes visible at ``out_dir``.
    ``user_history`` ([n_users, L] model item indices, row j = user_ids[j]) is the history
    snapshot the serving tower looks users up in; absent, served users get no history.
    """
    import torch

    cfg = model.cfg
    user_ids = _check_vocab(user_ids, "user_ids")
    item_ids = _check_vocab(item_ids, "item_ids")
    user_features = np.asarray(user_features, dtype=np.int64)
    if user_ids.size != cfg.n_users or item_ids.size != cfg.n_items:
        raise ValueError(
            f"vocab sizes ({user_ids.size} users, {item_ids.size} items) do not match the "
            f"model ({cfg.n_users} users, {cfg.n_items} items)"
        )
    if user_features.shape != (cfg.n_users, 3):
        raise ValueError(f"user_features must be [{cfg.n_users}, 3], got {list(user_features.shape)}")
    if user_history is None:
        user_history = np.zeros((cfg.n_users, cfg.history_length), dtype=np.int64)
    user_history = np.asarray(user_history, dtype=np.int64)
    if user_history.shape != (cfg.n_users, cfg.history_length):
        raise ValueError(f"user_history must be [{cfg.n_users}, {cfg.history_length}], "
                         f"got {list(user_history.shape)}")
    if user_history.size and (user_history.min() < 0 or user_history.max() > cfg.n_items):
        raise ValueError(f"user_history holds item indices outside 0..{cfg.n_items}")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        model = model.to("cpu").eval()
        with torch.no_grad():
            item_emb = model.all_item_vectors().numpy().astype(np.float32)
        scripted = torch.jit.script(model.user_tower)
        _verify_scripted(scripted, model, cfg, user_features)
        scripted.save(str(tmp / USER_TOWER_FILE))
        serving = build_serving_tower(scripted, user_ids, user_features, user_history)
        _verify_serving(serving, scripted, user_ids, user_features, user_history)
        serving.save(str(tmp / SERVING_TOWER_FILE))
        np.save(tmp / USER_HISTORY_FILE, np.ascontiguousarray(user_history))
        np.save(tmp / ITEM_EMBEDDINGS_FILE, np.ascontiguousarray(item_emb))
        np.save(tmp / ITEM_IDS_FILE, item_ids)
        np.save(tmp / USER_IDS_FILE, user_ids)
        np.save(tmp / USER_FEATURES_FILE, np.ascontiguousarray(user_features))
        meta = _bundle_meta(cfg, torch.__version__)
        meta.update(extra_meta or {})
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _bundle_meta(cfg: TowerConfig, torch_version: str) -> dict[str, Any]:
    """model_meta.json before the caller's ``extra_meta``: shapes, names and vocab conventions."""
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "embedding_dim": cfg.embedding_dim,
        "history_length": cfg.history_length,
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "inputs": [
            {"name": "user_idx", "dtype": "int64", "shape": [-1]},
            {"name": "hist_idx", "dtype": "int64", "shape": [-1, cfg.history_length]},
            {"name": "user_feats", "dtype": "int64", "shape": [-1, 3]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, cfg.embedding_dim]}],
        "serving": {
            "file": SERVING_TOWER_FILE,
            "inputs": [{"name": "user_id", "dtype": "int64", "shape": [-1, 1]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, cfg.embedding_dim]}],
            "history": "snapshot as of the end of the training window (user_history.npy)",
        },
        "user_feature_columns": ["gender_idx", "age_idx", "occupation_idx"],
        "feature_vocab_sizes": {
            "gender_idx": cfg.n_genders,
            "age_idx": cfg.n_ages,
            "occupation_idx": cfg.n_occupations,
            "genre_ids": cfg.n_genres,
            "year_idx": cfg.n_years,
        },
        "vocab": {
            "index_offset": 1,
            "unknown_index": 0,
            "padding_index": 0,
            "user_index": "user_ids.npy row j -> index j + 1; unknown user -> 0",
            "item_index": "item_ids.npy row j -> index j + 1; padding/unknown -> 0",
            "hist_order": "most recent first, right-padded with 0",
            "score": "dot product of unit vectors (cosine)",
        },
        "tower_config": cfg.as_dict(),
        "torch_version": torch_version,
    }


def plant_serving_skew(bundle_dir: Path | str, seed: int = 0) -> None:
    """Planted fault (tests, demos): rewrite the bundle's serving tower so that each user id
    looks up another user's row. Every file but ``serving_tower.pt`` stays as exported."""
    import torch

    bundle_dir = Path(bundle_dir)
    user_ids = np.load(bundle_dir / USER_IDS_FILE)
    shuffled = np.random.default_rng(seed).permutation(user_ids)
    tower = torch.jit.load(str(bundle_dir / USER_TOWER_FILE))
    serving = build_serving_tower(tower, shuffled, np.load(bundle_dir / USER_FEATURES_FILE),
                                  np.load(bundle_dir / USER_HISTORY_FILE))
    buffer = io.BytesIO()
    torch.jit.save(serving, buffer)
    atomic_write_bytes(bundle_dir / SERVING_TOWER_FILE, buffer.getvalue())


def build_serving_tower(
    user_tower: Any, user_ids: np.ndarray, user_features: np.ndarray, user_history: np.ndarray
) -> Any:
    """Script a module mapping raw user ids to embeddings: lookup tables + the user tower.

    Unknown ids map to index 0 (no id embedding, unknown features, empty history), the same
    convention as :meth:`ModelBundle.prepare_inputs`.
    """
    import torch

    class ServingTower(torch.nn.Module):
        def __init__(self, tower: Any, sorted_ids: Any, order: Any, features: Any, history: Any) -> None:
            super().__init__()
            self.tower = tower
            self.register_buffer("sorted_ids", sorted_ids)
            self.register_buffer("order", order)
            self.register_buffer("features", features)
            self.register_buffer("history", history)

        def forward(self, user_id: torch.Tensor) -> torch.Tensor:
            ids = user_id.reshape(-1).to(torch.int64)
            n = self.sorted_ids.numel()
            pos = torch.searchsorted(self.sorted_ids, ids).clamp(max=n - 1)
            found = self.sorted_ids[pos] == ids
            idx = torch.where(found, self.order[pos] + 1, torch.zeros_like(ids))
            return self.tower(idx, self.history[idx], self.features[idx])

    order = np.argsort(user_ids, kind="stable")
    pad = np.zeros((1, user_history.shape[1]), dtype=np.int64)
    module = ServingTower(
        user_tower,
        torch.from_numpy(np.ascontiguousarray(user_ids[order])),
        torch.from_numpy(order.astype(np.int64)),
        torch.from_numpy(np.vstack([np.zeros((1, 3), np.int64), user_features])),
        torch.from_numpy(np.vstack([pad, user_history])),
    ).eval()
    return torch.jit.script(module)


def _verify_serving(serving: Any, tower: Any, user_ids: np.ndarray, user_features: np.ndarray,
                    user_history: np.ndarray) -> None:
    """The serving tower must equal the user tower fed the same lookups (and map unknowns to 0)."""
    import torch

    rng = np.random.default_rng(0)
    rows = rng.choice(user_ids.size, size=min(64, user_ids.size), replace=False)
    unknown = np.setdiff1d(np.array([-1, 0, int(user_ids.max()) + 1], dtype=np.int64), user_ids)
    ids = np.r_[user_ids[rows], unknown].astype(np.int64)
    idx = np.r_[rows + 1, np.zeros(unknown.size, dtype=np.int64)]
    feats = np.vstack([np.zeros((1, 3), np.int64), user_features])[idx]
    hist = np.vstack([np.zeros((1, user_history.shape[1]), np.int64), user_history])[idx]
    with torch.no_grad():
        want = tower(torch.from_numpy(idx), torch.from_numpy(hist), torch.from_numpy(feats))
        got = serving(torch.from_numpy(ids).reshape(-1, 1))
    if not torch.allclose(want, got, atol=1e-6):
        raise RuntimeError("serving tower disagrees with the user tower on the same lookups")


def _verify_scripted(scripted: Any, model: TwoTowerModel, cfg: Any, user_features: np.ndarray) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    b = min(64, max(cfg.n_users, 1))
    user_idx = torch.randint(0, cfg.n_users + 1, (b,), generator=gen)
    hist = torch.randint(0, cfg.n_items + 1, (b, cfg.history_length), generator=gen)
    feats_table = torch.from_numpy(np.vstack([np.zeros((1, 3), np.int64), user_features]))
    feats = feats_table[user_idx]
    with torch.no_grad():
        eager = model.user_tower(user_idx, hist, feats)
        compiled = scripted(user_idx, hist, feats)
    if not torch.allclose(eager, compiled, atol=1e-5):
        raise RuntimeError("TorchScript user tower disagrees with the eager model")


class _IdLookup:
    """Vectorised id -> index (row + 1, 0 when unknown) over a vocab array."""

    def __init__(self, ids: np.ndarray) -> None:
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if self._sorted.size == 0 or ids.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos_c = np.minimum(pos, self._sorted.size - 1)
        found = self._sorted[pos_c] == ids
        return np.where(found, self._order[pos_c] + 1, 0).astype(np.int64)


class ModelBundle:
    """A loaded bundle: id mapping, feature lookup and the TorchScript user tower."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        user_tower: Any,
        item_ids: np.ndarray,
        item_embeddings: np.ndarray,
        user_ids: np.ndarray,
        user_features: np.ndarray,
    ) -> None:
        self.path = Path(path)
        self.meta = meta
        self.user_tower = user_tower
        self.item_ids = item_ids
        self.item_embeddings = item_embeddings
        self.user_ids = user_ids
        self.user_features = user_features
        self.embedding_dim = int(meta["embedding_dim"])
        self.history_length = int(meta["history_length"])
        self._users = _IdLookup(user_ids)
        self._items = _IdLookup(item_ids)
        # row 0 = unknown user -> all feature codes unknown
        self._features_by_index = np.vstack([np.zeros((1, 3), np.int64), user_features])

    @classmethod
    def load(cls, path: Path | str) -> ModelBundle:
        """Load and validate a bundle directory (ValueError naming what is wrong)."""
        import torch

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model bundle {path} does not exist or is not a directory")
        missing = [name for name in BUNDLE_FILES if not (path / name).is_file()]
        if missing:
            raise ValueError(f"model bundle {path} lacks {', '.join(missing)}")
        try:
            meta = json.loads((path / MODEL_META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / MODEL_META_FILE} is not valid JSON: {exc}") from exc
        if meta.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"{path}: bundle format {meta.get('format_version')!r} is not "
                f"{BUNDLE_FORMAT_VERSION}"
            )
        try:
            item_emb = np.load(path / ITEM_EMBEDDINGS_FILE, allow_pickle=False)
            item_ids = np.load(path / ITEM_IDS_FILE, allow_pickle=False)
            user_ids = np.load(path / USER_IDS_FILE, allow_pickle=False)
            user_features = np.load(path / USER_FEATURES_FILE, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"model bundle {path}: unreadable array file: {exc}") from exc
        d, n_items, n_users = int(meta["embedding_dim"]), int(meta["n_items"]), int(meta["n_users"])
        problems = []
        if item_emb.dtype != np.float32 or item_emb.shape != (n_items, d):
            problems.append(f"item_embeddings is {item_emb.dtype}{list(item_emb.shape)}, "
                            f"expected float32[{n_items}, {d}]")
        if item_ids.dtype != np.int64 or item_ids.shape != (n_items,):
            problems.append(f"item_ids is {item_ids.dtype}{list(item_ids.shape)}, expected int64[{n_items}]")
        if user_ids.dtype != np.int64 or user_ids.shape != (n_users,):
            problems.append(f"user_ids is {user_ids.dtype}{list(user_ids.shape)}, expected int64[{n_users}]")
        if user_features.dtype != np.int64 or user_features.shape != (n_users, 3):
            problems.append(f"user_features is {user_features.dtype}{list(user_features.shape)}, "
                            f"expected int64[{n_users}, 3]")
        if problems:
            raise ValueError(f"model bundle {path} is inconsistent: " + "; ".join(problems))
        try:
            tower = torch.jit.load(str(path / USER_TOWER_FILE), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError/ValueError variants
            raise ValueError(f"model bundle {path}: cannot load {USER_TOWER_FILE}: {exc}") from exc
        tower.eval()
        return cls(path, meta, tower, item_ids, item_emb, user_ids, user_features)

    @property
    def serving_tower_path(self) -> Path:
        """The file a model server loads: raw user id -> embedding."""
        return self.path / SERVING_TOWER_FILE

    @property
    def n_items(self) -> int:
        return int(self.item_ids.size)

    def user_index(self, user_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Model indices of user ids (0 for unknown users)."""
        return self._users(np.asarray(user_ids, dtype=np.int64))

    def item_index(self, item_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Model indices of item ids (0 for unknown items); row in item_embeddings = index - 1."""
        return self._items(np.asarray(item_ids, dtype=np.int64))

    def prepare_inputs(
        self, user_ids: np.ndarray | Sequence[int], hists: Sequence[Sequence[int] | None]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_idx[B], hist_idx[B, L], user_feats[B, 3]) exactly as the TorchScript wants."""
        user_ids = np.asarray(user_ids, dtype=np.int64).ravel()
        if len(hists) != user_ids.size:
            raise ValueError(f"{user_ids.size} user ids but {len(hists)} histories")
        user_idx = self.user_index(user_ids)
        length = self.history_length
        hist_idx = np.zeros((user_ids.size, length), dtype=np.int64)
        trimmed = [np.asarray([] if h is None else list(h)[:length], dtype=np.int64) for h in hists]
        lens = np.fromiter((t.size for t in trimmed), dtype=np.int64, count=len(trimmed))
        if lens.sum():
            flat = self.item_index(np.concatenate(trimmed))
            rows = np.repeat(np.arange(user_ids.size), lens)
            cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
            hist_idx[rows, cols] = flat
        feats = self._features_by_index[user_idx]
        return user_idx, hist_idx, feats

    def encode_users(
        self,
        user_ids: np.ndarray | Sequence[int],
        hists: Sequence[Sequence[int] | None],
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Unit user vectors float32[B, D] for raw user ids and most-recent-first histories."""
        import torch

        user_idx, hist_idx, feats = self.prepare_inputs(user_ids, hists)
        out = np.empty((user_idx.size, self.embedding_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, user_idx.size, batch_size):
                sl = slice(start, start + batch_size)
                vec = self.user_tower(
                    torch.from_numpy(user_idx[sl]),
                    torch.from_numpy(hist_idx[sl]),
                    torch.from_numpy(feats[sl]),
                )
                out[sl] = vec.numpy()
        return out
