"""Dropping a user's seen items from a search: how many neighbours to fetch, and the filter.

The top ``k + s`` neighbours of a user who has seen ``s`` items always hold ``k`` unseen
ones (at most ``s`` of them can be seen), so the service searches that many and keeps the
first ``k`` unseen ones, in score order. One search per batch: it fetches for the row that
needs the most.
"""

from __future__ import annotations

import numpy as np

from serving.index_service.seen import SeenItems

#: The most neighbours one search fetches: FAISS's GPU indexes select at most 2048 per
#: query. A user with more seen items than that may get fewer than k unseen ones back
#: only if nearly all of their top 2048 are seen (MovieLens-1M's heaviest user has 1,728
#: ratings in all, of 3,706 movies).
MAX_FETCH = 2048


def fetch_k(seen: SeenItems, user_ids: list[int], k: int, ntotal: int) -> int:
    """Neighbours to search for every row so that each can keep ``k`` unseen ones."""
    most_seen = int(seen.counts_for(user_ids).max()) if user_ids else 0
    return max(1, min(k + most_seen, MAX_FETCH, ntotal))


def drop_seen(
    ids: np.ndarray, scores: np.ndarray, seen: SeenItems, user_ids: list[int], k: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Rows of at most ``k`` ids and scores without the row's user's seen items or FAISS's -1 padding."""
    out_ids: list[list[int]] = []
    out_scores: list[list[float]] = []
    for row_ids, row_scores, user in zip(ids, scores, user_ids, strict=True):
        keep = row_ids >= 0
        mine = seen.items_for(user)
        if mine.size:
            # ``mine`` is sorted: a binary search per neighbour, no set built per request.
            pos = np.minimum(np.searchsorted(mine, row_ids), mine.size - 1)
            keep &= mine[pos] != row_ids
        chosen = np.flatnonzero(keep)[:k]
        out_ids.append(row_ids[chosen].tolist())
        out_scores.append(row_scores[chosen].tolist())
    return out_ids, out_scores
