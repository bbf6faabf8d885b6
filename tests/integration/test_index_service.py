"""The index service as a real uvicorn process on loopback, driven through its client.

Index directories are built here with FAISS (the main venv has faiss-cpu too) the way the
index stage writes them; the service runs under the serving venv's python.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.index_service.client import AsyncIndexServiceClient, IndexServiceClient, IndexServiceError
from serving_helpers import Service, free_port, serving_python

pytestmark = pytest.mark.integration

faiss = pytest.importorskip("faiss")

TOKEN = "test-admin-token-7f3a"


# ----------------------------------------------------------------------- helpers


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index_dir(
    out: Path, index, *, kind: str, dim: int, n_items: int, nprobe: int = 0, ef_search: int = 0
) -> str:
    """Write index.faiss + index_meta.json as the index stage does; returns the fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    fp = sha256(out / "index.faiss")
    meta = {
        "dim": dim,
        "n_items": n_items,
        "fingerprint": fp,
        "spec": {"kind": kind, "metric": "inner_product", "nprobe": nprobe, "ef_search": ef_search},
    }
    (out / "index_meta.json").write_text(json.dumps(meta))
    return fp


def flat_dir(out: Path, x: np.ndarray, ids: np.ndarray) -> str:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, ids)
    return write_index_dir(out, index, kind="flat", dim=x.shape[1], n_items=len(x))


class Catalogue:
    def __init__(self, n: int, dim: int, seed: int, id_base: int) -> None:
        self.x = unit_vectors(n, dim, seed)
        self.ids = np.arange(n, dtype=np.int64) + id_base
        self.dim = dim


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Value of one sample in a Prometheus text exposition (labels matched exactly)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("index-service")


@pytest.fixture(scope="module")
def cat1() -> Catalogue:
    return Catalogue(400, 16, seed=1, id_base=1000)


@pytest.fixture(scope="module")
def cat2() -> Catalogue:
    return Catalogue(300, 8, seed=2, id_base=50_000)


@pytest.fixture(scope="module")
def dirs(workdir: Path, cat1: Catalogue, cat2: Catalogue) -> dict[str, tuple[Path, str]]:
    """Index directories shared by the tests: name -> (path, fingerprint)."""
    out = {}
    for name, cat in (("v1", cat1), ("v2", cat2)):
        path = workdir / "artifacts" / name
        out[name] = (path, flat_dir(path, cat.x, cat.ids))
    # Same dimension as v1, other vectors: a different index that must not replace v1.
    other = Catalogue(400, 16, seed=9, id_base=1000)
    path = workdir / "artifacts" / "v1_other"
    out["v1_other"] = (path, flat_dir(path, other.x, other.ids))
    return out


@pytest.fixture(scope="module")
def service(workdir: Path) -> Iterator[str]:
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = Service(
        "index_service",
        [str(serving_python()), "-m", "serving.index_service", "--host", "127.0.0.1", "--port", str(port),
         "--token-file", str(token_file), "--threads", "1"],
        workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=30)
        yield url
    finally:
        proc.stop()
    # Every refusal above is a handled 4xx; a traceback means something escaped.
    log_text = proc.log_path.read_text()
    assert "Traceback" not in log_text, log_text[-3000:]


@pytest.fixture()
def client(service: str) -> Iterator[IndexServiceClient]:
    with IndexServiceClient(service, token=TOKEN) as c:
        yield c


@pytest.fixture()
def raw(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=10.0) as c:
        yield c


def ensure_loaded(client: IndexServiceClient, version: int, path: Path, dim: int) -> None:
    client.load_index(version, str(path), dim)


def assert_still_serving(client: IndexServiceClient, cat: Catalogue, version: int) -> None:
    q = unit_vectors(1, cat.dim, seed=99)
    res = client.search(version, q, 5)
    want, _ = exact_topk(cat.x, cat.ids, q, 5)
    assert res.ids == want.tolist()


# ------------------------------------------------------------------------- tests


