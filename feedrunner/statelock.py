"""One runner per state store, held with the database's own locking for the life of the process.

Two runners on one store would share one APScheduler job store and overwrite each other's rollout. The
lock is the database's, never a PID file, so it dies with its holder (kill -9 included):
- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection kept open for it; the
  holder's backend pid and address are named when a second runner is refused.
- SQLite: an exclusive transaction held open on `<database>.lock` beside the database (holding it on the
  database itself would lock this process's own writes out). An in-memory database cannot be shared.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from feedrunner.plan import mask_url

PG_LOCK = (0x66726E72, 1)  # ("frnr", 1): the two-int form shows as classid/objid in pg_locks


class StoreBusy(Exception):
    """Another runner holds the state store."""


def sqlite_path(url: sa.engine.URL) -> Path | None:
    """The file of a SQLite URL, `file:` URIs included; None for an in-memory database."""
    database = url.database or ""
    if database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
        if database.startswith("//"):  # file://host/path: the host part is empty or localhost
            database = "/" + database[2:].split("/", 1)[-1]
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    return Path(database)


class StoreLock:
    def __init__(self, url: str, engine: sa.Engine) -> None:
        self.url = url
        self.engine = engine
        self.dialect = engine.dialect.name
        self._pg: sa.Connection | None = None
        self._sqlite: sqlite3.Connection | None = None

    def acquire(self) -> None:
        if self.dialect == "postgresql":
            self._acquire_pg()
        elif self.dialect == "sqlite":
            self._acquire_sqlite()
        else:
            logger.warning("state store {}: no single-runner lock for {}", mask_url(self.url), self.dialect)

    def _acquire_pg(self) -> None:
        conn = self.engine.connect()
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": PG_LOCK[0], "b": PG_LOCK[1]}).scalar()
        conn.commit()
        if not got:
            holder = conn.execute(
                sa.text(
                    "SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = :a AND l.objid = :b AND l.granted"
                ),
                {"a": PG_LOCK[0], "b": PG_LOCK[1]},
            ).first()
            conn.close()
            who = f" (backend pid {holder[0]} from {holder[1] or 'local socket'})" if holder else ""
            raise StoreBusy(f"state store {mask_url(self.url)} is held by another runner{who}")
        self._pg = conn

    def _acquire_sqlite(self) -> None:
        database = sqlite_path(self.engine.url)
        if database is None:
            return  # in memory: no other process can open it
        path = database.with_name(database.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            conn.close()
            raise StoreBusy(f"state store {mask_url(self.url)} is held by another runner (lock {path})") from None
        self._sqlite = conn

    def held(self) -> bool:
        """Still ours? A PostgreSQL session that died (a server restart) took the lock with it, and a
        pooler may hand out another backend: ask for the lock on this very session."""
        if self._pg is not None:
            try:
                mine = self._pg.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :a AND objid = :b "
                        "AND granted AND pid = pg_backend_pid()"
                    ),
                    {"a": PG_LOCK[0], "b": PG_LOCK[1]},
                ).scalar()
                self._pg.commit()
            except sa.exc.SQLAlchemyError:
                return False
            return bool(mine)
        return True

    def release(self) -> None:
        if self._pg is not None:
            try:
                self._pg.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"), {"a": PG_LOCK[0], "b": PG_LOCK[1]})
                self._pg.commit()
            except sa.exc.SQLAlchemyError:
                pass  # a dead session holds nothing any more
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._pg.close()
            self._pg = None
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
