"""The seen-items file (serving/index_service/seen.py): round trip, lookups, the CSR
builder, and every malformed table or file refused with nothing written."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from serving.index_service.seen import (
    SEEN_FILE,
    SeenFormatError,
    csr_from_pairs,
    encode_seen,
    parse_seen,
    read_seen_file,
    write_seen_file,
)

USERS = np.array([3, 7, 20], dtype=np.int64)
OFFSETS = np.array([0, 2, 2, 5], dtype=np.int64)  # user 7 has an empty history
ITEMS = np.array([10, 40, 1, 2, 99], dtype=np.int64)


def test_round_trip_through_a_directory_and_a_file_path(tmp_path: Path) -> None:
    written = write_seen_file(tmp_path, USERS, OFFSETS, ITEMS, "2026-03-04")
    assert written == tmp_path / SEEN_FILE
    other = write_seen_file(tmp_path / "x.npz", USERS, OFFSETS, ITEMS, "2026-03-04")
    assert other == tmp_path / "x.npz" and other.read_bytes() == written.read_bytes()
    for path in (tmp_path, written):
        seen = read_seen_file(path)
        assert seen.last_day == "2026-03-04"
        assert (seen.n_users, seen.n_pairs) == (3, 5)
        assert seen.items_for(3).tolist() == [10, 40]
        assert seen.items_for(20).tolist() == [1, 2, 99]
        assert seen.items_for(7).tolist() == []
        for unknown in (0, 4, 21, 10**12):
            got = seen.items_for(unknown)
            assert got.size == 0 and got.dtype == np.int64
        assert seen.counts_for([3, 7, 20, 5, 10**12]).tolist() == [2, 0, 3, 0, 0]
        with pytest.raises(ValueError):
            seen.items[0] = 5  # read-only: a loaded table is shared by concurrent searches


def test_the_file_is_a_plain_npz_without_pickle(tmp_path: Path) -> None:
    path = write_seen_file(tmp_path, USERS, OFFSETS, ITEMS, "2026-03-04")
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"user_ids", "offsets", "items", "last_day", "format"}
        assert npz["items"].dtype == np.int64 and str(npz["last_day"][()]) == "2026-03-04"


def test_empty_table() -> None:
    seen = parse_seen(encode_seen([], [0], [], "2026-01-01"))
    assert seen.n_users == 0 and seen.items_for(1).size == 0
    assert seen.counts_for([1, 2]).tolist() == [0, 0]


@pytest.mark.parametrize(
    ("users", "offsets", "items", "last_day", "words"),
    [
        ([7, 3], [0, 1, 2], [1, 2], "2026-01-01", "sorted and unique"),
        ([3, 3], [0, 1, 2], [1, 2], "2026-01-01", "sorted and unique"),
        ([-1, 3], [0, 1, 2], [1, 2], "2026-01-01", ">= 0"),
        ([3, 7], [0, 1], [1, 2], "2026-01-01", "offsets"),
        ([3, 7], [0, 2, 1], [1, 2], "2026-01-01", "offsets"),
        ([3, 7], [1, 1, 2], [1, 2], "2026-01-01", "offsets"),
        ([3, 7], [0, 1, 3], [1, 2], "2026-01-01", "offsets"),
        ([3], [0, 2], [5, 5], "2026-01-01", "sorted and unique"),
        ([3], [0, 2], [6, 5], "2026-01-01", "sorted and unique"),
        ([3], [0, 1], [-4], "2026-01-01", ">= 0"),
        ([3], [0, 1], [1.5], "2026-01-01", "integers"),
        ([[3]], [0, 1], [1], "2026-01-01", "one-dimensional"),
        ([3], [0, 1], [1], "2026-1-1", "ISO date"),
        ([3], [0, 1], [1], "20260101", "ISO date"),
        ([3], [0, 1], [1], "yesterday", "ISO date"),
        ([3], [0, 1], [1], None, "ISO date"),
    ],
)
def test_malformed_tables_are_refused_and_nothing_is_written(tmp_path, users, offsets, items, last_day, words):
    with pytest.raises(SeenFormatError, match=words):
        write_seen_file(tmp_path, users, offsets, items, last_day)
    assert list(tmp_path.iterdir()) == []


def test_a_new_users_runs_may_start_lower_than_the_last_users_end() -> None:
    # Per-user order only: user 3 ends at 40, user 7 starts at 1.
    seen = parse_seen(encode_seen([3, 7], [0, 2, 3], [10, 40, 1], "2026-01-01"))
    assert seen.items_for(7).tolist() == [1]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_unreadable_or_foreign_files_are_refused(tmp_path: Path) -> None:
    good = dict(user_ids=USERS, offsets=OFFSETS, items=ITEMS, last_day=np.array("2026-03-04"),
                format=np.array(1))
    with pytest.raises(SeenFormatError, match="not a readable .npz"):
        parse_seen(b"not a zip file")
    with pytest.raises(SeenFormatError, match="missing"):
        parse_seen(_npz(**{k: v for k, v in good.items() if k != "offsets"}))
    with pytest.raises(SeenFormatError, match="format 2"):
        parse_seen(_npz(**{**good, "format": np.array(2)}))
    with pytest.raises(SeenFormatError, match="offsets"):
        parse_seen(_npz(**{**good, "offsets": np.array([0, 2, 5])}))
    with pytest.raises(SeenFormatError, match="ISO date"):
        parse_seen(_npz(**{**good, "last_day": np.array("March")}))
    with pytest.raises(SeenFormatError, match="unreadable arrays"):
        parse_seen(_npz(**{**good, "items": np.array([{"a": 1}], dtype=object)}))
    with pytest.raises(OSError):
        read_seen_file(tmp_path / "absent.npz")


def test_csr_from_pairs_dedupes_and_sorts() -> None:
    users, offsets, items = csr_from_pairs([7, 3, 7, 3, 7, 9], [5, 2, 1, 2, 5, 0])
    assert users.tolist() == [3, 7, 9]
    assert offsets.tolist() == [0, 1, 3, 4]
    assert items.tolist() == [2, 1, 5, 0]
    seen = parse_seen(encode_seen(users, offsets, items, "2026-01-01"))
    assert seen.items_for(7).tolist() == [1, 5]
    empty = csr_from_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert [a.tolist() for a in empty] == [[], [0], []]
    with pytest.raises(SeenFormatError, match="differ in length"):
        csr_from_pairs([1, 2], [1])
    with pytest.raises(SeenFormatError, match=">= 0"):
        csr_from_pairs([1, -2], [1, 1])