def test_load_two_versions_and_search_matches_exact(client, dirs, cat1, cat2) -> None:
    (p1, fp1), (p2, fp2) = dirs["v1"], dirs["v2"]
    r1 = client.load_index(1, str(p1), 16, fingerprint=fp1)
    r2 = client.load_index(2, f"file://{p2}", 8)
    assert r1["status"] == "loaded" and r2["status"] == "loaded"
    assert {1, 2} <= set(client.health()["versions"])

    info = client.get_index(1)
    assert (info["dim"], info["ntotal"], info["fingerprint"], info["kind"]) == (16, 400, fp1, "flat")
    assert info["source"] == str(p1) and info["loaded_at"]
    listed = {i["version"]: i for i in client.list_indexes()}
    assert listed[2]["fingerprint"] == fp2 and listed[2]["dim"] == 8

    for version, cat in ((1, cat1), (2, cat2)):
        q = unit_vectors(7, cat.dim, seed=10 + version)
        res = client.search(version, q, 10)
        want_ids, want_scores = exact_topk(cat.x, cat.ids, q, 10)
        assert res.version == version
        assert res.ids == want_ids.tolist()
        np.testing.assert_allclose(np.array(res.scores), want_scores, atol=1e-5)


def test_reload_is_idempotent_and_versions_are_immutable(client, dirs) -> None:
    (p1, fp1), (other, fp_other) = dirs["v1"], dirs["v1_other"]
    ensure_loaded(client, 1, p1, 16)
    again = client.load_index(1, str(p1), 16)
    assert again["status"] == "already loaded"
    assert client.load_index(1, str(p1), 16, fingerprint=fp1.upper())["status"] == "already loaded"

    for fingerprint in (None, fp_other):
        with pytest.raises(IndexServiceError) as err:
            client.load_index(1, str(other), 16, fingerprint=fingerprint)
        assert err.value.status == 409 and "immutable" in err.value.detail
    assert client.get_index(1)["fingerprint"] == fp1


def test_k_beyond_catalogue_drops_padding(client, workdir) -> None:
    cat = Catalogue(5, 4, seed=5, id_base=70)
    path = workdir / "artifacts" / "tiny"
    flat_dir(path, cat.x, cat.ids)
    client.load_index(6, str(path), 4)
    res = client.search(6, unit_vectors(2, 4, seed=6), 50)
    assert [len(r) for r in res.ids] == [5, 5]
    assert all(i >= 70 for row in res.ids for i in row)
    assert sorted(res.ids[0]) == list(range(70, 75))


