"""Pure parts of the index service: request validation, source and meta parsing, result
formatting, search-parameter plumbing on small FAISS indexes, and the client's helpers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from serving.index_service import app as svc  # noqa: E402
from serving.index_service import client as cl  # noqa: E402

FP = "0123456789abcdef" * 4


# ------------------------------------------------------------------ search body


def body(**fields) -> bytes:
    base = {"version": 3, "vectors": [[0.5, -0.5]], "k": 10}
    base.update(fields)
    return json.dumps(base).encode()


def test_search_request_accepts_a_good_body_and_ignores_unknown_keys() -> None:
    req = svc.parse_search_request(body(trace_id="abc"))
    assert (req.version, req.vectors, req.k) == (3, [[0.5, -0.5]], 10)
    assert svc.parse_search_request(body(vectors=[[1, 2]])).vectors == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"nope", "Invalid JSON"),
        (b"[]", "body"),
        (body(k=0), "k"),
        (body(k=1001), "k"),
        (body(k="5"), "k"),
        (body(k=True), "k"),
        (body(version=0), "version"),
        (body(version=10**9 + 1), "version"),
        (body(version=2.0), "version"),
        (body(vectors=[]), "vectors"),
        (body(vectors=[[]]), "vectors.0"),
        (body(vectors=[["x", 1.0]]), "vectors.0.0"),
        (body(vectors=[[True, 1.0]]), "vectors.0.0"),
        (body(vectors=[[0.1, 0.2]] * 257), "vectors"),
    ],
)
def test_search_request_refusals_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(svc.ServiceError) as err:
        svc.parse_search_request(raw)
    assert err.value.status == 422
    assert field in err.value.detail


def test_validation_message_is_bounded_and_does_not_echo_input() -> None:
    secret = "s3cr3t-value"
    with pytest.raises(svc.ServiceError) as err:
        svc.parse_search_request(body(vectors=[[secret] * 50]))
    assert secret not in err.value.detail
    assert "more error(s)" in err.value.detail


def test_vectors_to_array_checks_length_and_finiteness() -> None:
    x = svc.vectors_to_array([[1, 2, 3], [4, 5, 6]], 3)
    assert x.dtype == np.float32 and x.shape == (2, 3) and x.flags["C_CONTIGUOUS"]
    with pytest.raises(svc.ServiceError, match=r"vectors\[1\] has 2 values; this index has dimension 3"):
        svc.vectors_to_array([[1, 2, 3], [1, 2]], 3)
    for bad in (float("nan"), float("inf"), 1e39):  # 1e39 overflows float32
        with pytest.raises(svc.ServiceError, match=r"first is vectors\[1\]") as err:
            svc.vectors_to_array([[1, 2, 3], [1, bad, 3]], 3)
        assert err.value.status == 422


def test_format_results_drops_padding_per_row() -> None:
    ids = np.array([[7, 8, -1], [9, -1, -1]], dtype=np.int64)
    scores = np.array([[0.9, 0.5, -3e38], [0.7, -3e38, -3e38]], dtype=np.float32)
    out_ids, out_scores = svc.format_results(ids, scores)
    assert out_ids == [[7, 8], [9]]
    assert np.allclose(out_scores[0], [0.9, 0.5]) and np.allclose(out_scores[1], [0.7])
    full_ids, _ = svc.format_results(ids[:, :1], scores[:, :1])
    assert full_ids == [[7], [9]] and all(isinstance(i, int) for i in full_ids[0])


# -------------------------------------------------------------- version, token


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1.5", "", "99999999999", "1e3", "٣", " 3"])
def test_parse_version_refuses(raw: str) -> None:
    with pytest.raises(svc.ServiceError) as err:
        svc.parse_version(raw)
    assert err.value.status == 422


def test_parse_version_accepts_range() -> None:
    assert svc.parse_version("1") == 1
    assert svc.parse_version("1000000000") == 10**9
    assert svc.parse_version("007") == 7


def test_bearer_matches() -> None:
    assert svc.bearer_matches("Bearer tok", "tok")
    assert svc.bearer_matches("bearer  tok ", "tok")
    for header in (None, "", "tok", "Basic tok", "Bearer", "Bearer tok2", "Bearer to"):
        assert not svc.bearer_matches(header, "tok")


# ------------------------------------------------------------------ load body


def test_load_request_validation() -> None:
    req = svc.parse_load_request(json.dumps({"source": "/a", "expected_dim": 8, "fingerprint": FP.upper()}).encode())
    assert req.fingerprint == FP.upper() and req.expected_dim == 8
    assert svc.parse_load_request(b'{"source": "/a", "expected_dim": 8}').fingerprint is None
    for bad, field in (
        ({"source": "/a", "expected_dim": 8, "fingerprnt": FP}, "fingerprnt"),
        ({"source": "/a", "expected_dim": 8, "fingerprint": "abc"}, "fingerprint"),
        ({"source": "", "expected_dim": 8}, "source"),
        ({"source": "/a", "expected_dim": 8.0}, "expected_dim"),
        ({"source": "/a"}, "expected_dim"),
    ):
        with pytest.raises(svc.ServiceError, match=field):
            svc.parse_load_request(json.dumps(bad).encode())


# -------------------------------------------------------------------- sources


def test_parse_source_local_and_file_uri() -> None:
    s = svc.parse_source("/var/x/index/")
    assert (s.kind, s.location) == ("local", "/var/x/index")
    assert s.file("index.faiss") == "/var/x/index/index.faiss"
    for uri in ("file:///var/x/index", "file://localhost/var/x/index", "FILE:///var/x/index"):
        assert svc.parse_source(uri).location == "/var/x/index"
    assert svc.parse_source("file:///var/with%20space").location == "/var/with space"


def test_parse_source_http_keeps_query_and_hides_credentials() -> None:
    mlflow = "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/index/"
    s = svc.parse_source(mlflow)
    assert s.kind == "http"
    assert s.file("index_meta.json") == mlflow + "index_meta.json"
    s = svc.parse_source("https://user:pw@example.org:8443/a/b?sig=1")
    assert s.file("index.faiss") == "https://user:pw@example.org:8443/a/b/index.faiss?sig=1"
    assert "pw" not in s.display and "pw" not in s.display_file("index.faiss")
    assert s.display == "https://example.org:8443/a/b?sig=1"


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "relative/dir", "./x", "s3://bucket/x", "mlflow-artifacts:/1/abc", "file://host/x",
     "file:relative", "http://", "http://:80/x", "http://h:99999/x", "http://h/x#frag", "/a\x00b"],
)
def test_parse_source_refusals(raw: str) -> None:
    with pytest.raises(svc.ServiceError) as err:
        svc.parse_source(raw)
    assert err.value.status == 400 and err.value.detail


# ----------------------------------------------------------------------- meta


def meta(**fields) -> bytes:
    base = {"dim": 8, "n_items": 10, "fingerprint": FP, "spec": {"kind": "ivf", "nprobe": 4, "ef_search": 0}}
    base.update(fields)
    return json.dumps(base).encode()


def test_parse_meta_reads_what_the_index_stage_writes() -> None:
    m = svc.parse_meta(meta())
    assert (m.dim, m.fingerprint, m.kind, m.nprobe, m.ef_search, m.n_items) == (8, FP, "ivf", 4, None, 10)
    m = svc.parse_meta(meta(spec={"kind": "hnsw", "nprobe": None, "ef_search": 128}, n_items=None))
    assert (m.kind, m.nprobe, m.ef_search, m.n_items) == ("hnsw", None, 128, None)
    assert svc.parse_meta(meta(fingerprint=FP.upper())).fingerprint == FP


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1]", b"\xff\xfe", meta(dim=0), meta(dim=True), meta(dim="8"), meta(fingerprint="abc"),
     meta(fingerprint=None), meta(spec=None), meta(spec={"kind": "lsh"}), meta(spec={"kind": "ivf", "nprobe": -1}),
     meta(n_items=-5)],
)
def test_parse_meta_refusals(raw: bytes) -> None:
    with pytest.raises(svc.ServiceError) as err:
        svc.parse_meta(raw)
    assert err.value.status == 422


# ---------------------------------------------------------- FAISS plumbing


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kind_and_search_params_through_idmap() -> None:
    x, ids = unit(200, 8, 0), np.arange(200, dtype=np.int64) + 10
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    flat.add_with_ids(x, ids)
    assert svc.index_kind(flat) == "flat"
    assert svc.apply_search_params(flat, "flat", nprobe=None, ef_search=None) == {}

    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    wrapped = faiss.IndexIDMap(ivf)
    wrapped.add_with_ids(x, ids)
    assert svc.index_kind(wrapped) == "ivf"
    assert svc.apply_search_params(wrapped, "ivf", nprobe=3, ef_search=None) == {"nprobe": 3, "nlist": 4}
    assert faiss.extract_index_ivf(wrapped).nprobe == 3
    with pytest.raises(svc.ServiceError, match="exceeds the index's nlist"):
        svc.apply_search_params(wrapped, "ivf", nprobe=5, ef_search=None)

    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(x, ids)
    assert svc.index_kind(hnsw) == "hnsw"
    assert svc.apply_search_params(hnsw, "hnsw", nprobe=None, ef_search=77) == {"ef_search": 77}
    assert svc.innermost_index(hnsw).hnsw.efSearch == 77


def test_query_cost_orders_index_kinds() -> None:
    flat = svc.query_cost("flat", 64, 50_000, {})
    ivf = svc.query_cost("ivf", 64, 50_000, {"nlist": 900, "nprobe": 16})
    assert flat == 64 * 50_000 and ivf < flat
    assert svc.query_cost("hnsw", 64, 10**6, {"ef_search": 128}) < svc.query_cost("flat", 64, 10**6, {})


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
    source = svc.parse_source(str(tmp_path / "ok"))
    loaded = svc.load_index_dir(4, source, 8, fp.upper(), use_gpu=False)
    assert loaded is not None
    assert (loaded.version, loaded.dim, loaded.ntotal, loaded.kind, loaded.device) == (4, 8, 50, "flat", "cpu")
    scores, found = loaded.index.search(x[:1], 1)
    assert found[0, 0] == 5 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert set(loaded.info()) >= {"version", "dim", "ntotal", "fingerprint", "kind", "loaded_at", "source"}
    # The same fingerprint as one already loaded: nothing more is read.
    assert svc.load_index_dir(4, source, 8, skip_fingerprint=fp) is None

    with pytest.raises(svc.ServiceError) as err:
        svc.load_index_dir(4, source, 16)
    assert err.value.status == 409
    with pytest.raises(svc.ServiceError) as err:
        svc.load_index_dir(4, source, 8, FP)
    assert err.value.status == 409
    with pytest.raises(svc.ServiceError, match="is larger than"):
        svc.load_index_dir(4, source, 8, max_index_bytes=100)

    write_dir(tmp_path / "count", x, ids, n_items=49)
    with pytest.raises(svc.ServiceError, match="holds 50 vectors but its meta says 49"):
        svc.load_index_dir(4, svc.parse_source(str(tmp_path / "count")), 8)

    l2 = tmp_path / "l2"
    l2.mkdir()
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(8))
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(l2 / "index.faiss"))
    digest = hashlib.sha256((l2 / "index.faiss").read_bytes()).hexdigest()
    (l2 / "index_meta.json").write_text(json.dumps({"dim": 8, "fingerprint": digest, "spec": {"kind": "flat"}}))
    with pytest.raises(svc.ServiceError, match="inner-product"):
        svc.load_index_dir(4, svc.parse_source(str(l2)), 8)


# --------------------------------------------------------------------- client


def test_client_rows_and_body() -> None:
    assert cl._as_rows(np.array([1, 2], dtype=np.float64)) == [[1.0, 2.0]]
    assert cl._as_rows([[1, 2], [3, 4]]) == [[1.0, 2.0], [3.0, 4.0]]
    for bad in ([], [[]], [[[1.0]]], [1.0, float("nan")], [[float("inf")]]):
        with pytest.raises(ValueError):
            cl._as_rows(bad)
    body = json.loads(cl._search_body(3, [[0.5]], np.int64(7)))
    assert body == {"version": 3, "vectors": [[0.5]], "k": 7}
    for k in (0, True, 2.5):
        with pytest.raises(ValueError):
            cl._search_body(3, [[0.5]], k)
    for version in (0, -1, True, "3", 1.0):
        with pytest.raises(ValueError):
            cl._version(version)


def test_client_error_text() -> None:
    err = cl.IndexServiceError(404, "index version 3 is not loaded")
    assert err.status == 404 and str(err) == "index service HTTP 404: index version 3 is not loaded"
    down = cl.IndexServiceError(None, "cannot reach http://x")
    assert down.status is None and "unreachable" in str(down)


def test_client_module_stays_light() -> None:
    src = Path(cl.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "json", "collections", "dataclasses", "typing", "httpx", "numpy"}, imports
