"""Replacing a loaded version's seen-items table (``PUT /admin/indexes/{version}/seen``):
where the new file is, reading and verifying it, and the rule that history never goes
backwards by accident.

Why a loaded version's table is replaced at all: the file holds per-user history up to a
day and nothing about the model, but each version is built with the history up to its own
last day. During a canary the champion was built on an earlier day than the challenger,
so the challenger would drop more of what users had rated (the day in between) than the
champion does, and the CTR comparison would set two exclusion rules against each other
(the simulator's users still click items they rated on the later day). The control plane
gives the champion the canary's file, and both arms exclude the same history.

Reading blocks (the service runs ``fetch_seen`` in a worker thread); the swap itself is
one assignment on the event loop (``IndexService.update_seen``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from serving.index_service.errors import ServiceError
from serving.index_service.loading import LoadedIndex
from serving.index_service.seen import SEEN_FILE, SeenFormatError, SeenItems, parse_seen
from serving.index_service.sources import Source, parse_source, read_http, read_local


def seen_location(raw: str) -> tuple[Source, str]:
    """The directory and file name a seen source names: the seen-items file itself (a local
    file, or a URL ending in ``.npz``) or the directory holding ``SEEN_FILE`` (an index
    directory, as a load names it). 400 for a source ``parse_source`` refuses."""
    source = parse_source(raw)
    if source.kind == "local":
        path = Path(source.location)
        if path.is_dir():
            return source, SEEN_FILE
        parent = str(path.parent)  # a missing file is reported by the read, with its name
        return Source("local", parent, parent), path.name
    url, shown = urlsplit(source.location), urlsplit(source.display)
    head, _, name = url.path.rpartition("/")
    if not name.endswith(".npz"):
        return source, SEEN_FILE
    directory = Source(
        "http", urlunsplit(url._replace(path=head)), urlunsplit(shown._replace(path=shown.path.rpartition("/")[0]))
    )
    return directory, name


def fetch_seen(raw: str, fingerprint: str, max_bytes: int, fetch_timeout: float,
               keep: Callable[[bytes | bytearray], None] | None = None) -> tuple[SeenItems, str]:
    """The table ``raw`` names and where it was read (``keep`` gets the verified file's bytes), once its sha256 is ``fingerprint``
    (blocking). ServiceError: 400 bad or unreadable source, 502 a URL that cannot be
    fetched, 409 another file than the one named, 422 not a seen-items file."""
    source, name = seen_location(raw)
    where = source.display_file(name)
    if source.kind == "local":
        data: bytes | bytearray = read_local(source, name, max_bytes)
    else:
        with httpx.Client(timeout=fetch_timeout, follow_redirects=True) as client:
            data = read_http(client, source, name, max_bytes)
    actual = hashlib.sha256(data).hexdigest()
    if actual != fingerprint.lower():
        raise ServiceError(409, f"{where} has sha256 {actual}, not the {fingerprint.lower()} the request names")
    try:
        seen = parse_seen(data, where)
    except SeenFormatError as exc:
        raise ServiceError(422, str(exc)) from None
    if keep is not None:
        keep(data)
    return seen, where


def check_not_older(current: LoadedIndex, new: SeenItems, where: str, allow_older: bool) -> None:
    """409 when ``new`` ends before the table ``current`` holds, unless ``allow_older``:
    history only grows, so an older file is a mistake unless the caller says otherwise."""
    if current.seen is None or allow_older or new.last_day >= current.seen.last_day:  # ISO dates sort as text
        return
    raise ServiceError(
        409,
        f"version {current.version} excludes history through {current.seen.last_day}; {where} ends "
        f"{new.last_day}, which would take history backwards (send allow_older: true to mean it)",
    )
