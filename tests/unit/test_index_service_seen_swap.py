"""Replacing a loaded version's seen-items table: the request body, where a source points,
the verified read, and the never-backwards rule (the real endpoint is in
tests/integration/test_index_service.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from serving.index_service.errors import ServiceError  # noqa: E402
from serving.index_service.loading import LoadedIndex  # noqa: E402
from serving.index_service.protocol import parse_seen_update_request  # noqa: E402
from serving.index_service.seen import SEEN_FILE, parse_seen, write_seen_file  # noqa: E402
from serving.index_service.seen_swap import check_not_older, fetch_seen, seen_location  # noqa: E402

FP = "ab" * 32


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------ body


def test_a_seen_update_needs_a_source_and_a_fingerprint_and_nothing_else() -> None:
    req = parse_seen_update_request(json.dumps({"source": "/x", "fingerprint": FP.upper()}).encode())
    assert (req.source, req.fingerprint, req.allow_older) == ("/x", FP.upper(), False)
    ok = parse_seen_update_request(json.dumps({"source": "/x", "fingerprint": FP, "allow_older": True}).encode())
    assert ok.allow_older is True


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"source": "/x"}, "fingerprint"),
        ({"fingerprint": FP}, "source"),
        ({"source": "", "fingerprint": FP}, "source"),
        ({"source": "/x", "fingerprint": "abc"}, "fingerprint"),
        ({"source": "/x", "fingerprint": FP, "allow_older": "yes"}, "allow_older"),
        ({"source": "/x", "fingerprint": FP, "allow_older": 1}, "allow_older"),
        ({"source": "/x", "fingerprint": FP, "allow_oldr": True}, "allow_oldr"),
        ({"source": 7, "fingerprint": FP}, "source"),
    ],
)
def test_bad_seen_update_bodies_are_a_422_naming_the_field(body, words) -> None:
    with pytest.raises(ServiceError) as err:
        parse_seen_update_request(json.dumps(body).encode())
    assert err.value.status == 422 and words in err.value.detail, err.value.detail


def test_a_body_that_is_not_json_is_a_422() -> None:
    with pytest.raises(ServiceError) as err:
        parse_seen_update_request(b"{not json")
    assert err.value.status == 422


# -------------------------------------------------------------------- location


def test_a_source_names_the_file_or_the_directory_holding_it(tmp_path: Path) -> None:
    f = write_seen_file(tmp_path, [1], [0, 1], [5], "2026-03-02")
    d, name = seen_location(str(tmp_path))
    assert (d.location, name) == (str(tmp_path), SEEN_FILE)
    d, name = seen_location(str(f))
    assert (d.location, name) == (str(tmp_path), SEEN_FILE)
    d, name = seen_location(f"file://{tmp_path}/other.npz")
    assert (d.location, name) == (str(tmp_path), "other.npz")
    d, name = seen_location("https://user:pw@host:8443/api/artifacts/7/index/")
    assert (d.location, d.display, name) == ("https://user:pw@host:8443/api/artifacts/7/index",
                                             "https://host:8443/api/artifacts/7/index", SEEN_FILE)
    d, name = seen_location("https://user:pw@host/a/b/seen_items.npz")
    assert (d.location, d.display, name) == ("https://user:pw@host/a/b", "https://host/a/b", SEEN_FILE)
    for bad in ("relative/path", "s3://bucket/x", ""):
        with pytest.raises(ServiceError) as err:
            seen_location(bad)
        assert err.value.status == 400


# ------------------------------------------------------------------------ read


def test_fetch_seen_reads_and_verifies_the_named_file(tmp_path: Path) -> None:
    f = write_seen_file(tmp_path, [1, 4], [0, 2, 3], [5, 9, 2], "2026-03-02")
    for source in (str(tmp_path), str(f)):
        seen, where = fetch_seen(source, sha(f).upper(), 1 << 20, 5.0)
        assert seen.last_day == "2026-03-02" and seen.items_for(1).tolist() == [5, 9] and where == str(f)


def test_fetch_seen_refuses_another_file_a_missing_one_and_junk(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    f = write_seen_file(tmp_path / "a", [1], [0, 1], [5], "2026-03-02")
    with pytest.raises(ServiceError) as err:
        fetch_seen(str(f), FP, 1 << 20, 5.0)
    assert err.value.status == 409 and sha(f) in err.value.detail and FP in err.value.detail
    with pytest.raises(ServiceError) as err:
        fetch_seen(str(tmp_path / "a" / "nope.npz"), FP, 1 << 20, 5.0)
    assert err.value.status == 400 and "nope.npz" in err.value.detail
    with pytest.raises(ServiceError) as err:
        fetch_seen(str(tmp_path / "empty-dir-that-is-missing"), FP, 1 << 20, 5.0)
    assert err.value.status == 400
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(ServiceError) as err:
        fetch_seen(str(junk), sha(junk), 1 << 20, 5.0)
    assert err.value.status == 422 and "not a readable .npz" in err.value.detail
    with pytest.raises(ServiceError) as err:
        fetch_seen(str(f), sha(f), 10, 5.0)
    assert err.value.status == 422 and "limit" in err.value.detail


# ---------------------------------------------------------------------- freshness


def entry(tmp_path: Path, last_day: str | None) -> LoadedIndex:
    seen = None
    if last_day is not None:
        seen = parse_seen(write_seen_file(tmp_path / last_day, [1], [0, 1], [5], last_day).read_bytes())
    return LoadedIndex(version=3, index=None, dim=8, ntotal=10, fingerprint=FP, kind="flat", source="/x",
                       device="cpu", params={}, loaded_at="t", load_seconds=0.0, cost_per_query=1.0, seen=seen)


def test_history_never_goes_backwards_unless_asked(tmp_path: Path) -> None:
    new = parse_seen(write_seen_file(tmp_path / "new", [1], [0, 1], [5], "2026-03-02").read_bytes())
    check_not_older(entry(tmp_path, None), new, "f", allow_older=False)  # nothing loaded yet: any day
    check_not_older(entry(tmp_path, "2026-03-01"), new, "f", allow_older=False)  # fresher
    check_not_older(entry(tmp_path, "2026-03-02"), new, "f", allow_older=False)  # the same day
    newer = entry(tmp_path, "2026-03-03")
    with pytest.raises(ServiceError) as err:
        check_not_older(newer, new, "the file", allow_older=False)
    assert err.value.status == 409 and "2026-03-03" in err.value.detail and "allow_older" in err.value.detail
    check_not_older(newer, new, "the file", allow_older=True)
    assert newer.seen is not None and np.asarray(newer.seen.items).tolist() == [5]  # the check changes nothing
