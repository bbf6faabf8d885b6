"""Train the two-tower model on one feature directory and export its bundle.

Reads the directory described in :mod:`dayloop.features.schema`; torch is imported
only inside :func:`train_two_tower` so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dayloop.features.schema import FEATURE_SCHEMA, META_FILE, USER_FEATURE_COLUMNS, feature_schema_hash
from dayloop.training.holdout import META_KEY as HOLDOUT_META_KEY
from dayloop.training.holdout import HoldoutSpec, held_out_rows
from serving.fileio import atomic_write_json

FEATURE_FILES = {part: f"{part}.parquet" for part in FEATURE_SCHEMA}


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one training run.

    Defaults are sized for ~300k examples (60 days x 5000 MovieLens ratings) to train in
    about a minute on 2 CPU cores, and were chosen on real replay days (see
    benchmarks/bench_offline_quality.py). Pooled over held-out days 2026-11-01..14 (1,943
    user-days) they reach 1.03x 7-day popularity's NDCG@10 (90 % paired bootstrap
    interval [0.99, 1.07]) and 1.19x its recall@10 ([1.09, 1.29]); the model before
    issue 9 reached 0.92x / 0.70x, EASE 0.99x / 0.95x. Training took 77 s a day against
    70 s for the model before (1.10x, same run):

    * ``logq_weight``: weight of the logQ correction subtracted from in-batch logits. 1 is
      the unbiased correction; 0 disables it, which buries popular items (each one is a
      negative in many batches). Values > 1 pull rankings toward popular items, which is
      what next-day MovieLens behaviour rewards (2.0 measured best).
    * ``history_cutoff='day'``: a training row sees the user's history as of the start of
      its UTC day (the point-in-time history of the user's first event that day), exactly
      what evaluation and serving see for day ds; ``'event'`` uses the row's own history
      (strictly before ts), which teaches within-session continuation instead.
    * ``user_id_dropout``: share of rows whose user id is replaced by "unknown" (0) so the
      tower also learns to serve users it has no id embedding for (new users). 1.0 (no
      id embeddings at all) measured 1.03x 7-day popularity's NDCG@10 against 1.05x for
      0.5 on 2026-11-02.
    * ``history_length=None`` takes it from meta.json; ``max_train_rows`` keeps only the
      most recent rows.
    * ``num_threads`` caps torch's CPU threads during the run (None = torch's default, one
      per core). It defaults to 1: on a 2-core box shared with the Airflow services and
      Spark, OpenMP threads spin against each other (measured 9x slower per step at 2
      threads under load), while one thread loses little when the box is idle.
    * ``shuffle_item_ids`` deliberately corrupts the data (training targets relabelled by a
      fixed random item permutation) to produce a bad model for gate tests and drills;
      never use it in production.
    * ``loss``: ``'in_batch'`` (default) is the sampled softmax over the batch's items
      with the logQ term above; ``'full'`` is a softmax over every item of the vocabulary
      (~3.6k on MovieLens, no sampling, no logQ). Full softmax measured worse here: NDCG@10
      0.85-0.89x 7-day popularity's on replay days 2026-11-02/08 against 0.98-1.05x for
      in-batch with the same options, and 2-3x slower per epoch on one core: it learns
      the unbiased next-item distribution, while the per-user metric rewards the
      popularity push that logQ weight 2 gives (weight 1 measured 0.81x).
    * ``user_day_weight``: rows are weighted ``n ** -alpha`` with n the rows of that user
      on that day (mean weight 1). The gate scores each user-day once, while a heavy
      rater's day can hold 1,000 of the day's 5,000 rows; alpha = 1 (default) moved the
      in-batch model with the popularity prior from 1.00x to 1.05x 7-day popularity's
      NDCG@10 and from 0.89x to 1.30x its recall@10 on 2026-11-02 (0.98x / 1.15x on
      2026-11-08).
    * ``history_pooling``: ``'recency'`` learns one weight per history position (starting
      at a mild decay); ``'mean'`` is the fixed mean of the model before issue 9.
    * ``popularity_windows``: trailing windows (days) whose item popularity the item tower
      sees as bucketed codes (:func:`dayloop.training.model.popularity_codes`):
      point-in-time (the days before the row's day) in training, the days before ``ds``
      at export. Mini-batches then hold rows of one day each. ``()`` disables the prior.
    * ``logq_prior_days``: take the excess of the logQ weight over 1 from the trailing
      days' popularity instead of the window's (None = the window; 7 days with weight 3
      measured 1.02x against 1.05x for the default on 2026-11-02).
    * ``gate_holdout_days`` / ``gate_holdout_share``: the last days of a fixed share of
      users are not trained on, so the offline gate can evaluate on them as well
      (:mod:`dayloop.training.holdout`); share 0 trains on everything.
    """

    embedding_dim: int = 64
    epochs: int = 5
    batch_size: int = 1024
    lr: float = 1e-2
    weight_decay: float = 0.0
    temperature: float = 0.05
    logq_weight: float = 2.0
    history_length: int | None = None
    feature_dim: int = 16
    hidden_dim: int = 128
    dropout: float = 0.1
    user_id_dropout: float = 0.5
    seed: int = 42
    max_train_rows: int | None = None
    history_cutoff: Literal["event", "day"] = "day"
    device: str = "auto"
    num_threads: int | None = 1
    shuffle_item_ids: bool = False
    loss: Literal["full", "in_batch"] = "in_batch"
    history_pooling: Literal["recency", "mean"] = "recency"
    user_day_weight: float = 1.0
    logq_prior_days: int | None = None
    popularity_windows: tuple[int, ...] = (1, 7, 28)
    popularity_buckets: int = 32
    gate_holdout_days: int = 7
    gate_holdout_share: float = 0.25

    def __post_init__(self) -> None:
        positive = ("embedding_dim", "epochs", "batch_size", "feature_dim", "hidden_dim")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainParams.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("TrainParams.batch_size must be >= 2 (in-batch negatives)")
        if self.logq_weight < 0:
            raise ValueError(f"TrainParams.logq_weight must be >= 0, got {self.logq_weight}")
        if not self.lr > 0 or not self.temperature > 0 or self.weight_decay < 0:
            raise ValueError(
                f"TrainParams needs lr > 0, temperature > 0, weight_decay >= 0; got lr={self.lr}, "
                f"temperature={self.temperature}, weight_decay={self.weight_decay}"
            )
        if not 0.0 <= self.user_id_dropout <= 1.0:
            raise ValueError(f"TrainParams.user_id_dropout must be in [0, 1], got {self.user_id_dropout}")
        if self.history_cutoff not in ("event", "day"):
            raise ValueError(f"TrainParams.history_cutoff must be 'event' or 'day', got {self.history_cutoff!r}")
        if self.history_length is not None and self.history_length <= 0:
            raise ValueError(f"TrainParams.history_length must be positive, got {self.history_length}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"TrainParams.num_threads must be positive, got {self.num_threads}")
        if self.max_train_rows is not None and self.max_train_rows <= 0:
            raise ValueError(f"TrainParams.max_train_rows must be positive, got {self.max_train_rows}")
        self._check_model_options()
        # validates days >= 0 and share in [0, 1)
        HoldoutSpec(days=self.gate_holdout_days, share=self.gate_holdout_share)

    def _check_model_options(self) -> None:
        """The loss, history pooling, row weighting and popularity-prior options."""
        if self.history_pooling not in ("recency", "mean"):
            raise ValueError(f"TrainParams.history_pooling must be 'recency' or 'mean', got {self.history_pooling!r}")
        if not 0.0 <= self.user_day_weight <= 1.0:
            raise ValueError(f"TrainParams.user_day_weight must be in [0, 1], got {self.user_day_weight}")
        if self.logq_prior_days is not None and int(self.logq_prior_days) <= 0:
            raise ValueError(f"TrainParams.logq_prior_days must be positive or None, got {self.logq_prior_days}")
        if self.loss not in ("full", "in_batch"):
            raise ValueError(f"TrainParams.loss must be 'full' or 'in_batch', got {self.loss!r}")
        windows = tuple(self.popularity_windows)
        if any(int(w) <= 0 for w in windows) or len(set(windows)) != len(windows):
            raise ValueError(f"TrainParams.popularity_windows must be distinct positive days, got {windows}")
        if not 2 <= self.popularity_buckets <= 256:
            raise ValueError(f"TrainParams.popularity_buckets must be in [2, 256], got {self.popularity_buckets}")

    @property
    def holdout(self) -> HoldoutSpec:
        """The gate's user holdout these params train around."""
        return HoldoutSpec(days=self.gate_holdout_days, share=self.gate_holdout_share)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    ``metrics`` holds floats only (MLflow ``log_metrics``-ready): final/first loss,
    ``loss_epoch_<i>``, examples_per_s, seconds_per_epoch, train_seconds, sizes.
    ``history`` holds the per-epoch series (``loss``, ``epoch_seconds``) for step-wise
    logging; ``device`` is where it trained ('cpu' / 'cuda').
    """

    bundle_dir: Path
    metrics: dict[str, float]
    history: dict[str, list[float]]
    device: str
    params: TrainParams
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FeatureSet:
    """The tables of one feature directory (pandas) plus its meta.json."""

    path: Path
    meta: dict[str, Any]
    tables: dict[str, Any]

    def __getitem__(self, part: str) -> Any:
        return self.tables[part]


def load_features(features_dir: Path, parts: tuple[str, ...] | None = None) -> FeatureSet:
    """Read and validate a feature directory (files, columns, schema hash).

    Raises ValueError naming the first problem: a missing file or column, an unreadable
    meta.json, or a feature_schema_hash that this code was not written for.
    """
    import pandas as pd

    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise ValueError(f"feature directory {features_dir} does not exist")
    parts = tuple(FEATURE_SCHEMA) if parts is None else parts
    unknown = [p for p in parts if p not in FEATURE_SCHEMA]
    if unknown:
        raise ValueError(f"unknown feature tables {unknown}; known: {sorted(FEATURE_SCHEMA)}")
    meta_path = features_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"feature directory {features_dir} lacks {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
    if "history_length" not in meta:
        raise ValueError(f"{meta_path} lacks history_length")
    expected_hash = feature_schema_hash(int(meta["history_length"]))
    if meta.get("feature_schema_hash") != expected_hash:
        raise ValueError(
            f"{meta_path}: feature_schema_hash {meta.get('feature_schema_hash')!r} != "
            f"{expected_hash!r} expected by this code (features built by another schema version)"
        )
    tables: dict[str, Any] = {}
    for part in parts:
        path = features_dir / FEATURE_FILES[part]
        if not path.is_file():
            raise ValueError(f"feature directory {features_dir} lacks {FEATURE_FILES[part]}")
        df = pd.read_parquet(path)
        missing = [c for c in FEATURE_SCHEMA[part] if c not in df.columns]
        if missing:
            raise ValueError(f"{path} lacks columns {missing} (has {list(df.columns)})")
        tables[part] = df
    return FeatureSet(path=features_dir, meta=meta, tables=tables)


def pad_id_lists(lists: Any, length: int) -> np.ndarray:
    """Right-pad / truncate a column of id lists to int64[N, length] (0 = padding).

    Accepts a pandas Series of lists/arrays (None = empty). Keeps the first ``length``
    entries, which are the most recent ones in Dayloop's histories.
    """
    seqs = [np.asarray([] if v is None else v, dtype=np.int64)[:length] for v in lists]
    out = np.zeros((len(seqs), length), dtype=np.int64)
    lens = np.fromiter((s.size for s in seqs), dtype=np.int64, count=len(seqs))
    if lens.sum():
        flat = np.concatenate(seqs)
        rows = np.repeat(np.arange(len(seqs)), lens)
        cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        out[rows, cols] = flat
    return out


def _index_of(vocab_sorted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index (position + 1) of ids in a sorted vocab; 0 where absent (or id is 0 padding)."""
    if vocab_sorted.size == 0:
        return np.zeros_like(ids, dtype=np.int64)
    pos = np.searchsorted(vocab_sorted, ids)
    pos_c = np.minimum(pos, vocab_sorted.size - 1)
    return np.where(vocab_sorted[pos_c] == ids, pos_c + 1, 0).astype(np.int64)


def _day_start_rows(train: Any) -> np.ndarray:
    """For every row, the row of the same user's first event on the same UTC day.

    That event's point-in-time history holds exactly the items before the day, which is
    what the model sees at evaluation and serving time (history as of the start of ds).
    """
    users = train["user_id"].to_numpy(np.int64)
    ts = train["ts"]
    ticks = ts.astype("int64").to_numpy()  # unit does not matter, only the order
    day = ts.dt.floor("D").astype("int64").to_numpy()
    order = np.lexsort((ticks, day, users))
    u_sorted, d_sorted = users[order], day[order]
    new_group = np.ones(order.size, dtype=bool)
    new_group[1:] = (u_sorted[1:] != u_sorted[:-1]) | (d_sorted[1:] != d_sorted[:-1])
    group_first = order[np.flatnonzero(new_group)]
    group_id = np.cumsum(new_group) - 1
    out = np.empty(order.size, dtype=np.int64)
    out[order] = group_first[group_id]
    return out


def window_end_of(fs: FeatureSet) -> Any:
    """The exclusive end of the training window (meta's ``window_end``, i.e. ``ds``) as a UTC
    Timestamp; without it, the day after the last training event."""
    import pandas as pd

    raw = fs.meta.get("window_end") or fs.meta.get("ds")
    if raw:
        return pd.Timestamp(str(raw), tz="UTC")
    return fs["train"]["ts"].max().floor("D") + pd.Timedelta(days=1)


def _row_days(ts: Any, window_end: Any) -> tuple[int, np.ndarray]:
    """(days in the window, each row's day index from the window's first day; the export
    day ``window_end`` is index ``n_days``)."""
    import pandas as pd

    day = ts.dt.floor("D")
    first = min(day.min(), window_end - pd.Timedelta(days=1))
    n_days = int((window_end - first) / pd.Timedelta(days=1))
    row_day = ((day - first) / pd.Timedelta(days=1)).to_numpy().astype(np.int64)
    return n_days, np.clip(row_day, 0, n_days - 1)


def _user_day_weights(users: np.ndarray, row_day: np.ndarray, alpha: float) -> np.ndarray | None:
    """Row weights ``n ** -alpha`` (n = the rows of that user on that day), mean 1; None at 0.

    The gate averages NDCG per user-day, while one heavy rater's day can hold 1,000 of a
    day's 5,000 rows: alpha = 1 gives every user-day the same total weight in training."""
    if alpha == 0 or users.size == 0:
        return None
    _, inverse, counts = np.unique(np.stack([users, row_day]), axis=1, return_inverse=True, return_counts=True)
    weights = counts[inverse.ravel()].astype(np.float64) ** -float(alpha)
    return (weights / weights.mean()).astype(np.float32)


def popularity_tables(
    item_idx: np.ndarray, row_day: np.ndarray, n_days: int, n_items: int,
    windows: tuple[int, ...], n_buckets: int,
) -> np.ndarray:
    """int64[n_days + 1, n_items + 1, len(windows)] popularity codes per day.

    Day d's codes count the training rows of days [d - w, d) for each window w, so a row
    of day d never sees its own day (point in time); day ``n_days`` (= ds) is what the
    exported item vectors use.
    """
    from dayloop.training.model import popularity_codes

    trailing = _trailing_counts(item_idx, row_day, n_days, n_items)
    out = np.zeros((n_days + 1, n_items + 1, len(windows)), dtype=np.int64)
    for w_i, w in enumerate(windows):
        out[:, :, w_i] = popularity_codes(trailing(int(w)), n_buckets)
    return out


def _trailing_counts(item_idx: np.ndarray, row_day: np.ndarray, n_days: int, n_items: int) -> Any:
    """``f(w)``: float64[n_days + 1, n_items + 1], row d = each item's training rows on days
    [d - w, d) (point in time: a day never counts itself; row ``n_days`` is the export day)."""
    counts = np.zeros((n_days, n_items + 1), dtype=np.float64)
    np.add.at(counts, (row_day, item_idx), 1.0)
    cum = np.vstack([np.zeros((1, n_items + 1)), np.cumsum(counts, axis=0)])  # cum[d] = days < d
    days = np.arange(n_days + 1)
    return lambda w: cum[days] - cum[np.maximum(days - w, 0)]


def _vocab_rows(meta: dict[str, Any], vocab_key: str, column: str, observed_max: int) -> int:
    """Embedding-table rows for a 1-based code column (row 0 = unknown).

    Takes the largest of meta's ``cardinalities[column]``, ``len(meta[vocab_key]) + 1`` and
    the largest observed code + 1, so a stale or absent meta entry can never undersize it.
    """
    declared = 0
    vocab = meta.get(vocab_key)
    if isinstance(vocab, (list, tuple, dict)):
        declared = len(vocab) + 1
    cardinality = (meta.get("cardinalities") or {}).get(column)
    if isinstance(cardinality, int) and not isinstance(cardinality, bool):
        declared = max(declared, cardinality)
    return max(declared, int(observed_max) + 1, 2)


def _prepare(fs: FeatureSet, params: TrainParams, history_length: int) -> dict[str, Any]:
    """Vocabularies, index tensors (as numpy) and item feature tables."""
    # About 65 lines of one-pass array building; splitting would only pass the arrays around.
    train = fs["train"]
    if len(train) == 0:
        raise ValueError(f"{fs.path}/train.parquet has no rows; nothing to train on")
    window_end = window_end_of(fs)
    held = held_out_rows(train, window_end, params.holdout)
    if held.all():
        raise ValueError(f"{fs.path}: the gate holdout {params.holdout} leaves no row to train on")
    train = train[~held]
    if params.max_train_rows is not None and len(train) > params.max_train_rows:
        # the most recent rows are the most relevant for tomorrow's recommendations
        order = np.lexsort(
            (train["item_id"].to_numpy(), train["user_id"].to_numpy(), train["ts"].to_numpy())
        )
        train = train.iloc[order[-params.max_train_rows :]]
    users, items, popularity = fs["users"], fs["items"], fs["popularity"]

    train_users = train["user_id"].to_numpy(np.int64)
    train_items = train["item_id"].to_numpy(np.int64)
    if (train_items <= 0).any():
        # 0 is the padding index of every history; a real item 0 would vanish from them
        raise ValueError(f"{fs.path}/train.parquet holds item ids <= 0; item ids must be positive")
    # users.parquet users stay in the vocab so a server can look their features up
    user_vocab = np.unique(np.concatenate([users["user_id"].to_numpy(np.int64), train_users]))
    pop_items = popularity.loc[popularity["count"] > 0, "item_id"].to_numpy(np.int64)
    # only items with interactions in the window are retrievable; catalog items that nobody
    # touched would get untrained (random) id embeddings and pollute the top of the ranking
    item_vocab = np.unique(np.concatenate([train_items, pop_items]))

    feats = np.zeros((user_vocab.size, 3), dtype=np.int64)
    u_idx = _index_of(user_vocab, users["user_id"].to_numpy(np.int64))
    feats[u_idx - 1] = users[list(USER_FEATURE_COLUMNS)].to_numpy(np.int64)
    if (feats < 0).any():
        raise ValueError("users.parquet holds negative feature codes (codes are 1-based, 0 = unknown)")

    max_genres = max([1, *(0 if g is None else len(g) for g in items["genre_ids"])])
    item_genres = np.zeros((item_vocab.size + 1, max_genres), dtype=np.int64)
    item_years = np.zeros(item_vocab.size + 1, dtype=np.int64)
    i_idx = _index_of(item_vocab, items["item_id"].to_numpy(np.int64))
    known = i_idx > 0
    item_genres[i_idx[known]] = pad_id_lists(items["genre_ids"][known], max_genres)
    item_years[i_idx[known]] = items["year_idx"].to_numpy(np.int64)[known]
    if (item_genres < 0).any() or (item_years < 0).any():
        raise ValueError("items.parquet holds negative codes (codes are 1-based, 0 = unknown)")

    hist_ids = pad_id_lists(train["hist"], history_length)
    if params.history_cutoff == "day":
        hist_ids = hist_ids[_day_start_rows(train)]
    hist_idx = np.where(hist_ids > 0, _index_of(item_vocab, hist_ids), 0)
    meta = fs.meta
    n_days, row_day = _row_days(train["ts"], window_end)
    return {
        "row_weight": _user_day_weights(train_users, row_day, params.user_day_weight),
        "n_held_out": int(held.sum()),
        "n_days": n_days,
        "row_day": row_day,
        "user_vocab": user_vocab,
        "item_vocab": item_vocab,
        "user_features": feats,
        "item_genres": item_genres,
        "item_years": item_years,
        "user_idx": _index_of(user_vocab, train_users),
        "hist_idx": hist_idx,
        "item_idx": _index_of(item_vocab, train_items),
        "sizes": {
            "n_genders": _vocab_rows(meta, "gender_vocab", "gender_idx", feats[:, 0].max(initial=0)),
            "n_ages": _vocab_rows(meta, "age_vocab", "age_idx", feats[:, 1].max(initial=0)),
            "n_occupations": _vocab_rows(
                meta, "occupation_vocab", "occupation_idx", feats[:, 2].max(initial=0)
            ),
            "n_genres": _vocab_rows(meta, "genre_vocab", "genre_ids", item_genres.max(initial=0)),
            "n_years": _vocab_rows(meta, "year_buckets", "year_idx", item_years.max(initial=0)),
            "max_genres": max_genres,
        },
    }


def serving_histories(
    train_df: Any, user_vocab: np.ndarray, item_vocab: np.ndarray, history_length: int
) -> np.ndarray:
    """[n_users, L] model item indices: each vocab user's history at the end of the window.

    Both vocabularies are sorted (as :func:`_prepare` builds them).

    What the serving tower looks a user up in. A user with no training event, or items
    outside the vocabulary, get 0 (padding), as at training time.
    """
    from dayloop.training.evaluate import window_histories

    out = np.zeros((user_vocab.size, history_length), dtype=np.int64)
    users, hists = window_histories(train_df, history_length)
    if users.size == 0:
        return out
    rows = _index_of(user_vocab, users)
    for row, hist in zip(rows, hists, strict=True):
        if row == 0 or hist.size == 0:
            continue
        # unknown items become 0 in place, exactly as ModelBundle.prepare_inputs does
        idx = _index_of(item_vocab, hist[:history_length])
        out[row - 1, : idx.size] = idx
    return out


def _batches(n_examples: int, row_day: Any, by_day: bool, batch_size: int, gen: Any) -> list[Any]:
    """One epoch's mini-batches (CPU index tensors) in a seeded random order.

    ``by_day``: every batch holds rows of one day only (shuffled within the day, batches
    in random order), so one item-tower pass with that day's popularity codes covers it."""
    import torch

    order = torch.randperm(n_examples, generator=gen)
    if not by_day:
        return list(torch.split(order, batch_size))
    order = order[torch.sort(row_day[order], stable=True).indices]
    counts = torch.bincount(row_day[order]).tolist()
    batches = [b for day in torch.split(order, counts) for b in torch.split(day, batch_size)]
    pick = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in pick]


