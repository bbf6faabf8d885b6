"""Loading an index directory on small FAISS indexes: kinds and search knobs through the
id-map wrappers, the query-cost estimate, and the checks of a local load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from serving.index_service.errors import ServiceError  # noqa: E402
from serving.index_service.faiss_params import index_kind, innermost_index  # noqa: E402
from serving.index_service.loading import apply_search_params, load_index_dir, query_cost  # noqa: E402
from serving.index_service.sources import parse_source  # noqa: E402

FP = "0123456789abcdef" * 4


# ---------------------------------------------------------- FAISS plumbing


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kind_and_search_params_through_idmap() -> None:
    x, ids = unit(200, 8, 0), np.arange(200, dtype=np.int64) + 10
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    flat.add_with_ids(x, ids)
    assert index_kind(flat) == "flat"
    assert apply_search_params(flat, "flat", nprobe=None, ef_search=None) == {}

    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    wrapped = faiss.IndexIDMap(ivf)
    wrapped.add_with_ids(x, ids)
    assert index_kind(wrapped) == "ivf"
    assert apply_search_params(wrapped, "ivf", nprobe=3, ef_search=None) == {"nprobe": 3, "nlist": 4}
    assert faiss.extract_index_ivf(wrapped).nprobe == 3
    with pytest.raises(ServiceError, match="exceeds the index's nlist"):
        apply_search_params(wrapped, "ivf", nprobe=5, ef_search=None)

    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(x, ids)
    assert index_kind(hnsw) == "hnsw"
    assert apply_search_params(hnsw, "hnsw", nprobe=None, ef_search=77) == {"ef_search": 77}
    assert innermost_index(hnsw).hnsw.efSearch == 77


def test_query_cost_orders_index_kinds() -> None:
    flat = query_cost("flat", 64, 50_000, {})
    ivf = query_cost("ivf", 64, 50_000, {"nlist": 900, "nprobe": 16})
    assert flat == 64 * 50_000 and ivf < flat
    assert query_cost("hnsw", 64, 10**6, {"ef_search": 128}) < query_cost("flat", 64, 10**6, {})


def write_dir(out: Path, x: np.ndarray, ids: np.ndarray, **meta_fields) -> str:
    out.mkdir(parents=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(out / "index.faiss"))
    fp = hashlib.sha256((out / "index.faiss").read_bytes()).hexdigest()
    data = {"dim": x.shape[1], "n_items": len(x), "fingerprint": fp, "spec": {"kind": "flat"}}
    data.update(meta_fields)
    (out / "index_meta.json").write_text(json.dumps(data))
    return fp


def test_load_index_dir_local(tmp_path: Path) -> None:
    x, ids = unit(50, 8, 1), np.arange(50, dtype=np.int64) * 3 + 5
    fp = write_dir(tmp_path / "ok", x, ids)
    source = parse_source(str(tmp_path / "ok"))
    loaded = load_index_dir(4, source, 8, fp.upper(), use_gpu=False)
    assert loaded is not None
    assert (loaded.version, loaded.dim, loaded.ntotal, loaded.kind, loaded.device) == (4, 8, 50, "flat", "cpu")
    scores, found = loaded.index.search(x[:1], 1)
    assert found[0, 0] == 5 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert set(loaded.info()) >= {"version", "dim", "ntotal", "fingerprint", "kind", "loaded_at", "source"}
    # The same fingerprint as one already loaded: nothing more is read.
    assert load_index_dir(4, source, 8, skip_fingerprint=fp) is None

    with pytest.raises(ServiceError) as err:
        load_index_dir(4, source, 16)
    assert err.value.status == 409
    with pytest.raises(ServiceError) as err:
        load_index_dir(4, source, 8, FP)
    assert err.value.status == 409
    with pytest.raises(ServiceError, match="is larger than"):
        load_index_dir(4, source, 8, max_index_bytes=100)

    write_dir(tmp_path / "count", x, ids, n_items=49)
    with pytest.raises(ServiceError, match="holds 50 vectors but its meta says 49"):
        load_index_dir(4, parse_source(str(tmp_path / "count")), 8)

    l2 = tmp_path / "l2"
    l2.mkdir()
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(8))
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(l2 / "index.faiss"))
    digest = hashlib.sha256((l2 / "index.faiss").read_bytes()).hexdigest()
    (l2 / "index_meta.json").write_text(json.dumps({"dim": 8, "fingerprint": digest, "spec": {"kind": "flat"}}))
    with pytest.raises(ServiceError, match="inner-product"):
        load_index_dir(4, parse_source(str(l2)), 8)
