"""The shards of one deployment on one state store: a lock per shard, one rollout leader, heartbeats,
and each shard's health readings for the leader's gates. Nothing here is a consensus of our own: the
locks are the database's (a PostgreSQL session advisory lock dies with its session, kill -9 included).

- Each shard holds its own shard lock for its life: the same index started twice is refused.
- One shard holds the leader lock (the lock a single runner holds on its store): it runs the rollout
  controller and the APScheduler job. The others are standbys that try the lock every `poll` and lead
  once the leader's session is gone; a leader that cannot confirm its lock stops leading at once.
- Desired state travels through the store: the leader writes rollout_state, every standby reads it every
  `poll` and reconciles its own symbols when it changed.
- Health for the gates travels through the store too, bounded: every `health.interval` each shard writes
  one row with its readings of each rollout condition over its own symbols (value, samples, coverage)
  and its silent target symbols. The leader combines them worst-case (the gate must hold on every shard;
  a trigger fires when it holds on any), adds a shard's rates, and treats the symbols of a shard with no
  fresh row as silent: a shard that is down holds the promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from loguru import logger

from feedrunner.health import Reading
from feedrunner.plan import mask_url
from feedrunner.sharding import owner_of
from feedrunner.spec import Condition, Spec
from feedrunner.statelock import StoreBusy, StoreLock, create_tables, held_shards

META = sa.MetaData()
SHARDS = sa.Table(
    "shards",
    META,
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("url", sa.String(512), nullable=False),
    sa.Column("leader", sa.Boolean, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("symbols", sa.Integer, nullable=False),
    sa.Column("readings", sa.Text, nullable=False),  # JSON: see Readings
    sa.Column("readings_at", sa.Float, nullable=False),
)

SUMMED = frozenset({"message_rate"})  # a deployment's rate is the sum of its shards'
LOWER_IS_WORSE = frozenset({"uptime"})


def reading_key(cond: Condition, transport: str | None) -> str:
    """What a reading depends on: its metric, window and transport (not the threshold)."""
    return f"{cond.metric}/{cond.window:g}/{transport or '*'}"


def combine(metric: str, readings: Sequence[Reading]) -> Reading:
    """One deployment's reading from its shards': the worst value (the sum for rates), every sample,
    the shortest coverage among the shards that had a value."""
    valued = [r for r in readings if r.value is not None]
    samples = sum(r.samples for r in readings)
    if not valued:
        return Reading(None, samples, min((r.covered for r in readings), default=0.0))
    values = [r.value for r in valued if r.value is not None]
    if metric in SUMMED:
        value = sum(values)
    elif metric in LOWER_IS_WORSE:
        value = min(values)
    else:
        value = max(values)
    return Reading(value, samples, min(r.covered for r in valued))


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


class Registry:
    """The shards table: one row per shard index, renewed every poll."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        create_tables(engine, META)

    def beat(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            updated = c.execute(sa.update(SHARDS).where(SHARDS.c.shard == row["shard"]).values(**row)).rowcount
            if not updated:
                c.execute(sa.insert(SHARDS).values(**row))

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(sa.select(SHARDS).order_by(SHARDS.c.shard)).mappings()]

    def remove(self, shard: int) -> None:
        with self.engine.begin() as c:
            c.execute(sa.delete(SHARDS).where(SHARDS.c.shard == shard))


class ClusterHealth:
    """The leader's view of every shard's health, with the interface the rollout controller asks of
    Health (evaluate, silent). `refresh` reads the shards table; the rest is pure."""

    def __init__(self, spec: Spec, registry: Registry, fresh_for: float, clock: Any = time.time) -> None:
        self.spec = spec  # every shard's share: who owns which symbol
        self.registry = registry
        self.fresh_for = fresh_for
        self.clock = clock
        self.fresh: dict[int, dict[str, Any]] = {}  # shard -> its readings, as of the last refresh

    def refresh(self) -> None:
        """Once per evaluation: the shards of this deployment that are alive (their lock is held) with
        recent readings, parsed, for every condition the evaluation judges."""
        alive = held_shards(self.spec.state_url, self.registry.engine, self.spec.shard.count)
        now, count = self.clock(), self.spec.shard.count
        self.fresh = {
            row["shard"]: json.loads(row["readings"])
            for row in self.registry.rows()
            if row["count"] == count and row["shard"] in alive and now - row["readings_at"] <= self.fresh_for
        }

    def evaluate(
        self, cond: Condition, venues: Iterable[str], keys: Iterable[tuple[str, str]], transport: str | None
    ) -> Reading:
        key = reading_key(cond, transport)
        readings = []
        for data in self.fresh.values():
            got = data.get("conditions", {}).get(key)
            if got is not None:
                value, samples, covered = got
                readings.append(Reading(value, samples, math.inf if covered is None else covered))
        return combine(cond.metric, readings)

    def silent(self, keys: Iterable[tuple[str, str]], transport: str, window: float) -> list[tuple[str, str]]:
        """Target symbols a shard reported silent, and every target symbol of a shard not reporting."""
        fresh = self.fresh
        said = {tuple(k) for data in fresh.values() if data.get("transport") == transport for k in data["silent"]}
        count = self.spec.shard.count
        out = []
        for venue_name, symbol in keys:
            try:
                venue = self.spec.venue(venue_name)
            except KeyError:
                continue
            if (venue_name, symbol) in said or owner_of(venue, symbol, count) not in fresh:
                out.append((venue_name, symbol))
        return out


