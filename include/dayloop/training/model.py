"""Two-tower retrieval model (PyTorch).

The user tower pools the history with learned per-position weights (recency-weighted:
position 0 is the most recent item). The item tower may take popularity codes (see
:func:`popularity_codes`): how popular the item was over trailing windows before the day
a training row belongs to, and before the day served at export. That is the popularity
prior: MovieLens's next day follows the last days' popularity closely (pooled over replay
days 2026-11-01..14, 60-day popularity reached 0.90x the NDCG@10 and 0.65x the recall@10
of 7-day popularity), which static id embeddings trained over 60 days cannot follow.

Index conventions (shared with :mod:`dayloop.training.bundle`): every id vocabulary
maps the id at row ``j`` of its vocab array to index ``j + 1``; index 0 is reserved for
padding / unknown and always embeds to a zero vector. Categorical feature codes come
1-based from the feature job (0 = unknown) and are used as indices directly.

This module imports torch at import time; import it only inside task bodies.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TowerConfig:
    """Sizes of the two towers. ``n_*`` of feature tables include the 0 (unknown) row."""

    n_users: int  # real users; the table has n_users + 1 rows
    n_items: int  # real items; the table has n_items + 1 rows
    n_genders: int
    n_ages: int
    n_occupations: int
    n_genres: int
    n_years: int
    max_genres: int
    history_length: int
    embedding_dim: int = 64
    feature_dim: int = 16
    hidden_dim: int = 128
    dropout: float = 0.1
    # popularity codes per item (one per trailing window; 0 = the tower has no prior)
    popularity_windows: int = 0
    popularity_buckets: int = 32
    # "recency": learned per-position history weights; "mean": the plain mean (fixed)
    history_pooling: str = "recency"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "history_pooling":
                if value not in ("recency", "mean"):
                    raise ValueError(f"history_pooling must be 'recency' or 'mean', got {value!r}")
            elif name == "dropout":
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"dropout must be in [0, 1), got {value}")
            elif name == "popularity_windows":
                if value < 0:
                    raise ValueError(f"TowerConfig.popularity_windows must be >= 0, got {value}")
            elif value <= 0:
                raise ValueError(f"TowerConfig.{name} must be positive, got {value}")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _in_range(idx: torch.Tensor, size: int) -> torch.Tensor:
    # Out-of-vocabulary codes become "unknown" (0) instead of an indexing crash: a server
    # that meets a new occupation code should degrade, not fail the request.
    return torch.where((idx >= 0) & (idx < size), idx, torch.zeros_like(idx))


def _masked_mean(emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    mask = (idx > 0).unsqueeze(-1).to(emb.dtype)
    total = (emb * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1.0)
    return total / count


def _weighted_mean(emb: torch.Tensor, idx: torch.Tensor, position_logits: torch.Tensor) -> torch.Tensor:
    # softmax-style weights over the filled positions only; equal logits give the plain mean
    weights = torch.exp(position_logits[: idx.shape[1]]).unsqueeze(0) * (idx > 0).to(emb.dtype)
    total = (emb * weights.unsqueeze(-1)).sum(dim=1)
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1e-6)


def popularity_codes(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket codes (1..n_buckets-1) of popularity counts ``[..., n_items + 1]``.

    Counts are first made relative to a uniform share of the row's total (so a day with
    half the usual volume keeps the same codes), then log-bucketed three buckets per
    doubling: code 1 = never seen in the window, higher = more popular. Code 0 stays the
    padding row of the embedding and is only used for the padding item.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_items = max(counts.shape[-1] - 1, 1)
    total = counts.sum(axis=-1, keepdims=True)
    rel = np.where(total > 0, counts * n_items / np.maximum(total, 1.0), 0.0)
    codes = 1 + np.minimum(n_buckets - 2, np.floor(3.0 * np.log2(1.0 + rel))).astype(np.int64)
    codes[..., 0] = 0
    return codes


def _embedding(rows: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(rows, dim, padding_idx=0)
    # N(0, 1) (the default) makes the MLP start saturated; a small init trains faster
    nn.init.normal_(emb.weight, std=0.05)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class UserTower(nn.Module):
    """user id + recency-weighted history item embeddings + (gender, age, occupation) -> unit D."""

    def __init__(self, cfg: TowerConfig, item_embedding: nn.Embedding) -> None:
        super().__init__()
        d, f = cfg.embedding_dim, cfg.feature_dim
        self.n_user_rows = cfg.n_users + 1
        self.n_item_rows = cfg.n_items + 1
        self.n_genders = cfg.n_genders
        self.n_ages = cfg.n_ages
        self.n_occupations = cfg.n_occupations
        self.user_embedding = _embedding(self.n_user_rows, d)
        # shared with the item tower: history and candidates live in one id space
        self.item_embedding = item_embedding
        self.gender_embedding = _embedding(cfg.n_genders, f)
        self.age_embedding = _embedding(cfg.n_ages, f)
        self.occupation_embedding = _embedding(cfg.n_occupations, f)
        # learned per-position weights of the history (position 0 = most recent); starting
        # at a gentle decay (weight halves every ~7 positions) instead of the flat mean
        recency = cfg.history_pooling == "recency"
        decay = -0.1 * torch.arange(cfg.history_length, dtype=torch.float32)
        self.position_logits = nn.Parameter(decay if recency else torch.zeros(cfg.history_length),
                                            requires_grad=recency)
        self.mlp = _mlp(2 * d + 3 * f, cfg.hidden_dim, d, cfg.dropout)

    def forward(
        self, user_idx: torch.Tensor, hist_idx: torch.Tensor, user_feats: torch.Tensor
    ) -> torch.Tensor:
        user_idx = _in_range(user_idx, self.n_user_rows)
        hist_idx = _in_range(hist_idx, self.n_item_rows)
        pooled = _weighted_mean(self.item_embedding(hist_idx), hist_idx, self.position_logits)
        gender = _in_range(user_feats[:, 0], self.n_genders)
        age = _in_range(user_feats[:, 1], self.n_ages)
        occupation = _in_range(user_feats[:, 2], self.n_occupations)
        x = torch.cat(
            [
                self.user_embedding(user_idx),
                pooled,
                self.gender_embedding(gender),
                self.age_embedding(age),
                self.occupation_embedding(occupation),
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), p=2.0, dim=1)


class ItemTower(nn.Module):
    """item id + genre bag (mean) + release-year bucket (+ popularity codes) -> unit D."""

    def __init__(self, cfg: TowerConfig, item_embedding: nn.Embedding) -> None:
        super().__init__()
        d, f = cfg.embedding_dim, cfg.feature_dim
        self.item_embedding = item_embedding
        self.genre_embedding = _embedding(cfg.n_genres, f)
        self.year_embedding = _embedding(cfg.n_years, f)
        self.popularity_embeddings = nn.ModuleList(
            [_embedding(cfg.popularity_buckets, f) for _ in range(cfg.popularity_windows)]
        )
        self.mlp = _mlp(d + (2 + cfg.popularity_windows) * f, cfg.hidden_dim, d, cfg.dropout)

    def forward(
        self,
        item_idx: torch.Tensor,
        genre_idx: torch.Tensor,
        year_idx: torch.Tensor,
        popularity_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        genres = _masked_mean(self.genre_embedding(genre_idx), genre_idx)
        parts = [self.item_embedding(item_idx), genres, self.year_embedding(year_idx)]
        if len(self.popularity_embeddings):
            if popularity_idx is None:
                raise ValueError("this item tower needs popularity codes")
            parts += [emb(popularity_idx[..., w]) for w, emb in enumerate(self.popularity_embeddings)]
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), p=2.0, dim=-1)


class TwoTowerModel(nn.Module):
    """Both towers plus the item feature tables, indexed by item index (row 0 = padding)."""

    def __init__(
        self,
        cfg: TowerConfig,
        item_genres: torch.Tensor,
        item_years: torch.Tensor,
        item_popularity: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if tuple(item_genres.shape) != (cfg.n_items + 1, cfg.max_genres):
            raise ValueError(
                f"item_genres must be [{cfg.n_items + 1}, {cfg.max_genres}], "
                f"got {list(item_genres.shape)}"
            )
        if tuple(item_years.shape) != (cfg.n_items + 1,):
            raise ValueError(f"item_years must be [{cfg.n_items + 1}], got {list(item_years.shape)}")
        self.cfg = cfg
        shared = _embedding(cfg.n_items + 1, cfg.embedding_dim)
        self.user_tower = UserTower(cfg, shared)
        self.item_tower = ItemTower(cfg, shared)
        self.register_buffer("item_genres", item_genres.to(torch.long))
        self.register_buffer("item_years", item_years.to(torch.long))
        # the popularity codes the exported item vectors use (as of the served day)
        if item_popularity is None:
            item_popularity = torch.ones(cfg.n_items + 1, cfg.popularity_windows, dtype=torch.long)
        if tuple(item_popularity.shape) != (cfg.n_items + 1, cfg.popularity_windows):
            raise ValueError(
                f"item_popularity must be [{cfg.n_items + 1}, {cfg.popularity_windows}], "
                f"got {list(item_popularity.shape)}"
            )
        self.register_buffer("item_popularity", item_popularity.to(torch.long))

    def item_vectors(self, item_idx: torch.Tensor, popularity: torch.Tensor | None = None) -> torch.Tensor:
        """Unit item vectors for item indices (features looked up from the buffers).

        ``popularity`` ([n_items + 1, windows] codes) replaces the exported codes, e.g. with
        those of a training row's day."""
        table = self.item_popularity if popularity is None else popularity
        return self.item_tower(
            item_idx, self.item_genres[item_idx], self.item_years[item_idx], table[item_idx]
        )

    @torch.no_grad()
    def all_item_vectors(self, batch_size: int = 8192) -> torch.Tensor:
        """Vectors of items 1..n_items (row j = item index j + 1), in eval mode."""
        was_training = self.training
        self.eval()
        device = self.item_genres.device
        out = []
        for start in range(1, self.cfg.n_items + 1, batch_size):
            stop = min(start + batch_size, self.cfg.n_items + 1)
            out.append(self.item_vectors(torch.arange(start, stop, device=device)))
        self.train(was_training)
        return torch.cat(out, dim=0)


