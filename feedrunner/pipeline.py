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
from feedrunner.sinks.delivery import Delivery
from feedrunner.spec import Spec

BATCH = 2048


class Pipeline:
    """The bounded queue between adapters and sinks, with the overflow policy from the spec.

    Adapters put whole batches (one watch result, say): a queue entry per event cost more than the
    sink itself at high rates. The bound (`queue.size`) still counts events. Sinks report their own
    I/O faults per file (sinks/base.py SinkState); an exception escaping a sink is caught here, so one
    sink failing never stops the feeds or the other sinks. Bus sinks are Deliveries: `write` only hands
    them the batch, and each delivers from its own buffer, task and spool (sinks/delivery.py).
    """

    def __init__(
        self, spec: Spec, sinks: list[Sink | Delivery], metrics: Metrics, health: Health | None = None
    ) -> None:
        self.health = health
        self.capacity = spec.queue.size
        self.block = spec.queue.overflow == "block"
        self.sinks = [s for s in sinks if isinstance(s, Sink)]
        self.deliveries = [d for d in sinks if isinstance(d, Delivery)]
        self.metrics = metrics
        self.written = 0
        self.depth = 0  # events queued
        # Durability marks, in events: accepted by put; settled (written, failed or dropped); settled
        # before the last flush completed. Everything accepted by `accepted == n` is on disk (or counted
        # lost) once `durable >= n`, which is what a trade checkpoint waits for.
        self.accepted = 0
        self.dropped = 0  # events the overflow policy dropped
        self.durable = 0
        self._flushed = asyncio.Event()
        self._batches: deque[list[Event]] = deque()
        self._written: dict[str, Any] = {}  # sink name -> its labelled counter
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_every = min((s.spec.flush_interval for s in self.sinks), default=1.0) or 0.05
        for sink in self.sinks:
            sink.state.bind(metrics)

    @property
    def settled(self) -> int:
        """Events written (or failed) by the sinks, or dropped by the overflow policy."""
        return self.written + self.dropped

    def put_now(self, events: list[Event]) -> bool:
        """Write a batch now if nothing is queued (so nothing is being written either: `_write` never
        awaits), in order; False, and nothing done, if batches are queued (then `put` it)."""
        if self._batches or self._task is None:
            return False
        self.accepted += len(events)
        self._write(events)
        return True

    async def put(self, events: list[Event]) -> None:
        """Queue a batch (the pipeline owns the list from here on). With nothing queued it is written at
        once, instead of two loop iterations later in the consumer; under load batches queue up and the
        consumer takes them together."""
        if not events or self.put_now(events):
            return
        self.accepted += len(events)
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
        self.dropped += n

    def _take(self, limit: int) -> list[Event]:
        batch: list[Event] = []
        while self._batches and len(batch) < limit:
            batch += self._batches.popleft()
        self.depth -= len(batch)
        self._space.set()
        return batch

    def start(self) -> None:
        for d in self.deliveries:
            d.start()
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
        # The sinks first: the health and metrics bookkeeping after them adds nothing to how late they are.
        for sink in self.sinks:
            events = batch if len(sink.kinds) == 3 else [e for e in batch if e.kind in sink.kinds]
            state = sink.state
            try:
                written = sink.write(events)
            except Exception as exc:  # a sink's bug, not its I/O (handled per file inside): the batch is lost
                state.fail("batches", "write", len(events), exc)
                continue
            if state.failing:
                state.ok("batches")
            counter = self._written.get(sink.name)
            if counter is None:
                counter = self._written[sink.name] = self.metrics.sink_written.labels(sink.name)
            counter.inc(written)
            state.events_written += written
        for d in self.deliveries:
            d.write(batch if len(d.kinds) == 3 else [e for e in batch if e.kind in d.kinds])
        self.written += len(batch)
        for d in self.deliveries:
            d.note(self.settled)
        self.metrics.queue_depth.set(self.depth)
        if self.health is not None:
            self.health.observe_written(batch[-1], time.time_ns())
            self.health.observe_many(batch)

    async def flushed(self, mark: int) -> None:
        """Return once every event accepted up to `mark` (a past `accepted`) is written and flushed."""
        while self.durable < mark:
            self._flushed.clear()
            await self._flushed.wait()

    def _flush(self) -> None:
        mark = self.settled
        self._flush_sinks()
        for d in self.deliveries:
            d.tick()
            held = d.durable()
            if held is not None:
                mark = min(mark, held)
        self.durable = max(self.durable, mark)
        self._flushed.set()

    def _flush_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as exc:
                sink.state.fail("buffers", "flush", 0, exc)
            else:
                if sink.state.failing:
                    sink.state.ok("buffers")

    def reopen(self) -> None:
        """Every sink lets go of its files; each path is opened afresh by its next write (SIGHUP)."""
        for sink in self.sinks:
            try:
                sink.reopen()
            except Exception as exc:
                sink.state.fail("files", "reopen", 0, exc)
        logger.info("sinks reopened: {}", ", ".join(s.name for s in self.sinks) or "none")

    def sink_problems(self) -> list[str]:
        """Why /readyz fails on account of the sinks: one line per failing sink."""
        return self.losing() + [p for d in self.deliveries if (p := d.problem())]

    def losing(self) -> list[str]:
        """The sinks losing events now (file sinks failing); a bus that spools keeps them."""
        return [p for s in self.sinks if (p := s.state.problem())]

    def sink_status(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.state.status() for s in self.sinks} | {d.name: d.status() for d in self.deliveries}

    async def drain_and_close(self, deadline: float = 5.0) -> None:
        """Write the queue out, close the file sinks, and give the buses `deadline` seconds to deliver
        what they buffer (the rest stays in their spools)."""
        for task in (self._task, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._flusher = None  # a late put queues, as it did before start
        rest = self._take(self.depth)
        if rest:
            self._write(rest)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                sink.state.fail("the sink", "close", 0, exc)
            if sink.state.since is not None:
                logger.error("{}; closed while failing", sink.state.problem())
        await asyncio.gather(*(d.close(deadline) for d in self.deliveries))
        self.durable = self.settled
        self._flushed.set()