def _log_q(item_idx: np.ndarray, data: dict[str, Any], n_items: int, params: TrainParams) -> np.ndarray:
    """The logQ term subtracted from in-batch logits: float32[n_items + 1], or
    [n_days + 1, n_items + 1] (one row per day) with ``logq_prior_days``.

    Weight 1 of it is the sampling correction (log of each item's share of the rows, the
    chance it is an in-batch candidate); the excess ``logq_weight - 1`` is a popularity
    prior the scores absorb. ``logq_prior_days`` takes that prior from the trailing days
    before each row's day instead of the whole window, so it follows recent popularity.
    """
    counts = np.bincount(item_idx, minlength=n_items + 1).astype(np.float64)
    # items never sampled get the smallest observed probability, not log(0)
    log_all = np.log(np.maximum(counts, 1.0) / item_idx.size)
    if params.logq_prior_days is None:
        return (params.logq_weight * log_all).astype(np.float32)
    recent = _trailing_counts(item_idx, data["row_day"], data["n_days"], n_items)(int(params.logq_prior_days))
    # add-one smoothing: a day with nothing before it gets the uniform prior
    log_recent = np.log((recent + 1.0) / (recent.sum(axis=1, keepdims=True) + n_items + 1))
    return (log_all[None, :] + (params.logq_weight - 1.0) * log_recent).astype(np.float32)


