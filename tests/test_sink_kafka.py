"""The Kafka sink against a real broker (Tansu): what it writes, where, and how it fails.

Every test names its own topics, so they share one broker; the tests that kill the broker start their own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kafka_server
import orjson
import pytest
import servers
from kafka_server import KafkaServer, Record, consume

from feedrunner.events import Book, Event, Ticker, Trade, event_id, from_dict, to_dict
from feedrunner.sinks.bus import Permanent, Transient
from feedrunner.sinks.kafka import KafkaSink
from feedrunner.spec import load_spec

BASE = """\
version: 1
environment: simulator
venues:
  stocks: {adapter: ib, host: 127.0.0.1, port: 7497, channels: [trades], transport: websocket, symbols: [AAPL]}
state: {url: "sqlite:///state.db"}
"""
SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "ADA/USDT", "DOGE/USDT"]

MakeSink = Callable[..., KafkaSink]


@pytest.fixture(scope="module")
def kafka() -> Iterator[KafkaServer]:
    yield from kafka_server.running()


@pytest.fixture
def own_kafka() -> Iterator[KafkaServer]:
    """A broker of the test's own, for tests that kill it."""
    yield from kafka_server.running()


@pytest.fixture
def auth_kafka() -> Iterator[KafkaServer]:
    """A broker that requires SASL and knows no user: every client is refused."""
    yield from kafka_server.running(authentication=True)


@pytest.fixture
async def make_sink(tmp_path: Path) -> AsyncIterator[MakeSink]:
    """KafkaSinks from a feeds.yaml with one kafka sink of the given settings; closed when the test ends."""
    made: list[KafkaSink] = []

    def make(**settings: Any) -> KafkaSink:
        feeds = tmp_path / f"feeds{len(made)}.yaml"
        feeds.write_text(BASE + "sinks: " + json.dumps([{"type": "kafka", **settings}]) + "\n")
        sink = KafkaSink(load_spec(feeds, env={}).sinks[0])
        made.append(sink)
        return sink

    try:
        yield make
    finally:
        for sink in made:
            await sink.close()


def events(per_symbol: int, venue: str = "binance", symbols: list[str] = SYMBOLS, start: int = 0) -> list[Event]:
    """Trades, tickers and books interleaved across symbols, each symbol's in a known order (its `i`)."""
    base = time.time_ns()
    out: list[Event] = []
    for i in range(start, start + per_symbol):
        for s in symbols:
            ts = base + i
            if i % 3 == 0:
                out.append(Trade(venue, s, ts, ts, "websocket", f"{i}", 100.0 + i, 0.25, "buy"))
            elif i % 3 == 1:
                out.append(Ticker(venue, s, ts, ts, "websocket", 99.5, 100.5, 100.0 + i, 1e6))
            else:
                out.append(Book(venue, s, ts, ts, "websocket", [(99.0, 1.0), (98.5, 2.0)], [(101.0, 1.5)], i))
    return out


def decoded(r: Record) -> Event:
    return from_dict(orjson.loads(r.value))


async def read(kafka: KafkaServer, topic: str) -> list[Record]:
    """Everything the topic holds: what the sink was acknowledged for, and nothing else."""
    return await asyncio.to_thread(consume, kafka.bootstrap, topic)


async def test_batches_arrive_keyed_identified_and_in_order_per_symbol(kafka: KafkaServer, make_sink: MakeSink):
    kafka.create_topic("rt", partitions=3)
    sink = make_sink(brokers=[kafka.bootstrap], topic="rt")
    await sink.open()
    sent = events(100)
    for i in range(0, len(sent), 150):  # several sends: order must also hold across batches
        await sink.send(sent[i : i + 150])

    got = await read(kafka, "rt")
    assert len(got) == len(sent)
    by_id = {event_id(e): e for e in sent}
    assert len(by_id) == len(sent)
    per_key: dict[bytes, list[Record]] = defaultdict(list)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        e = by_id[r.headers["event-id"].decode()]
        assert orjson.loads(r.value) == orjson.loads(orjson.dumps(to_dict(e)))
        assert decoded(r) == e
        assert r.key == f"{e.venue}:{e.symbol}".encode()
        per_key[r.key].append(r)
    assert len(per_key) == len(SYMBOLS)
    for key, records in per_key.items():
        assert len({r.partition for r in records}) == 1, f"{key!r} spread over partitions"
        symbol = key.decode().split(":", 1)[1]
        assert [decoded(r) for r in records] == [e for e in sent if e.symbol == symbol]
    assert len({rs[0].partition for rs in per_key.values()}) > 1, "every symbol on one partition proves little"


