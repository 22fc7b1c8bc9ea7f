"""The Redis Streams sink against a real redis-server: what lands in which stream, in what order, capped
how; which failures are transient and which need an operator; and a crash of the server survived by
the same sink object without losing what Redis acknowledged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
from redis_server import RedisServer, read_stream

from feedrunner.events import Book, Event, Ticker, Trade, event_id, from_dict, to_dict
from feedrunner.sinks.bus import Permanent, Transient
from feedrunner.sinks.redis import CHUNK, RedisSink
from feedrunner.spec import Delivery, RedisSpec, Secret, SpoolSpec, check_text
from feedrunner.spec import Sink as SinkSpec

T0 = 1_700_000_000_000_000_000
STREAM = "md:{venue}:{kind}:{symbol}"
PASSWORD = "s3cret-Pa55"

MakeSink = Callable[..., RedisSink]


def trade(i: int, symbol: str = "BTC/USDT", venue: str = "binance") -> Trade:
    return Trade(venue, symbol, T0 + i, T0 + i + 5, "websocket", str(i), 100.0 + i, 0.5, "buy")


def ticker(i: int, symbol: str = "BTC/USDT") -> Ticker:
    return Ticker("binance", symbol, T0 + i, T0 + i + 5, "polling", 99.5, 100.5, 100.0, 1234.5)


def book(i: int, symbol: str = "BTC/USDT") -> Book:
    return Book("binance", symbol, T0 + i, T0 + i + 5, "websocket", [(99.5, 1.0), (99.0, 2.0)], [(100.5, 3.0)], i)


def ids(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[str]:
    return [fields[b"id"].decode() for _, fields in entries]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    s = RedisServer(password=PASSWORD)
    try:
        s.start()
        yield s
    finally:
        s.cleanup()


@pytest.fixture
async def make_sink(tmp_path: Path) -> AsyncIterator[MakeSink]:
    """Sinks built from their spec, every one closed at the end whatever the test did to its server."""
    made: list[RedisSink] = []

    def make(url: str, stream: str = STREAM, maxlen: int = 1_000_000, timeout: float = 10.0) -> RedisSink:
        spool = SpoolSpec(str(tmp_path / "spool" / str(len(made))))
        spec = SinkSpec(
            type="redis",
            name="redis",
            delivery=Delivery(spool, timeout=timeout),
            redis=RedisSpec(Secret(url), stream, maxlen),
        )
        made.append(RedisSink(spec))
        return made[-1]

    yield make
    for sink in made:
        await sink.close()


async def test_a_batch_lands_in_the_streams_its_template_names(secured: RedisServer, tmp_path: Path) -> None:
    """From feeds.yaml with the URL from the environment: each stream gets its own events, in batch
    order, each with its event id and its record as JSON; where() names the server but not the password."""
    text = (
        "version: 1\n"
        "venues:\n  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT, ETH/USDT]}\n"
        f'state: {{url: "sqlite:///{tmp_path}/state.db"}}\n'
        'sinks:\n  - {type: redis, url: "${REDIS_URL}", stream: "md:{venue}:{kind}:{symbol}", timeout: 5s}\n'
    )
    spec, problems = check_text(text, "feeds.yaml", {"REDIS_URL": secured.url})
    assert spec is not None, problems
    sink = RedisSink(spec.sinks[0])
    batch: list[Event] = []
    for i in range(30):
        symbol = ("BTC/USDT", "ETH/USDT")[i % 2]
        batch += [trade(i, symbol), ticker(i, symbol), book(i, symbol)]
    try:
        await sink.open()
        await sink.send(batch)
        assert PASSWORD not in sink.where() and f"127.0.0.1:{secured.port}/0" in sink.where()
    finally:
        await sink.close()

    client = secured.client()
    try:
        keys = {k.decode() for k in await client.keys("*")}
    finally:
        await client.aclose()
    expected: dict[str, list[Event]] = {}
    for e in batch:
        expected.setdefault(f"md:binance:{e.kind}:{e.symbol}", []).append(e)
    assert keys == set(expected) and len(keys) == 6
    for key, events in expected.items():
        entries = await read_stream(secured, key)
        assert ids(entries) == [event_id(e) for e in events]
        for (_, fields), e in zip(entries, events, strict=True):
            assert set(fields) == {b"id", b"data"}
            record = orjson.loads(fields[b"data"])
            assert record == orjson.loads(orjson.dumps(to_dict(e)))
            assert from_dict(record) == e


async def test_a_batch_larger_than_one_round_trip_keeps_its_order(server: RedisServer, make_sink: MakeSink) -> None:
    sink = make_sink(server.url)
    await sink.open()
    batch = [trade(i) for i in range(2 * CHUNK + 345)]
    await sink.send(batch)
    await sink.send([trade(i) for i in range(len(batch), len(batch) + 10)])
    assert ids(await read_stream(server, "md:binance:trade:BTC/USDT")) == [
        f"binance:BTC/USDT:trade:{i}" for i in range(len(batch) + 10)
    ]


async def test_maxlen_caps_each_stream_approximately(server: RedisServer, make_sink: MakeSink) -> None:
    """MAXLEN ~ trims whole nodes (100 entries by default): the length stays near the cap, never below it."""
    sink = make_sink(server.url, stream="md:{venue}:{kind}", maxlen=100)
    await sink.open()
    for start in range(0, 3000, 500):
        await sink.send([trade(i) for i in range(start, start + 500)])
    entries = await read_stream(server, "md:binance:trade")
    assert 100 <= len(entries) <= 300
    assert ids(entries)[-1] == "binance:BTC/USDT:trade:2999"  # the newest are the ones kept


async def test_a_key_of_another_type_is_permanent_and_stops_the_chunk_at_the_refused_entry(
    server: RedisServer, make_sink: MakeSink
) -> None:
    client = server.client()
    try:
        await client.set("md:binance:trade:ETH/USDT", "not a stream")
    finally:
        await client.aclose()
    sink = make_sink(server.url)
    await sink.open()
    batch = [trade(i, ("BTC/USDT", "ETH/USDT")[i % 2]) for i in range(20)]
    with pytest.raises(Permanent):
        await sink.send(batch)
    # The entry before the refused one went in, none after it did; the batch failed all the same.
    assert ids(await read_stream(server, "md:binance:trade:BTC/USDT")) == ["binance:BTC/USDT:trade:0"]


async def test_a_server_out_of_memory_is_transient_and_takes_the_batch_once_memory_frees(
    server: RedisServer, make_sink: MakeSink
) -> None:
    sink = make_sink(server.url)
    await sink.open()
    client = server.client()
    try:
        await client.config_set("maxmemory", 1)  # with the default noeviction: every write refused
        with pytest.raises(Transient):
            await sink.send([trade(0)])
        await client.config_set("maxmemory", 0)
    finally:
        await client.aclose()
    await sink.open()
    await sink.send([trade(0)])
    assert ids(await read_stream(server, "md:binance:trade:BTC/USDT")) == ["binance:BTC/USDT:trade:0"]


@pytest.mark.parametrize("password", ["wrong-password", None])
async def test_a_refused_password_is_permanent_and_never_shown(
    secured: RedisServer, make_sink: MakeSink, password: str | None
) -> None:
    auth = f":{password}@" if password else ""
    sink = make_sink(f"redis://{auth}127.0.0.1:{secured.port}/0")
    with pytest.raises(Permanent) as caught:
        await sink.open()
    assert password is None or password not in str(caught.value) + sink.where()
    with pytest.raises(Transient):  # not opened: nothing is sent
        await sink.send([trade(0)])


async def test_a_killed_server_is_transient_and_acknowledged_entries_survive_its_restart(
    server: RedisServer, make_sink: MakeSink
) -> None:
    sink = make_sink(server.url)
    await sink.open()
    before = [trade(i) for i in range(500)]
    await sink.send(before)
    server.kill()

    after = [trade(i) for i in range(500, 1000)]
    started = time.monotonic()
    with pytest.raises(Transient):
        await sink.send(after)
    assert time.monotonic() - started < 15
    started = time.monotonic()
    await sink.close()
    assert time.monotonic() - started < 3
    with pytest.raises(Transient):  # refused while it is down
        await sink.open()

    server.restart()
    await sink.open()
    await sink.send(after)
    assert ids(await read_stream(server, "md:binance:trade:BTC/USDT")) == [event_id(e) for e in before + after]


async def test_a_server_that_stops_answering_is_transient_within_the_timeout(
    server: RedisServer, make_sink: MakeSink
) -> None:
    """Frozen (SIGSTOP), it keeps the connection open and never replies: the reply wait is bounded."""
    sink = make_sink(server.url, timeout=1.0)
    await sink.open()
    await sink.send([trade(0)])
    server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(Transient):
            await sink.send([trade(1)])
        assert time.monotonic() - started < 5
        started = time.monotonic()
        await sink.close()
        assert time.monotonic() - started < 3
        with pytest.raises(Transient):  # the connection is accepted by the kernel, the PING never answered
            await sink.open()
        assert time.monotonic() - started < 8
    finally:
        server.thaw()


async def test_a_user_not_allowed_eval_is_permanent_and_named(server: RedisServer, make_sink: MakeSink) -> None:
    """The sink writes through EVAL: an ACL granting only XADD is an operator's matter, said as such."""
    client = server.client()
    try:
        await client.execute_command(
            "ACL", "SETUSER", "writer", "on", ">pw", "~*", "+ping", "+client|setname", "+xadd", "+xtrim"
        )
    finally:
        await client.aclose()
    sink = make_sink(f"redis://writer:pw@127.0.0.1:{server.port}/0")
    await sink.open()
    with pytest.raises(Permanent) as caught:
        await sink.send([trade(0)])
    assert "eval" in str(caught.value).lower()
    assert "pw@" not in str(caught.value)
    assert await read_stream(server, "md:binance:trade:BTC/USDT") == []
