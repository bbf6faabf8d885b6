"""The seen-items file on its way into the index service: ``user_ids`` in a search body,
``seen_items`` in index_meta.json, and a local load that verifies the file like the index
(an index directory without one still loads, exclusion reported unavailable)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from serving.index_service.errors import ServiceError  # noqa: E402
from serving.index_service.loading import load_index_dir  # noqa: E402
from serving.index_service.meta import parse_meta  # noqa: E402
from serving.index_service.protocol import parse_search_request  # noqa: E402
from serving.index_service.seen import SEEN_FILE, write_seen_file  # noqa: E402
from serving.index_service.sources import parse_source  # noqa: E402

FP = "0123456789abcdef" * 4


# ------------------------------------------------------------------ search body


def body(**fields) -> bytes:
    base = {"version": 3, "vectors": [[0.5, -0.5], [0.1, 0.2]], "k": 10}
    base.update(fields)
    return json.dumps(base).encode()


def test_user_ids_are_optional_and_aligned_with_vectors() -> None:
    assert parse_search_request(body()).user_ids is None
    assert parse_search_request(body(user_ids=None)).user_ids is None
    assert parse_search_request(body(user_ids=[0, 2**40])).user_ids == [0, 2**40]


@pytest.mark.parametrize(
    ("user_ids", "words"),
    [
        ([1], "1 entries but vectors has 2"),
        ([1, 2, 3], "3 entries but vectors has 2"),
        ([], "0 entries"),
        ([1, -1], "user_ids.1"),
        ([1, "2"], "user_ids.1"),
        ([1, 2.5], "user_ids.1"),
        ([1, True], "user_ids.1"),
        ([1, 2**63], "user_ids.1"),
        (7, "user_ids"),
    ],
)
def test_bad_user_ids_are_a_422_naming_them(user_ids, words) -> None:
    with pytest.raises(ServiceError) as err:
        parse_search_request(body(user_ids=user_ids))
    assert err.value.status == 422 and words in err.value.detail, err.value.detail


# ----------------------------------------------------------------------- meta


def meta(**fields) -> bytes:
    base = {"dim": 8, "fingerprint": FP, "spec": {"kind": "flat"}}
    base.update(fields)
    return json.dumps(base).encode()


def test_meta_seen_items_is_optional_and_checked() -> None:
    assert parse_meta(meta()).seen is None
    m = parse_meta(meta(seen_items={"file": SEEN_FILE, "fingerprint": FP.upper(), "last_day": "2026-02-03",
                                    "n_users": 5}))
    assert m.seen is not None and (m.seen.fingerprint, m.seen.last_day) == (FP, "2026-02-03")
    for bad in ("x", {"fingerprint": "ab", "last_day": "2026-02-03"}, {"fingerprint": FP, "last_day": "soon"},
                {"fingerprint": FP}, {"file": "../etc/passwd", "fingerprint": FP, "last_day": "2026-02-03"}):
        with pytest.raises(ServiceError) as err:
            parse_meta(meta(seen_items=bad))
        assert err.value.status == 422 and "seen_items" in err.value.detail


# ---------------------------------------------------------------------- loading


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_dir(out: Path, *, with_seen: bool, last_day: str = "2026-02-03") -> Path:
    out.mkdir(parents=True)
    x = unit(40, 8, 0)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(x, np.arange(40, dtype=np.int64) + 100)
    faiss.write_index(index, str(out / "index.faiss"))
    data = {"dim": 8, "n_items": 40, "spec": {"kind": "flat"},
            "fingerprint": hashlib.sha256((out / "index.faiss").read_bytes()).hexdigest()}
    if with_seen:
        f = write_seen_file(out, [1, 2], [0, 2, 3], [100, 105, 101], last_day)
        data["seen_items"] = {"file": SEEN_FILE, "fingerprint": hashlib.sha256(f.read_bytes()).hexdigest(),
                              "last_day": "2026-02-03"}
    (out / "index_meta.json").write_text(json.dumps(data))
    return out


def test_a_directory_with_its_seen_file_loads_it(tmp_path: Path) -> None:
    d = write_dir(tmp_path / "ok", with_seen=True)
    loaded = load_index_dir(1, parse_source(str(d)), 8)
    assert loaded is not None and loaded.seen is not None
    assert loaded.seen.items_for(1).tolist() == [100, 105]
    info = loaded.info()["seen_items"]
    assert info["available"] is True and info["last_day"] == "2026-02-03"
    assert (info["users"], info["pairs"]) == (2, 3) and len(info["fingerprint"]) == 64


def test_a_directory_without_one_loads_with_exclusion_unavailable(tmp_path: Path) -> None:
    d = write_dir(tmp_path / "old", with_seen=False)
    loaded = load_index_dir(1, parse_source(str(d)), 8)
    assert loaded is not None and loaded.seen is None
    assert loaded.info()["seen_items"]["available"] is False
    # A stray file the meta does not name is not trusted (its digest is unknown).
    write_seen_file(d, [1], [0, 1], [100], "2026-02-03")
    assert load_index_dir(1, parse_source(str(d)), 8).seen is None


def test_a_seen_file_that_does_not_match_its_meta_refuses_the_load(tmp_path: Path) -> None:
    swapped = write_dir(tmp_path / "swapped", with_seen=True)
    write_seen_file(swapped, [1, 2], [0, 2, 3], [100, 106, 101], "2026-02-03")  # another build's file
    with pytest.raises(ServiceError) as err:
        load_index_dir(1, parse_source(str(swapped)), 8)
    assert err.value.status == 409 and "sha256" in err.value.detail and SEEN_FILE in err.value.detail

    missing = write_dir(tmp_path / "missing", with_seen=True)
    (missing / SEEN_FILE).unlink()
    with pytest.raises(ServiceError) as err:
        load_index_dir(1, parse_source(str(missing)), 8)
    assert err.value.status == 400 and SEEN_FILE in err.value.detail

    other_day = write_dir(tmp_path / "other_day", with_seen=True, last_day="2026-02-01")
    with pytest.raises(ServiceError) as err:
        load_index_dir(1, parse_source(str(other_day)), 8)
    assert err.value.status == 422 and "2026-02-01" in err.value.detail

    garbage = write_dir(tmp_path / "garbage", with_seen=True)
    (garbage / SEEN_FILE).write_bytes(b"junk")
    meta_doc = json.loads((garbage / "index_meta.json").read_text())
    meta_doc["seen_items"]["fingerprint"] = hashlib.sha256(b"junk").hexdigest()
    (garbage / "index_meta.json").write_text(json.dumps(meta_doc))
    with pytest.raises(ServiceError) as err:
        load_index_dir(1, parse_source(str(garbage)), 8)
    assert err.value.status == 422 and "not a readable .npz" in err.value.detail
