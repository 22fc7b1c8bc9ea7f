"""The bounded queue between adapters and sinks, with the overflow policy from the spec."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

from loguru import logger

from feedrunner.events import Event
from feedrunner.health import Health
from feedrunner.metrics import Metrics
from feedrunner.sinks.base import Sink
from feedrunner.spec import Spec

BATCH = 2048


class Pipeline:
    """The bounded queue between adapters and sinks, with the overflow policy from the spec.

    Adapters put whole batches (one watch result, say): a queue entry per event cost more than the
    sink itself at high rates. The bound (`queue.size`) still counts events.
    """

    def __init__(self, spec: Spec, sinks: list[Sink], metrics: Metrics, health: Health | None = None) -> None:
        self.health = health
        self.capacity = spec.queue.size
        self.block = spec.queue.overflow == "block"
        self.sinks = sinks
        self.metrics = metrics
        self.written = 0
        self.depth = 0  # events queued
        self._batches: deque[list[Event]] = deque()
        self._written: dict[str, Any] = {}  # sink name -> its labelled counter
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_every = min((s.spec.flush_interval for s in sinks), default=1.0) or 0.05

    async def put(self, events: list[Event]) -> None:
        """Queue a batch (the pipeline owns the list from here on)."""
        if not events:
            return
        if self.block:
            while self.depth and self.depth + len(events) > self.capacity:
                self._space.clear()
                await self._space.wait()
        else:
            if len(events) > self.capacity:
                self._drop(len(events) - self.capacity)
                events = events[-self.capacity :]
            excess = self.depth + len(events) - self.capacity
            while excess > 0:
                oldest = self._batches[0]
                if len(oldest) <= excess:
                    self._batches.popleft()
                    n = len(oldest)
                else:
                    del oldest[:excess]
                    n = excess
                self.depth -= n
                excess -= n
                self._drop(n)
        self._batches.append(events)
        self.depth += len(events)
        self._ready.set()

    def _drop(self, n: int) -> None:
        self.metrics.dropped.labels("queue_full").inc(n)

    def _take(self, limit: int) -> list[Event]:
        batch: list[Event] = []
        while self._batches and len(batch) < limit:
            batch += self._batches.popleft()
        self.depth -= len(batch)
        self._space.set()
        return batch

    def start(self) -> None:
        self._task = asyncio.create_task(self._consume(), name="pipeline")
        self._flusher = asyncio.create_task(self._flush_periodically(), name="pipeline-flush")

    async def _consume(self) -> None:
        """Wake on the first batch, yield once so other producers can add theirs, then take it all.

        The single yield costs one loop iteration of latency and turns a trickle into batches.
        """
        while True:
            if not self._batches:
                self._ready.clear()
                await self._ready.wait()
            if self.depth < BATCH:
                await asyncio.sleep(0)
            self._write(self._take(BATCH))

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every)
            self._flush()

    def _write(self, batch: list[Event]) -> None:
        self.metrics.queue_depth.set(self.depth)
        if self.health is not None:
            self.health.observe_many(batch)
        for sink in self.sinks:
            events = batch if len(sink.kinds) == 3 else [e for e in batch if e.kind in sink.kinds]
            try:
                written = sink.write(events)
                counter = self._written.get(sink.name)
                if counter is None:
                    counter = self._written[sink.name] = self.metrics.sink_written.labels(sink.name)
                counter.inc(written)
            except Exception as exc:  # a failing sink is counted and logged, never fatal to the feeds
                self.metrics.sink_errors.labels(sink.name).inc()
                logger.error("sink {} failed to write {} events: {}", sink.name, len(events), exc)
        self.written += len(batch)
        if self.health is not None:
            self.health.observe_written(batch[-1], time.time_ns())

    def _flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                self.metrics.sink_errors.labels(sink.name).inc()
                logger.error("sink {} failed to flush: {}", sink.name, exc)

    async def drain_and_close(self) -> None:
        for task in (self._task, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        rest = self._take(self.depth)
        if rest:
            self._write(rest)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()
