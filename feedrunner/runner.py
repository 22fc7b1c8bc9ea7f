"""Spec -> adapters -> bounded queue -> sinks, with the desired state reconciled into the adapters.

The desired transport of every (venue, symbol) is derived in one place (`desired`); adapters apply the
breaker override themselves. Shutdown on SIGINT/SIGTERM stops the adapters, drains the queue, flushes
the sinks and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger
from prometheus_client import Counter, Gauge

from feedrunner import coordination, jobs
from feedrunner.adapters.base import Adapter
from feedrunner.alerts import Alerts
from feedrunner.checkpoints import Checkpoints, CheckpointStore
from feedrunner.control import ControlServer
from feedrunner.controlapi import RunnerApi
from feedrunner.coordination import ClusterHealth, Coordinator
from feedrunner.eventloop import new_loop
from feedrunner.filewatch import log_rejected, recheck, watch_file
from feedrunner.health import Health
from feedrunner.logsetup import configure_logging
from feedrunner.metrics import Metrics
from feedrunner.pipeline import Pipeline
from feedrunner.plan import RESTART_FIELDS, Change, diff, mask_url, spec_to_dict
from feedrunner.resilience import ConnState
from feedrunner.rollout import ActionError, Controller, Store, engine_for
from feedrunner.rollout import State as RolloutState
from feedrunner.sharding import own_share
from feedrunner.sinks import build as build_sink
from feedrunner.spec import Spec, Venue
from feedrunner.statelock import StoreBusy, StoreLock


def adapter_class(venue: Venue) -> type[Adapter] | None:
    """The adapter of a venue family, or None when its client library is missing."""
    if venue.adapter == "ccxt":
        from feedrunner.adapters.ccxt import CcxtAdapter

        return CcxtAdapter
    for module, cls in (("ib", "IbAdapter"), ("futu", "FutuAdapter")):
        if venue.adapter == module:
            try:
                mod = __import__(f"feedrunner.adapters.{module}", fromlist=[cls])
            except ImportError:
                return None
            return getattr(mod, cls, None)
    return None


class Runner:
    def __init__(self, spec: Spec, metrics: Metrics | None = None) -> None:
        self.source_spec = spec  # feeds.yaml as read, every shard's share: what /config and plan compare
        spec = own_share(spec)
        self.spec = spec
        self.metrics = metrics or Metrics()
        self.adapters: dict[str, Adapter] = {}
        self.skipped: dict[str, str] = {}
        self.sims: list[Any] = []
        windows = [c.window for c in spec.health.checks]
        if spec.rollout:
            windows += [c.window for c in (*spec.rollout.gates, *spec.rollout.rollback)]
        self.health = Health(windows)
        self.pipeline = Pipeline(spec, [build_sink(s, self.metrics) for s in spec.sinks], self.metrics, self.health)
        self.alerts = Alerts(spec.health.webhook, self.metrics.registry)
        self.rollout: Controller | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.control: ControlServer | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._up: asyncio.Task[None] | None = None
        self.lock: StoreLock | None = None
        self.checkpoints: CheckpointStore | None = None
        self._stored: Checkpoints = {}  # trade checkpoints loaded at start, seeded into each venue once
        self._checkpointer: asyncio.Task[None] | None = None
        self.started = False  # /readyz says "starting" until every venue and job is set up
        self.stopping = False
        self.store_lost = False  # another runner took the state store: write nothing more to it
        self.fatal: Callable[[str], None] = lambda why: None  # serve() stops the process on it
        self._seen_counts: dict[tuple[str, str], float] = {}
        self.engine: sa.Engine | None = None
        self.coord: Coordinator | None = None  # a shard of a sharded deployment: its lock, row and lead
        self._coordinating: asyncio.Task[None] | None = None
        self._health_loop: asyncio.Task[None] | None = None
        self._runtime: dict[str, Callable[[Venue], Venue]] = {}  # simulator endpoints, kept across reloads
        self._sims_by_venue: dict[str, Any] = {}
        self._reload_lock = asyncio.Lock()
        self.reloads = Counter(
            "feedrunner_config_reloads_total",
            "feeds.yaml reloads by result.",
            ["result"],
            registry=self.metrics.registry,
        )
        self.checkpoint_failures = Counter(
            "feedrunner_checkpoint_failures_total",
            "Trade checkpoint saves the state store refused.",
            registry=self.metrics.registry,
        )
        self.rollout_phase = Gauge(
            "feedrunner_rollout_phase",
            "Current rollout phase (1-based; 0 before the first).",
            registry=self.metrics.registry,
        )
        self.rollout_state = Gauge(
            "feedrunner_rollout_state", "1 for the rollout's current state.", ["state"], registry=self.metrics.registry
        )
        self.rollout_leader = Gauge(
            "feedrunner_rollout_leader",
            "1 while this process leads the rollout (a single runner always does; a shard may stand by).",
            registry=self.metrics.registry,
        )
        self.leader_changes = Counter(
            "feedrunner_rollout_leader_changes_total",
            "Times this shard took or lost the rollout lead, by what happened.",
            ["change"],
            registry=self.metrics.registry,
        )

    # -- desired state ---------------------------------------------------------------------------------

    def desired(self) -> dict[str, dict[str, str]]:
        """Transport wanted per venue and symbol: the rollout's choice where there is one, else the venue's.
        Breakers then override inside each adapter."""
        venues = [v for v in self.spec.venues if v.enabled]
        if self.rollout is None:
            return {v.name: dict.fromkeys(v.symbols, v.transport) for v in venues}
        targets = self.rollout.target_symbols()
        return {v.name: {s: self.rollout.transport_for(v.name, s, targets) for s in v.symbols} for v in venues}

    def reconcile(self) -> None:
        for venue, wanted in self.desired().items():
            adapter = self.adapters.get(venue)
            if adapter is not None:
                adapter.apply(wanted)
        self.refresh_gauges()

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        return self.spec.shard.count > 1

    def _controller(self) -> Controller:
        """The rollout controller; a shard's judges every shard's health and stands by until it leads."""
        assert self.engine is not None
        judge: Any = self.health
        if self.coord is not None:
            fresh_for = 2 * self.spec.health.interval + 2 * self.spec.coordination.poll + 5.0
            judge = ClusterHealth(self.source_spec, self.coord.registry, fresh_for)
        writable = self.coord is None or self.coord.leading
        return Controller(self.source_spec, Store(self.engine), judge, on_change=self.reconcile, writable=writable)

    async def start(self) -> None:
        """Claim the state store, bind the control port, then touch the store: a second runner on the
        same store, or a port in use, stops here with nothing written. A shard claims its index instead,
        and leads the rollout only if no other shard does."""
        venues = [v for v in self.spec.venues if v.enabled]
        self.engine = engine_for(self.spec.state_url)  # one engine for our tables and the job store
        if self.sharded:
            self.coord = Coordinator(self.spec, self.engine, self)
            self.coord.claim()
            self.lock = self.coord.shard_lock
        else:
            self.lock = StoreLock(self.spec.state_url, self.engine)
            self.lock.acquire()
        if self.spec.server.enabled:
            self.control = ControlServer(RunnerApi(self))
            await self.control.start()
        if self.coord is not None:
            host = self.spec.server.host
            self.coord.url = coordination.advertised_url(host, self.control.port) if self.control else ""
        if self.spec.rollout is not None and self.spec.rollout.enabled:
            self.rollout = self._controller()
        if self.spec.environment == "live":  # a simulator started here begins a new tape every run
            self.checkpoints = CheckpointStore(self.engine)
            self._stored = self.checkpoints.load()
        self.pipeline.start()
        self.alerts.start()
        for venue in venues:
            await self._add_venue(venue)
        self.reconcile()
        if self.checkpoints is not None:
            self._checkpointer = asyncio.create_task(self._checkpoint_periodically(), name="trade-checkpoints")
        self._sampler = asyncio.create_task(self._sample(), name="health-sampler")
        self._up = asyncio.create_task(self._mark_up(), name="health-baseline")
        if self.coord is not None:
            self._health_loop = asyncio.create_task(self._health_periodically(), name="health-checks")
            await self.coord.tick()  # lead now if no shard does, and be in the shards table
            self._coordinating = asyncio.create_task(self.coord.run(), name="coordination")
        else:
            await self._start_scheduler()
        self.started = True
        logger.info("runner started: {} venue(s) running, {} skipped", len(self.adapters), len(self.skipped))

    async def _add_venue(self, venue: Venue, seed: dict[str, int] | None = None) -> None:
        if self.spec.environment == "simulator":
            venue = await self._simulate(venue)
        cls = adapter_class(venue)
        if cls is None:
            self.skipped[venue.name] = f"no {venue.adapter} adapter is installed"
        if venue.name in self.skipped:
            logger.warning("venue {} skipped: {}", venue.name, self.skipped[venue.name])
            return
        assert cls is not None
        adapter = cls(venue, self.pipeline.put, self.metrics)
        adapter.emit_now = self.pipeline.put_now
        self.adapters[venue.name] = adapter
        if seed is None:
            seed = {s: n for (v, s), n in self._stored.items() if v == venue.name and s in venue.symbols}
        adapter.seed_checkpoints(seed)
        await adapter.start()

    async def _start_scheduler(self) -> None:
        """Persistent APScheduler jobs with fixed ids: a restart replaces them, never duplicates them."""
        jobs.bind(self)
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.engine)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
        )
        self.scheduler.start()
        self._schedule_jobs()

    def _schedule_jobs(self) -> None:
        assert self.scheduler is not None
        interval = self.spec.health.interval
        if self.coord is None:
            self.scheduler.add_job(
                "feedrunner.jobs:health_job",
                "interval",
                seconds=interval,
                id="health",
                name="health checks",
                replace_existing=True,
            )
        elif self.scheduler.get_job("health") is not None:  # every shard checks its own health
            self.scheduler.remove_job("health")
        if self.rollout is not None:
            self.scheduler.add_job(
                "feedrunner.jobs:rollout_job",
                "interval",
                seconds=interval,
                id="rollout",
                name="rollout gates and triggers",
                replace_existing=True,
                next_run_time=datetime.now(UTC),
            )
        elif self.scheduler.get_job("rollout") is not None:
            self.scheduler.remove_job("rollout")

    # -- a shard of a deployment (the Coordinator's hooks) ----------------------------------------------

    async def lead(self) -> None:
        """This shard now leads: its controller reads the stored rollout and writes from here on, and the
        scheduler's job runs here (its first evaluation at once)."""
        self.leader_changes.labels("took").inc()
        if self.rollout is not None:
            self.rollout.writable = True
            self.rollout.follow()
        if not self.stopping:
            await self._start_scheduler()

    async def step_down(self) -> None:
        self.leader_changes.labels("lost").inc()
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self.rollout is not None:
            self.rollout.writable = False

    def follow(self) -> None:
        if self.rollout is not None:
            self.rollout.follow()

    def symbols(self) -> int:
        return sum(len(v.symbols) for v in self.spec.venues if v.enabled)

    def readings(self) -> dict[str, Any]:
        if self.rollout is None or self.spec.rollout is None:
            return {}
        own = {(v.name, s) for v in self.spec.venues if v.enabled for s in v.symbols}
        return coordination.readings(self.health, self.spec, own, self.rollout.target_symbols(), set(self.adapters))

    async def _health_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.spec.health.interval)
            self.health_tick()

    async def _simulate(self, venue: Venue) -> Venue:
        """Start the built-in simulator for a venue and point the venue at it (only for adapters that exist)."""
        if venue.name in self._runtime:
            return self._runtime[venue.name](venue)
        if adapter_class(venue) is None:
            return venue
        seed, rate = self.spec.sim_seed, self.spec.sim_rate
        if venue.adapter == "ccxt":
            if not (venue.exchange or "").startswith("binance"):
                self.skipped[venue.name] = f"no simulator speaks {venue.exchange}'s protocol (only binance)"
                return venue
            from feedrunner.sim.binance import BinanceSim

            sim: Any = BinanceSim(list(venue.symbols), seed=seed, rate=rate)
            await sim.start()
            endpoints = dict(sim.endpoints)
            self._runtime[venue.name] = lambda v: dataclasses.replace(v, endpoints=endpoints)
        else:
            if venue.adapter == "ib":
                from feedrunner.sim.tws import TwsSim

                sim = TwsSim(seed=seed, rate=rate)
            else:
                from feedrunner.sim.opend import OpenDSim

                sim = OpenDSim(
                    seed=seed,
                    rate=rate,
                    codes=list(venue.symbols),
                    quota=venue.quota,
                    min_sub_seconds=venue.min_subscription,
                )
            await sim.start()
            port = sim.port
            self._runtime[venue.name] = lambda v: dataclasses.replace(v, host="127.0.0.1", port=port)
        self.sims.append(sim)
        self._sims_by_venue[venue.name] = sim
        logger.info("venue {}: simulator on 127.0.0.1:{}", venue.name, sim.port)
        return self._runtime[venue.name](venue)

    # -- reload ----------------------------------------------------------------------------------------

    async def reload(self, spec: Spec) -> list[Change]:
        """Apply a new, already validated spec by reconciling: only what changed is touched. Each shard
        takes its share of it: a symbol added lands on one shard, and no other symbol moves."""
        source, spec = spec, own_share(spec, self.spec.shard)
        self.source_spec = dataclasses.replace(source, **{k: getattr(self.source_spec, k) for k in RESTART_FIELDS})
        changes = diff(spec_to_dict(self.spec), spec_to_dict(spec))
        if not changes:
            self.reloads.labels("unchanged").inc()
            logger.info("reload: no change")
            return changes
        # Settings only a restart applies keep their running values; the change is reported instead.
        spec = dataclasses.replace(spec, **{k: getattr(self.spec, k) for k in RESTART_FIELDS})
        old = {v.name: v for v in self.spec.venues if v.enabled}
        new = {v.name: v for v in spec.venues if v.enabled}
        self.spec = spec
        restart = {c.target for c in changes if c.kind == "venue_restart"}
        resume: dict[str, dict[str, int]] = {}  # a rebuilt venue resumes its tape where the old one stopped
        for name in (old.keys() - new.keys()) | restart:
            adapter = self.adapters.pop(name, None)
            if adapter is not None:
                await adapter.stop()
                if name in restart:
                    resume[name] = adapter.trade_checkpoints()
            self.skipped.pop(name, None)
        for name, venue in new.items():
            adapter = self.adapters.get(name)
            if adapter is None:
                if name not in self.skipped:
                    await self._add_venue(venue, resume.get(name, {}))
                continue
            sim = self._sims_by_venue.get(name)
            if sim is not None and hasattr(sim, "add_symbol"):  # a symbol added in simulator mode
                for symbol in venue.symbols:
                    sim.add_symbol(symbol)
            adapter.update(self._runtime.get(name, lambda v: v)(venue))
        if spec.rollout is not None and spec.rollout.enabled:
            if self.rollout is None:
                self.rollout = self._controller()
            else:
                self.rollout.update(self.source_spec)
        else:
            self.rollout = None
        if self.scheduler is not None:
            self._schedule_jobs()
        self.reconcile()
        for change in changes:
            (logger.info if change.live else logger.warning)("reload: {}", change)
        self.reloads.labels("applied").inc()
        return changes

    async def reload_file(self, path: str | None = None) -> tuple[str, list[Change], list[Any]]:
        """Validate fully first; an invalid file is rejected and the running config stays."""
        if not self.started or self.stopping:  # a reload racing start or stop would add a venue twice
            why = "starting" if not self.started else "stopping"
            logger.warning("reload refused: the runner is {}", why)
            return "invalid", [], [f"the runner is {why}: reload again once it runs"]
        async with self._reload_lock:
            path = path or self.spec.source
            spec, problems = await recheck(path)
            if spec is None:
                self.reject_reload(problems)
                return "invalid", [], problems
            changes = await self.reload(spec)
            return ("applied" if changes else "unchanged"), changes, []

    def reject_reload(self, problems: list[Any]) -> None:
        self.reloads.labels("invalid").inc()
        log_rejected(problems, "the running config stays")

    async def stop(self) -> None:
        """Scheduler, server and timers first; then the venues (concurrently, within half the shutdown
        deadline, so the drain and flush always get the rest); then the queue into the sinks."""
        self.stopping = True
        began = time.monotonic()
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                self.scheduler.shutdown(wait=False)
        jobs.bind(None)
        if self.control is not None:
            await self.control.stop()
        for task in (self._sampler, self._up, self._checkpointer, self._coordinating, self._health_loop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Concurrently: each adapter's stop is bounded by its close_timeout, and in sequence they would add up.
        try:
            await asyncio.wait_for(
                asyncio.gather(*(a.stop() for a in self.adapters.values())), self.spec.shutdown_deadline / 2
            )
        except TimeoutError:
            logger.error("venues still stopping after {:g}s: draining without them", self.spec.shutdown_deadline / 2)
        snap, mark = self._snapshot(), self.pipeline.accepted  # what was handed to the queue by now
        # The buses get what is left of the deadline, less a margin for the checkpoint and the rest.
        await self.pipeline.drain_and_close(max(1.0, self.spec.shutdown_deadline - (time.monotonic() - began) - 3.0))
        if self.checkpoints is not None and self.pipeline.durable >= mark and not self.store_lost:
            await self._save_checkpoints(snap)
        await self.alerts.stop()
        for sim in self.sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        if self.coord is not None:
            await self.coord.release()
        elif self.lock is not None:
            await asyncio.to_thread(self.lock.release)
        if self.engine is not None:
            self.engine.dispose()
        logger.info("runner stopped: {} events written", self.pipeline.written)

    # -- health ----------------------------------------------------------------------------------------

    async def _sample(self) -> None:
        """Once a second: each venue up or not, and its new errors and reconnects, into the health windows;
        every 5 s, that the state store is still ours."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            self.health.sample_memory()
            ticks += 1
            if ticks % 5 == 0 and self.lock is not None and not await asyncio.to_thread(self.lock.held):
                await self._reclaim_store()
            # Only these two counters are read: collecting the whole registry took ~0.7 ms a second, a
            # pause every trade in flight waited out.
            totals: dict[tuple[str, str], float] = {}
            for metric, counter in (("errors", self.metrics.errors), ("reconnects", self.metrics.reconnects)):
                for family in counter.collect():
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            key = (sample.labels.get("venue", ""), metric)
                            totals[key] = totals.get(key, 0.0) + sample.value
            for name, adapter in self.adapters.items():
                self.health.sample_up(name, not self._venue_problem(name, adapter))
                for metric, feed in (("errors", self.health.error), ("reconnects", self.health.reconnect)):
                    total = totals.get((name, metric), 0.0)
                    delta = int(total - self._seen_counts.get((name, metric), 0.0))
                    self._seen_counts[(name, metric)] = total
                    for _ in range(max(0, delta)):
                        feed(name)

    async def venues_up(self, timeout: float = 30.0) -> None:
        """Return once every adapter is connected (or `timeout` passed)."""
        up = (ConnState.CONNECTED, ConnState.DEGRADED)
        for _ in range(int(timeout / 0.25)):  # polled: adapters have no "all up" event to wait on
            if all(a.conn.state in up for a in self.adapters.values()):
                return
            await asyncio.sleep(0.25)

    async def _mark_up(self) -> None:
        """Health windows and the memory baseline start once the venues are up: what loading markets
        allocates is startup, and a window that began before the venues did would judge the start."""
        await self.venues_up()
        await asyncio.sleep(0)  # let the first batches land in the queue before the baseline
        self.health.mark_up()

    # -- trade checkpoints ------------------------------------------------------------------------------

    def _snapshot(self) -> Checkpoints:
        return {(name, s): n for name, a in self.adapters.items() for s, n in a.trade_checkpoints().items()}

    async def _checkpoint_periodically(self) -> None:
        """Every CHECKPOINT_EVERY seconds: the last trade id per symbol that the sinks have on disk.

        The snapshot is of ids already handed to the queue; it is stored once everything queued before it
        is written and flushed, so a crash (kill -9) resumes from ids the files hold, and the restart
        backfills what came after (or counts it lost). Not stored while a sink fails: those trades are
        not on disk, and a restart should fetch them again.
        """
        self._stored = {}  # seeded at start; a venue added later starts from the live tape
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            snap, mark = self._snapshot(), self.pipeline.accepted
            await self.pipeline.flushed(mark)
            await self._save_checkpoints(snap)

    async def _save_checkpoints(self, snap: Checkpoints) -> None:
        assert self.checkpoints is not None
        if not snap:
            return
        failing = self.pipeline.losing()
        if failing:
            logger.debug("trade checkpoints held back: {}", failing[0])
            return
        try:
            await asyncio.to_thread(self.checkpoints.save, snap)
        except sa.exc.SQLAlchemyError as exc:
            self.metrics.errors.labels("state", "checkpoint").inc()
            logger.warning(
                "trade checkpoints not saved ({}): a crash now would resume from older ids", exc.__class__.__name__
            )

    async def _reclaim_store(self) -> None:
        """The store lock's session died (a database restart): take it again, or stop if another runner
        took it meanwhile, since two runners would overwrite each other's rollout."""
        assert self.lock is not None
        logger.error("state store lock lost ({}): claiming it again", mask_url(self.spec.state_url))
        await asyncio.to_thread(self.lock.release)
        try:
            await asyncio.to_thread(self.lock.acquire)
        except StoreBusy as exc:
            self.store_lost = True
            self.fatal(str(exc))
        except sa.exc.SQLAlchemyError as exc:
            logger.error("state store unreachable: {}; next try in 5s", exc.__class__.__name__)
        else:
            logger.info("state store lock held again")

    def _venue_problem(self, name: str, adapter: Adapter) -> str | None:
        if adapter.conn.state not in (ConnState.CONNECTED, ConnState.DEGRADED):
            return f"{name}: {adapter.conn.state.value} ({adapter.conn.reason})"
        window = max(adapter.venue.stale_after.values(), default=15.0)
        latest = max((t for (v, _, _), t in self.health.last_seen.items() if v == name), default=None)
        if latest is None or time.time() - latest > window:
            return f"{name}: no data for {window:g}s"
        return None

    def not_ready(self) -> list[str]:
        """Why /readyz says 503: every enabled venue must be connected and delivering, every sink writing."""
        if not self.started:
            return ["starting"]
        problems = [p for n, a in self.adapters.items() if (p := self._venue_problem(n, a))]
        problems += [f"{n}: skipped ({why})" for n, why in self.skipped.items()]
        problems += self.pipeline.sink_problems()
        return problems

    def health_tick(self) -> None:
        keys = [(v.name, s) for v in self.spec.venues if v.enabled for s in v.symbols if v.name in self.adapters]
        for check in self.spec.health.checks:
            reading = self.health.evaluate(check, list(self.adapters), keys, None)
            firing = reading.value is not None and check.holds(reading.value)
            self.alerts.update(
                check.name,
                firing,
                {"metric": check.metric, "value": reading.value, "threshold": check.threshold, "summary": check.name},
            )
        for name, adapter in self.adapters.items():
            self.alerts.update(
                f"venue {name} failed",
                adapter.conn.state is ConnState.FAILED,
                {"venue": name, "summary": adapter.conn.reason},
            )
        now = time.monotonic()
        for d in self.pipeline.deliveries:
            self.alerts.update(
                f"sink {d.name} cannot deliver",
                d.failing and d.since is not None and time.time() - d.since >= self.spec.health.interval,
                {"sink": d.name, "summary": d.problem() or "", "permanent": d.permanent},
            )
            self.alerts.update(
                f"sink {d.name} dropping events",
                d.dropped_at is not None and now - d.dropped_at < 2 * self.spec.health.interval,
                {"sink": d.name, "summary": f"{d.dropped} events dropped (spool full or unwritable)"},
            )
        if self.coord is not None:
            self.coord.publish()
        self.refresh_gauges()

    def rollout_tick(self) -> None:
        if self.rollout is None or not self.rollout.writable:
            return
        if isinstance(self.rollout.health, ClusterHealth):
            self.rollout.health.refresh()
        before = self.rollout.state
        self.rollout.evaluate()
        if self.rollout.state is not before:
            self.alerts.update(
                "rollout rolled back", self.rollout.state is RolloutState.ROLLED_BACK, {"summary": self.rollout.reason}
            )
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        self.rollout_leader.set(1 if self.coord is None or self.coord.leading else 0)
        if self.rollout is not None:
            self.rollout_phase.set(self.rollout.index + 1)
            for state in RolloutState:
                self.rollout_state.labels(state.value).set(1 if state is self.rollout.state else 0)
        m = self.metrics
        m.staleness.clear()  # a venue a reload removed leaves no stale series behind
        m.venue_up.clear()
        for venue in self.spec.venues:
            adapter = self.adapters.get(venue.name)
            if adapter is None:
                continue
            silence = self.health.staleness([(venue.name, s) for s in venue.symbols]).value
            if silence is not None:
                m.staleness.labels(venue.name).set(silence)
            m.venue_up.labels(venue.name).set(0 if self._venue_problem(venue.name, adapter) else 1)
        m.memory_rss.set(self.health.memory()[0])
        m.health_coverage.set(self.health.coverage())

    def rollout_act(self, action: str, full: bool = False) -> tuple[int, dict[str, Any]]:
        """An operator's rollout action: (HTTP status, body). Only the leader's controller acts."""
        if self.rollout is None:
            return 404, {"error": "no rollout in feeds.yaml"}
        if not self.rollout.writable:
            leader = self.coord.status()["leader"] if self.coord else None
            where = f"shard {leader['shard']} leads it at {leader['url']}" if leader else "no shard leads it now"
            return 409, {"error": f"this shard stands by for the rollout: {where}", "leader": leader}
        try:
            self.rollout.act(action, full=full)
        except ActionError as exc:
            return 409, {"error": str(exc), "rollout": self.rollout.status()}
        logger.info("rollout {}{} requested over HTTP", action, " --full" if full else "")
        return 200, self.rollout.status()

    def status(self) -> dict[str, Any]:
        venues = {}
        now = time.time()
        for name, adapter in self.adapters.items():
            st = adapter.status()
            rows = {}
            for symbol, transport in st["symbols"].items():
                count, latency = self.health.per_symbol.get((name, symbol), (0, 0.0))
                last = max(self.health.last_seen.get((name, symbol, t), 0.0) for t in ("websocket", "polling"))
                rows[symbol] = {
                    "transport": transport,
                    "events": int(count),
                    "latency_ms": round(latency * 1000, 2),
                    "silent_seconds": round(now - last, 1) if last else None,
                }
            st["symbols"] = rows
            st["rate_per_s"] = round(self.health.rate([name], 60).value or 0.0, 1)
            venues[name] = st
        rss, growth = self.health.memory()
        out: dict[str, Any] = {
            "venues": venues,
            "skipped": dict(self.skipped),
            "queue_depth": self.pipeline.depth,
            "events_written": self.pipeline.written,
            "sinks": self.pipeline.sink_status(),
            "ready": not self.not_ready(),
            "not_ready": self.not_ready(),
            "rss_mb": round(rss / 2**20, 1),
            "rss_growth_mb": round(growth / 2**20, 1),
            "alerts": sorted(self.alerts.active),
            "rollout": self.rollout.status() if self.rollout else None,
            "shard": {"index": self.spec.shard.index, "count": self.spec.shard.count},
            "leader": self.coord is None or self.coord.leading,
        }
        if self.coord is not None:
            out["cluster"] = self.coord.status()
        if self.scheduler is not None:
            job = self.scheduler.get_job("rollout") or self.scheduler.get_job("health")
            out["next_evaluation"] = job.next_run_time.timestamp() if job and job.next_run_time else None
        return out


async def freeze_heap_when_up(runner: Runner, timeout: float = 30.0) -> None:
    """Once the venues are up (markets loaded) or `timeout` passed, move everything alive into the
    collector's permanent generation.

    ccxt alone leaves some 240,000 long-lived objects, and a full collection walking them stopped the
    event loop for about 90 ms: a latency spike on every feed whenever it came. Frozen, they are no
    longer walked; everything created later is collected as usual.
    """
    await runner.venues_up(timeout)
    gc.collect()
    gc.freeze()
    logger.debug("{} long-lived objects frozen out of garbage collection", gc.get_freeze_count())


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's unhandled errors (a client library's stray task failing) go to our log, not raw stderr.
    A connection error there is expected after we drop a socket (aiohttp's pending pong, say): debug."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError):
        logger.debug("asyncio: {}: {}", context.get("message"), exc)
    else:
        logger.opt(exception=exc).error("asyncio: {}", context.get("message"))


async def serve(
    spec: Spec, watch: bool = False, read_from: tuple[int, int, int] | None = None, announce: str | None = None
) -> int:
    """Run until a signal; with `announce`, write {pid, port, shard} there (atomically) once started, for
    the supervisor that spawned this worker."""
    runner = Runner(spec)
    stop = asyncio.Event()
    failure: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_exception)

    def fatal(why: str) -> None:
        logger.error("stopping: {}", why)
        failure.append(why)
        stop.set()

    runner.fatal = fatal
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(  # logrotate's signal too: sinks reopen their files
        signal.SIGHUP, lambda: (runner.pipeline.reopen(), asyncio.ensure_future(runner.reload_file()))
    )
    watcher = freezer = None
    try:
        await runner.start()
        if announce is not None:
            _announce(announce, runner)
        freezer = asyncio.create_task(freeze_heap_when_up(runner), name="freeze-heap")
        if watch:
            watcher = asyncio.create_task(watch_file(spec.source, read_from, runner.reload_file), name="watch")
        await stop.wait()
        if not failure:
            logger.info("signal received: draining and stopping")
    except StoreBusy as exc:
        logger.error("cannot start: {}", exc)
        return 69
    except OSError as exc:  # the control port taken, the state directory unwritable...
        logger.error("cannot start: {}", exc)
        return 69  # EX_UNAVAILABLE
    except sa.exc.SQLAlchemyError as exc:
        logger.error("cannot open the state store {}: {}", mask_url(spec.state_url), exc.__class__.__name__)
        return 69
    finally:
        timer = _exit_after(spec.shutdown_deadline + EXIT_GRACE)
        for task in (watcher, freezer):
            if task is not None:
                task.cancel()
        try:
            await asyncio.wait_for(runner.stop(), spec.shutdown_deadline)
        except TimeoutError:
            logger.error("shutdown passed its {:g}s deadline: exiting with what is flushed", spec.shutdown_deadline)
        timer.cancel()
    return 69 if failure else 0


