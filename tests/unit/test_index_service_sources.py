"""Where the index service fetches an index directory from: paths, file:// URIs, HTTP URLs."""

from __future__ import annotations

import pytest

from serving.index_service.errors import ServiceError
from serving.index_service.sources import parse_source

# -------------------------------------------------------------------- sources


def test_parse_source_local_and_file_uri() -> None:
    s = parse_source("/var/x/index/")
    assert (s.kind, s.location) == ("local", "/var/x/index")
    assert s.file("index.faiss") == "/var/x/index/index.faiss"
    for uri in ("file:///var/x/index", "file://localhost/var/x/index", "FILE:///var/x/index"):
        assert parse_source(uri).location == "/var/x/index"
    assert parse_source("file:///var/with%20space").location == "/var/with space"


def test_parse_source_http_keeps_query_and_hides_credentials() -> None:
    mlflow = "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/index/"
    s = parse_source(mlflow)
    assert s.kind == "http"
    assert s.file("index_meta.json") == mlflow + "index_meta.json"
    s = parse_source("https://user:pw@example.org:8443/a/b?sig=1")
    assert s.file("index.faiss") == "https://user:pw@example.org:8443/a/b/index.faiss?sig=1"
    assert "pw" not in s.display and "pw" not in s.display_file("index.faiss")
    assert s.display == "https://example.org:8443/a/b?sig=1"


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "relative/dir", "./x", "s3://bucket/x", "mlflow-artifacts:/1/abc", "file://host/x",
     "file:relative", "http://", "http://:80/x", "http://h:99999/x", "http://h/x#frag", "/a\x00b"],
)
def test_parse_source_refusals(raw: str) -> None:
    with pytest.raises(ServiceError) as err:
        parse_source(raw)
    assert err.value.status == 400 and err.value.detail