def _weighted_mean_loss(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def full_softmax_loss(
    user_vec: torch.Tensor,
    all_item_vec: torch.Tensor,
    item_idx: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the whole catalogue: row i's positive is item index ``item_idx[i]``.

    ``all_item_vec`` holds items 1..n_items (row j = index j + 1). Every other item is a
    negative exactly once, so no sampling correction is needed (in-batch negatives need
    logQ and still over- or under-penalise popular items). ``weights`` (per row) turn the
    mean into a weighted mean.
    """
    logits = user_vec @ all_item_vec.T / temperature
    return _weighted_mean_loss(F.cross_entropy(logits, item_idx - 1, reduction="none"), weights)


def in_batch_softmax_loss(
    user_vec: torch.Tensor,
    item_vec: torch.Tensor,
    item_idx: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives.

    Row i's positive is column i. Other columns holding the same item are masked (they
    are not negatives, just duplicates). ``log_q[item_idx]`` (log sampling probability of
    each item as an in-batch candidate) is subtracted from the logits, the logQ correction
    that stops popular items from being over-penalised as negatives.
    """
    logits = user_vec @ item_vec.T / temperature
    if log_q is not None:
        logits = logits - log_q[item_idx].unsqueeze(0)
    duplicate = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return _weighted_mean_loss(F.cross_entropy(logits, labels, reduction="none"), weights)
