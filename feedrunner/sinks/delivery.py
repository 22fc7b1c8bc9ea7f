"""A bus sink fed through its own bounded buffer and task, spooling to disk whatever the bus has not taken.

The pipeline hands each batch to `write` and moves on: a slow or dead bus never stalls the feeds or the
other sinks. Order is kept by one rule: everything in the spool is older than everything in the buffer.
The task sends the spool first (replay, oldest first), then the buffer. When a send fails, the batch and
the whole buffer go to the spool, and while the bus is failing new events go straight there too, so a
crash during an outage loses only what the fsync policy allows. A buffer over its bound spills its
oldest events to the spool.

One episode, one pair of log lines: the failure that began it, and the recovery with what was spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
from loguru import logger

from feedrunner.events import Event, from_dict, to_dict
from feedrunner.metrics import Metrics
from feedrunner.sinks.bus import BusSink, DeliveryError
from feedrunner.spool import Spool

CLOSE_TIMEOUT = 3.0  # seconds a bus client may take to close


def _encode(events: Sequence[Event]) -> bytes:
    return orjson.dumps([to_dict(e) for e in events])


def _decode(payloads: list[bytes]) -> list[Event]:
    return [from_dict(d) for p in payloads for d in orjson.loads(p)]


class Delivery:
    def __init__(self, bus: BusSink, metrics: Metrics) -> None:
        assert bus.spec.delivery is not None
        self.bus = bus
        self.conf = bus.spec.delivery
        self.name = bus.name
        self.kinds = bus.kinds
        self.metrics = metrics
        self.spool = Spool(self.conf.spool, self.name)
        self._buffer: deque[list[Event]] = deque()
        self.buffered = 0
        self.inflight = 0  # events taken from the buffer and being sent
        self.offered = 0
        self.acked = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self.connected = False
        self.failing = False  # an episode: the bus cannot take events; new ones go to the spool
        self.permanent = False
        self.since: float | None = None
        self.last_error: str | None = None
        self.attempts = 0
        self.episode_spooled = 0
        self._marks: deque[tuple[int, int]] = deque()  # (pipeline mark, self.offered then)
        self._durable = 0
        self.dropped_at: float | None = None  # monotonic time of the last drop (alerts)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()  # cuts a backoff wait short at shutdown
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        m, n = metrics, self.name
        self._m_acked = m.sink_written.labels(n)
        self._m_spooled = m.sink_spooled.labels(n)
        self._m_replayed = m.sink_replayed.labels(n)
        self._m_failed = m.sink_events_failed.labels(n)
        self._m_latency = m.sink_delivery_latency.labels(n)
        self._m_up = m.sink_up.labels(n)

    # -- the pipeline's side ------------------------------------------------------------------------------

    def start(self) -> None:
        self.spool.open()
        if self.spool.torn:
            self._drop(self.spool.torn, "torn")
        self._gauges()
        self._m_up.set(0)  # until the bus is reached
        self._task = asyncio.create_task(self._run(), name=f"sink {self.name}")

    def write(self, events: list[Event]) -> int:
        """Take a batch (already filtered by kind); never blocks, never raises."""
        if not events:
            return 0
        self.offered += len(events)
        if self.failing or self._closing:
            self._to_spool(events)
        else:
            self._buffer.append(events)
            self.buffered += len(events)
            while self.buffered > self.conf.buffer:
                oldest = self._buffer.popleft()
                self.buffered -= len(oldest)
                self._to_spool(oldest)
            self._wake.set()
        return len(events)

    def note(self, mark: int) -> None:
        """The pipeline's count of settled events after the batch just written."""
        self._marks.append((mark, self.offered))

    def durable(self) -> int | None:
        """The pipeline mark up to which every event is acknowledged, spooled (and synced as the fsync
        policy asks) or counted dropped: what a trade checkpoint may rely on. None: everything noted."""
        safe = self.offered - self.buffered - self.inflight - self.spool.unsynced
        while self._marks and self._marks[0][1] <= safe:
            self._durable = self._marks.popleft()[0]
        return self._durable if self._marks else None

    def tick(self) -> None:
        """The pipeline's flush timer: fsync the spool per policy, refresh gauges."""
        try:
            self.spool.tick()
        except OSError as exc:
            self._spool_failed(exc, 0)
        self._gauges()

    # -- spooling ---------------------------------------------------------------------------------------

    def _to_spool(self, events: list[Event]) -> None:
        try:
            stored, lost = self.spool.append(_encode(events), len(events))
        except OSError as exc:
            self._spool_failed(exc, len(events))
            return
        if lost:
            self._drop(lost, "spool_full")
        if stored:
            self.spooled += len(events)
            self.episode_spooled += len(events)
            self._m_spooled.inc(len(events))

    def _spill(self) -> None:
        while self._buffer:
            batch = self._buffer.popleft()
            self.buffered -= len(batch)
            self._to_spool(batch)

    def _spool_failed(self, exc: OSError, events: int) -> None:
        self.metrics.sink_errors.labels(self.name, "spool").inc()
        logger.error("sink {}: spool {} failed: {}; {} events lost", self.name, self.spool.dir, exc.strerror, events)
        if events:
            self._drop(events, "spool_error")

    def _drop(self, events: int, reason: str) -> None:
        if not self.dropped or reason == "torn":
            logger.error(
                "sink {}: {} events dropped ({}, spool bound {} bytes, policy {}); every drop is counted in "
                "feedrunner_sink_events_dropped_total",
                self.name,
                events,
                reason,
                self.conf.spool.max_bytes,
                self.conf.spool.overflow,
            )
        self.dropped += events
        self.dropped_at = time.monotonic()
        self._m_failed.inc(events)
        self.metrics.sink_dropped.labels(self.name, reason).inc(events)

    # -- the task ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._closing and self.failing:
                return  # what is left stays in the spool
            if not self.connected:
                try:
                    await asyncio.wait_for(self.bus.open(), self.conf.timeout)
                except Exception as exc:
                    await self._failed("open", exc)
                    continue
                self.connected = True
            if self.spool:
                payloads, n, pos = self.spool.read(self.conf.batch)
                events = _decode(payloads)
                if not await self._send(events):
                    continue
                self.spool.ack(pos, n)
                self.replayed += n
                self._m_replayed.inc(n)
                if not self.spool:
                    self._drained()
                continue
            if self._buffer:
                events = self._take()
                self.inflight = len(events)
                await self._send(events, fresh=True)
                continue
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()

    def _take(self) -> list[Event]:
        batch: list[Event] = []
        while self._buffer and len(batch) + len(self._buffer[0]) <= self.conf.batch:
            part = self._buffer.popleft()
            self.buffered -= len(part)
            batch += part
        if not batch:  # one batch larger than the send size: split it
            part = self._buffer[0]
            batch, self._buffer[0] = part[: self.conf.batch], part[self.conf.batch :]
            self.buffered -= len(batch)
        return batch

    async def _send(self, events: list[Event], fresh: bool = False) -> bool:
        """Send one batch; `fresh` when it came from the buffer: on failure it goes to the spool first,
        since it is older than what is still buffered."""
        try:
            await asyncio.wait_for(self.bus.send(events), self.conf.timeout)
        except BaseException as exc:
            if fresh:
                self.inflight = 0
                self._to_spool(events)
            if isinstance(exc, asyncio.CancelledError):  # shutdown cut the send short
                raise
            await self._failed("send", exc, events=len(events) if fresh else 0)
            return False
        self.inflight = 0
        self.acked += len(events)
        self._m_acked.inc(len(events))
        self._m_latency.observe(max(0.0, time.time() - events[0].ts_received / 1e9))
        if self.failing or self.since is not None:
            self._recovered()
        return True

    async def _failed(self, op: str, exc: BaseException, events: int = 0) -> None:
        """An open or send failed: spool what is buffered, close the client, wait the backoff."""
        self.failing = True
        self.connected = False
        self.permanent = isinstance(exc, DeliveryError) and exc.permanent
        if isinstance(exc, TimeoutError):
            reason = f"no acknowledgement within {self.conf.timeout:g}s"
        else:
            reason = str(exc) or type(exc).__name__
        error = f"{op}: {reason}"
        self.metrics.sink_errors.labels(self.name, op).inc()
        self._spill()
        self._m_up.set(0)
        if self.since is None:
            self.since = time.time()
            self.episode_spooled = events
            logger.error(
                "sink {} cannot deliver ({}{}): spooling to {} and retrying",
                self.name,
                error,
                "; a permanent error: it needs an operator" if self.permanent else "",
                self.spool.dir,
            )
        elif error != self.last_error:
            logger.warning("sink {} still failing: {}", self.name, error)
        self.last_error = error
        self.attempts += 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.bus.close(), CLOSE_TIMEOUT)
        r = self.conf.retry
        delay = r.cap if self.permanent else min(r.cap, r.base * r.factor ** min(self.attempts - 1, 32))
        delay *= 1 + random.uniform(-r.jitter, r.jitter)
        self._gauges()
        if self._closing:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    def _recovered(self) -> None:
        if self.since is not None:
            logger.info(
                "sink {} delivering again after {:.1f}s and {} attempt(s): {} events were spooled, {} left to replay",
                self.name,
                time.time() - self.since,
                self.attempts,
                self.episode_spooled,
                self.spool.events,
            )
        self.failing = self.permanent = False
        self.since = None
        self.attempts = 0
        self._m_up.set(1)
        self._gauges()

    def _drained(self) -> None:
        logger.info("sink {}: spool drained, {} events replayed since start", self.name, self.replayed)

    def _gauges(self) -> None:
        m, n = self.metrics, self.name
        m.sink_spool_bytes.labels(n).set(self.spool.bytes)
        m.sink_spool_events.labels(n).set(self.spool.events)
        m.sink_buffer_events.labels(n).set(self.buffered)
        if not self.failing and self.connected:
            self._m_up.set(1)

    # -- shutdown ---------------------------------------------------------------------------------------

    async def close(self, deadline: float) -> None:
        """Deliver what is buffered within `deadline` seconds; what is left stays in the spool."""
        self._closing = True
        self._wake.set()
        self._stop.set()
        if self._task is not None:
            if not self.failing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._idle()), deadline)
            self._task.cancel()
            # asyncio.wait, not await: on Python 3.11 a wait_for whose inner call finished as the cancel
            # came swallows the cancel, and the loop above then ends at its next turn instead.
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT)
        self._spill()
        try:
            self.spool.close()
        except OSError as exc:
            self._spool_failed(exc, 0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.bus.close(), CLOSE_TIMEOUT)
        self._gauges()
        if self.spool.events:
            logger.warning(
                "sink {} closed with {} events in its spool {}: replayed at the next start",
                self.name,
                self.spool.events,
                self.spool.dir,
            )
        else:
            logger.info("sink {} closed: {} events acknowledged by the bus", self.name, self.acked)

    async def _idle(self) -> None:
        """Until the buffer is delivered (the spool may keep the rest)."""
        while self._buffer or self.inflight:
            await asyncio.sleep(0.02)
            if self.failing:
                return

    # -- reporting ----------------------------------------------------------------------------------------

    def problem(self) -> str | None:
        if not self.failing:
            return None
        since = time.time() - (self.since or time.time())
        kind = "permanent error" if self.permanent else "retrying"
        return (
            f"sink {self.name}: cannot deliver for {since:.0f}s ({kind}; last: {self.last_error}); "
            f"{self.spool.events} events spooled"
        )

    def status(self) -> dict[str, Any]:
        state = "ok" if self.connected and not self.failing else "failing" if self.permanent else "retrying"
        if not self.connected and not self.failing:
            state = "connecting"
        return {
            "state": state,
            "where": self.bus.where(),
            "since": self.since,
            "last_error": self.last_error,
            "attempts": self.attempts,
            "events_written": self.acked,
            "events_spooled": self.spooled,
            "events_replayed": self.replayed,
            "events_dropped": self.dropped,
            "buffer_events": self.buffered,
            "spool_events": self.spool.events,
            "spool_bytes": self.spool.bytes,
            "spool_path": str(self.spool.dir),
        }
