"""One exclusion rule for both arms of a canary: the champion's loaded index takes the
canary's (fresher) seen-items file before any user is routed to the canary.

Each version's index is built with every user's history up to its own last day
(``dayloop.index.history``), and the serving tier drops those items from a user's list.
The champion was built on an earlier day than the canary, so without this the canary
would drop what users rated in between and the champion would not: the online CTR
comparison would pit two exclusion rules against each other, biased against the canary
(simulated users still click items they rated on the later day). The file holds history
only, nothing of the model, so the champion can use the canary's as it is. After a
rollback the champion keeps it: history only grows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dayloop.rollout.deploy import DeployFailed

if TYPE_CHECKING:  # pragma: no cover
    from dayloop.rollout.pairs import ServingPair
    from serving.client import DataPlaneClient

log = logging.getLogger(__name__)


def _seen_items(client: DataPlaneClient, version: int) -> dict[str, Any]:
    """The ``seen_items`` object of a loaded version's ``/indexes/{v}`` (DeployFailed if unreadable)."""
    from serving.client import IndexServiceError

    try:
        info = client.index.get_index(version)
    except IndexServiceError as exc:
        raise DeployFailed(f"cannot read the seen items of v{version} on the index service: {exc}") from exc
    seen = info.get("seen_items")
    return seen if isinstance(seen, dict) else {"available": False}


def share_seen(client: DataPlaneClient, champion: int, canary: ServingPair) -> str | None:
    """Switch the loaded champion to the canary's seen-items file when that history is fresher;
    returns the last day the champion now excludes (None when the canary's index has no file).

    The file is the one the index service verified when it loaded the canary (its
    fingerprint from the canary's ``index_meta.json``), read again from the canary's index
    source. No-op when the champion's history already runs at least as far. DeployFailed
    when the swap is refused: nothing is routed then."""
    from serving.client import IndexServiceError

    theirs = _seen_items(client, canary.version)
    if not theirs.get("available"):
        log.warning("canary v%s's index has no seen-items file: each arm keeps its own exclusion", canary.version)
        return None
    ours = _seen_items(client, champion)
    day = str(theirs["last_day"])
    if ours.get("available") and str(ours["last_day"]) >= day:  # ISO dates sort as text
        log.info("champion v%s already excludes history through %s (canary v%s: %s): no seen-items swap",
                 champion, ours["last_day"], canary.version, day)
        return str(ours["last_day"])
    try:
        client.index.update_seen(champion, canary.index_source, str(theirs["fingerprint"]))
    except IndexServiceError as exc:
        raise DeployFailed(f"champion v{champion} could not take canary v{canary.version}'s seen items "
                           f"(history through {day}): {exc}") from exc
    log.info("both arms now exclude history through %s: champion v%s took canary v%s's seen items (was %s)",
             day, champion, canary.version, ours.get("last_day", "none"))
    return day
