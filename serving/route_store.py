"""The route table's store: append-only revisions with actor, time and reason.

Every change is a new row ``revision = previous + 1``; nothing is updated or deleted (SQLite
triggers refuse it). A write names the revision it was based on and fails with
:class:`StaleRevision` if another write got there first (compare-and-swap), so two
controllers can never silently overwrite each other. Readers (router replicas) poll
:meth:`RouteStore.latest_revision`, a single indexed lookup.

SQLite file by default (``sqlite:///abs/path.db``); ``postgresql://...`` for several hosts
(needs ``psycopg``; the primary key makes the CAS safe across writers there too).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from serving.routing import RouteTable

DEFAULT_MODEL = "user_tower"
MAX_ACTOR = 200
MAX_REASON = 2000

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS route_revisions (
        model TEXT NOT NULL,
        revision INTEGER NOT NULL,
        route_table TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (model, revision))""",
]
_POSTGRES_APPEND_ONLY = [
    """CREATE OR REPLACE FUNCTION route_revisions_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'route_revisions is append-only'; END; $$ LANGUAGE plpgsql""",
    """DROP TRIGGER IF EXISTS route_revisions_append_only ON route_revisions""",
    """CREATE TRIGGER route_revisions_append_only BEFORE UPDATE OR DELETE ON route_revisions
       FOR EACH ROW EXECUTE FUNCTION route_revisions_append_only()""",
]
# Any fixed key: serialises schema creation when several replicas start at once on a fresh
# Postgres (concurrent CREATE TABLE IF NOT EXISTS can collide on the catalog).
_POSTGRES_SCHEMA_LOCK = 7_320_411
_SQLITE_APPEND_ONLY = [
    """CREATE TRIGGER IF NOT EXISTS route_revisions_no_update BEFORE UPDATE ON route_revisions
       BEGIN SELECT RAISE(ABORT, 'route_revisions is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS route_revisions_no_delete BEFORE DELETE ON route_revisions
       BEGIN SELECT RAISE(ABORT, 'route_revisions is append-only'); END""",
]


class StaleRevision(RuntimeError):
    """The write was based on a revision that is no longer the latest."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"route table revision {expected} is stale: the latest is {current}")
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class Revision:
    revision: int
    table: RouteTable
    actor: str
    reason: str
    created_at: str
    model: str = DEFAULT_MODEL

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "revision": self.revision, "table": self.table.as_dict(),
                "actor": self.actor, "reason": self.reason, "created_at": self.created_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Revision:
        """A revision as the router's admin API sends it (the table is validated again)."""
        return cls(revision=int(data["revision"]), table=RouteTable.from_dict(data["table"]),
                   actor=str(data.get("actor", "")), reason=str(data.get("reason", "")),
                   created_at=str(data.get("created_at", "")), model=str(data.get("model") or DEFAULT_MODEL))

    def describe(self) -> str:
        """Who wrote this revision, when and why: the sentence a rollout that lost the table logs."""
        return f"revision {self.revision} by {self.actor or '?'} ({self.created_at or '?'}): {self.reason}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} is required (a non-empty string)")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return value.strip()


def _sqlite_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


# SQLite answers BUSY/locked at once in a few places no busy handler covers (see _conn);
# retry those for about 5 s in all, then let the error through.
_retry_busy = tenacity.retry(retry=tenacity.retry_if_exception(_sqlite_busy),
                             stop=tenacity.stop_after_attempt(100), wait=tenacity.wait_fixed(0.05),
                             reraise=True)