def readings(
    health: Any,
    spec: Spec,
    own: set[tuple[str, str]],
    targets: set[tuple[str, str]],
    own_venues: set[str],
) -> dict[str, Any]:
    """This shard's readings of every rollout condition, scoped as the leader's controller scopes them
    (the target symbols, or every venue before any is on the target), restricted to this shard's share."""
    assert spec.rollout is not None
    r = spec.rollout
    keys = targets & own
    venues = ({v for v, _ in targets} & own_venues) if targets else own_venues
    out: dict[str, list[Any]] = {}
    for cond in (*r.gates, *r.rollback):
        got = health.evaluate(cond, venues, keys, r.target)
        out[reading_key(cond, r.target)] = [got.value, got.samples, _finite(got.covered)]
    window = max((g.window for g in r.gates), default=60.0)
    return {"transport": r.target, "conditions": out, "silent": health.silent(sorted(keys), r.target, window)}


def advertised_url(host: str, port: int) -> str:
    """Where the other shards and operators reach this shard's control server."""
    if host in ("0.0.0.0", "::", ""):
        host = os.environ.get("POD_IP") or socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Coordinator:
    """One shard's part: its lock and row, the leader lock tried or confirmed every `poll`, the desired
    state followed while standing by. The runner supplies what to do on each change (`hooks`)."""

    def __init__(self, spec: Spec, engine: sa.Engine, hooks: Any) -> None:
        self.spec = spec
        self.shard = spec.shard
        self.hooks = hooks  # async lead(), async step_down(), follow(), readings() -> dict, symbols() -> int
        self.registry = Registry(engine)
        self.shard_lock = StoreLock(spec.state_url, engine, shard=self.shard.index, wait=2.0)
        self.leader_lock = StoreLock(spec.state_url, engine, keepalive=spec.coordination.lease)
        self.leading = False
        self.url = ""
        self.started_at = time.time()
        self.leaderless_since: float | None = None
        self.led_since: float | None = None
        self._readings: dict[str, Any] = {}
        self._readings_at = 0.0

    def claim(self) -> None:
        """This shard's lock (StoreBusy if its index runs elsewhere), and no deployment of another shard
        count on the store: its shards would serve the same symbols as ours."""
        now, stale = time.time(), 3 * self.spec.coordination.lease
        for row in self.registry.rows():
            if row["count"] != self.shard.count and now - row["heartbeat_at"] < stale:
                raise StoreBusy(
                    f"state store {mask_url(self.spec.state_url)} serves a deployment of {row['count']} shards "
                    f"(shard {row['shard']} on {row['host']} pid {row['pid']}, {row['url']}); every shard must "
                    f"run with the same count ({self.shard.count} here)"
                )
        self.shard_lock.acquire()

    def row(self) -> dict[str, Any]:
        return {
            "shard": self.shard.index,
            "count": self.shard.count,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "url": self.url,
            "leader": self.leading,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "symbols": self.hooks.symbols(),
            "readings": json.dumps(self._readings),
            "readings_at": self._readings_at,
        }

    def publish(self) -> None:
        """Take this shard's readings now (every health interval, from the runner's health tick)."""
        self._readings, self._readings_at = self.hooks.readings(), time.time()

    async def tick(self) -> None:
        """One round: confirm or try the lead, follow the leader while standing by, renew the row."""
        if self.leading and not await asyncio.to_thread(self.leader_lock.held):
            logger.error("rollout leader lock lost (the database session ended): standing by")
            await asyncio.to_thread(self.leader_lock.release)
            self.leading, self.led_since = False, None
            self.leaderless_since = time.time()
            await self.hooks.step_down()
        if not self.leading:
            try:
                got = await asyncio.to_thread(self.leader_lock.try_acquire)
            except sa.exc.SQLAlchemyError as exc:
                logger.warning("rollout leader lock not tried: {}", exc.__class__.__name__)
                got = False
            if got:
                self.leading, self.led_since = True, time.time()
                gap = (
                    f" after {self.led_since - self.leaderless_since:.1f}s without one" if self.leaderless_since else ""
                )
                logger.info("shard {}/{} leads the rollout{}", self.shard.index, self.shard.count, gap)
                await self.hooks.lead()
            else:
                if self.leaderless_since is None:
                    self.leaderless_since = time.time()
                self.hooks.follow()
        await asyncio.to_thread(self.registry.beat, self.row())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.spec.coordination.poll)
            try:
                await self.tick()
            except sa.exc.SQLAlchemyError as exc:
                logger.warning("state store unreachable for coordination: {}", exc.__class__.__name__)

    def status(self) -> dict[str, Any]:
        now = time.time()
        try:
            rows = self.registry.rows()
        except sa.exc.SQLAlchemyError:
            rows = []
        shards = [
            {
                "shard": r["shard"],
                "count": r["count"],
                "host": r["host"],
                "pid": r["pid"],
                "url": r["url"],
                "leader": bool(r["leader"]),
                "symbols": r["symbols"],
                "heartbeat_age_s": round(now - r["heartbeat_at"], 1),
            }
            for r in rows
        ]
        leader = next(
            (s for s in shards if s["leader"] and s["heartbeat_age_s"] < 3 * self.spec.coordination.lease), None
        )
        return {
            "shard": self.shard.index,
            "count": self.shard.count,
            "leading": self.leading,
            "leader": leader,
            "shards": shards,
        }

    async def release(self) -> None:
        """On a clean stop: our row goes (the leader stops counting on this shard's readings), then the
        locks, so a standby leads at once."""
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            await asyncio.to_thread(self.registry.remove, self.shard.index)
        await asyncio.to_thread(self.leader_lock.release)
        await asyncio.to_thread(self.shard_lock.release)
        self.leading = False
