"""Dropping seen items from search results (serving/index_service/exclusion.py): how many
neighbours are fetched, and that each row keeps k unseen ones in score order."""

from __future__ import annotations

import numpy as np

from serving.index_service.exclusion import MAX_FETCH, drop_seen, fetch_k
from serving.index_service.seen import encode_seen, parse_seen

# user 1 saw items 101, 103, 104; user 2 saw 100; user 3 saw nothing.
SEEN = parse_seen(encode_seen([1, 2], [0, 3, 4], [101, 103, 104, 100], "2026-05-06"))


def test_fetch_k_covers_the_row_with_the_most_seen_items() -> None:
    assert fetch_k(SEEN, [3], 10, 1000) == 10
    assert fetch_k(SEEN, [2], 10, 1000) == 11
    assert fetch_k(SEEN, [2, 1, 3], 10, 1000) == 13
    assert fetch_k(SEEN, [1], 10, 12) == 12  # never beyond the catalogue
    big = parse_seen(encode_seen([5], [0, 5000], np.arange(5000), "2026-05-06"))
    assert fetch_k(big, [5], 10, 10**6) == MAX_FETCH
    assert fetch_k(SEEN, [], 10, 1000) == 10


def test_drop_seen_keeps_k_unseen_in_score_order() -> None:
    ids = np.array([[100, 101, 102, 103, 104, 105, 106],
                    [100, 101, 102, 103, 104, 105, 106],
                    [104, 103, 100, -1, -1, -1, -1]], dtype=np.int64)
    scores = -np.arange(ids.size, dtype=np.float32).reshape(ids.shape)
    out_ids, out_scores = drop_seen(ids, scores, SEEN, [1, 2, 3], 3)
    assert out_ids == [[100, 102, 105], [101, 102, 103], [104, 103, 100]]
    assert out_scores[0] == [0.0, -2.0, -5.0]
    assert out_scores[1] == [-8.0, -9.0, -10.0]
    # FAISS's -1 padding is dropped even when the row has fewer than k results.
    out_ids, _ = drop_seen(ids[2:], scores[2:], SEEN, [2], 5)
    assert out_ids == [[104, 103]]


def test_every_row_excludes_its_own_users_items_over_random_tables() -> None:
    rng = np.random.default_rng(3)
    n_items, k = 300, 10
    users = np.arange(50, dtype=np.int64) * 3
    pairs_u = np.repeat(users, rng.integers(0, 60, size=users.size))
    pairs_i = rng.integers(0, n_items, size=pairs_u.size)
    from serving.index_service.seen import csr_from_pairs

    seen = parse_seen(encode_seen(*csr_from_pairs(pairs_u, pairs_i), "2026-05-06"))
    order = np.argsort(rng.standard_normal((users.size, n_items)), axis=1)
    fetch = fetch_k(seen, users.tolist(), k, n_items)
    ids = order[:, :fetch].astype(np.int64)
    out_ids, _ = drop_seen(ids, np.zeros(ids.shape, np.float32), seen, users.tolist(), k)
    for u, row, full in zip(users, out_ids, order, strict=True):
        mine = set(seen.items_for(int(u)).tolist())
        assert len(row) == k and not (set(row) & mine)
        assert row == [i for i in full.tolist() if i not in mine][:k]  # the best k unseen
