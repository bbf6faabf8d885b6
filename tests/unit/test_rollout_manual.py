"""Manual rollback requests that are refused before any registry or data-plane lookup."""

from __future__ import annotations

import pytest


def test_rollback_requests_are_refused_before_any_lookup(tmp_path):
    from dayloop.config import Settings
    from dayloop.rollout.manual import RollbackRefused, plan_rollback

    settings = Settings(home=tmp_path, data_cache=tmp_path)
    for kwargs, message in (
        (dict(model="other", target="previous", reason="a good reason"), "unknown model"),
        (dict(model=None, target="previous", reason="   "), "reason"),
        (dict(model=None, target="previous", reason=None), "reason"),
        (dict(model=None, target="v3", reason="a good reason"), "target version"),
        (dict(model=None, target="-1", reason="a good reason"), "target version"),
        (dict(model=None, target="1; drop", reason="a good reason"), "target version"),
    ):
        with pytest.raises(RollbackRefused, match=message):
            plan_rollback(settings, client=None, **kwargs)
