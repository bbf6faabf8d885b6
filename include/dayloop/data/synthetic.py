"""A synthetic world in the landing schema: fast tests, planted faults, a user simulator.

Users and items carry latent vectors ``u`` and ``v`` (standard normal, ``dim`` wide).
A user picks items with probability ``softmax(u . v / (sqrt(dim) * temperature) + b)``
where ``b`` is a mild per-item popularity bias, so a model that learns the latents
beats popularity by a wide margin while popularity is still a sensible baseline.

* ``drift`` rotates every user's vector by ``drift * k`` radians on day ``k`` (in
  the planes of dims (0,1), (2,3), ...), so tastes move smoothly over time and a
  stale model slowly decays.
* Each day is generated from its own seed ``(seed, k)``: day ``k`` never requires
  generating another day, and the same settings always give the same rows.
* Features correlate with the latents so feature towers have something to learn:
  genres come from the item's nearest genre prototypes, the release year from
  ``v[0]``, gender/age/occupation from the user's vector.
* Items are drawn with replacement: unlike MovieLens a user may pick an item again
  on another day (or, rarely, twice in one day).
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property

import numpy as np
import pandas as pd

from dayloop.config import SyntheticSettings, parse_day
from dayloop.data.replay import CalendarDays, ReplayCalendar
from dayloop.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, USER_COLUMNS

# MovieLens vocabularies, so both sources share one feature space.
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
AGE_BUCKETS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
# Share of ML-1M users per age bucket (222, 1103, 2096, 1193, 550, 496, 380 of 6040).
_AGE_SHARES = np.array([222, 1103, 2096, 1193, 550, 496, 380], dtype=float) / 6040
N_OCCUPATIONS = 21
_DAY_US = 86_400 * 1_000_000
_YEAR_MIN, _YEAR_MAX = 1919, 2000

# Streams of the static RNG and salt for the per-day RNG (any fixed distinct ints).
_STATIC_STREAM, _DAY_STREAM = 11, 23


class SyntheticWorld(CalendarDays):
    """Deterministic synthetic users, items and daily interactions.

    ``relevance(user_ids, ds)`` returns the logits the sampler uses, so a user
    simulator can reproduce how synthetic users choose. The dates (``first_day``,
    ``last_day``, ``history_days``, ``day_index``) come from ``calendar``.
    """

    def __init__(
        self,
        synthetic: SyntheticSettings,
        replay_start: dt.date,
        temperature: float = 0.5,
        popularity_scale: float = 0.6,
    ) -> None:
        s = synthetic
        if s.n_users <= 0 or s.n_items <= 1 or s.dim < 2:
            raise ValueError(
                f"synthetic world needs n_users >= 1, n_items >= 2 and dim >= 2; "
                f"got {s.n_users}, {s.n_items}, {s.dim}"
            )
        if s.events_per_day <= 0 or s.replay_days <= 0 or s.history_days < 0:
            raise ValueError(
                f"synthetic events_per_day and replay_days must be positive and "
                f"history_days >= 0; got {s.events_per_day}, {s.replay_days}, {s.history_days}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.settings = s
        self.temperature = float(temperature)
        self.calendar = ReplayCalendar(
            n_events=(s.history_days + s.replay_days) * s.events_per_day,
            events_per_day=s.events_per_day,
            replay_days=s.replay_days,
            replay_start=replay_start,
        )
        rng = np.random.default_rng([s.seed, _STATIC_STREAM])
        self.user_vectors = rng.standard_normal((s.n_users, s.dim))
        self.item_vectors = rng.standard_normal((s.n_items, s.dim))
        self.item_bias = popularity_scale * rng.standard_normal(s.n_items)
        self._activity = rng.lognormal(0.0, 1.0, s.n_users)
        self._activity /= self._activity.sum()
        self._genre_protos = rng.standard_normal((len(GENRES), s.dim))
        self._occupation_protos = rng.standard_normal((N_OCCUPATIONS, s.dim))
        self._feature_seed = int(rng.integers(0, 2**31))
        self.user_ids = np.arange(1, s.n_users + 1, dtype=np.int64)
        self.item_ids = np.arange(1, s.n_items + 1, dtype=np.int64)

    # ----- dimensions ---------------------------------------------------------------
    @cached_property
    def _users(self) -> pd.DataFrame:
        rng = np.random.default_rng([self._feature_seed, 1])
        u = self.user_vectors
        gender = np.where(u[:, 1] + 0.5 * rng.standard_normal(len(u)) > -0.5, "M", "F")
        # Age follows ML-1M's bucket shares, ordered by u[2] so age tracks taste.
        age_score = u[:, 2] + 0.5 * rng.standard_normal(len(u))
        cuts = np.quantile(age_score, np.cumsum(_AGE_SHARES)[:-1])
        age = np.asarray(AGE_BUCKETS)[np.searchsorted(cuts, age_score)]
        gumbel = rng.gumbel(size=(len(u), N_OCCUPATIONS))
        occupation = np.argmax(u @ self._occupation_protos.T / np.sqrt(u.shape[1]) + gumbel, axis=1)
        return pd.DataFrame({
            "user_id": self.user_ids,
            "gender": pd.Series(gender, dtype=object),
            "age": age.astype(np.int64),
            "occupation": occupation.astype(np.int64),
        }).astype(USER_COLUMNS)

    @cached_property
    def _items(self) -> pd.DataFrame:
        rng = np.random.default_rng([self._feature_seed, 2])
        v = self.item_vectors
        scores = v @ self._genre_protos.T / np.sqrt(v.shape[1])
        scores = scores + 0.3 * rng.standard_normal(scores.shape)
        order = np.argsort(-scores, axis=1)
        genres = []
        for i in range(len(v)):
            # The best genre always; up to two more when they fit nearly as well.
            picked = [order[i, 0]] + [g for g in order[i, 1:3] if scores[i, g] > scores[i, order[i, 0]] - 0.5]
            genres.append("|".join(GENRES[g] for g in sorted(picked)))
        year = np.clip(np.rint(1988 + 7 * v[:, 0] + 3 * rng.standard_normal(len(v))),
                       _YEAR_MIN, _YEAR_MAX).astype(np.int64)
        titles = [f"Synthetic Movie {i} ({y})" for i, y in zip(self.item_ids, year)]
        return pd.DataFrame({
            "item_id": self.item_ids,
            "title": pd.Series(titles, dtype=object),
            "year": year,
            "genres": pd.Series(genres, dtype=object),
        }).astype(ITEM_COLUMNS)

    def users(self) -> pd.DataFrame:
        """User dimension (user_id, gender, age, occupation)."""
        return self._users.copy()

    def items(self) -> pd.DataFrame:
        """Item dimension (item_id, title, year, genres)."""
        return self._items.copy()

    # ----- preferences ---------------------------------------------------------------
    def user_vectors_at(self, ds: dt.date | None = None) -> np.ndarray:
        """User latents on day ``ds`` (default: replay day 0), after drift."""
        k = 0 if ds is None else (parse_day(ds) - self.calendar.replay_start).days
        angle = self.settings.drift * k
        if angle == 0.0:
            return self.user_vectors.copy()
        c, s = np.cos(angle), np.sin(angle)
        out = self.user_vectors.copy()
        for a in range(0, self.settings.dim - 1, 2):
            x, y = self.user_vectors[:, a], self.user_vectors[:, a + 1]
            out[:, a], out[:, a + 1] = c * x - s * y, s * x + c * y
        return out

    def _row_index(self, user_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(user_ids, dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > self.settings.n_users):
            raise ValueError(f"user ids must lie in 1..{self.settings.n_users}")
        return ids - 1

    def affinity(self, user_ids: np.ndarray, ds: dt.date | None = None) -> np.ndarray:
        """Standardised taste match ``u . v / sqrt(dim)``, shape (len(user_ids), n_items)."""
        u = self.user_vectors_at(ds)[self._row_index(user_ids)]
        return u @ self.item_vectors.T / np.sqrt(self.settings.dim)

    def relevance(self, user_ids: np.ndarray, ds: dt.date | None = None) -> np.ndarray:
        """Choice logits per (user, item), columns in ``item_ids`` order; softmax = choice probs."""
        return self.affinity(user_ids, ds) / self.temperature + self.item_bias

    def probabilities(self, user_ids: np.ndarray, ds: dt.date | None = None) -> np.ndarray:
        """``softmax(relevance)`` per user row."""
        logits = self.relevance(user_ids, ds)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    # ----- events ---------------------------------------------------------------
    def interactions(self, ds: dt.date) -> pd.DataFrame:
        """The day's events (user_id, item_id, rating, ts), sorted by (ts, user_id, item_id)."""
        ds = parse_day(ds)
        k = self.day_index(ds)  # raises DataUnavailable outside the world
        s = self.settings
        # k may be negative; shift it into SeedSequence's non-negative range.
        rng = np.random.default_rng([s.seed, _DAY_STREAM, k + 2**31])
        n = s.events_per_day
        rows = rng.choice(s.n_users, size=n, p=self._activity)
        uniq, inverse = np.unique(rows, return_inverse=True)
        probs = self.probabilities(uniq + 1, ds)
        cdf = np.cumsum(probs, axis=1)
        cdf[:, -1] = 1.0  # guard against round-off leaving a gap at the top
        draws = rng.random(n)
        items = np.empty(n, dtype=np.int64)
        for lo in range(0, n, 4096):  # bounded memory for large item counts
            hi = min(lo + 4096, n)
            items[lo:hi] = (cdf[inverse[lo:hi]] <= draws[lo:hi, None]).sum(axis=1)
        aff_all = self.affinity(uniq + 1, ds)
        # Centre on the user's expected affinity under their own choice distribution,
        # so the rating mix (mean ~3.6, like ML-1M) does not depend on the temperature.
        expected = (probs * aff_all).sum(axis=1)
        centred = aff_all[inverse, items] - expected[inverse]
        rating = np.clip(np.rint(3.6 + 0.75 * centred + 0.7 * rng.standard_normal(n)), 1, 5)
        offsets = rng.integers(0, _DAY_US, size=n)
        start_us = int(pd.Timestamp(ds, tz="UTC").value // 1000)
        df = pd.DataFrame({
            "user_id": rows.astype(np.int64) + 1,
            "item_id": items + 1,
            "rating": rating.astype(np.int64),
            "ts": pd.to_datetime(start_us + offsets, unit="us", utc=True),
        }).astype(INTERACTION_COLUMNS)
        return df.sort_values(["ts", "user_id", "item_id"], kind="mergesort").reset_index(drop=True)
