"""The NATS JetStream sink against a real nats-server: subjects, payloads, de-duplication, stream checks,
authentication, and a server killed and restarted under a sink that keeps its object."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import nats
import orjson
import pytest
import servers
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from nats_server import NatsServer, Stored, read_stream

from feedrunner.events import Book, Event, Ticker, Trade, event_id, from_dict
from feedrunner.sinks.bus import Permanent, Transient
from feedrunner.sinks.nats import NatsSink, covers, safe_token, stream_filter
from feedrunner.spec import Delivery, NatsSpec, Secret, Sink, SpoolSpec, load_spec

SYMBOLS = ("BTC/USDT", "BRK.B", "ETH/USDT:USDT", "odd *>sym")
SAFE = {"BTC/USDT": "BTC-USDT", "BRK.B": "BRK_B", "ETH/USDT:USDT": "ETH-USDT:USDT", "odd *>sym": "odd___sym"}
T0 = 1_700_000_000_000_000_000

FEEDS = """\
version: 1
environment: simulator
venues:
  ib: {{adapter: ib, symbols: [AAPL], channels: [trades]}}
sinks:
  - type: nats
    servers: ["{url}"]
    subject: "{prefix}.{{venue}}.{{kind}}.{{symbol}}"
    stream: {stream}
    duplicate_window: 30s
    max_pending: 50
    timeout: 3s
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state.db"}}
"""


def trades(n: int, symbols: Sequence[str] = SYMBOLS, start: int = 0) -> list[Event]:
    return [
        Trade("binance", symbols[i % len(symbols)], T0 + i, T0 + i + 7, "websocket", str(i), 100.0 + i, 0.25, "buy")
        for i in range(start, start + n)
    ]


def mixed() -> list[Event]:
    """Every kind, including a ticker and a book without venue timestamps or sequence."""
    out: list[Event] = []
    for i, s in enumerate(SYMBOLS):
        out.append(Trade("binance", s, T0 + i, T0 + i, "websocket", f"t{i}", 10.0 + i, 1.5, "sell"))
        out.append(Ticker("binance", s, None, T0 + i, "polling", 9.5, 10.5, 10.0, 123.0))
        out.append(Book("binance", s, T0 + i, T0 + i, "websocket", [(9.9, 1.0), (9.8, 2.0)], [(10.1, 3.0)], 77 + i))
        out.append(Book("binance", s, T0 + i, T0 + i + 1, "hybrid", [(9.7, 1.0)], [], None))
    return out


def nats_sink(
    url: str,
    prefix: str,
    stream: str,
    tmp_path: Path,
    timeout: float = 5.0,
    **settings: object,
) -> NatsSink:
    spec = NatsSpec((Secret(url),), subject=f"{prefix}.{{venue}}.{{kind}}.{{symbol}}", stream=stream, **settings)  # type: ignore[arg-type]
    delivery = Delivery(SpoolSpec(str(tmp_path / "spool")), timeout=timeout)
    return NatsSink(Sink("nats", name=f"nats-{stream}", delivery=delivery, nats=spec))


@pytest.fixture(scope="module")
def shared() -> Iterator[NatsServer]:
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def own() -> Iterator[NatsServer]:
    """A server this test alone may kill."""
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def admin(shared: NatsServer) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(shared.url, allow_reconnect=False, connect_timeout=2)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def opened(sink: NatsSink) -> NatsSink:
    await asyncio.wait_for(sink.open(), 10)
    return sink


def per_subject(stored: Sequence[Stored]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = defaultdict(list)
    for m in stored:
        ids[m.subject].append(m.headers["Nats-Msg-Id"])
    return dict(ids)


def expected_per_subject(prefix: str, events: Sequence[Event]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = defaultdict(list)
    for e in events:
        ids[f"{prefix}.{e.venue}.{e.kind}.{SAFE[e.symbol]}"].append(event_id(e))
    return dict(ids)


# ---------------------------------------------------------------------------------------------------
# Subjects


@pytest.mark.parametrize(
    ("symbol", "token"),
    [
        ("BTC/USDT", "BTC-USDT"),
        ("BRK.B", "BRK_B"),
        ("A B", "A_B"),
        ("x*", "x_"),
        ("y>", "y_"),
        ("tab\tcr\r", "tab_cr_"),
        ("", "_"),
        ("ETH/USDT:USDT", "ETH-USDT:USDT"),
    ],
)
def test_symbols_become_one_subject_token(symbol: str, token: str) -> None:
    assert safe_token(symbol) == token


@pytest.mark.parametrize(
    ("pattern", "subject", "covered"),
    [
        ("md.*.*.*", "md.*.*.*", True),
        ("md.>", "md.*.*.*", True),
        (">", "md.*.*.*", True),
        ("md.*.>", "md.*.*.*", True),
        ("md.*.*", "md.*.*.*", False),
        ("md.*.*.*.*", "md.*.*.*", False),
        ("md.binance.*.*", "md.*.*.*", False),
        ("other.>", "md.*.*.*", False),
        ("md.*.*.>", "md.*.*", False),
    ],
)
def test_stream_subjects_must_cover_the_template(pattern: str, subject: str, covered: bool) -> None:
    assert covers(pattern, subject) is covered


def test_template_to_stream_subjects() -> None:
    assert stream_filter("md.{venue}.{kind}.{symbol}") == "md.*.*.*"
    assert stream_filter("feed.{venue}-{kind}.x.{symbol}") == "feed.*.x.*"


# ---------------------------------------------------------------------------------------------------
# Publishing against a live server


async def test_batch_round_trip_through_a_spec_file(
    shared: NatsServer, admin: nats.js.JetStreamContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(FEEDS.format(url=shared.url, prefix="rt", stream="RT"))
    spec = load_spec(feeds, env={})
    sink = await opened(NatsSink(spec.sinks[0]))
    try:
        info = await admin.stream_info("RT")
        assert info.config.subjects == ["rt.*.*.*"]
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == 30
        events = mixed() + trades(200)  # 200 over a window of 50: acknowledgements overlap publishing
        await sink.send(events)
    finally:
        await sink.close()
    stored = await read_stream(shared.url, "RT")
    assert len(stored) == len(events)
    assert per_subject(stored) == expected_per_subject("rt", events)  # subjects, and order per symbol
    by_id = {event_id(e): e for e in events}
    for m in stored:
        assert from_dict(orjson.loads(m.data)) == by_id[m.headers["Nats-Msg-Id"]]


async def test_the_same_batch_twice_is_stored_once(shared: NatsServer, tmp_path: Path) -> None:
    sink = await opened(nats_sink(shared.url, "dd", "DD", tmp_path, max_pending=100))
    events = trades(600)
    try:
        await sink.send(events)
        await sink.send(events[:300])  # a replay of a partly delivered batch, then the whole batch
        await sink.send(events)
    finally:
        await sink.close()
    stored = await read_stream(shared.url, "DD")
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [event_id(e) for e in events]


async def test_a_matching_stream_is_used_as_it_is(
    shared: NatsServer, admin: nats.js.JetStreamContext, tmp_path: Path
) -> None:
    await admin.add_stream(StreamConfig(name="WIDE", subjects=["wide.>"], storage=StorageType.MEMORY))
    sink = await opened(nats_sink(shared.url, "wide", "WIDE", tmp_path))
    try:
        await sink.send(trades(10))
    finally:
        await sink.close()
    info = await admin.stream_info("WIDE")
    assert info.config.subjects == ["wide.>"]
    assert info.config.storage == StorageType.MEMORY
    assert info.state.messages == 10


async def test_a_stream_capturing_other_subjects_is_refused(
    shared: NatsServer, admin: nats.js.JetStreamContext, tmp_path: Path
) -> None:
    await admin.add_stream(StreamConfig(name="NARROW", subjects=["narrow.binance.trade.*"]))
    sink = nats_sink(shared.url, "narrow", "NARROW", tmp_path)
    try:
        with pytest.raises(Permanent) as refused:
            await sink.open()
        assert "NARROW" in str(refused.value)
    finally:
        await sink.close()
    assert (await admin.stream_info("NARROW")).config.subjects == ["narrow.binance.trade.*"]


async def test_a_missing_stream_is_permanent_without_create_stream(
    shared: NatsServer, admin: nats.js.JetStreamContext, tmp_path: Path
) -> None:
    sink = nats_sink(shared.url, "nocreate", "NOCREATE", tmp_path, create_stream=False)
    try:
        with pytest.raises(Permanent):
            await sink.open()
    finally:
        await sink.close()
    with pytest.raises(NotFoundError):
        await admin.stream_info("NOCREATE")


async def test_a_stream_deleted_while_running_is_permanent(
    shared: NatsServer, admin: nats.js.JetStreamContext, tmp_path: Path
) -> None:
    sink = await opened(nats_sink(shared.url, "gone", "GONE", tmp_path))
    try:
        await sink.send(trades(5))
        await admin.delete_stream("GONE")
        with pytest.raises(Permanent):
            await sink.send(trades(5, start=5))
        await sink.open()  # create_stream: opening again brings the stream back
        await sink.send(trades(5, start=5))
    finally:
        await sink.close()
    assert (await admin.stream_info("GONE")).state.messages == 5


async def test_where_names_servers_without_credentials(tmp_path: Path) -> None:
    spec = NatsSpec(
        (Secret("nats://alice:s3cret-pw@10.0.0.5:4222"), Secret("tls://tok3n-value@nats.example:4443")),
        password=Secret("s3cret-pw"),
    )
    sink = NatsSink(Sink("nats", delivery=Delivery(SpoolSpec(str(tmp_path))), nats=spec))
    where = sink.where()
    assert where == "nats 10.0.0.5:4222,nats.example:4443 subject md.{venue}.{kind}.{symbol} stream MD"


# ---------------------------------------------------------------------------------------------------
# Failures


async def test_wrong_password_is_permanent(tmp_path: Path) -> None:
    server = NatsServer(user="feed", password="right-pass")
    try:
        server.start()
        wrong = nats_sink(server.url, "auth", "AUTH", tmp_path, username=Secret("feed"), password=Secret("wrong-pass"))
        none = nats_sink(server.url, "auth", "AUTH", tmp_path)
        for sink in (wrong, none):
            try:
                with pytest.raises(Permanent) as refused:
                    await asyncio.wait_for(sink.open(), 10)
                assert "wrong-pass" not in str(refused.value)
            finally:
                await sink.close()
        right = nats_sink(server.url, "auth", "AUTH", tmp_path, username=Secret("feed"), password=Secret("right-pass"))
        try:
            await opened(right)
            await right.send(trades(3))
        finally:
            await right.close()
        stored = await read_stream(server.url, "AUTH", user="feed", password="right-pass")
        assert len(stored) == 3
    finally:
        server.cleanup()


async def test_no_server_listening_is_transient(tmp_path: Path) -> None:
    sink = nats_sink(f"nats://127.0.0.1:{servers.free_port()}", "none", "NONE", tmp_path)
    start = time.monotonic()
    try:
        with pytest.raises(Transient):
            await asyncio.wait_for(sink.open(), 15)
    finally:
        await sink.close()
    assert time.monotonic() - start < 5


async def test_server_killed_then_restarted(own: NatsServer, tmp_path: Path) -> None:
    sink = await opened(nats_sink(own.url, "kr", "KR", tmp_path, timeout=5.0, max_pending=200))
    before, during, after = trades(3000), trades(20000, start=3000), trades(500, start=23000)
    try:
        await sink.send(before)
        sending = asyncio.create_task(sink.send(during))
        await asyncio.sleep(0.01)  # part of the batch is out, part acknowledged, when the server dies
        own.kill()
        start = time.monotonic()
        with pytest.raises(Transient):
            await asyncio.wait_for(sending, 15)
        assert time.monotonic() - start < 3  # the loss is noticed, not waited out to the 5s timeout
        with pytest.raises(Transient):
            await asyncio.wait_for(sink.open(), 15)
        start = time.monotonic()
        await asyncio.wait_for(sink.close(), 5)
        assert time.monotonic() - start < 3

        own.restart()
        await opened(sink)
        await sink.send(during)  # the failed batch, sent again whole
        await sink.send(after)
    finally:
        await sink.close()
    stored = await read_stream(own.url, "KR")
    assert len(stored) == len(before) + len(during) + len(after)
    assert [m.headers["Nats-Msg-Id"] for m in stored[: len(before)]] == [event_id(e) for e in before]
    assert sorted(m.headers["Nats-Msg-Id"] for m in stored) == sorted(event_id(e) for e in before + during + after)


async def test_close_returns_promptly_with_the_server_dead(own: NatsServer, tmp_path: Path) -> None:
    sink = await opened(nats_sink(own.url, "cl", "CL", tmp_path))
    await sink.send(trades(10))
    own.kill()
    start = time.monotonic()
    await asyncio.wait_for(sink.close(), 5)
    await sink.close()
    assert time.monotonic() - start < 3


async def test_a_hung_server_fails_the_batch_at_the_timeout(own: NatsServer, tmp_path: Path) -> None:
    """Only max_pending messages go out unacknowledged: the rest of the batch waits for room, so a hung
    server holds the window's worth, and the batch sent again whole fills in the rest, in order."""
    sink = await opened(nats_sink(own.url, "hang", "HANG", tmp_path, timeout=1.0, max_pending=4))
    first, batch = trades(10), trades(500, start=10)
    try:
        await sink.send(first)
        own.pause()
        start = time.monotonic()
        with pytest.raises(Transient):
            await asyncio.wait_for(sink.send(batch), 10)
        assert 0.9 < time.monotonic() - start < 4
        start = time.monotonic()
        await asyncio.wait_for(sink.close(), 5)
        assert time.monotonic() - start < 3
        own.resume()
        assert await stored_count(own.url, "HANG", at_least=14) == 14  # the first send and the window
        await opened(sink)
        await sink.send(batch)
    finally:
        own.resume()
        await sink.close()
    stored = await read_stream(own.url, "HANG")
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [event_id(e) for e in first + batch]


async def stored_count(url: str, stream: str, at_least: int, settle: float = 0.5) -> int:
    """The stream's message count once it reached `at_least` and then held still for `settle` seconds."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 5
        count = 0
        while time.monotonic() < deadline:
            count = (await js.stream_info(stream)).state.messages
            if count >= at_least:
                await asyncio.sleep(settle)
                return (await js.stream_info(stream)).state.messages
            await asyncio.sleep(0.05)
        return count
    finally:
        await nc.close()