def _batch_loss(model: Any, batch: dict[str, Any], ctx: dict[str, Any], params: TrainParams) -> Any:
    """The loss of one mini-batch (full or in-batch softmax)."""
    from dayloop.training.model import full_softmax_loss, in_batch_softmax_loss

    u = model.user_tower(batch["users"], batch["hist"], batch["feats"])
    pop = None if ctx["popularity"] is None else ctx["popularity"][batch["day"]]
    weights = batch["weights"]
    if params.loss == "full":
        all_v = model.item_vectors(ctx["all_items"], pop)
        return full_softmax_loss(u, all_v, batch["items"], params.temperature, weights)
    v = model.item_vectors(batch["items"], pop)
    log_q = ctx["log_q"]
    if log_q is not None and log_q.dim() == 2:
        log_q = log_q[batch["day"]]
    return in_batch_softmax_loss(u, v, batch["items"], params.temperature, log_q, weights)


def _fit(model: Any, optimizer: Any, tensors: tuple[Any, Any, Any, Any], ctx: dict[str, Any],
         params: TrainParams, device: Any) -> tuple[list[float], list[float]]:
    """The epoch loop over shuffled mini-batches of (user, history, features, item).
    ``ctx`` holds ``row_day`` (CPU), ``popularity`` (per-day codes or None), ``all_items``
    and ``log_q``. Returns the mean loss and the seconds of each epoch.

    Deterministic for a seed: one CPU generator draws the order and the id dropout in a
    fixed sequence; torch's deterministic mode and thread count are restored afterwards."""
    import torch

    user_t, hist_t, feats_t, item_t = tensors
    n_examples = int(item_t.numel())
    by_day = params.loss == "full" or ctx["popularity"] is not None or params.logq_prior_days is not None
    gen = torch.Generator(device="cpu").manual_seed(params.seed)
    losses: list[float] = []
    epoch_seconds: list[float] = []
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if params.num_threads is not None:
        torch.set_num_threads(params.num_threads)
    try:
        model.train()
        for _epoch in range(params.epochs):
            t0 = time.perf_counter()
            total, batches = 0.0, 0
            for b_cpu in _batches(n_examples, ctx["row_day"], by_day, params.batch_size, gen):
                if b_cpu.numel() < 2:
                    continue  # a single example has no in-batch negatives
                b = b_cpu.to(device)
                users = user_t[b]
                if params.user_id_dropout > 0:
                    drop = torch.rand(users.shape, generator=gen).to(device) < params.user_id_dropout
                    users = users.masked_fill(drop, 0)
                batch = {"users": users, "hist": hist_t[b], "feats": feats_t[b], "items": item_t[b],
                         "day": int(ctx["row_day"][b_cpu[0]]),
                         "weights": None if ctx["weights"] is None else ctx["weights"][b]}
                loss = _batch_loss(model, batch, ctx, params)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds.append(time.perf_counter() - t0)
            losses.append(total / max(batches, 1))
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"training diverged: epoch loss {losses[-1]} (lower lr?)")
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    return losses, epoch_seconds


