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
import time
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from feedrunner.plan import mask_url

PG_LOCK = (0x66726E72, 1)  # ("frnr", 1): the two-int form shows as classid/objid in pg_locks
PG_SHARD = 0x66726E73  # ("frns", index): one lock per shard index of a sharded deployment


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
    """The runner's lock on the store; with `shard`, the lock of one shard index instead (a sharded
    deployment's shards share the store, and each index runs once). `keepalive` (seconds) makes the
    database notice a holder that vanished without closing its socket (a host lost) within about that
    long, so the lock does not outlive its holder by the kernel's two-hour default."""

    def __init__(
        self, url: str, engine: sa.Engine, shard: int | None = None, keepalive: float | None = None, wait: float = 0.0
    ) -> None:
        self.url = url
        self.engine = engine
        self.dialect = engine.dialect.name
        self.key = PG_LOCK if shard is None else (PG_SHARD, shard)
        self.what = "another runner" if shard is None else f"another process running shard {shard}"
        self.suffix = ".lock" if shard is None else f".shard-{shard}.lock"
        self.keepalive = keepalive
        self.wait = wait  # SQLite: seconds to wait out a lock held a moment (the leader probing who is alive)
        self._pg: sa.Connection | None = None
        self._sqlite: sqlite3.Connection | None = None

    def acquire(self) -> None:
        if not self.try_acquire():
            raise StoreBusy(f"state store {mask_url(self.url)} is held by {self.what}{self.holder()}")

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (and nothing held) if another process has it."""
        if self._pg is not None or self._sqlite is not None:
            return True
        if self.dialect == "postgresql":
            return self._acquire_pg()
        if self.dialect == "sqlite":
            return self._acquire_sqlite()
        logger.warning("state store {}: no single-runner lock for {}", mask_url(self.url), self.dialect)
        return True

    def holder(self) -> str:
        """Who holds the lock, as far as the database says: for the refusal message."""
        if self.dialect == "sqlite":
            database = sqlite_path(self.engine.url)
            return f" (lock {database.with_name(database.name + self.suffix)})" if database else ""
        if self.dialect != "postgresql":
            return ""
        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = :a AND l.objid = :b AND l.granted"
                ),
                {"a": self.key[0], "b": self.key[1]},
            ).first()
            if row:
                return f" (backend pid {row[0]} from {row[1] or 'local socket'})"
        return ""

    def _acquire_pg(self) -> bool:
        conn = self.engine.connect()
        try:
            if self.keepalive is not None:
                idle, count = max(1, round(self.keepalive / 2)), 3
                interval = max(1, round((self.keepalive - idle) / count))
                for name, value in (("idle", idle), ("interval", interval), ("count", count)):
                    conn.execute(sa.text(f"SET tcp_keepalives_{name} = {int(value)}"))
                conn.execute(sa.text(f"SET tcp_user_timeout = {int(self.keepalive * 1000)}"))
            got = conn.execute(
                sa.text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": self.key[0], "b": self.key[1]}
            ).scalar()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._pg = conn
        return True

    def _acquire_sqlite(self) -> bool:
        database = sqlite_path(self.engine.url)
        if database is None:
            return True  # in memory: no other process can open it
        path = database.with_name(database.name + self.suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=self.wait, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            conn.close()
            return False
        self._sqlite = conn
        return True

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
                    {"a": self.key[0], "b": self.key[1]},
                ).scalar()
                self._pg.commit()
            except sa.exc.SQLAlchemyError:
                return False
            return bool(mine)
        return True

    def release(self) -> None:
        if self._pg is not None:
            try:
                self._pg.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"), {"a": self.key[0], "b": self.key[1]})
                self._pg.commit()
            except sa.exc.SQLAlchemyError:
                pass  # a dead session holds nothing any more
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._pg.close()
            self._pg = None
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None


def held_shards(url: str, engine: sa.Engine, count: int) -> set[int]:
    """The shard indexes whose lock some process holds now: the shards that are alive, as exactly as the
    database knows it (a killed shard's session, and so its lock, is gone at once)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = :a AND granted"),
                {"a": PG_SHARD},
            )
            return {int(r[0]) for r in rows if int(r[0]) < count}
    alive = set()
    for index in range(count):
        probe = StoreLock(url, engine, shard=index)
        if probe.try_acquire() and (probe._sqlite is not None or probe._pg is not None):
            probe.release()  # free: nobody runs this shard
        else:
            alive.add(index)
    return alive


PG_SCHEMA = (0x66726E72, 2)  # held for a transaction while tables are created


def create_tables(engine: sa.Engine, meta: sa.MetaData) -> None:
    """CREATE TABLE IF NOT EXISTS, safe when several processes start on an empty store at once: on
    PostgreSQL two such statements for one table race in the catalogue (one fails on a unique index), so
    the creation is serialised by a transaction-scoped advisory lock."""
    if engine.dialect.name != "postgresql":  # SQLite: a table made meanwhile fails the CREATE; look again
        for attempt in range(5):
            try:
                meta.create_all(engine)
                return
            except sa.exc.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": PG_SCHEMA[0], "b": PG_SCHEMA[1]})
        meta.create_all(conn)