class RouteStore:
    """Revisions of the route table of one model in SQLite or Postgres."""

    def __init__(self, url: str, model: str = DEFAULT_MODEL) -> None:
        self.url = url
        self.model = model
        self._local = threading.local()
        if url.startswith("sqlite:///"):
            self.kind = "sqlite"
            self._path = Path(url.removeprefix("sqlite:///"))
            if not self._path.is_absolute():
                raise ValueError(f"sqlite route store path must be absolute: {url}")
            self._path.parent.mkdir(parents=True, exist_ok=True)
        elif url.startswith(("postgresql://", "postgres://")):
            self.kind = "postgres"
        else:
            raise ValueError(f"unsupported route store URL {url!r} (sqlite:///abs/path or postgresql://...)")
        self._init_schema()

    # ------------------------------------------------------------------ connections
    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.kind == "sqlite":
                conn = sqlite3.connect(self._path, timeout=10.0, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=10000")
                # Switching to WAL needs a moment of exclusive access; SQLite answers BUSY at once
                # (no busy handler) when another process is opening the same new file, e.g. two
                # router replicas starting together. Retry briefly instead of failing the start.
                _retry_busy(conn.execute)("PRAGMA journal_mode=WAL")
            else:
                import psycopg  # only where a Postgres store is configured

                conn = psycopg.connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def _q(self, sql: str) -> str:
        return sql if self.kind == "sqlite" else sql.replace("?", "%s")

    def _init_schema(self) -> None:
        conn = self._conn()
        if self.kind == "sqlite":
            for stmt in _SCHEMA + _SQLITE_APPEND_ONLY:
                _retry_busy(conn.execute)(stmt)
            return
        conn.execute("SELECT pg_advisory_lock(%s)", (_POSTGRES_SCHEMA_LOCK,))
        try:
            for stmt in _SCHEMA + _POSTGRES_APPEND_ONLY:
                conn.execute(stmt)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_POSTGRES_SCHEMA_LOCK,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ reads
    def latest_revision(self) -> int:
        """The newest revision number (0 when no table was ever written)."""
        row = self._conn().execute(
            self._q("SELECT MAX(revision) FROM route_revisions WHERE model = ?"), (self.model,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _row(self, row: Any) -> Revision:
        return Revision(revision=int(row[0]), table=RouteTable.from_dict(json.loads(row[1])),
                        actor=row[2], reason=row[3], created_at=str(row[4]), model=self.model)

    def current(self) -> Revision | None:
        """The latest revision, or None before the first write."""
        row = self._conn().execute(
            self._q("SELECT revision, route_table, actor, reason, created_at FROM route_revisions "
                    "WHERE model = ? ORDER BY revision DESC LIMIT 1"), (self.model,)
        ).fetchone()
        return self._row(row) if row else None

    def get(self, revision: int) -> Revision | None:
        row = self._conn().execute(
            self._q("SELECT revision, route_table, actor, reason, created_at FROM route_revisions "
                    "WHERE model = ? AND revision = ?"), (self.model, int(revision))
        ).fetchone()
        return self._row(row) if row else None

    def history(self, limit: int = 100) -> list[Revision]:
        """Newest first."""
        rows = self._conn().execute(
            self._q("SELECT revision, route_table, actor, reason, created_at FROM route_revisions "
                    "WHERE model = ? ORDER BY revision DESC LIMIT ?"), (self.model, int(limit))
        ).fetchall()
        return [self._row(r) for r in rows]

    # ------------------------------------------------------------------ write
    def write(self, table: RouteTable, expected_revision: int, actor: str, reason: str) -> Revision:
        """Append ``table`` as ``expected_revision + 1`` if ``expected_revision`` is the latest."""
        if not isinstance(table, RouteTable):
            raise TypeError("table must be a RouteTable")
        if isinstance(expected_revision, bool) or not isinstance(expected_revision, int) or expected_revision < 0:
            raise ValueError(f"expected_revision must be a non-negative integer, got {expected_revision!r}")
        actor = _text(actor, "actor", MAX_ACTOR)
        reason = _text(reason, "reason", MAX_REASON)
        payload = json.dumps(table.as_dict(), sort_keys=True)
        created = _now()
        conn = self._conn()
        if self.kind == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = self.latest_revision()
                if current != expected_revision:
                    raise StaleRevision(expected_revision, current)
                conn.execute("INSERT INTO route_revisions VALUES (?, ?, ?, ?, ?, ?)",
                             (self.model, current + 1, payload, actor, reason, created))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        else:
            import psycopg

            current = self.latest_revision()
            if current != expected_revision:
                raise StaleRevision(expected_revision, current)
            try:
                conn.execute(self._q("INSERT INTO route_revisions VALUES (?, ?, ?, ?, ?, ?)"),
                             (self.model, current + 1, payload, actor, reason, created))
            except psycopg.errors.UniqueViolation as exc:
                raise StaleRevision(expected_revision, self.latest_revision()) from exc
        return Revision(current + 1, table, actor, reason, created, self.model)
