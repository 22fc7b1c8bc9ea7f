"""Spec -> adapters -> bounded queue -> sinks, with the desired state reconciled into the adapters.

The desired transport of every (venue, symbol) is derived in one place (`desired`); adapters apply the
breaker override themselves. Shutdown on SIGINT/SIGTERM stops the adapters, drains the queue, flushes
the sinks and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from feedrunner.adapters.base import Adapter
from feedrunner.events import Event
from feedrunner.metrics import Metrics
from feedrunner.sinks import build as build_sink
from feedrunner.sinks.base import Sink
from feedrunner.spec import Spec, Venue

BATCH = 2048


class Pipeline:
    """The bounded queue between adapters and sinks, with the overflow policy from the spec."""

    def __init__(self, spec: Spec, sinks: list[Sink], metrics: Metrics) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=spec.queue.size)
        self.block = spec.queue.overflow == "block"
        self.sinks = sinks
        self.metrics = metrics
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._flush_every = min((s.spec.flush_interval for s in sinks), default=1.0) or 0.05

    async def put(self, event: Event) -> None:
        if self.block:
            await self.queue.put(event)
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.metrics.dropped.labels("queue_full").inc()
        self.queue.put_nowait(event)

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume(), name="pipeline")

    async def _consume(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                first = await asyncio.wait_for(self.queue.get(), timeout=self._flush_every)
                batch = [first]
                while len(batch) < BATCH and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                self._write(batch)
            except TimeoutError:
                pass
            if time.monotonic() - last_flush >= self._flush_every:
                self._flush()
                last_flush = time.monotonic()

    def _write(self, batch: list[Event]) -> None:
        self.metrics.queue_depth.set(self.queue.qsize())
        for sink in self.sinks:
            events = batch if len(sink.kinds) == 3 else [e for e in batch if e.kind in sink.kinds]
            try:
                self.metrics.sink_written.labels(sink.name).inc(sink.write(events))
            except Exception as exc:  # a failing sink is counted and logged, never fatal to the feeds
                self.metrics.sink_errors.labels(sink.name).inc()
                logger.error("sink {} failed to write {} events: {}", sink.name, len(events), exc)
        self.written += len(batch)

    def _flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                self.metrics.sink_errors.labels(sink.name).inc()
                logger.error("sink {} failed to flush: {}", sink.name, exc)

    async def drain_and_close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        rest = []
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        if rest:
            self._write(rest)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()


def adapter_class(venue: Venue) -> type[Adapter] | None:
    """The adapter of a venue family, or None while that family has not landed."""
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
        self.spec = spec
        self.metrics = metrics or Metrics()
        self.adapters: dict[str, Adapter] = {}
        self.skipped: dict[str, str] = {}
        self.sims: list[Any] = []
        self.pipeline = Pipeline(spec, [build_sink(s) for s in spec.sinks], self.metrics)

    def desired(self) -> dict[str, dict[str, str]]:
        """Transport wanted per venue and symbol; the rollout refines it, breakers apply in adapters."""
        return {v.name: dict.fromkeys(v.symbols, v.transport) for v in self.spec.venues if v.enabled}

    def reconcile(self) -> None:
        for venue, wanted in self.desired().items():
            adapter = self.adapters.get(venue)
            if adapter is not None:
                adapter.apply(wanted)

    async def start(self) -> None:
        venues = [v for v in self.spec.venues if v.enabled]
        if self.spec.environment == "simulator":
            venues = [await self._simulate(v) for v in venues]
        self.pipeline.start()
        for venue in venues:
            cls = adapter_class(venue)
            if cls is None:
                self.skipped[venue.name] = f"the {venue.adapter} adapter has not landed yet"
                logger.warning("venue {} skipped: {}", venue.name, self.skipped[venue.name])
                continue
            if venue.name in self.skipped:
                continue
            adapter = cls(venue, self.pipeline.put, self.metrics)
            self.adapters[venue.name] = adapter
            await adapter.start()
        self.reconcile()
        logger.info("runner started: {} venue(s) running, {} skipped", len(self.adapters), len(self.skipped))

    async def _simulate(self, venue: Venue) -> Venue:
        """Start the built-in simulator for a venue and point the venue at it (only for adapters that exist)."""
        if adapter_class(venue) is None:
            return venue
        seed, rate = self.spec.sim_seed, self.spec.sim_rate
        if venue.adapter == "ccxt":
            if not (venue.exchange or "").startswith("binance"):
                self.skipped[venue.name] = f"no simulator speaks {venue.exchange}'s protocol (only binance)"
                logger.warning("venue {} skipped: {}", venue.name, self.skipped[venue.name])
                return venue
            from feedrunner.sim.binance import BinanceSim

            sim = BinanceSim(list(venue.symbols), seed=seed, rate=rate)
            await sim.start()
            self.sims.append(sim)
            logger.info("venue {}: simulator on {}", venue.name, sim.endpoints["rest"])
            return dataclasses.replace(venue, endpoints=sim.endpoints)
        if venue.adapter == "ib":
            from feedrunner.sim.tws import TwsSim

            sim = TwsSim(seed=seed, rate=rate)
        else:
            from feedrunner.sim.opend import OpenDSim

            sim = OpenDSim(seed=seed, rate=rate, codes=list(venue.symbols), quota=venue.quota)
        await sim.start()
        self.sims.append(sim)
        logger.info("venue {}: simulator on 127.0.0.1:{}", venue.name, sim.port)
        return dataclasses.replace(venue, host="127.0.0.1", port=sim.port)

    async def stop(self) -> None:
        for adapter in self.adapters.values():
            await adapter.stop()
        await self.pipeline.drain_and_close()
        for sim in self.sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        logger.info("runner stopped: {} events written", self.pipeline.written)

    def status(self) -> dict[str, Any]:
        return {
            "venues": {n: a.status() for n, a in self.adapters.items()},
            "skipped": dict(self.skipped),
            "queue_depth": self.pipeline.queue.qsize(),
            "events_written": self.pipeline.written,
        }


def configure_logging(spec: Spec) -> None:
    logger.remove()
    if spec.log_format == "json":
        logger.add(sys.stderr, level=spec.log_level, serialize=True)
    else:
        logger.add(sys.stderr, level=spec.log_level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}")


async def serve(spec: Spec, ready: Callable[[Runner], None] | None = None) -> int:
    runner = Runner(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.start()
        if ready:
            ready(runner)
        await stop.wait()
        logger.info("signal received: draining and stopping")
    finally:
        await runner.stop()
    return 0


def run(spec: Spec) -> int:
    configure_logging(spec)
    return asyncio.run(serve(spec))
