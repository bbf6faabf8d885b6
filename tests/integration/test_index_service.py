"""The index service as a real uvicorn process on loopback, driven through its client.

Index directories are built here with FAISS (the main venv has faiss-cpu too) the way the
index stage writes them; the service runs under the serving venv's python.
"""

from __future__ import annotations

import asyncio
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