async def test_topic_template_routes_by_venue_and_kind(kafka: KafkaServer, make_sink: MakeSink):
    for venue in ("tplx", "tply"):
        for kind in ("trade", "ticker", "book"):
            kafka.create_topic(f"md.{venue}.{kind}", partitions=2)
    sink = make_sink(brokers=[kafka.bootstrap], topic="md.{venue}.{kind}")
    await sink.open()
    sent = events(9, venue="tplx") + events(6, venue="tply")
    await sink.send(sent)
    for venue in ("tplx", "tply"):
        for kind in ("trade", "ticker", "book"):
            expected = [e for e in sent if e.venue == venue and e.kind == kind]
            got = await read(kafka, f"md.{venue}.{kind}")
            assert sorted(event_id(decoded(r)) for r in got) == sorted(event_id(e) for e in expected)


async def test_symbol_in_topic_is_made_a_legal_topic_name(kafka: KafkaServer, make_sink: MakeSink):
    kafka.create_topic("bysym.BTC_USDT")
    sink = make_sink(brokers=[kafka.bootstrap], topic="bysym.{symbol}", kinds=["trade"])
    await sink.open()
    sent = [e for e in events(6, symbols=["BTC/USDT"]) if e.kind == "trade"]
    await sink.send(sent)
    got = await read(kafka, "bysym.BTC_USDT")
    assert [decoded(r) for r in got] == sent


async def test_missing_topic_is_permanent_and_not_created(kafka: KafkaServer, make_sink: MakeSink):
    kafka.create_topic("md.present.trade")
    sink = make_sink(brokers=[kafka.bootstrap], topic="md.{venue}.{kind}", timeout="5s")
    await sink.open()  # the template names no topic by itself: nothing to check yet
    begin = time.monotonic()
    with pytest.raises(Permanent, match=r"md\.absent\.trade"):
        await sink.send([e for e in events(3, venue="absent") if e.kind == "trade"])
    assert time.monotonic() - begin < 3.0, "a missing topic must not wait for the delivery timeout"
    assert kafka.admin is not None
    assert "md.absent.trade" not in kafka.admin.list_topics(timeout=5).topics

    await sink.open()
    present = [e for e in events(3, venue="present") if e.kind == "trade"]
    await sink.send(present)
    assert len(await read(kafka, "md.present.trade")) == len(present)


async def test_missing_fixed_topic_is_permanent_at_open(kafka: KafkaServer, make_sink: MakeSink):
    sink = make_sink(brokers=[kafka.bootstrap], topic="never-created")
    with pytest.raises(Permanent, match="never-created"):
        await sink.open()


async def test_oversize_message_refuses_the_batch_before_sending_any(kafka: KafkaServer, make_sink: MakeSink):
    kafka.create_topic("big")
    sink = make_sink(brokers=[kafka.bootstrap], topic="big", message_max_bytes="2KB")
    await sink.open()
    small = events(2)
    now = time.time_ns()
    huge = Book("binance", "BTC/USDT", now, now, "websocket", [(100.0 - i / 100, 1.0) for i in range(200)], [], 1)
    with pytest.raises(Permanent):
        await sink.send([*small, huge])
    assert await read(kafka, "big") == []

    await sink.send(small)  # the sink itself is fine: only that batch was refused
    assert [decoded(r) for r in await read(kafka, "big")] == small


async def test_unreachable_brokers_fail_open_transiently_within_the_timeout(make_sink: MakeSink):
    sink = make_sink(brokers=[f"127.0.0.1:{servers.free_port()}"], timeout="2s")
    begin = time.monotonic()
    with pytest.raises(Transient):
        await asyncio.wait_for(sink.open(), 2.0)
    assert time.monotonic() - begin < 2.0


