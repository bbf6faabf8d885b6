"""The index service's local copies (restore on restart) and the static fallback list's
generator: pure file and table logic."""

from __future__ import annotations

import json

import pandas as pd

from dayloop.data.static_list import document, top_items
from serving.index_service.local_copies import LocalCopies


def test_kept_files_are_named_live_and_forgotten_with_their_directory(tmp_path):
    copies = LocalCopies(tmp_path / "state")
    d = copies.keep_files(7, "ab" * 32, {"index.faiss": b"x" * 10, "index_meta.json": b"{}"})
    assert d.name == "7-" + "ab" * 6 and (d / "index.faiss").read_bytes() == b"x" * 10
    assert copies.entries() == {}, "nothing is live until it is recorded"
    copies.record(7, {"dir": str(d.relative_to(copies.root)), "fingerprint": "ab" * 32, "expected_dim": 8})
    seen = copies.keep_seen(7, "ab" * 32, "cd" * 32, b"npz")
    assert seen.parent == d and seen.read_bytes() == b"npz"
    assert copies.entries()[7]["expected_dim"] == 8
    assert not list(copies.versions_dir.glob(".*")), "no staging directory left behind"
    copies.forget(7)
    assert copies.entries() == {} and not d.exists()
    copies.forget(7)  # forgetting twice is harmless


def test_keeping_a_version_again_replaces_its_files(tmp_path):
    copies = LocalCopies(tmp_path)
    copies.keep_files(3, "ef" * 32, {"a": b"old", "b": b"old"})
    d = copies.keep_files(3, "ef" * 32, {"a": b"new"})
    assert (d / "a").read_bytes() == b"new" and not (d / "b").exists()


def test_an_unreadable_manifest_restores_nothing_rather_than_failing(tmp_path):
    copies = LocalCopies(tmp_path)
    copies.manifest_path.write_text("{not json")
    assert copies.entries() == {}
    copies.manifest_path.write_text(json.dumps({"versions": {"x": {}}}))
    assert copies.entries() == {}


def test_static_list_ranks_by_distinct_users_with_ties_by_id():
    ratings = pd.DataFrame({"user_id": [1, 2, 3, 1, 1, 2, 4], "item_id": [5, 5, 5, 9, 9, 9, 2]})
    assert top_items(ratings, 3) == [5, 9, 2]  # 9 rated twice by user 1 counts once
    assert top_items(ratings, 1) == [5]
    assert document([5, 9])["items"] == [5, 9]
