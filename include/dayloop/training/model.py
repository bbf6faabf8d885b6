"""Two-tower retrieval model (PyTorch).

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

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "dropout":
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"dropout must be in [0, 1), got {value}")
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
    """user id + mean-pooled history item embeddings + (gender, age, occupation) -> unit D."""

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
        self.mlp = _mlp(2 * d + 3 * f, cfg.hidden_dim, d, cfg.dropout)

    def forward(
        self, user_idx: torch.Tensor, hist_idx: torch.Tensor, user_feats: torch.Tensor
    ) -> torch.Tensor:
        user_idx = _in_range(user_idx, self.n_user_rows)
        hist_idx = _in_range(hist_idx, self.n_item_rows)
        pooled = _masked_mean(self.item_embedding(hist_idx), hist_idx)
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
    """item id + genre bag (mean) + release-year bucket -> unit D."""

    def __init__(self, cfg: TowerConfig, item_embedding: nn.Embedding) -> None:
        super().__init__()
        d, f = cfg.embedding_dim, cfg.feature_dim
        self.item_embedding = item_embedding
        self.genre_embedding = _embedding(cfg.n_genres, f)
        self.year_embedding = _embedding(cfg.n_years, f)
        self.mlp = _mlp(d + 2 * f, cfg.hidden_dim, d, cfg.dropout)

    def forward(
        self, item_idx: torch.Tensor, genre_idx: torch.Tensor, year_idx: torch.Tensor
    ) -> torch.Tensor:
        genres = _masked_mean(self.genre_embedding(genre_idx), genre_idx)
        x = torch.cat(
            [self.item_embedding(item_idx), genres, self.year_embedding(year_idx)], dim=1
        )
        return F.normalize(self.mlp(x), p=2.0, dim=1)


class TwoTowerModel(nn.Module):
    """Both towers plus the item feature tables, indexed by item index (row 0 = padding)."""

    def __init__(
        self, cfg: TowerConfig, item_genres: torch.Tensor, item_years: torch.Tensor
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

    def item_vectors(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Unit item vectors for item indices (features looked up from the buffers)."""
        return self.item_tower(item_idx, self.item_genres[item_idx], self.item_years[item_idx])

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


def in_batch_softmax_loss(
    user_vec: torch.Tensor,
    item_vec: torch.Tensor,
    item_idx: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
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
    return F.cross_entropy(logits, labels)