def test_ivf_and_hnsw_get_their_search_params_from_meta(client, workdir) -> None:
    cat = Catalogue(600, 16, seed=4, id_base=9000)
    q = unit_vectors(20, 16, seed=40)
    want, _ = exact_topk(cat.x, cat.ids, q, 20)

    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(cat.x)
    ivf.add_with_ids(cat.x, cat.ids)
    ivf.nprobe = 1  # saved with nprobe=1; the meta asks for all 8 lists (exact)
    _, saved_ids = ivf.search(q, 20)
    assert saved_ids.tolist() != want.tolist(), "test setup: nprobe=1 should miss neighbours"
    write_index_dir(workdir / "artifacts" / "ivf", ivf, kind="ivf", dim=16, n_items=600, nprobe=8)

    client.load_index(4, str(workdir / "artifacts" / "ivf"), 16)
    info = client.get_index(4)
    assert info["kind"] == "ivf" and info["search_params"] == {"nprobe": 8, "nlist": 8}
    assert client.search(4, q, 20).ids == want.tolist()

    hnsw = faiss.IndexHNSWFlat(16, 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 16
    index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(cat.x, cat.ids)
    write_index_dir(workdir / "artifacts" / "hnsw", index, kind="hnsw", dim=16, n_items=600, ef_search=300)
    client.load_index(5, str(workdir / "artifacts" / "hnsw"), 16)
    info = client.get_index(5)
    assert info["kind"] == "hnsw" and info["search_params"] == {"ef_search": 300}
    got = client.search(5, q, 20).ids
    recall = np.mean([len(set(g) & set(w)) / 20 for g, w in zip(got, want.tolist())])
    assert recall >= 0.95


def test_dimension_mismatch_is_refused_and_nothing_loads(client, dirs, workdir, cat1) -> None:
    p1, _ = dirs["v1"]
    with pytest.raises(IndexServiceError) as err:
        client.load_index(11, str(p1), 32)
    assert err.value.status == 409 and "dimension 16" in err.value.detail and "32" in err.value.detail

    # The meta lies about the dimension: the index itself is checked too.
    liar = workdir / "artifacts" / "liar"
    flat_dir(liar, cat1.x, cat1.ids)
    meta = json.loads((liar / "index_meta.json").read_text())
    meta["dim"] = 32
    (liar / "index_meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexServiceError) as err:
        client.load_index(11, str(liar), 32)
    assert err.value.status == 409 and "dimension 16" in err.value.detail

    with pytest.raises(IndexServiceError) as err:
        client.get_index(11)
    assert err.value.status == 404
    assert 11 not in client.health()["versions"]


def test_wrong_fingerprints_are_refused(client, dirs, workdir, cat1) -> None:
    p1, fp1 = dirs["v1"]
    with pytest.raises(IndexServiceError) as err:
        client.load_index(12, str(p1), 16, fingerprint="ab" * 32)
    assert err.value.status == 409 and "fingerprint" in err.value.detail

    # index.faiss replaced after its meta was written (another build's file).
    swapped = workdir / "artifacts" / "swapped"
    flat_dir(swapped, cat1.x, cat1.ids)
    (swapped / "index.faiss").write_bytes((dirs["v1_other"][0] / "index.faiss").read_bytes())
    with pytest.raises(IndexServiceError) as err:
        client.load_index(12, str(swapped), 16)
    assert err.value.status == 409 and "sha256" in err.value.detail
    assert 12 not in client.health()["versions"]


def test_admin_needs_the_token(service, client, raw, dirs, cat1) -> None:
    p1, _ = dirs["v1"]
    ensure_loaded(client, 1, p1, 16)
    body = {"source": str(p1), "expected_dim": 16}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": TOKEN}):
        r = raw.put("/admin/indexes/13", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["detail"]
        r = raw.delete("/admin/indexes/1", headers=headers)
        assert r.status_code == 401
    with IndexServiceClient(service) as anonymous, pytest.raises(IndexServiceError) as err:
        anonymous.unload_index(1)
    assert err.value.status == 401
    assert 13 not in client.health()["versions"]
    assert_still_serving(client, cat1, 1)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/indexes/14", b"not json", 422),
        ("/admin/indexes/14", b"[]", 422),
        ("/admin/indexes/14", {"source": "/nope", "expected_dim": 16, "extra": 1}, 422),
        ("/admin/indexes/14", {"source": "/nope", "expected_dim": "16"}, 422),
        ("/admin/indexes/14", {"source": "/nope", "expected_dim": 0}, 422),
        ("/admin/indexes/14", {"source": "/nope", "expected_dim": 16, "fingerprint": "xyz"}, 422),
        ("/admin/indexes/14", {"source": "/definitely/not/here", "expected_dim": 16}, 400),
        ("/admin/indexes/14", {"source": "relative/dir", "expected_dim": 16}, 400),
        ("/admin/indexes/14", {"source": "s3://bucket/index", "expected_dim": 16}, 400),
        ("/admin/indexes/14", {"source": "file://otherhost/x", "expected_dim": 16}, 400),
        ("/admin/indexes/14", {"source": "http://", "expected_dim": 16}, 400),
        ("/admin/indexes/abc", {"source": "/x", "expected_dim": 16}, 422),
        ("/admin/indexes/0", {"source": "/x", "expected_dim": 16}, 422),
        ("/admin/indexes/-3", {"source": "/x", "expected_dim": 16}, 422),
        ("/admin/indexes/99999999999", {"source": "/x", "expected_dim": 16}, 422),
    ],
)
def test_bad_load_requests_are_refused(raw, client, dirs, cat1, path, body, status) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    headers = {"authorization": f"Bearer {TOKEN}"}
    if isinstance(body, bytes):
        r = raw.put(path, content=body, headers=headers)
    else:
        r = raw.put(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert client.health()["versions"] and 14 not in client.health()["versions"]
    assert_still_serving(client, cat1, 1)


def test_unusable_artifacts_are_refused(client, workdir, dirs, cat1) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    base = workdir / "artifacts"

    garbage = base / "garbage"
    garbage.mkdir()
    (garbage / "index.faiss").write_bytes(b"this is not a faiss index" * 10)
    meta = {"dim": 16, "fingerprint": sha256(garbage / "index.faiss"), "spec": {"kind": "flat"}}
    (garbage / "index_meta.json").write_text(json.dumps(meta))

    bad_meta = base / "bad_meta"
    flat_dir(bad_meta, cat1.x, cat1.ids)
    (bad_meta / "index_meta.json").write_text("{not json")

    no_meta = base / "no_meta"
    flat_dir(no_meta, cat1.x, cat1.ids)
    (no_meta / "index_meta.json").unlink()

    wrong_kind = base / "wrong_kind"
    flat_dir(wrong_kind, cat1.x, cat1.ids)
    meta = json.loads((wrong_kind / "index_meta.json").read_text())
    meta["spec"]["kind"] = "hnsw"
    (wrong_kind / "index_meta.json").write_text(json.dumps(meta))

    for path, status, words in (
        (garbage, 422, "not a readable FAISS index"),
        (bad_meta, 422, "not valid JSON"),
        (no_meta, 400, "index_meta.json"),
        (wrong_kind, 422, "meta says hnsw"),
    ):
        with pytest.raises(IndexServiceError) as err:
            client.load_index(15, str(path), 16)
        assert err.value.status == status and words in err.value.detail, err.value
    assert 15 not in client.health()["versions"]
    assert_still_serving(client, cat1, 1)


def _body(version=1, vectors=None, k=5, dim=16) -> bytes:
    vectors = vectors if vectors is not None else [[0.25] * dim]
    return json.dumps({"version": version, "vectors": vectors, "k": k}).encode()


GARBAGE_SEARCHES = {
    "not_json": (b"{version: 1", 422),
    "empty": (b"", 422),
    "array": (b"[1, 2, 3]", 422),
    "missing_k": (b'{"version": 1, "vectors": [[0.1]]}', 422),
    "version_string": (b'{"version": "1", "vectors": [[0.1]], "k": 5}', 422),
    "k_string": (_body(k="5"), 422),
    "k_bool": (b'{"version": 1, "vectors": [[0.1]], "k": true}', 422),
    "k_zero": (_body(k=0), 422),
    "k_huge": (_body(k=1001), 422),
    "k_float": (_body(k=5.5), 422),
    "vectors_string": (b'{"version": 1, "vectors": "abc", "k": 5}', 422),
    "vector_of_strings": (_body(vectors=[["a"] * 16]), 422),
    "flat_vector": (_body(vectors=[0.1] * 16), 422),
    "no_vectors": (_body(vectors=[]), 422),
    "empty_vector": (_body(vectors=[[]]), 422),
    "nan": (_body().replace(b"0.25", b"NaN", 1), 422),
    "infinity": (_body().replace(b"0.25", b"-Infinity", 1), 422),
    "float32_overflow": (_body().replace(b"0.25", b"1e39", 1), 422),
    "wrong_length": (_body(vectors=[[0.1] * 15]), 422),
    "ragged": (_body(vectors=[[0.1] * 16, [0.1] * 17]), 422),
    "too_many_vectors": (_body(vectors=[[0.1] * 16] * 257), 422),
    "version_zero": (_body(version=0), 422),
    "version_not_loaded": (_body(version=424242), 404),
    "huge_body": (b'{"version": 1, "vectors": [[' + b"0.1, " * 400_000 + b'0.1]], "k": 5}', 413),
    "user_ids_too_few": (_body()[:-1] + b', "user_ids": []}', 422),
    "user_ids_too_many": (_body()[:-1] + b', "user_ids": [1, 2]}', 422),
    "user_id_negative": (_body()[:-1] + b', "user_ids": [-3]}', 422),
    "user_id_string": (_body()[:-1] + b', "user_ids": ["3"]}', 422),
    "user_ids_not_a_list": (_body()[:-1] + b', "user_ids": 3}', 422),
}


@pytest.mark.parametrize("case", sorted(GARBAGE_SEARCHES))
def test_garbage_searches_get_4xx_and_change_nothing(raw, client, dirs, cat1, case) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    body, status = GARBAGE_SEARCHES[case]
    r = raw.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    assert_still_serving(client, cat1, 1)


def test_streamed_oversized_body_is_cut_off(raw, client, dirs, cat1) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the service must count itself
        for _ in range(40):
            yield b" " * 65536

    r = raw.post("/search", content=chunks())
    assert r.status_code == 413
    assert_still_serving(client, cat1, 1)


def test_unload_while_searching_other_versions(service, client, dirs, workdir, cat1) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    # Large enough that an 8-vector batch runs in a worker thread: an unload then lands
    # while FAISS is inside the search.
    big = Catalogue(20_000, 16, seed=7, id_base=100_000)
    big_dir = workdir / "artifacts" / "big"
    flat_dir(big_dir, big.x, big.ids)
    client.load_index(7, str(big_dir), 16)

    q1 = unit_vectors(1, 16, seed=71)
    want1, _ = exact_topk(cat1.x, cat1.ids, q1, 10)
    q7 = unit_vectors(8, 16, seed=72)
    want7, _ = exact_topk(big.x, big.ids, q7, 10)
    stop = threading.Event()
    failures: list[str] = []
    other_statuses: dict[int, int] = {}
    counts = {"v1": 0}

    def hammer_v1() -> None:
        with IndexServiceClient(service, timeout=10.0) as c:
            while not stop.is_set():
                try:
                    res = c.search(1, q1, 10)
                    if res.ids != want1.tolist():
                        failures.append(f"wrong ids {res.ids}")
                    counts["v1"] += 1
                except Exception as exc:  # every failure is a test failure
                    failures.append(repr(exc))

    def hammer_v7() -> None:
        with IndexServiceClient(service, timeout=10.0) as c:
            while not stop.is_set():
                try:
                    res = c.search(7, q7, 10)
                    status = 200
                    if res.ids != want7.tolist():
                        failures.append("v7 answered wrong ids")
                except IndexServiceError as exc:
                    status = exc.status if exc.status is not None else -1
                other_statuses[status] = other_statuses.get(status, 0) + 1

    threads = [threading.Thread(target=hammer_v1), threading.Thread(target=hammer_v7)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            time.sleep(0.15)
            client.unload_index(7)
            time.sleep(0.1)
            assert client.load_index(7, str(big_dir), 16)["status"] == "loaded"
        time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    client.unload_index(7)

    assert not failures, failures[:5]
    assert counts["v1"] > 20
    assert set(other_statuses) <= {200, 404}, other_statuses
    assert other_statuses.get(200, 0) > 0


@pytest.fixture()
def http_artifacts(workdir: Path) -> Iterator[str]:
    """The artifacts folder served by ``python -m http.server`` (a stand-in for MLflow's proxy)."""
    port = free_port()
    proc = Service(
        "http_server",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(workdir / "artifacts")],
        workdir,
    )
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_load_over_http(client, http_artifacts, dirs, cat1) -> None:
    _, fp1 = dirs["v1"]
    res = client.load_index(3, f"{http_artifacts}/v1/", 16, fingerprint=fp1)
    assert res["status"] == "loaded" and res["index"]["source"] == f"{http_artifacts}/v1"
    q = unit_vectors(4, 16, seed=33)
    want, _ = exact_topk(cat1.x, cat1.ids, q, 10)
    assert client.search(3, q, 10).ids == want.tolist()

    with pytest.raises(IndexServiceError) as err:
        client.load_index(16, f"{http_artifacts}/no-such-dir", 16)
    assert err.value.status == 502 and "404" in err.value.detail
    with pytest.raises(IndexServiceError) as err:
        client.load_index(16, f"http://127.0.0.1:{free_port()}/v1", 16)
    assert err.value.status == 502 and "cannot fetch" in err.value.detail
    assert 16 not in client.health()["versions"]
    client.unload_index(3)


def test_metrics_count_traffic_per_version(client, dirs) -> None:
    p1, _ = dirs["v1"]
    client.load_index(8, str(p1), 16)
    q = unit_vectors(3, 16, seed=8)
    for _ in range(3):
        client.search(8, q, 4)
    client.unload_index(8)
    with pytest.raises(IndexServiceError) as err:
        client.search(8, q, 4)
    assert err.value.status == 404

    text = client.metrics_text()
    assert metric_value(text, "dayloop_index_search_total", version="8") == 3
    assert metric_value(text, "dayloop_index_search_vectors_total", version="8") == 9
    assert metric_value(text, "dayloop_index_search_seconds_count", version="8") == 3
    assert metric_value(text, "dayloop_index_search_errors_total", version="8", reason="not_loaded") == 1
    assert metric_value(text, "dayloop_index_loaded", version="8") == 0
    ensure_loaded(client, 1, p1, 16)
    assert metric_value(client.metrics_text(), "dayloop_index_loaded", version="1") == 1


def test_client_errors_are_clear(service, client, dirs) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    with pytest.raises(IndexServiceError) as err:
        client.search(999, [0.1] * 16, 3)
    assert err.value.status == 404 and "not loaded" in str(err.value)
    with pytest.raises(ValueError):
        client.search(1, [float("nan")] + [0.1] * 15, 3)
    with IndexServiceClient(f"http://127.0.0.1:{free_port()}", timeout=1.0) as dead:
        with pytest.raises(IndexServiceError) as err:
            dead.health()
    assert err.value.status is None and "cannot reach" in str(err.value)


def test_single_search_latency_and_async_client(service, client, dirs, cat1, capsys) -> None:
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    q = unit_vectors(1, 16, seed=123)[0]
    want, _ = exact_topk(cat1.x, cat1.ids, q[None, :], 10)
    for _ in range(30):
        client.search(1, q, 10)
    times = []
    for _ in range(300):
        t0 = time.perf_counter()
        client.search(1, q, 10)
        times.append(time.perf_counter() - t0)

    async def run_async() -> tuple[list[int], list[float]]:
        async with AsyncIndexServiceClient(service) as ac:
            first = await ac.search(1, q, 10, timeout=2.0)
            assert first.ids == want[0].tolist() and len(first.scores) == 10
            spent = []
            for _ in range(200):
                t0 = time.perf_counter()
                await ac.search(1, q, 10)
                spent.append(time.perf_counter() - t0)
            with pytest.raises(IndexServiceError) as err:
                await ac.search(31337, q, 10)
            assert err.value.status == 404
            return first.ids, spent

    ids, async_times = asyncio.run(run_async())
    assert ids == want[0].tolist()
    with capsys.disabled():
        print(
            f"\n[index service] single-vector search over {len(cat1.ids)} items, k=10: "
            f"sync client p50 {statistics.median(times) * 1e3:.3f} ms, "
            f"p90 {np.percentile(times, 90) * 1e3:.3f} ms; "
            f"async client p50 {statistics.median(async_times) * 1e3:.3f} ms"
        )


# ------------------------------------------------------------ seen-items exclusion


def add_seen_file(index_dir: Path, users: list[int], seen: list[list[int]], last_day: str) -> None:
    """Put a seen-items file beside an index and name it in the meta, as the index stage does."""
    from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file

    pairs_u = [u for u, items in zip(users, seen) for _ in items]
    pairs_i = [i for items in seen for i in items]
    path = write_seen_file(index_dir / SEEN_FILE, *csr_from_pairs(pairs_u, pairs_i), last_day)
    meta = json.loads((index_dir / "index_meta.json").read_text())
    meta["seen_items"] = {"file": SEEN_FILE, "fingerprint": sha256(path), "last_day": last_day}
    (index_dir / "index_meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def seen_index(workdir: Path, cat1: Catalogue) -> dict:
    """cat1's index with a history: user u (of 40) has seen a random half of their exact top-30
    plus items they would never get (so k + seen count overfetches more than needed)."""
    rng = np.random.default_rng(21)
    users = list(range(100, 140))
    q = unit_vectors(len(users), cat1.dim, seed=21)
    top, _ = exact_topk(cat1.x, cat1.ids, q, 30)
    seen = [sorted(set(rng.choice(row, size=15, replace=False).tolist()) | {int(cat1.ids[-1]), int(cat1.ids[-2])})
            for row in top]
    seen[0] = top[0].tolist()  # the whole top-30 seen: the answer comes from ranks 31..
    path = workdir / "artifacts" / "with_seen"
    flat_dir(path, cat1.x, cat1.ids)
    add_seen_file(path, users, seen, "2026-04-05")
    return {"path": path, "users": users, "q": q, "seen": seen}


def test_search_with_user_ids_excludes_each_users_seen_items_and_keeps_k(client, seen_index, cat1, dirs) -> None:
    client.load_index(21, str(seen_index["path"]), 16)
    info = client.get_index(21)["seen_items"]
    assert info["available"] is True and info["last_day"] == "2026-04-05" and info["users"] == 40
    users, q, k = seen_index["users"], seen_index["q"], 10
    res = client.search(21, q, k, user_ids=users)
    assert res.seen_last_day == "2026-04-05"
    everything, _ = exact_topk(cat1.x, cat1.ids, q, len(cat1.ids))
    for row, scores, full, mine in zip(res.ids, res.scores, everything, seen_index["seen"], strict=True):
        assert len(row) == k and not set(row) & set(mine)
        assert row == [i for i in full.tolist() if i not in set(mine)][:k]  # the best k unseen, in order
        assert scores == sorted(scores, reverse=True)
    # One row at a time (the router's call) answers the same as the batch.
    for i in (0, 7):
        assert client.search(21, q[i], k, user_ids=[users[i]]).ids == [res.ids[i]]
    # A user without history, or no user_ids at all: the plain top-k.
    plain, _ = exact_topk(cat1.x, cat1.ids, q[:1], k)
    assert client.search(21, q[:1], k, user_ids=[999]).ids == plain.tolist()
    unfiltered = client.search(21, q[:1], k)
    assert unfiltered.ids == plain.tolist() and unfiltered.seen_last_day is None

    async def one_async() -> list[int]:
        async with AsyncIndexServiceClient(client.base_url) as ac:
            got = await ac.search(21, q[0], k, user_id=users[0])
            assert got.seen_last_day == "2026-04-05"
            return got.ids

    assert asyncio.run(one_async()) == res.ids[0]

    # An index from before the seen file: still served, unfiltered, and it says so.
    ensure_loaded(client, 1, dirs["v1"][0], 16)
    assert client.get_index(1)["seen_items"]["available"] is False
    old = client.search(1, q[:1], k, user_ids=[users[0]])
    assert old.ids == plain.tolist() and old.seen_last_day is None
    text = client.metrics_text()
    assert metric_value(text, "dayloop_index_search_exclusion_total", version="21", outcome="applied") >= 43
    assert metric_value(text, "dayloop_index_search_exclusion_total", version="1", outcome="unavailable") >= 1
    with pytest.raises(ValueError):
        client.search(21, q[:2], k, user_ids=[1])
    client.unload_index(21)


def test_a_seen_file_from_another_build_refuses_the_load(client, seen_index, workdir, cat1) -> None:
    path = workdir / "artifacts" / "seen_swapped"
    flat_dir(path, cat1.x, cat1.ids)
    add_seen_file(path, [1], [[int(cat1.ids[0])]], "2026-04-05")
    (path / "seen_items.npz").write_bytes((seen_index["path"] / "seen_items.npz").read_bytes())
    with pytest.raises(IndexServiceError) as err:
        client.load_index(22, str(path), 16)
    assert err.value.status == 409 and "seen_items.npz" in err.value.detail
    assert 22 not in client.health()["versions"]


def test_seen_file_loads_over_http(client, http_artifacts, seen_index) -> None:
    client.load_index(23, f"{http_artifacts}/with_seen", 16)
    assert client.get_index(23)["seen_items"]["last_day"] == "2026-04-05"
    users, q = seen_index["users"], seen_index["q"]
    res = client.search(23, q[:5], 10, user_ids=users[:5])
    for row, mine in zip(res.ids, seen_index["seen"][:5], strict=True):
        assert len(row) == 10 and not set(row) & set(mine)
    client.unload_index(23)


# ------------------------------------------------------------- seen-items swap


def unseen_top(full: np.ndarray, seen: list[int], k: int) -> list[int]:
    mine = set(seen)
    return [i for i in full.tolist() if i not in mine][:k]


@pytest.fixture(scope="module")
def seen_days(workdir: Path, seen_index: dict, cat1: Catalogue) -> dict:
    """Seen-items files for seen_index's users on other days, each alone in its directory:
    a day later (each user also saw the best 5 they had not seen, so their top 10 moves) and
    a day earlier (the first half of each history). day -> (dir, sha256, seen lists)."""
    from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file

    everything, _ = exact_topk(cat1.x, cat1.ids, seen_index["q"], len(cat1.ids))
    later = [sorted(set(s) | set(unseen_top(full, s, 5))) for s, full in zip(seen_index["seen"], everything)]
    earlier = [s[: len(s) // 2] for s in seen_index["seen"]]
    out = {"2026-04-05": (seen_index["path"], sha256(seen_index["path"] / SEEN_FILE), seen_index["seen"])}
    for day, lists in (("2026-04-06", later), ("2026-04-04", earlier)):
        d = workdir / "artifacts" / f"seen_{day}"
        d.mkdir(parents=True, exist_ok=True)
        us = [u for u, items in zip(seen_index["users"], lists) for _ in items]
        f = write_seen_file(d / SEEN_FILE, *csr_from_pairs(us, [i for items in lists for i in items]), day)
        out[day] = (d, sha256(f), lists)
    out["everything"] = everything
    return out


def test_a_loaded_versions_seen_items_are_swapped_for_a_fresher_history(client, raw, seen_index, seen_days, dirs,
                                                                        http_artifacts) -> None:
    users, q, k = seen_index["users"], seen_index["q"], 10
    client.load_index(31, str(seen_index["path"]), 16)
    fresh_dir, fresh_fp, fresh_seen = seen_days["2026-04-06"]
    out = client.update_seen(31, str(fresh_dir), fresh_fp)
    assert out["status"] == "updated" and out["previous"]["last_day"] == "2026-04-05"
    info = client.get_index(31)["seen_items"]
    assert (info["last_day"], info["fingerprint"]) == ("2026-04-06", fresh_fp)
    assert info["source"] == str(fresh_dir / "seen_items.npz") and info["users"] == 40
    res = client.search(31, q, k, user_ids=users)
    assert res.seen_last_day == "2026-04-06"
    assert res.ids == [unseen_top(full, s, k) for full, s in zip(seen_days["everything"], fresh_seen)]
    # The file in use (its sha256) answers from what is loaded, like a load does.
    assert client.update_seen(31, str(fresh_dir / "seen_items.npz"), fresh_fp.upper())["status"] == "unchanged"

    # Refusals leave the fresher table in place.
    old_dir, old_fp, old_seen = seen_days["2026-04-04"]
    refusals = [
        (lambda: client.update_seen(31, str(old_dir), old_fp), 409, "backwards"),
        (lambda: client.update_seen(31, str(old_dir), seen_days["2026-04-05"][1]), 409, "sha256"),
        (lambda: client.update_seen(31, str(dirs["v1"][0]), "0" * 64), 400, "seen_items.npz"),
        (lambda: client.update_seen(31, str(dirs["v1"][0] / "index.faiss"), sha256(dirs["v1"][0] / "index.faiss")),
         422, "not a readable .npz"),
        (lambda: client.update_seen(31, "relative/dir", "0" * 64), 400, "absolute"),
        (lambda: client.update_seen(77, str(fresh_dir), fresh_fp), 404, "not loaded"),
    ]
    for call, status, words in refusals:
        with pytest.raises(IndexServiceError) as err:
            print("accepted where a refusal naming", repr(words), "was due:", call())
        assert err.value.status == status and words in err.value.detail, err.value.detail
    assert client.get_index(31)["seen_items"]["fingerprint"] == fresh_fp
    body = {"source": str(old_dir), "fingerprint": old_fp}
    assert raw.put("/admin/indexes/31/seen", json=body).status_code == 401
    headers = {"authorization": f"Bearer {TOKEN}"}
    for bad in ({"source": str(old_dir)}, {**body, "allow_older": "true"}, {**body, "extra": 1}):
        assert raw.put("/admin/indexes/31/seen", json=bad, headers=headers).status_code == 422
    assert client.search(31, q, k, user_ids=users).ids == res.ids

    # Going back is possible when asked for.
    assert client.update_seen(31, str(old_dir), old_fp, allow_older=True)["status"] == "updated"
    assert client.search(31, q[:1], k, user_ids=users[:1]).ids == [unseen_top(seen_days["everything"][0],
                                                                               old_seen[0], k)]

    # An index loaded without a seen file starts excluding once it gets one; over HTTP too.
    client.load_index(32, str(dirs["v1"][0]), 16)
    assert client.update_seen(32, f"{http_artifacts}/seen_2026-04-06/seen_items.npz", fresh_fp)["status"] == "updated"
    assert client.get_index(32)["seen_items"]["source"] == f"{http_artifacts}/seen_2026-04-06/seen_items.npz"
    got = client.search(32, q[:3], k, user_ids=users[:3])
    assert got.seen_last_day == "2026-04-06" and got.ids == res.ids[:3]

    text = client.metrics_text()
    assert metric_value(text, "dayloop_index_seen_updates_total", outcome="updated") >= 3
    assert metric_value(text, "dayloop_index_seen_updates_total", outcome="unchanged") >= 1
    assert metric_value(text, "dayloop_index_seen_updates_total", outcome="refused_409") >= 2
    midnight = datetime.datetime(2026, 4, 6, tzinfo=datetime.timezone.utc).timestamp()
    assert metric_value(text, "dayloop_index_seen_last_day_timestamp_seconds", version="32") == midnight
    client.unload_index(31)
    client.unload_index(32)
    text = client.metrics_text()
    assert metric_value(text, "dayloop_index_seen_last_day_timestamp_seconds", version="32") == 0


def test_searches_during_swaps_see_one_history_or_the_other(client, service, seen_index, seen_days) -> None:
    users, q, k = seen_index["users"], seen_index["q"], 10
    client.load_index(33, str(seen_index["path"]), 16)
    want = {day: [unseen_top(full, s, k) for full, s in zip(seen_days["everything"], seen_days[day][2])]
            for day in ("2026-04-04", "2026-04-05", "2026-04-06")}
    answers: list[tuple[str | None, list[list[int]]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def search_loop() -> None:
        with IndexServiceClient(service) as c:
            while not stop.is_set():
                try:
                    r = c.search(33, q, k, user_ids=users)
                    answers.append((r.seen_last_day, r.ids))
                except Exception as exc:  # noqa: BLE001 - counted, asserted below
                    failures.append(repr(exc))

    threads = [threading.Thread(target=search_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            for day in ("2026-04-06", "2026-04-04", "2026-04-05"):
                d, fp, _ = seen_days[day]
                client.update_seen(33, str(d), fp, allow_older=True)
                time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:3]
    days = {day for day, _ in answers}
    assert len(answers) > 20 and len(days) >= 2, (len(answers), days)
    for day, ids in answers:  # every batch is wholly one history's answer
        assert ids == want[day], day
    client.unload_index(33)