async def test_dead_broker_is_transient_and_the_sink_recovers_after_restart(
    own_kafka: KafkaServer, make_sink: MakeSink
):
    own_kafka.create_topic("life", partitions=3)
    sink = make_sink(brokers=[own_kafka.bootstrap], topic="life", timeout="2s")
    await sink.open()
    await sink.send(events(2))

    own_kafka.kill()
    begin = time.monotonic()
    with pytest.raises(Transient):
        await asyncio.wait_for(sink.send(events(2, start=2)), 2.0)  # as the delivery loop bounds it
    assert time.monotonic() - begin < 2.0, "the sink's own deadline comes before the caller's"
    begin = time.monotonic()
    await asyncio.wait_for(sink.close(), 3.0)
    assert time.monotonic() - begin < 2.0

    own_kafka.restart()  # memory storage: only the topic comes back, empty
    await sink.open()
    after = events(3, start=4)
    await sink.send(after)
    got = await read(own_kafka, "life")
    assert sorted(event_id(decoded(r)) for r in got) == sorted(event_id(e) for e in after)


async def test_a_cancelled_send_does_not_confuse_the_next_one(own_kafka: KafkaServer, make_sink: MakeSink):
    own_kafka.create_topic("cut", partitions=3)
    sink = make_sink(brokers=[own_kafka.bootstrap], topic="cut", timeout="2s")
    await sink.open()
    own_kafka.kill()
    with pytest.raises(TimeoutError):  # cancelled by the caller while its messages wait for a broker
        await asyncio.wait_for(sink.send(events(5)), 0.3)
    own_kafka.restart()

    await sink.open()  # no close() in between: open() alone makes the sink usable again
    after = events(4, start=5)
    await asyncio.wait_for(sink.send(after), 5.0)
    got = await read(own_kafka, "cut")
    assert sorted(event_id(decoded(r)) for r in got) == sorted(event_id(e) for e in after)


async def test_late_reports_of_a_cancelled_send_do_not_count_for_the_next(kafka: KafkaServer, make_sink: MakeSink):
    kafka.create_topic("late", partitions=3)
    sink = make_sink(brokers=[kafka.bootstrap], topic="late", linger="200ms")
    await sink.open()
    first = asyncio.ensure_future(sink.send(events(50)))
    await asyncio.sleep(0.02)  # produced, lingering in the client: cancelled and purged, reports still due
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    second = events(20, start=50)
    await sink.send(second)  # the same producer: the first batch's failed reports reach only the first
    held = {event_id(decoded(r)) for r in await read(kafka, "late")}
    assert {event_id(e) for e in second} <= held, "send returned before its own batch was acknowledged"


async def test_close_returns_promptly_with_the_broker_dead(own_kafka: KafkaServer, make_sink: MakeSink):
    own_kafka.create_topic("gone")
    sink = make_sink(brokers=[own_kafka.bootstrap], topic="gone", timeout="10s")
    await sink.open()
    own_kafka.kill()
    pending = asyncio.ensure_future(sink.send(events(3)))  # left waiting for its acknowledgements
    await asyncio.sleep(0.2)
    begin = time.monotonic()
    await asyncio.wait_for(sink.close(), 3.0)
    assert time.monotonic() - begin < 1.0
    with pytest.raises(Transient):  # the waiting send ends too, without waiting out its timeout
        await asyncio.wait_for(pending, 1.0)


async def test_refused_credentials_are_permanent_and_never_shown(auth_kafka: KafkaServer, make_sink: MakeSink):
    sink = make_sink(
        brokers=[auth_kafka.bootstrap],
        topic="md.{venue}.{kind}",
        security_protocol="sasl_plaintext",
        sasl_mechanism="SCRAM-SHA-256",
        username="feeder",
        password="s3cr3t-pw",
        timeout="2s",
    )
    assert sink.where() == f"kafka brokers {auth_kafka.bootstrap} topic md.{{venue}}.{{kind}}"
    with pytest.raises(Permanent) as refused:
        await asyncio.wait_for(sink.open(), 2.0)
    assert "s3cr3t-pw" not in str(refused.value)
