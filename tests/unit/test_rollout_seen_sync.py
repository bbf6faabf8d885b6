"""share_seen's decisions on what the index service reports (the real swap against a real
data plane is in tests/integration/test_rollout_deploy.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dayloop.rollout.deploy import DeployFailed
from dayloop.rollout.pairs import ServingPair
from dayloop.rollout.seen_sync import share_seen
from serving.index_service.client import IndexServiceError

CANARY = ServingPair(version=5, model_file=Path("/m/v5/model.pt"), index_source="/art/v5/index", dim=16,
                     fingerprint="f" * 64)


class Index:
    """The two calls share_seen makes, answering from a dict of ``seen_items`` per version."""

    def __init__(self, seen: dict[int, dict], refuse: IndexServiceError | None = None) -> None:
        self.seen, self.refuse, self.updates = seen, refuse, []

    def get_index(self, version: int) -> dict:
        if version not in self.seen:
            raise IndexServiceError(404, f"index version {version} is not loaded")
        return {"version": version, "seen_items": self.seen[version]}

    def update_seen(self, version: int, source: str, fingerprint: str) -> dict:
        if self.refuse is not None:
            raise self.refuse
        self.updates.append((version, source, fingerprint))
        return {"status": "updated"}


def seen(day: str | None, fp: str = "a" * 64) -> dict:
    return {"available": False} if day is None else {"available": True, "last_day": day, "fingerprint": fp}


def client(index: Index) -> SimpleNamespace:
    return SimpleNamespace(index=index)


def test_the_champion_takes_the_canarys_fresher_file(caplog) -> None:
    index = Index({4: seen("2026-03-01"), 5: seen("2026-03-02", "b" * 64)})
    with caplog.at_level("INFO", logger="dayloop.rollout.seen_sync"):
        assert share_seen(client(index), 4, CANARY) == "2026-03-02"
    assert index.updates == [(4, "/art/v5/index", "b" * 64)]
    assert "both arms now exclude history through 2026-03-02" in caplog.text


def test_a_champion_without_a_file_gets_one() -> None:
    index = Index({4: seen(None), 5: seen("2026-03-02", "b" * 64)})
    assert share_seen(client(index), 4, CANARY) == "2026-03-02" and index.updates == [(4, "/art/v5/index", "b" * 64)]


@pytest.mark.parametrize(("champion_day", "canary_day"), [("2026-03-02", "2026-03-02"), ("2026-03-05", "2026-03-02")])
def test_nothing_is_swapped_when_the_champion_is_at_least_as_fresh(champion_day, canary_day) -> None:
    index = Index({4: seen(champion_day), 5: seen(canary_day)})
    assert share_seen(client(index), 4, CANARY) == champion_day and index.updates == []


def test_nothing_is_swapped_when_the_canary_has_no_file() -> None:
    index = Index({4: seen("2026-03-01"), 5: seen(None)})
    assert share_seen(client(index), 4, CANARY) is None and index.updates == []


def test_a_refused_swap_or_an_unreadable_version_is_a_deploy_failure() -> None:
    refused = Index({4: seen("2026-03-01"), 5: seen("2026-03-02")}, refuse=IndexServiceError(409, "sha256 differs"))
    with pytest.raises(DeployFailed, match="champion v4 could not take canary v5's seen items.*sha256 differs"):
        share_seen(client(refused), 4, CANARY)
    missing = Index({5: seen("2026-03-02")})
    with pytest.raises(DeployFailed, match="seen items of v4.*not loaded"):
        share_seen(client(missing), 4, CANARY)
