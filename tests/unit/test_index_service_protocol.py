"""The index service's request bodies and answers: search and load bodies, URL versions,
query vectors, result rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.index_service.errors import ServiceError
from serving.index_service.protocol import (
    format_results,
    parse_load_request,
    parse_search_request,
    parse_version,
    vectors_to_array,
)

FP = "0123456789abcdef" * 4


# ------------------------------------------------------------------ search body


def body(**fields) -> bytes:
    base = {"version": 3, "vectors": [[0.5, -0.5]], "k": 10}
    base.update(fields)
    return json.dumps(base).encode()


def test_search_request_accepts_a_good_body_and_ignores_unknown_keys() -> None:
    req = parse_search_request(body(trace_id="abc"))
    assert (req.version, req.vectors, req.k) == (3, [[0.5, -0.5]], 10)
    assert parse_search_request(body(vectors=[[1, 2]])).vectors == [[1.0, 2.0]]


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
    with pytest.raises(ServiceError) as err:
        parse_search_request(raw)
    assert err.value.status == 422
    assert field in err.value.detail


def test_validation_message_is_bounded_and_does_not_echo_input() -> None:
    secret = "s3cr3t-value"
    with pytest.raises(ServiceError) as err:
        parse_search_request(body(vectors=[[secret] * 50]))
    assert secret not in err.value.detail
    assert "more error(s)" in err.value.detail


def test_vectors_to_array_checks_length_and_finiteness() -> None:
    x = vectors_to_array([[1, 2, 3], [4, 5, 6]], 3)
    assert x.dtype == np.float32 and x.shape == (2, 3) and x.flags["C_CONTIGUOUS"]
    with pytest.raises(ServiceError, match=r"vectors\[1\] has 2 values; this index has dimension 3"):
        vectors_to_array([[1, 2, 3], [1, 2]], 3)
    for bad in (float("nan"), float("inf"), 1e39):  # 1e39 overflows float32
        with pytest.raises(ServiceError, match=r"first is vectors\[1\]") as err:
            vectors_to_array([[1, 2, 3], [1, bad, 3]], 3)
        assert err.value.status == 422


def test_format_results_drops_padding_per_row() -> None:
    ids = np.array([[7, 8, -1], [9, -1, -1]], dtype=np.int64)
    scores = np.array([[0.9, 0.5, -3e38], [0.7, -3e38, -3e38]], dtype=np.float32)
    out_ids, out_scores = format_results(ids, scores)
    assert out_ids == [[7, 8], [9]]
    assert np.allclose(out_scores[0], [0.9, 0.5]) and np.allclose(out_scores[1], [0.7])
    full_ids, _ = format_results(ids[:, :1], scores[:, :1])
    assert full_ids == [[7], [9]] and all(isinstance(i, int) for i in full_ids[0])


# -------------------------------------------------------------- version


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1.5", "", "99999999999", "1e3", "٣", " 3"])
def test_parse_version_refuses(raw: str) -> None:
    with pytest.raises(ServiceError) as err:
        parse_version(raw)
    assert err.value.status == 422


def test_parse_version_accepts_range() -> None:
    assert parse_version("1") == 1
    assert parse_version("1000000000") == 10**9
    assert parse_version("007") == 7


# ------------------------------------------------------------------ load body


def test_load_request_validation() -> None:
    req = parse_load_request(json.dumps({"source": "/a", "expected_dim": 8, "fingerprint": FP.upper()}).encode())
    assert req.fingerprint == FP.upper() and req.expected_dim == 8
    assert parse_load_request(b'{"source": "/a", "expected_dim": 8}').fingerprint is None
    for bad, field in (
        ({"source": "/a", "expected_dim": 8, "fingerprnt": FP}, "fingerprnt"),
        ({"source": "/a", "expected_dim": 8, "fingerprint": "abc"}, "fingerprint"),
        ({"source": "", "expected_dim": 8}, "source"),
        ({"source": "/a", "expected_dim": 8.0}, "expected_dim"),
        ({"source": "/a"}, "expected_dim"),
    ):
        with pytest.raises(ServiceError, match=field):
            parse_load_request(json.dumps(bad).encode())
