"""The delivery loop's own logic, with a bus of our own making (the real buses: tests/test_bus_outage.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from helpers import wait_until

from feedrunner.events import Event, Trade, event_id
from feedrunner.metrics import Metrics
from feedrunner.sinks.bus import BusSink, Permanent, Transient
from feedrunner.sinks.delivery import Delivery
from feedrunner.spec import Delivery as DeliverySpec
from feedrunner.spec import Retry, Sink, SpoolSpec


class Bus(BusSink):
    """Takes batches while `up`; otherwise raises `error`; `hang` makes a send never return."""

    def __init__(self, spec: Sink) -> None:
        super().__init__(spec)
        self.up = True
        self.hang = False
        self.error: Exception = Transient("broker down")
        self.received: list[Event] = []
        self.opens = self.sends = 0

    async def open(self) -> None:
        self.opens += 1
        if not self.up:
            raise self.error

    async def send(self, events: Sequence[Event]) -> None:
        self.sends += 1
        if self.hang:
            await asyncio.sleep(3600)
        if not self.up:
            raise self.error
        self.received += events

    async def close(self) -> None:
        pass


def _spec(tmp: Path, **kw) -> Sink:
    spool = SpoolSpec(str(tmp / "spool"), **kw.pop("spool", {}))
    conf = DeliverySpec(spool, retry=Retry(base=0.02, cap=0.2, jitter=0), **kw)
    return Sink("kafka", name="bus", delivery=conf)


def _trades(start: int, n: int, symbol: str = "A/USDT") -> list[Event]:
    return [Trade("v", symbol, i, i, "websocket", str(i), 1.0, 1.0, "buy") for i in range(start, start + n)]


def _ids(events: list[Event]) -> list[str]:
    return [event_id(e) for e in events]


async def _delivery(tmp: Path, **kw) -> tuple[Delivery, Bus, Metrics]:
    metrics = Metrics()
    bus = Bus(_spec(tmp, **kw))
    d = Delivery(bus, metrics)
    d.start()
    return d, bus, metrics


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"sink": "bus", **labels}) or 0.0


async def test_an_outage_spools_then_replays_in_order_before_new_events(tmp_path: Path):
    d, bus, metrics = await _delivery(tmp_path, timeout=1.0)
    d.write(_trades(0, 100))
    await wait_until(lambda: len(bus.received) == 100, 5, "first batch")
    bus.up = False
    d.write(_trades(100, 100))  # this send fails: the batch goes to the spool
    await wait_until(lambda: d.failing, 5, "failing")
    for start in range(200, 1000, 100):
        d.write(_trades(start, 100))  # straight to the spool while failing
    assert d.spool.events == 900 and d.buffered == 0
    assert d.problem() is not None and d.status()["state"] == "retrying"
    assert _metric(metrics, "feedrunner_sink_up") == 0
    bus.up = True
    d.write(_trades(1000, 50))
    await wait_until(lambda: len(bus.received) == 1050, 10, "replay")
    assert _ids(bus.received) == _ids(_trades(0, 1050))  # once each, in order: the spool first
    assert d.spool.events == 0 and not d.failing and d.problem() is None
    assert _metric(metrics, "feedrunner_sink_events_replayed_total") == 950  # the last write came while failing
    assert _metric(metrics, "feedrunner_sink_events_written_total") == 1050
    assert _metric(metrics, "feedrunner_sink_up") == 1
    await d.close(1.0)


async def test_a_permanent_error_is_retried_slowly_not_in_a_hot_loop(tmp_path: Path):
    d, bus, _ = await _delivery(tmp_path)
    bus.up = False
    bus.error = Permanent("topic md.v.trade does not exist")
    d.write(_trades(0, 10))
    await asyncio.sleep(1.0)
    assert d.permanent and d.status()["state"] == "failing"
    assert bus.opens + bus.sends <= 8  # the cap (0.2 s) paces permanent errors
    assert "does not exist" in (d.problem() or "")
    await d.close(0.5)
    assert d.spool.events == 10  # closed while failing: what was spooled stays on disk


async def test_what_is_spooled_at_shutdown_arrives_after_a_restart(tmp_path: Path):
    d, bus, _ = await _delivery(tmp_path)
    bus.up = False
    d.write(_trades(0, 300))
    await wait_until(lambda: d.failing, 5, "failing")
    d.write(_trades(300, 200))
    await d.close(0.5)
    assert d.spool.events == 500
    again, bus2, _ = await _delivery(tmp_path)
    again.write(_trades(500, 10))
    await wait_until(lambda: len(bus2.received) == 510, 10, "replay after restart")
    assert _ids(bus2.received) == _ids(_trades(0, 510))
    await again.close(1.0)


async def test_a_send_that_never_returns_times_out_into_the_spool(tmp_path: Path):
    d, bus, _ = await _delivery(tmp_path, timeout=0.3)
    bus.hang = True
    d.write(_trades(0, 20))
    await wait_until(lambda: d.failing, 5, "timed out")
    assert d.spool.events == 20 and "0.3s" in (d.last_error or "")
    bus.hang = False
    await wait_until(lambda: len(bus.received) == 20, 5, "replayed")
    await d.close(1.0)


async def test_a_full_buffer_spills_its_oldest_to_the_spool_and_order_holds(tmp_path: Path):
    d, bus, _ = await _delivery(tmp_path, buffer=200, batch=50)
    bus.hang = True  # the bus is slow: the first send holds
    for start in range(0, 1000, 50):
        d.write(_trades(start, 50))
    assert d.buffered <= 200 and d.spool.events >= 700
    bus.hang = False
    await wait_until(lambda: len(bus.received) >= 1000 - 50, 15, "all delivered")
    await d.close(1.0)
    ids = _ids(bus.received)
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=lambda i: int(i.rsplit(":", 1)[1]))


async def test_the_durable_mark_waits_for_the_bus_or_the_spool(tmp_path: Path):
    d, bus, _ = await _delivery(tmp_path, spool={"fsync": "always"})
    bus.hang = True
    d.write(_trades(0, 10))
    d.note(10)
    assert d.durable() == 0  # buffered or in flight: not safe yet
    bus.hang = False
    bus.up = False
    await wait_until(lambda: d.spool.events == 10, 5, "spooled")
    assert d.durable() is None  # every noted batch is safe (on disk)


async def test_a_full_spool_drops_by_policy_and_counts_it(tmp_path: Path):
    d, bus, metrics = await _delivery(tmp_path, spool={"max_bytes": 8192, "segment_bytes": 4096})
    bus.up = False
    d.write(_trades(0, 1))
    await wait_until(lambda: d.failing, 5, "failing")
    for start in range(1, 2001, 100):
        d.write(_trades(start, 100))
    assert d.dropped > 0 and d.spool.bytes <= 8192
    assert _metric(metrics, "feedrunner_sink_events_dropped_total", reason="spool_full") == d.dropped
    bus.up = True
    await wait_until(lambda: d.spool.events == 0, 10, "drained")
    assert len(bus.received) + d.dropped == 2001
    await d.close(1.0)
