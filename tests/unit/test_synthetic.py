"""Synthetic world: schema, determinism per (seed, day), drift and learnable structure."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from dayloop.config import SyntheticSettings
from dayloop.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, USER_COLUMNS
from dayloop.data.synthetic import AGE_BUCKETS, GENRES, SyntheticWorld
from dayloop.errors import DataUnavailable

START = dt.date(2026, 3, 1)
SMALL = SyntheticSettings(n_users=200, n_items=150, dim=8, events_per_day=1500,
                          history_days=6, replay_days=5, drift=0.0, seed=3)


def world(**changes) -> SyntheticWorld:
    params = {**SMALL.__dict__, **changes}
    return SyntheticWorld(SyntheticSettings(**params), START)


def test_interactions_follow_the_landing_schema() -> None:
    w = world()
    df = w.interactions(START)
    assert {c: str(t) for c, t in df.dtypes.items()} == INTERACTION_COLUMNS
    assert len(df) == SMALL.events_per_day
    lo = pd.Timestamp(START, tz="UTC")
    assert df["ts"].min() >= lo and df["ts"].max() < lo + pd.Timedelta(days=1)
    assert df["ts"].is_monotonic_increasing
    assert df["rating"].between(1, 5).all()
    assert df["user_id"].between(1, SMALL.n_users).all()
    assert df["item_id"].between(1, SMALL.n_items).all()


def test_dimensions_follow_the_schema_and_movielens_vocabularies() -> None:
    w = world()
    users, items = w.users(), w.items()
    assert {c: str(t) for c, t in users.dtypes.items()} == USER_COLUMNS
    assert {c: str(t) for c, t in items.dtypes.items()} == ITEM_COLUMNS
    assert users["user_id"].tolist() == list(range(1, SMALL.n_users + 1))
    assert set(users["gender"]) <= {"M", "F"}
    assert set(users["age"]) <= set(AGE_BUCKETS)
    assert users["occupation"].between(0, 20).all()
    genres = {g for gs in items["genres"] for g in gs.split("|")}
    assert genres <= set(GENRES)
    assert items["year"].between(1919, 2000).all()


def test_same_settings_give_the_same_rows() -> None:
    a = world().interactions(START + dt.timedelta(days=2))
    b = world().interactions(START + dt.timedelta(days=2))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(world().users(), world().users())
    pd.testing.assert_frame_equal(world().items(), world().items())


def test_a_day_does_not_depend_on_which_days_were_generated_before() -> None:
    target = START - dt.timedelta(days=3)
    fresh = world().interactions(target)
    busy = world()
    for d in [*busy.history_days, START, START + dt.timedelta(days=4)]:
        busy.interactions(d)
    pd.testing.assert_frame_equal(busy.interactions(target), fresh)


def test_days_and_seeds_differ() -> None:
    w = world()
    assert not w.interactions(START).equals(w.interactions(START + dt.timedelta(days=1)))
    assert not world(seed=4).interactions(START).equals(w.interactions(START))


def test_calendar_covers_history_and_replay_only() -> None:
    w = world()
    assert w.history_days == [START - dt.timedelta(days=k) for k in range(6, 0, -1)]
    assert w.first_day == START - dt.timedelta(days=6)
    assert w.last_day == START + dt.timedelta(days=4)
    assert w.day_index(START) == 0
    for outside in (w.first_day - dt.timedelta(days=1), w.last_day + dt.timedelta(days=1)):
        with pytest.raises(DataUnavailable):
            w.interactions(outside)


def test_drift_rotates_preferences_and_keeps_their_size() -> None:
    static = world(drift=0.0)
    assert np.array_equal(static.user_vectors_at(START + dt.timedelta(days=4)),
                          static.user_vectors_at(START))
    moving = world(drift=0.1)
    u0 = moving.user_vectors_at(START)
    u4 = moving.user_vectors_at(START + dt.timedelta(days=4))
    assert not np.allclose(u0, u4)
    np.testing.assert_allclose(np.linalg.norm(u0, axis=1), np.linalg.norm(u4, axis=1))
    # Rotation by 0.4 rad in every plane: cosine similarity cos(0.4) per user.
    cos = (u0 * u4).sum(1) / (np.linalg.norm(u0, axis=1) ** 2)
    np.testing.assert_allclose(cos, np.cos(0.4), atol=1e-9)


def test_relevance_is_a_valid_choice_model() -> None:
    w = world()
    users = np.array([1, 5, 200])
    scores = w.relevance(users)
    assert scores.shape == (3, SMALL.n_items)
    probs = w.probabilities(users)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        w.relevance(np.array([0]))


def test_a_model_of_the_latents_beats_popularity_clearly() -> None:
    w = world()
    history = pd.concat([w.interactions(d) for d in w.history_days])
    popular = history["item_id"].value_counts().index[:10].to_numpy()
    today = w.interactions(START)
    top = np.argsort(-w.relevance(today["user_id"].to_numpy(), START), axis=1)[:, :10] + 1
    oracle_hits = (top == today["item_id"].to_numpy()[:, None]).any(axis=1).mean()
    popularity_hits = np.isin(today["item_id"], popular).mean()
    assert oracle_hits > 2 * popularity_hits


def test_ratings_and_features_track_the_latents() -> None:
    w = world()
    df = w.interactions(START)
    aff = w.affinity(df["user_id"].to_numpy())[np.arange(len(df)), df["item_id"].to_numpy() - 1]
    assert np.corrcoef(aff, df["rating"])[0, 1] > 0.2
    assert np.corrcoef(w.item_vectors[:, 0], w.items()["year"])[0, 1] > 0.5
    # Items sharing a genre are closer in latent space than random pairs.
    items = w.items()
    first = items["genres"].str.split("|").str[0]
    top_genre = first.value_counts().index[0]
    members = w.item_vectors[(first == top_genre).to_numpy()]
    same = np.mean([a @ b for i, a in enumerate(members) for b in members[i + 1:]])
    assert same > 0.5


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        world(dim=1)
    with pytest.raises(ValueError):
        world(events_per_day=0)
