"""FAISS index stage against real FAISS on small synthetic catalogues."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dayloop.errors import IndexGateFailed
from dayloop.index import faiss_index as fi

pytestmark = pytest.mark.integration

faiss = pytest.importorskip("faiss")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors drawn around ``n_clusters`` random unit centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, dim)))
    labels = rng.integers(0, n_clusters, size=n)
    return _unit(centres[labels] + rng.standard_normal((n, dim)) * spread / np.sqrt(dim))


def uniform(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def item_ids(n: int, seed: int = 1) -> np.ndarray:
    # Sparse, shuffled ids so a row-number/id mix-up cannot pass by accident.
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n, dtype=np.int64) * 13 + 1_000)


def final_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


@pytest.fixture(scope="module")
def small_catalogue() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(3_000, 16, n_clusters=30, spread=1.0, seed=3)
    return x, item_ids(len(x))


# ----------------------------------------------------------------- exact + files


def test_exact_index_has_perfect_recall_and_is_published(tmp_path: Path, small_catalogue) -> None:
    x, ids = small_catalogue
    out = tmp_path / "index"
    res = fi.build_and_check(x, ids, out, k=50, n_queries=200, threads=1)

    assert res.spec.kind == "flat"
    assert res.recall == 1.0
    assert res.path == out / fi.INDEX_FILENAME and res.path.is_file()
    assert res.n_items == len(x) and res.dim == x.shape[1]
    assert res.fingerprint == fi.index_fingerprint(res.path)
    assert final_files(out) == sorted([fi.INDEX_FILENAME, fi.META_FILENAME])

    meta = json.loads((out / fi.META_FILENAME).read_text())
    assert meta == json.loads(json.dumps(res.as_dict()))
    assert meta["fingerprint"] == fi.index_fingerprint(res.path)
    assert meta["query_source"] == "perturbed_items"

    # Search returns item ids: each item's own vector finds its own id first.
    index = fi.load_index(res.path, expected_dim=x.shape[1], expected_fingerprint=res.fingerprint)
    _, found = index.search(x[:100], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:100])


def test_provided_query_vectors_are_used(tmp_path: Path, small_catalogue) -> None:
    x, ids = small_catalogue
    users = uniform(77, x.shape[1], seed=9)
    res = fi.build_and_check(x, ids, tmp_path, k=20, query_vectors=users, threads=1)
    assert res.query_source == "provided"
    assert res.n_queries == 77
    assert res.recall == 1.0


def test_k_larger_than_catalogue_is_capped(tmp_path: Path) -> None:
    x = uniform(40, 8, seed=2)
    res = fi.build_and_check(x, item_ids(40), tmp_path, k=100, n_queries=30, threads=1)
    assert res.k == 40
    assert res.recall == 1.0


# --------------------------------------------------------------------- IVF / HNSW


def test_auto_ivf_on_clustered_data_meets_floor(tmp_path: Path) -> None:
    x = clustered(20_000, 32, n_clusters=200, spread=0.5, seed=5)
    ids = item_ids(len(x))
    users = clustered(500, 32, n_clusters=200, spread=1.0, seed=6)  # users: a different draw
    res = fi.build_and_check(
        x, ids, tmp_path, recall_floor=0.95, k=100, query_vectors=users, exact_threshold=0, threads=2
    )
    assert res.spec.kind == "ivf"
    assert res.recall >= 0.95
    # The data is built so the initial nprobe falls short: the gate had to tune it up.
    initial = fi.choose_index_spec(len(x), 32, exact_threshold=0, k=100)
    assert res.spec.nlist == initial.nlist
    assert res.spec.nprobe > initial.nprobe
    starved = fi.build_index(x, ids, initial)
    assert fi.recall_against_exact(starved, x, ids, users, 100) < 0.95
    # Independent re-measurement of the saved index by plain id-set intersection.
    # It can only be lower than the module's tie-aware recall, and only by the few
    # near-ties at the cut-off.
    index = fi.load_index(res.path, expected_dim=32)
    assert faiss.extract_index_ivf(index).nprobe == res.spec.nprobe
    _, approx = index.search(users, 100)
    exact_index = faiss.IndexFlatIP(32)
    exact_index.add(x)
    _, rows = exact_index.search(users, 100)
    truth = ids[rows]
    overlap = np.mean([len(set(a) & set(t)) / 100 for a, t in zip(approx, truth)])
    assert overlap <= res.recall + 1e-12
    assert res.recall - overlap < 1e-3
    assert overlap >= 0.94
    # Cheaper than exact: it scans a minority of the lists.
    assert res.spec.nprobe < res.spec.nlist


def test_ivf_build_is_deterministic(tmp_path: Path) -> None:
    x = clustered(5_000, 16, n_clusters=50, spread=1.0, seed=8)
    ids = item_ids(len(x))
    spec = fi.IndexSpec(kind="ivf", nlist=64, nprobe=8)
    fi.configure_faiss_threads(2)
    a = fi.save_index(fi.build_index(x, ids, spec, seed=4), tmp_path / "a.faiss")
    b = fi.save_index(fi.build_index(x, ids, spec, seed=4), tmp_path / "b.faiss")
    c = fi.save_index(fi.build_index(x, ids, spec, seed=5), tmp_path / "c.faiss")
    assert fi.index_fingerprint(a) == fi.index_fingerprint(b)
    assert fi.index_fingerprint(a) != fi.index_fingerprint(c)


def test_hnsw_meets_floor_and_keeps_ef_search(tmp_path: Path) -> None:
    x = clustered(4_000, 16, n_clusters=40, spread=1.0, seed=10)
    ids = item_ids(len(x))
    res = fi.build_and_check(
        x, ids, tmp_path, k=50, n_queries=200, exact_threshold=0, approximate="hnsw", threads=2
    )
    assert res.spec.kind == "hnsw"
    assert res.recall >= 0.95
    index = fi.load_index(res.path, expected_dim=16)
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    assert inner.hnsw.efSearch == res.spec.ef_search


# ---------------------------------------------------------------- broken indexes


def test_starved_ivf_fails_gate_and_writes_nothing(tmp_path: Path) -> None:
    # Uniform data has no cluster structure: one probe out of 100 lists sees ~1% of items.
    x = uniform(5_000, 32, seed=11)
    out = tmp_path / "index"
    spec = fi.IndexSpec(kind="ivf", nlist=100, nprobe=1)
    with pytest.raises(IndexGateFailed) as info:
        fi.build_and_check(x, item_ids(len(x)), out, k=100, n_queries=200, spec=spec, threads=2)
    assert "recall@100" in str(info.value) and "below the floor" in str(info.value)
    assert "nprobe=1" in str(info.value)
    assert not (out / fi.INDEX_FILENAME).exists()
    assert not (out / fi.META_FILENAME).exists()
    assert final_files(out) == []


def test_scrambled_ids_have_near_zero_recall(small_catalogue) -> None:
    x, ids = small_catalogue
    scrambled = np.random.default_rng(0).permutation(ids)
    index = fi.build_index(x, scrambled, fi.IndexSpec(kind="flat"))
    queries = fi.default_queries(x, 100, seed=1)
    assert fi.recall_against_exact(index, x, ids, queries, 20) < 0.1
    honest = fi.build_index(x, ids, fi.IndexSpec(kind="flat"))
    assert fi.recall_against_exact(honest, x, ids, queries, 20) == 1.0


def test_scrambled_index_fails_gate(tmp_path: Path, small_catalogue, monkeypatch) -> None:
    x, ids = small_catalogue
    real_build = fi.build_index

    def scrambling_build(emb, item_ids_, spec, seed=0):
        return real_build(emb, np.random.default_rng(0).permutation(item_ids_), spec, seed)

    monkeypatch.setattr(fi, "build_index", scrambling_build)
    out = tmp_path / "index"
    with pytest.raises(IndexGateFailed):
        fi.build_and_check(x, ids, out, k=20, n_queries=100, threads=1)
    assert final_files(out) == []


def test_recall_counts_ties_at_cutoff_as_hits() -> None:
    # Two identical items: either one is a correct nearest neighbour.
    x = uniform(50, 8, seed=12)
    x[1] = x[0]
    ids = np.arange(50, dtype=np.int64) + 100
    query = x[:1].copy()
    other = 101 if fi.exact_search(x, ids, query, 1).ids[0, 0] == 100 else 100

    class OtherTwin:
        d = 8

        def search(self, q, k):
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), other, np.int64)

    assert fi.recall_against_exact(OtherTwin(), x, ids, query, 1) == 1.0

    class Repeats:  # repeating one correct id must not count k times
        d = 8

        def search(self, q, k):
            return np.zeros((len(q), k), np.float32), np.full((len(q), k), other, np.int64)

    assert fi.recall_against_exact(Repeats(), x, ids, query, 2) == 0.5


# ------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = clustered(4_000, 16, n_clusters=40, spread=1.0, seed=13)
    ids = item_ids(len(x))
    index = fi.build_index(x, ids, fi.IndexSpec(kind="ivf", nlist=32, nprobe=5))
    path = fi.save_index(index, tmp_path / "sub" / "i.faiss")
    loaded = fi.load_index(path, expected_dim=16)
    queries = fi.default_queries(x, 50, seed=2)
    d0, i0 = index.search(queries, 10)
    d1, i1 = loaded.search(queries, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(d0, d1)
    assert loaded.ntotal == len(x)
    assert faiss.extract_index_ivf(loaded).nprobe == 5
    assert fi.index_fingerprint(path) == fi.index_fingerprint(path)
    assert len(fi.index_fingerprint(path)) == 64
    assert [p.name for p in path.parent.iterdir()] == ["i.faiss"]  # no temp files left


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch, small_catalogue) -> None:
    x, ids = small_catalogue
    path = fi.save_index(fi.build_index(x, ids, fi.IndexSpec(kind="flat")), tmp_path / "i.faiss")
    before = fi.index_fingerprint(path)

    def broken_write(index, name):
        Path(name).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        fi.save_index(fi.build_index(x[:10], ids[:10], fi.IndexSpec(kind="flat")), path)
    assert fi.index_fingerprint(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["i.faiss"]


def test_load_refuses_dimension_mismatch(tmp_path: Path, small_catalogue) -> None:
    x, ids = small_catalogue
    path = fi.save_index(fi.build_index(x, ids, fi.IndexSpec(kind="flat")), tmp_path / "i.faiss")
    with pytest.raises(ValueError, match=r"dimension 16 .* 32-d"):
        fi.load_index(path, expected_dim=32)
    with pytest.raises(ValueError, match="fingerprint"):
        fi.load_index(path, expected_fingerprint="0" * 64)
    with pytest.raises(FileNotFoundError):
        fi.load_index(tmp_path / "missing.faiss")
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        fi.load_index(garbage)


# ------------------------------------------------------------------ bad inputs


def _bad_inputs() -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    x = uniform(200, 8, seed=14)
    ids = np.arange(200, dtype=np.int64)
    nan = x.copy()
    nan[3, 2] = np.nan
    inf = x.copy()
    inf[5, 0] = np.inf
    dup = ids.copy()
    dup[7] = dup[8]
    neg = ids.copy()
    neg[0] = -1
    return [
        ("float64", x.astype(np.float64), ids, "float32"),
        ("1-D", x[0], ids[:1], "2-D"),
        ("NaN", nan, ids, "NaN"),
        ("inf", inf, ids, "infinite"),
        ("empty", x[:0], ids[:0], "non-empty"),
        ("int32 ids", x, ids.astype(np.int32), "int64"),
        ("2-D ids", x, ids.reshape(-1, 1), "1-D"),
        ("duplicate ids", x, dup, "unique"),
        ("negative ids", x, neg, ">= 0"),
        ("length mismatch", x, ids[:-1], "199 entries"),
        ("list", x.tolist(), ids, "numpy"),  # type: ignore[list-item]
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_are_refused_and_nothing_is_written(tmp_path: Path, case) -> None:
    _, emb, ids, needle = case
    out = tmp_path / "index"
    with pytest.raises(ValueError, match=needle):
        fi.build_and_check(emb, ids, out, n_queries=10, threads=1)
    with pytest.raises(ValueError, match=needle):
        fi.build_index(emb, ids, fi.IndexSpec(kind="flat"))
    assert not out.exists()


def test_bad_queries_and_settings_are_refused(tmp_path: Path, small_catalogue) -> None:
    x, ids = small_catalogue
    out = tmp_path / "index"
    with pytest.raises(ValueError, match="dimension 8, expected 16"):
        fi.build_and_check(x, ids, out, query_vectors=uniform(10, 8, seed=1))
    with pytest.raises(ValueError, match="recall_floor"):
        fi.build_and_check(x, ids, out, recall_floor=1.5)
    with pytest.raises(ValueError, match="exceeds the number of items"):
        fi.build_and_check(x[:50], ids[:50], out, spec=fi.IndexSpec(kind="ivf", nlist=64, nprobe=4))
    with pytest.raises(ValueError, match="threads"):
        fi.build_and_check(x, ids, out, threads=0)
    assert not out.exists()


def test_threads_follow_environment(monkeypatch) -> None:
    monkeypatch.setenv(fi.THREADS_ENV, "1")
    assert fi.configure_faiss_threads() == 1
    assert faiss.omp_get_max_threads() == 1
    monkeypatch.delenv(fi.THREADS_ENV)
    assert fi.configure_faiss_threads() == fi.DEFAULT_FAISS_THREADS
    assert fi.configure_faiss_threads(1) == 1
    monkeypatch.setenv(fi.THREADS_ENV, "many")
    with pytest.raises(ValueError, match=fi.THREADS_ENV):
        fi.configure_faiss_threads()
    fi.configure_faiss_threads(2)
