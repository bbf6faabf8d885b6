"""Train real (small) two-tower models on a generated feature directory and gate them."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dayloop.features.schema import FEATURE_SCHEMA, feature_schema_hash

pytestmark = pytest.mark.integration

HISTORY_LENGTH = 10


def write_latent_feature_dir(
    path: Path,
    *,
    n_users: int = 400,
    n_items: int = 300,
    n_clusters: int = 8,
    train_days: int = 14,
    daily_active: float = 0.6,
    per_day: int = 4,
    eval_per_user: int = 8,
    seed: int = 0,
) -> Path:
    """Write a feature directory (dayloop.features.schema contract) from a latent model.

    Users and items live near one of ``n_clusters`` centroids; a user picks unseen items
    with probability ~ exp(4 * <u, v> + item bias). Genres encode the item's cluster, so
    both ids and features carry signal, while popularity only knows the bias.
    """
    rng = np.random.default_rng(seed)
    dim = 8
    centroids = rng.normal(size=(n_clusters, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    item_cluster = rng.integers(0, n_clusters, n_items)
    item_vec = centroids[item_cluster] + 0.3 * rng.normal(size=(n_items, dim))
    item_bias = rng.normal(scale=0.7, size=n_items)
    user_cluster = rng.integers(0, n_clusters, n_users)
    user_vec = centroids[user_cluster] + 0.3 * rng.normal(size=(n_users, dim))
    item_ids = np.arange(n_items, dtype=np.int64) * 7 + 101  # ids are not indices
    user_ids = np.arange(n_users, dtype=np.int64) * 3 + 11
    logits = 4.0 * user_vec @ item_vec.T + item_bias

    ds = dt.date(2026, 11, 20)
    start = ds - dt.timedelta(days=train_days)
    events: list[tuple[int, int, pd.Timestamp]] = []  # (user row, item row, ts)
    seen = [set() for _ in range(n_users)]
    for day in range(train_days + 1):
        day_ts = pd.Timestamp(start + dt.timedelta(days=day), tz="UTC")
        held_out = day == train_days
        for u in range(n_users):
            if not held_out and rng.random() > daily_active:
                continue
            k = eval_per_user if held_out else per_day
            g = logits[u] + rng.gumbel(size=n_items)
            g[list(seen[u])] = -np.inf
            picks = np.argsort(-g)[:k]
            secs = np.sort(rng.integers(0, 86_400, k))
            for i, s in zip(picks, secs, strict=True):
                events.append((u, int(i), day_ts + pd.Timedelta(seconds=int(s))))
            seen[u].update(int(i) for i in picks)
    ev = pd.DataFrame(events, columns=["u", "i", "ts"]).sort_values(["ts", "u", "i"], kind="stable")
    ds_ts = pd.Timestamp(ds, tz="UTC")

    train_rows: list[dict] = []
    hist_of: dict[int, list[int]] = {u: [] for u in range(n_users)}
    window = ev[ev["ts"] < ds_ts]
    for u, i, ts in window.itertuples(index=False):
        train_rows.append(
            {"user_id": user_ids[u], "item_id": item_ids[i], "ts": ts, "hist": list(hist_of[u][:HISTORY_LENGTH])}
        )
        hist_of[u].insert(0, int(item_ids[i]))
    eval_rows = []
    for u, group in ev[ev["ts"] >= ds_ts].groupby("u"):
        eval_rows.append(
            {
                "user_id": user_ids[u],
                "hist": list(hist_of[u][:HISTORY_LENGTH]),
                "seen": sorted(hist_of[u]),
                "targets": sorted({int(item_ids[i]) for i in group["i"]}),
            }
        )
    path.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame(train_rows)
    train["ts"] = pd.to_datetime(train["ts"], utc=True)
    train.to_parquet(path / "train.parquet", index=False)
    pd.DataFrame(eval_rows).to_parquet(path / "eval.parquet", index=False)
    pd.DataFrame(
        {
            "user_id": user_ids,
            "gender_idx": rng.integers(1, 3, n_users),
            "age_idx": 1 + user_cluster % 7,  # weakly informative, like real demographics
            "occupation_idx": rng.integers(0, 21, n_users),
        }
    ).to_parquet(path / "users.parquet", index=False)
    pd.DataFrame(
        {
            "item_id": item_ids,
            "year_idx": rng.integers(1, 6, n_items),
            "genre_ids": [[int(c) + 1] + ([int(c % 3) + 9] if c % 2 else []) for c in item_cluster],
        }
    ).to_parquet(path / "items.parquet", index=False)
    counts = window["i"].value_counts()
    pd.DataFrame({"item_id": item_ids[counts.index.to_numpy()], "count": counts.to_numpy(np.int64)}).to_parquet(
        path / "popularity.parquet", index=False
    )
    meta = {
        "ds": ds.isoformat(),
        "window_start": start.isoformat(),
        "window_end": ds.isoformat(),
        "history_length": HISTORY_LENGTH,
        "n_train": len(train),
        "n_eval_users": len(eval_rows),
        "genre_vocab": [f"g{c}" for c in range(11)],
        "age_vocab": list(range(7)),
        "occupation_vocab": list(range(21)),
        "year_buckets": 5,
        "feature_schema": FEATURE_SCHEMA,
        "feature_schema_hash": feature_schema_hash(HISTORY_LENGTH),
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


# small and single-threaded: other test suites share the 2 cores, and OpenMP threads
# spinning against each other would make these runs 10x slower
FAST = dict(epochs=8, batch_size=256, lr=5e-3, embedding_dim=32, hidden_dim=64, feature_dim=8, num_threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from dayloop.training.train import TrainParams, train_two_tower

    root = tmp_path_factory.mktemp("training")
    features = write_latent_feature_dir(root / "features")
    good_a = train_two_tower(features, root / "a", TrainParams(seed=1, **FAST))
    good_b = train_two_tower(features, root / "b", TrainParams(seed=2, **FAST))
    bad = train_two_tower(features, root / "bad", TrainParams(seed=3, shuffle_item_ids=True, **FAST))
    return {"root": root, "features": features, "a": good_a, "b": good_b, "bad": bad}


def _evaluate(bundle_dir: Path, features: Path):
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.evaluate import evaluate_bundle

    eval_df = pd.read_parquet(features / "eval.parquet")
    return evaluate_bundle(ModelBundle.load(bundle_dir), eval_df, ks=(10, 50))


def test_training_result_and_bundle_layout(trained: dict) -> None:
    from dayloop.training.bundle import ModelBundle

    res = trained["a"]
    assert res.device == "cpu"
    assert len(res.history["loss"]) == FAST["epochs"]
    assert res.history["loss"][-1] < res.history["loss"][0]  # it learned something
    assert res.metrics["examples_per_s"] > 0
    bundle = ModelBundle.load(res.bundle_dir)
    items = pd.read_parquet(trained["features"] / "popularity.parquet")
    assert set(bundle.item_ids.tolist()) == set(items["item_id"].tolist())
    assert bundle.item_embeddings.shape == (bundle.n_items, FAST["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(bundle.item_embeddings, axis=1), 1.0, atol=1e-5)
    assert bundle.meta["feature_schema_hash"] == feature_schema_hash(HISTORY_LENGTH)
    assert bundle.meta["history_length"] == HISTORY_LENGTH
    assert (res.bundle_dir.parent / "train_metrics.json").is_file()


def test_torchscript_matches_encode_users(trained: dict) -> None:
    """Build the raw inputs by hand from the .npy files and call the TorchScript directly."""
    import torch

    from dayloop.training.bundle import ModelBundle

    bdir = trained["a"].bundle_dir
    bundle = ModelBundle.load(bdir)
    eval_df = pd.read_parquet(trained["features"] / "eval.parquet").head(50)
    user_ids = eval_df["user_id"].to_numpy(np.int64).copy()
    user_ids[0] = -999  # an unknown user must map to index 0 with unknown features
    hists = [list(h) + [-5] for h in eval_df["hist"]]  # unknown item ids are dropped to padding

    vocab_u = np.load(bdir / "user_ids.npy").tolist()
    vocab_i = np.load(bdir / "item_ids.npy").tolist()
    feats_tab = np.load(bdir / "user_features.npy")
    u_idx = np.array([vocab_u.index(u) + 1 if u in vocab_u else 0 for u in user_ids])
    h_idx = np.zeros((len(hists), HISTORY_LENGTH), dtype=np.int64)
    for r, h in enumerate(hists):
        for c, item in enumerate(h[:HISTORY_LENGTH]):
            h_idx[r, c] = vocab_i.index(item) + 1 if item in vocab_i else 0
    feats = np.array([feats_tab[i - 1] if i > 0 else [0, 0, 0] for i in u_idx], dtype=np.int64)
    tower = torch.jit.load(str(bdir / "user_tower.pt"))
    with torch.no_grad():
        direct = tower(torch.from_numpy(u_idx), torch.from_numpy(h_idx), torch.from_numpy(feats)).numpy()

    encoded = bundle.encode_users(user_ids, hists)
    assert encoded.dtype == np.float32 and encoded.shape == (50, FAST["embedding_dim"])
    np.testing.assert_allclose(encoded, direct, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(encoded, axis=1), 1.0, atol=1e-5)


def test_training_is_deterministic_for_a_seed(trained: dict, tmp_path: Path) -> None:
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.train import TrainParams, train_two_tower

    params = TrainParams(seed=1, **{**FAST, "epochs": 1})
    one = train_two_tower(trained["features"], tmp_path / "one", params)
    two = train_two_tower(trained["features"], tmp_path / "two", params)
    np.testing.assert_array_equal(
        ModelBundle.load(one.bundle_dir).item_embeddings, ModelBundle.load(two.bundle_dir).item_embeddings
    )


def test_row_cap_and_event_histories(trained: dict, tmp_path: Path) -> None:
    from dayloop.training.train import TrainParams, train_two_tower

    params = TrainParams(seed=1, max_train_rows=500, history_cutoff="event", **{**FAST, "epochs": 1})
    res = train_two_tower(trained["features"], tmp_path / "capped", params)
    assert res.metrics["n_train_examples"] == 500
    assert res.params.history_length == HISTORY_LENGTH  # filled in from meta.json


def test_learned_model_beats_popularity_and_bad_model_does_not(trained: dict) -> None:
    from dayloop.training.evaluate import evaluate_popularity

    features = trained["features"]
    pop = evaluate_popularity(
        pd.read_parquet(features / "popularity.parquet"), pd.read_parquet(features / "eval.parquet"), ks=(10, 50)
    )
    good = _evaluate(trained["a"].bundle_dir, features).per_user
    bad = _evaluate(trained["bad"].bundle_dir, features).per_user
    assert list(good["user_id"]) == list(pop["user_id"]) == list(bad["user_id"])
    assert good["recall@10"].mean() > 1.5 * pop["recall@10"].mean()
    assert bad["recall@10"].mean() < pop["recall@10"].mean()


def test_gate_rejects_corrupted_model_and_accepts_second_seed(trained: dict) -> None:
    from dayloop.quality.offline_gate import GateThresholds, gate_model

    root, features = trained["root"], trained["features"]
    # default limits; only the latency budget is widened because the 2 cores are shared
    # with other test suites
    thresholds = GateThresholds(latency_budget_ms=1000.0)
    champion = trained["a"].bundle_dir

    ok = gate_model(trained["b"].bundle_dir, champion, features, root / "report_b", thresholds)
    assert ok.decision.passed, ok.decision.reasons
    assert not ok.decision.bootstrap
    assert ok.report_path.is_file() and (root / "report_b" / "score_histograms.png").is_file()

    bad = gate_model(trained["bad"].bundle_dir, champion, features, root / "report_bad", thresholds)
    assert not bad.decision.passed
    failed = " ".join(bad.decision.failures)
    assert "non-inferiority" in failed and "popularity" in failed
    html = bad.report_path.read_text()
    assert "FAILED" in html and "data:image/png;base64," in html

    boot = gate_model(trained["b"].bundle_dir, None, features, root / "report_boot", thresholds)
    assert boot.decision.passed and boot.decision.bootstrap


def test_gate_pools_the_user_holdout_only_when_both_models_share_it(trained: dict, tmp_path: Path) -> None:
    from dayloop.quality.offline_gate import GateThresholds, gate_model
    from dayloop.training.bundle import ModelBundle
    from dayloop.training.holdout import HoldoutSpec
    from dayloop.training.train import TrainParams, train_two_tower

    # every synthetic user is active on the held-out day: keep a quarter of them there, so
    # held-out users outside it have something to add
    features = tmp_path / "features"
    shutil.copytree(trained["features"], features)
    day = pd.read_parquet(features / "eval.parquet")
    day.iloc[::4].to_parquet(features / "eval.parquet", index=False)
    n_day = len(day.iloc[::4])
    spec = HoldoutSpec.from_meta(ModelBundle.load(trained["a"].bundle_dir).meta)
    assert spec == TrainParams().holdout and spec.active
    thresholds = GateThresholds(latency_budget_ms=1000.0)
    pooled = gate_model(trained["b"].bundle_dir, trained["a"].bundle_dir, features, tmp_path / "pooled", thresholds)
    n_pooled = int(pooled.decision.metrics["n_eval_users"])
    assert n_pooled > n_day, pooled.decision.reasons
    assert any("held-out users of the last 7 days" in r for r in pooled.decision.reasons)
    assert pooled.decision.passed, pooled.decision.reasons
    # a champion trained on every row saw the held-out users' rows: the gate falls back
    full = train_two_tower(features, tmp_path / "full", TrainParams(seed=1, gate_holdout_share=0.0, **FAST))
    day_only = gate_model(trained["b"].bundle_dir, full.bundle_dir, features, tmp_path / "day", thresholds)
    assert int(day_only.decision.metrics["n_eval_users"]) == n_day
    assert any("held-out day only" in r for r in day_only.decision.reasons)
    off = gate_model(trained["b"].bundle_dir, None, features, tmp_path / "off", replace(thresholds, pool_holdout=False))
    assert int(off.decision.metrics["n_eval_users"]) == n_day
    # the held-out rows were not trained on
    train = pd.read_parquet(features / "train.parquet")
    assert trained["a"].meta["gate_holdout"]["held_out_rows"] > 0
    assert trained["a"].metrics["n_train_examples"] == len(train) - trained["a"].meta["gate_holdout"]["held_out_rows"]
    assert full.metrics["n_train_examples"] == len(train)


def test_popularity_codes_are_point_in_time() -> None:
    from dayloop.training.train import popularity_tables

    # item 1 on day 0 (3x), item 2 on day 2 (1x); 2 items, 3 days
    codes = popularity_tables(np.array([1, 1, 1, 2]), np.array([0, 0, 0, 2]), n_days=3, n_items=2,
                              windows=(1, 7), n_buckets=32)
    assert codes.shape == (4, 3, 2)
    assert (codes[:, 0, :] == 0).all()  # the padding item keeps code 0
    assert (codes[0, 1:, :] == 1).all()  # day 0 sees nothing before it
    assert codes[1, 1, 0] > 1 and codes[1, 2, 0] == 1  # day 1 sees day 0: item 1 only
    assert codes[2, 1, 0] == 1 and codes[2, 1, 1] > 1  # 1-day window forgets day 0, 7-day keeps it
    assert codes[2, 2, 0] == 1  # day 2's own event is not visible on day 2
    assert codes[3, 2, 0] > 1  # ... but at export (day 3)


def test_check_exported_model_good_and_corrupted(trained: dict, tmp_path: Path) -> None:
    from dayloop.quality.offline_gate import check_exported_model

    good = check_exported_model(trained["a"].bundle_dir, batch=256, budget_ms=1000.0, n_runs=5)
    assert good.ok, good.problems
    assert good.output_shape == [256, FAST["embedding_dim"]]
    assert good.output_dtype == "float32" and good.finite
    assert good.latency_ms is not None and good.latency_ms > 0

    broken = tmp_path / "broken"
    shutil.copytree(trained["a"].bundle_dir, broken)
    raw = (broken / "user_tower.pt").read_bytes()
    (broken / "user_tower.pt").write_bytes(raw[: len(raw) // 2])  # truncated zip archive
    bad = check_exported_model(broken, budget_ms=1000.0, n_runs=5)
    assert not bad.ok and "user_tower.pt" in " ".join(bad.problems)

    (broken / "user_tower.pt").unlink()
    missing = check_exported_model(broken, budget_ms=1000.0, n_runs=5)
    assert not missing.ok and "missing" in " ".join(missing.problems)

    tight = check_exported_model(trained["a"].bundle_dir, budget_ms=1e-6, n_runs=3)
    assert not tight.ok and "budget" in " ".join(tight.problems)


def test_training_rejects_bad_feature_dirs(tmp_path: Path, trained: dict) -> None:
    from dayloop.training.train import TrainParams, train_two_tower

    with pytest.raises(ValueError, match="does not exist"):
        train_two_tower(tmp_path / "nope", tmp_path / "out", TrainParams(**FAST))
    broken = tmp_path / "features"
    shutil.copytree(trained["features"], broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["feature_schema_hash"] = "0" * 16
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="feature_schema_hash"):
        train_two_tower(broken, tmp_path / "out", TrainParams(**FAST))
    assert not (tmp_path / "out" / "bundle").exists()