def _train_metrics(losses: list[float], epoch_seconds: list[float], epochs: int, n_examples: int,
                   n_users: int, n_items: int) -> dict[str, float]:
    """The flat metrics logged to MLflow and written into the bundle's meta."""
    train_seconds = float(sum(epoch_seconds))
    return {
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "examples_per_s": epochs * n_examples / train_seconds if train_seconds else 0.0,
        "seconds_per_epoch": train_seconds / epochs,
        "train_seconds": train_seconds,
        "n_train_examples": float(n_examples),
        "n_users": float(n_users),
        "n_items": float(n_items),
        "epochs": float(epochs),
        **{f"loss_epoch_{i}": loss for i, loss in enumerate(losses)},
    }


def train_two_tower(features_dir: Path, out_dir: Path, params: TrainParams) -> TrainResult:
    """Train on ``features_dir`` and export the bundle to ``out_dir / 'bundle'``.

    Also writes ``out_dir / 'train_metrics.json'``. Deterministic for a given seed and
    device (CPU); on CUDA, cuBLAS may still add run-to-run noise at the 1e-6 level.
    """
    # Longer than most: one straight sequence (tensors, fit, fix-up, export) whose steps
    # share a dozen locals; the loop and the metrics are already their own functions.
    import torch

    from dayloop.training.bundle import export_bundle
    from dayloop.training.model import TowerConfig, TwoTowerModel, resolve_device, seed_everything

    fs = load_features(Path(features_dir))
    history_length = int(params.history_length or fs.meta["history_length"])
    params = replace(params, history_length=history_length)
    data = _prepare(fs, params, history_length)
    device = resolve_device(params.device)
    seed_everything(params.seed)
    n_examples = int(data["item_idx"].size)

    item_idx = data["item_idx"]
    if params.shuffle_item_ids:
        perm = np.random.default_rng(params.seed).permutation(data["item_vocab"].size) + 1
        item_idx = perm[item_idx - 1]

    windows = tuple(int(w) for w in params.popularity_windows)
    cfg = TowerConfig(
        n_users=int(data["user_vocab"].size),
        n_items=int(data["item_vocab"].size),
        history_length=history_length,
        embedding_dim=params.embedding_dim,
        feature_dim=params.feature_dim,
        hidden_dim=params.hidden_dim,
        dropout=params.dropout,
        popularity_windows=len(windows),
        history_pooling=params.history_pooling,
        popularity_buckets=params.popularity_buckets,
        **data["sizes"],
    )
    # computed on the (possibly shuffled) targets the model trains on: a shuffled-id model
    # must not get the real items' popularity for free
    pop_codes = popularity_tables(item_idx, data["row_day"], data["n_days"], cfg.n_items, windows,
                                  params.popularity_buckets)
    model = TwoTowerModel(
        cfg,
        torch.from_numpy(data["item_genres"]),
        torch.from_numpy(data["item_years"]),
        torch.from_numpy(pop_codes[data["n_days"]]),
    ).to(device)

    feats_by_index = np.vstack([np.zeros((1, 3), np.int64), data["user_features"]])
    user_t = torch.from_numpy(data["user_idx"]).to(device)
    hist_t = torch.from_numpy(data["hist_idx"]).to(device)
    feats_t = torch.from_numpy(feats_by_index[data["user_idx"]]).to(device)
    item_t = torch.from_numpy(item_idx).to(device)
    log_q = None
    if params.logq_weight and params.loss == "in_batch":
        log_q = torch.from_numpy(_log_q(item_idx, data, cfg.n_items, params)).to(device)

    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    ctx = {
        "row_day": torch.from_numpy(data["row_day"]),
        "popularity": torch.from_numpy(pop_codes).to(device) if windows else None,
        "all_items": torch.arange(1, cfg.n_items + 1, device=device),
        "log_q": log_q,
        "weights": None if data["row_weight"] is None else torch.from_numpy(data["row_weight"]).to(device),
    }
    losses, epoch_seconds = _fit(model, optimizer, (user_t, hist_t, feats_t, item_t), ctx, params, device)

    with torch.no_grad():
        # users without a training example keep only their features: their id row would
        # otherwise be an untrained random vector
        trained_users = np.zeros(cfg.n_users + 1, dtype=bool)
        if params.user_id_dropout < 1.0:
            trained_users[data["user_idx"]] = True
        untouched = torch.from_numpy(~trained_users).to(device)
        model.user_tower.user_embedding.weight[untouched] = 0.0

    metrics = _train_metrics(losses, epoch_seconds, params.epochs, n_examples, cfg.n_users, cfg.n_items)
    history = {"loss": losses, "epoch_seconds": epoch_seconds}
    extra_meta = {
        "feature_schema_hash": fs.meta["feature_schema_hash"],
        "features_ds": fs.meta.get("ds"),
        "features_window": [fs.meta.get("window_start"), fs.meta.get("window_end")],
        "train_params": params.as_dict(),
        HOLDOUT_META_KEY: {**params.holdout.as_dict(), "held_out_rows": data["n_held_out"]},
        "train_metrics": metrics,
        "train_device": str(device),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_dir = export_bundle(
        model,
        user_ids=data["user_vocab"],
        user_features=data["user_features"],
        item_ids=data["item_vocab"],
        out_dir=out_dir / "bundle",
        extra_meta=extra_meta,
        user_history=serving_histories(fs["train"], data["user_vocab"], data["item_vocab"], history_length),
    )
    report = {"metrics": metrics, "history": history, "device": str(device), "params": params.as_dict()}
    atomic_write_json(out_dir / "train_metrics.json", report, indent=2, default=str)
    return TrainResult(
        bundle_dir=bundle_dir,
        metrics=metrics,
        history=history,
        device=str(device),
        params=params,
        meta=extra_meta,
    )