CHECKPOINT_EVERY = 5.0  # seconds between trade checkpoint saves (one upsert of every symbol)
EXIT_GRACE = 5.0  # seconds past shutdown.deadline before the process exits whatever is still running


def _exit_after(seconds: float) -> threading.Timer:
    """Shutdown must not depend on threads: a reload blocked in open(), a client library's thread, the
    executor join at interpreter exit. A daemon timer ends the process if it is still here by then."""

    def force() -> None:
        logger.error("shutdown still blocked after {:g}s: exiting now", seconds)
        os._exit(70)  # EX_SOFTWARE

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer


def _announce(path: str, runner: Runner) -> None:
    """Written whole or not at all (tmp + rename): the supervisor never reads half a file."""
    shard = runner.spec.shard
    port = runner.control.port if runner.control is not None else None
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "port": port, "shard": [shard.index, shard.count]}, f)
    os.replace(tmp, path)


def run(
    spec: Spec, watch: bool = False, read_from: tuple[int, int, int] | None = None, announce: str | None = None
) -> int:
    configure_logging(spec)
    loop, kind = new_loop(spec.event_loop)
    logger.info("event loop: {}", kind)
    try:
        code = loop.run_until_complete(serve(spec, watch, read_from, announce))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    # Not asyncio.run, and no plain return: asyncio.run joins the default executor's threads and the
    # interpreter every non-daemon one at exit, and a thread stuck in a blocking call (a FIFO's open, a
    # dead NFS read, a client library's socket) would hold the process forever.
    deadline = time.monotonic() + 1.0  # loop.close() told idle executor threads to end: let them
    stuck = []
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                stuck.append(t.name)
    if stuck:
        logger.warning("exiting past {} blocked thread(s): {}", len(stuck), ", ".join(stuck[:5]))
        logger.complete()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
