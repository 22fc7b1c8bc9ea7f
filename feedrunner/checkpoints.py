"""Each symbol's last delivered trade id, kept in the state store so a restart resumes the tape from it.

After a crash (`kill -9`) the runner seeds its adapters with these ids (`Adapter.seed_checkpoints`), so the
trades in between are backfilled, or counted lost where the venue no longer has them, instead of vanishing
unnoticed. Saved periodically (not per trade): one upsert of every (venue, symbol) in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from feedrunner.statelock import create_tables

META = sa.MetaData()
TABLE = sa.Table(
    "trade_checkpoints",
    META,
    sa.Column("venue", sa.String(64), primary_key=True),
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # epoch seconds of the save
)

Checkpoints = dict[tuple[str, str], int]  # (venue, symbol) -> last delivered trade id
UPSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class CheckpointStore:
    """load() / save() of trade checkpoints on a SQLAlchemy engine (the runner's state store)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        create_tables(engine, META)

    def load(self) -> Checkpoints:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(TABLE.c.venue, TABLE.c.symbol, TABLE.c.last_id))
            return {(venue, symbol): int(last_id) for venue, symbol, last_id in rows}

    def save(self, ids: Mapping[tuple[str, str], int]) -> None:
        """Upsert every id in one transaction: a crash mid-save leaves the previous checkpoints whole."""
        if not ids:
            return
        at = time.time()
        rows = [{"venue": v, "symbol": s, "last_id": int(n), "at": at} for (v, s), n in ids.items()]
        with self.engine.begin() as c:
            insert = UPSERT[c.dialect.name](TABLE)  # the state store is SQLite or PostgreSQL
            excluded = insert.excluded
            c.execute(
                insert.on_conflict_do_update(
                    index_elements=[TABLE.c.venue, TABLE.c.symbol],
                    set_={"last_id": excluded.last_id, "at": excluded.at},
                ),
                rows,
            )
