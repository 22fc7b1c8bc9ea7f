"""The real futu-api client against the OpenD simulator over loopback: the client judges fidelity.

futu-api is blocking and runs its own threads while the simulator serves from the test's event loop, so
every client call goes through `asyncio.to_thread` with a deadline, and every context is closed in a
`finally` (its callback thread is not a daemon and would keep the interpreter alive).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from feedrunner.adapters.futu import futu  # imported without its side effects on this process
from feedrunner.sim.opend import OpenDSim, ProtoId, run_standalone
from feedrunner.sim.opend import _pb as pb
from feedrunner.sim.opend.protocol import HEADER_LEN, FrameDecoder, ProtocolError, encode

HOST = "127.0.0.1"

# futu-api's network thread calls Thread.setDaemon(), deprecated since 3.10; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")


class _Ctx(futu.OpenQuoteContext):  # type: ignore[misc]
    """Records the down/up transitions that futu-api offers no public callback for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.events: list[tuple[float, str]] = []
        super().__init__(*args, **kwargs)

    def on_disconnect(self, conn_id: int, reason: Any, msg: str) -> Any:
        self.events.append((time.monotonic(), f"down:{reason.name}"))
        return super().on_disconnect(conn_id, reason, msg)

    def on_api_socket_reconnected(self) -> Any:
        ret = super().on_api_socket_reconnected()  # resubscribes everything it has on record
        self.events.append((time.monotonic(), "up"))
        return ret

    def when(self, prefix: str, after: float = 0.0) -> float | None:
        return next((t for t, e in list(self.events) if e.startswith(prefix) and t > after), None)


class _Rows:
    """Thread-safe store for rows the callback thread hands over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self._lock:
            self._rows.extend({**r, "_at": now} for r in rows)

    def all(self, code: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._rows if code is None or r["code"] == code]


class _Tickers(futu.TickerHandlerBase):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.rows = _Rows()

    def on_recv_rsp(self, rsp_pb: Any) -> Any:
        ret, data = super().on_recv_rsp(rsp_pb)
        if ret == futu.RET_OK:
            self.rows.add(data.to_dict("records"))
        return ret, data


class _Quotes(futu.StockQuoteHandlerBase):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.rows = _Rows()

    def on_recv_rsp(self, rsp_pb: Any) -> Any:
        ret, data = super().on_recv_rsp(rsp_pb)
        if ret == futu.RET_OK:
            self.rows.add(data.to_dict("records"))
        return ret, data


class _Books(futu.OrderBookHandlerBase):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.rows = _Rows()

    def on_recv_rsp(self, rsp_pb: Any) -> Any:
        ret, data = super().on_recv_rsp(rsp_pb)
        if ret == futu.RET_OK:
            self.rows.add([data])
        return ret, data


class _Notices(futu.SysNotifyHandlerBase):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.items: list[Any] = []

    def on_recv_rsp(self, rsp_pb: Any) -> Any:
        ret, content = super().on_recv_rsp(rsp_pb)
        if ret == futu.RET_OK:
            self.items.append(content)
        return ret, content


class _Count(futu.TickerHandlerBase):  # type: ignore[misc]
    """Counts pushes without building DataFrames: measures the client's transport, not pandas."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_recv_rsp(self, rsp_pb: Any) -> Any:
        self.n += 1
        return futu.RET_OK, None


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking futu-api call off the loop, so the simulator keeps serving while it waits."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), 10.0)


async def until(pred: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def _extra_threads(baseline: set[threading.Thread]) -> list[threading.Thread]:
    """Non-daemon threads started since `baseline`, other than the loop's to_thread workers."""
    return [
        t
        for t in threading.enumerate()
        if t not in baseline and t.is_alive() and not t.daemon and not t.name.startswith("asyncio")
    ]


@asynccontextmanager
async def connected(sim: OpenDSim, *handlers: Any, sync: bool = False) -> AsyncIterator[_Ctx]:
    """An OpenQuoteContext on the simulator, closed on the way out and checked to leave no thread."""
    baseline = set(threading.enumerate())
    if sync:  # the default mode: the constructor blocks until InitConnect has been answered
        ctx = await call(_Ctx, HOST, sim.port)
    else:  # returns at once; connecting happens on futu's timer thread
        ctx = _Ctx(HOST, sim.port, is_async_connect=True)
    try:
        for h in handlers:
            ctx.set_handler(h)
        await until(lambda: ctx.status == "READY", 5, "the context to be READY")
        yield ctx
    finally:
        ctx.close()
        await until(lambda: not _extra_threads(baseline), 5, "futu-api threads to exit after close()")


def realtime_seqs(rows: list[dict[str, Any]]) -> list[int]:
    """Sequences of live prints; a first push after (re)subscribing repeats cached ones as CACHE."""
    return [int(r["sequence"]) for r in rows if r["push_data_type"] == "REALTIME"]


def _since(handler: _Tickers, t: float) -> list[dict[str, Any]]:
    return [r for r in handler.rows.all() if r["_at"] > t]


@pytest.fixture
async def sim() -> AsyncIterator[OpenDSim]:
    async with OpenDSim(seed=7, rate=20.0, min_sub_seconds=1.0, keepalive_interval=1) as s:
        yield s


QUOTE, TICKER, ORDER_BOOK = "QUOTE", "TICKER", "ORDER_BOOK"


# --- connection -------------------------------------------------------------------------------------


async def test_connects_answers_global_state_and_keepalive(sim: OpenDSim) -> None:
    async with connected(sim, sync=True) as ctx:
        assert ctx.get_login_user_id() > 0
        ret, state = await call(ctx.get_global_state)
        assert ret == futu.RET_OK, state
        assert state["qot_logined"] is True and state["trd_logined"] is True
        assert state["market_hk"] == "MORNING" and state["program_status_type"] == "READY"
        assert sim.stats["connections"] == 1
        # keepAliveInterval=1 makes the client send KeepAlive about every second (interval * 4/5, on
        # its 1 s tick); the simulator must answer or the client drops the link after 33 s of silence.
        await until(lambda: sim.stats["keepalives"] >= 2, 5, "two keepalives")
    await until(lambda: sim.stats["connections"] == 0, 2, "the server to see the close")


# --- pushes -----------------------------------------------------------------------------------------


async def test_pushes_quote_ticker_and_order_book(sim: OpenDSim) -> None:
    tickers, quotes, books = _Tickers(), _Quotes(), _Books()
    codes = ["HK.00700", "US.AAPL"]
    async with connected(sim, tickers, quotes, books) as ctx:
        ret, msg = await call(ctx.subscribe, codes, [QUOTE, TICKER, ORDER_BOOK])
        assert ret == futu.RET_OK, msg
        for code in codes:
            await until(lambda c=code: len(realtime_seqs(tickers.rows.all(c))) >= 5, 5, f"{code} tickers")
            await until(lambda c=code: len(quotes.rows.all(c)) >= 3, 5, f"{code} quotes")
            await until(lambda c=code: len(books.rows.all(c)) >= 3, 5, f"{code} books")

    lots = {"HK.00700": 100, "US.AAPL": 1}
    for code in codes:
        seqs = realtime_seqs(tickers.rows.all(code))
        assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
        for t in tickers.rows.all(code):
            assert t["price"] > 0 and t["volume"] > 0 and t["volume"] % lots[code] == 0
            assert t["ticker_direction"] in ("BUY", "SELL")
        for q in quotes.rows.all(code):
            assert q["low_price"] <= q["last_price"] <= q["high_price"], q
            assert q["name"] != "N/A" and q["data_date"] and q["data_time"]
        volumes = [q["volume"] for q in quotes.rows.all(code)]
        assert volumes == sorted(volumes)
        for book in books.rows.all(code):
            bids, asks = [lvl[0] for lvl in book["Bid"]], [lvl[0] for lvl in book["Ask"]]
            assert len(bids) == len(asks) == 10
            assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
            assert bids[0] < asks[0], book
            assert all(lvl[1] > 0 and lvl[1] % lots[code] == 0 for lvl in book["Bid"] + book["Ask"])
    by_proto = sim.stats["pushes_by_proto"]
    pushed = {ProtoId.QOT_UPDATE_BASIC_QOT, ProtoId.QOT_UPDATE_TICKER, ProtoId.QOT_UPDATE_ORDER_BOOK}
    assert pushed <= set(by_proto)


async def test_pushes_go_only_where_registered(sim: OpenDSim) -> None:
    tickers = _Tickers()
    async with connected(sim, tickers) as ctx:
        ret, msg = await call(ctx.subscribe, ["HK.00700"], [TICKER], subscribe_push=False)
        assert ret == futu.RET_OK, msg
        await asyncio.sleep(0.4)
        assert tickers.rows.all() == [] and sim.stats["pushes_sent"] == 0
        ret, msg = await call(ctx.subscribe, ["US.TSLA"], [TICKER])
        assert ret == futu.RET_OK, msg
        await until(lambda: len(tickers.rows.all("US.TSLA")) >= 3, 5, "TSLA tickers")
        assert tickers.rows.all("HK.00700") == []


# --- polling ----------------------------------------------------------------------------------------


async def test_polling_snapshot_quote_book_and_ticker(sim: OpenDSim) -> None:
    async with connected(sim) as ctx:
        ret, snap = await call(ctx.get_market_snapshot, ["HK.00700", "US.AAPL", "US.TSLA"])
        assert ret == futu.RET_OK, snap
        assert list(snap["code"]) == ["HK.00700", "US.AAPL", "US.TSLA"]
        assert list(snap["lot_size"]) == [100, 1, 1]
        assert (snap["bid_price"] < snap["ask_price"]).all() and (snap["last_price"] > 0).all()

        ret, err = await call(ctx.get_stock_quote, ["HK.00700"])
        assert ret == futu.RET_ERROR and "subscribe" in err.lower(), err  # OpenD wants QUOTE first

        ret, msg = await call(ctx.subscribe, ["HK.00700"], [QUOTE, ORDER_BOOK, TICKER], subscribe_push=False)
        assert ret == futu.RET_OK, msg
        await asyncio.sleep(0.3)  # let the idle market trade a little before it is polled
        ret, quote = await call(ctx.get_stock_quote, ["HK.00700"])
        assert ret == futu.RET_OK, quote
        row = quote.iloc[0]
        assert row["code"] == "HK.00700" and row["name"] == "TENCENT" and row["last_price"] > 0
        ret, book = await call(ctx.get_order_book, "HK.00700", 5)
        assert ret == futu.RET_OK, book
        assert len(book["Bid"]) == len(book["Ask"]) == 5 and book["Bid"][0][0] < book["Ask"][0][0]
        ret, ticks = await call(ctx.get_rt_ticker, "HK.00700", 5)
        assert ret == futu.RET_OK, ticks
        assert 1 <= len(ticks) <= 5 and list(ticks["sequence"]) == sorted(ticks["sequence"])
        ret, subs = await call(ctx.query_subscription)
        assert ret == futu.RET_OK, subs
        assert subs["own_used"] == 3 and subs["remain"] == 97
        assert subs["sub_list"][QUOTE] == ["HK.00700"]


# --- subscription rules -----------------------------------------------------------------------------


async def test_unknown_and_rejected_codes_are_named_in_the_error(sim: OpenDSim) -> None:
    async with connected(sim) as ctx:
        ret, msg = await call(ctx.subscribe, ["HK.99999"], [QUOTE])
        assert ret == futu.RET_ERROR and "HK.99999" in msg, msg
        ret, msg = await call(ctx.get_market_snapshot, ["US.NOPE"])
        assert ret == futu.RET_ERROR and "US.NOPE" in msg, msg

        sim.inject("reject_symbol", duration=0.6, symbol="HK.09988")
        ret, msg = await call(ctx.subscribe, ["HK.09988"], [QUOTE])
        assert ret == futu.RET_ERROR and "HK.09988" in msg, msg
        ret, msg = await call(ctx.subscribe, ["HK.00700"], [QUOTE])
        assert ret == futu.RET_OK, msg  # only the rejected code is affected
        await asyncio.sleep(0.7)
        ret, msg = await call(ctx.subscribe, ["HK.09988"], [QUOTE])
        assert ret == futu.RET_OK, msg


async def test_quota_counts_code_subtype_pairs() -> None:
    async with OpenDSim(quota=4, min_sub_seconds=1.0) as sim, connected(sim) as ctx:
        ret, msg = await call(ctx.subscribe, ["HK.00700", "US.AAPL"], [QUOTE, TICKER])
        assert ret == futu.RET_OK, msg
        ret, msg = await call(ctx.subscribe, ["HK.00700"], [QUOTE])
        assert ret == futu.RET_OK, msg  # already held: costs nothing
        ret, msg = await call(ctx.subscribe, ["US.TSLA"], [QUOTE])
        assert ret == futu.RET_ERROR and "quota" in msg.lower(), msg
        ret, subs = await call(ctx.query_subscription)
        assert ret == futu.RET_OK and subs["own_used"] == 4 and subs["remain"] == 0, subs


async def test_unsubscribe_only_after_min_hold(sim: OpenDSim) -> None:
    async with connected(sim) as ctx:
        ret, msg = await call(ctx.subscribe, ["HK.00700"], [QUOTE, TICKER])
        assert ret == futu.RET_OK, msg
        subscribed = time.monotonic()
        ret, msg = await call(ctx.unsubscribe, ["HK.00700"], [QUOTE])
        assert ret == futu.RET_ERROR and "at least 1 seconds" in msg, msg
        assert len(next(iter(sim.subscriptions().values()))) == 2  # nothing was cancelled
        await asyncio.sleep(max(0.0, sim.min_sub_seconds - (time.monotonic() - subscribed)) + 0.1)
        ret, msg = await call(ctx.unsubscribe, ["HK.00700"], [QUOTE])
        assert ret == futu.RET_OK, msg
        assert next(iter(sim.subscriptions().values())) == [("HK.00700", "TICKER")]
        ret, msg = await call(ctx.unsubscribe_all)
        assert ret == futu.RET_OK, msg
        assert next(iter(sim.subscriptions().values())) == []


# --- faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "reset", "restart"])
async def test_client_reconnects_and_resubscribes_by_itself(sim: OpenDSim, fault: str) -> None:
    tickers, quotes = _Tickers(), _Quotes()
    port = sim.port
    async with connected(sim, tickers, quotes) as ctx:
        assert (await call(ctx.subscribe, ["HK.00700"], [TICKER, QUOTE]))[0] == futu.RET_OK
        assert (await call(ctx.subscribe, ["US.AAPL"], [QUOTE]))[0] == futu.RET_OK
        # Refused (held under min_sub_seconds), so OpenD keeps it; but futu-api has already struck it
        # from the record it resubscribes from, so it will not come back after the reconnect.
        assert (await call(ctx.unsubscribe, ["US.AAPL"], [QUOTE]))[0] == futu.RET_ERROR
        before = sim.subscriptions()
        assert list(before.values()) == [[("HK.00700", QUOTE), ("HK.00700", TICKER), ("US.AAPL", QUOTE)]]
        await until(lambda: len(realtime_seqs(tickers.rows.all())) >= 3, 5, "tickers before the fault")
        last_seq = realtime_seqs(tickers.rows.all())[-1]

        injected = time.monotonic()
        sim.inject(fault, duration=1.0)
        await until(lambda: ctx.when("down", injected) is not None, 3, "the client to notice")
        down = ctx.when("down", injected)
        assert down is not None
        if fault == "restart":  # not listening for the duration: a connect is refused outright
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(HOST, port)

        # futu-api waits a fixed 6 s (on_disconnect -> _wait_reconnect() default) before reconnecting,
        # whatever reconnect_interval says; that setting only spaces the retries after a failed attempt.
        await until(lambda: ctx.when("up", down) is not None, 12, "the client to reconnect")
        up = ctx.when("up", down)
        assert up is not None and 5.0 <= up - down <= 11.0, up - down
        await until(lambda: realtime_seqs(_since(tickers, up)) != [], 3, "tickers after reconnect")
        await until(lambda: any(r["_at"] > up for r in quotes.rows.all("HK.00700")), 3, "quotes after it")

        after = sim.subscriptions()
        assert sim.port == port and len(after) == 1
        assert next(iter(after)) != next(iter(before))  # a new connection, resubscribed by futu-api
        assert list(after.values()) == [[("HK.00700", QUOTE), ("HK.00700", TICKER)]]
        # The market kept trading while the client was away: the tape continues, with a gap.
        assert realtime_seqs(_since(tickers, up))[0] > last_seq + 1


async def test_refuse_turns_away_new_connections_only(sim: OpenDSim) -> None:
    tickers = _Tickers()
    async with connected(sim, tickers) as ctx:
        assert (await call(ctx.subscribe, ["HK.00700"], [TICKER]))[0] == futu.RET_OK
        await until(lambda: len(tickers.rows.all()) >= 2, 5, "tickers")
        sim.inject("refuse", duration=1.5)
        refused_at = time.monotonic()
        late = _Ctx(HOST, sim.port, is_async_connect=True)
        late.reconnect_interval = 0.3  # spaces retries after a failed connect (not after a drop)
        try:
            await asyncio.sleep(1.0)
            assert late.status != "READY" and sim.stats["refused"] >= 1
            n = len(tickers.rows.all())
            await until(lambda: late.status == "READY", 4, "the late client to get in once refuse ends")
            assert time.monotonic() - refused_at >= 1.5
            assert len(tickers.rows.all()) > n  # the established client streamed throughout
            assert ctx.when("down") is None
        finally:
            late.close()


async def test_stall_stops_pushes_but_keeps_the_connection(sim: OpenDSim) -> None:
    tickers = _Tickers()
    async with connected(sim, tickers) as ctx:
        assert (await call(ctx.subscribe, ["HK.00700"], [TICKER]))[0] == futu.RET_OK
        await until(lambda: len(tickers.rows.all()) >= 3, 5, "tickers")
        keepalives = sim.stats["keepalives"]
        sim.inject("stall", duration=2.0)
        stalled_at = time.monotonic()
        await asyncio.sleep(0.2)  # pushes already in flight may still land
        n = len(tickers.rows.all())
        last_seq = realtime_seqs(tickers.rows.all())[-1]
        # The client sends KeepAlive about once a second here; it must still be answered.
        await until(lambda: sim.stats["keepalives"] > keepalives, 1.6, "a keepalive during the stall")
        await asyncio.sleep(max(0.0, 1.8 - (time.monotonic() - stalled_at)))
        assert len(tickers.rows.all()) == n
        await until(lambda: len(tickers.rows.all()) > n, 3, "pushes to resume")
        assert ctx.when("down") is None and sim.stats["connections_total"] == 1
        assert realtime_seqs(tickers.rows.all())[-1] > last_seq + 1  # the market traded on silently


@pytest.mark.parametrize("kind", ["sha1", "junk"])
async def test_malformed_frames_are_dropped_by_the_client(sim: OpenDSim, kind: str) -> None:
    tickers = _Tickers()
    sim.malformed_kind = kind
    async with connected(sim, tickers) as ctx:
        assert (await call(ctx.subscribe, ["HK.00700"], [TICKER]))[0] == futu.RET_OK
        await until(lambda: len(tickers.rows.all()) >= 3, 5, "tickers")
        sim.inject("malformed", duration=1.0)
        await asyncio.sleep(0.2)
        n = len(tickers.rows.all())
        await asyncio.sleep(0.7)
        assert len(tickers.rows.all()) == n and sim.stats["malformed_sent"] > 5
        await until(lambda: len(tickers.rows.all()) > n, 3, "pushes to resume")
        assert ctx.when("down") is None  # futu-api skips the bad frame and keeps the link
        ret, state = await call(ctx.get_global_state)
        assert ret == futu.RET_OK, state


async def test_link_lost_and_gateway_events_arrive_as_notify(sim: OpenDSim) -> None:
    notices, tickers = _Notices(), _Tickers()
    async with connected(sim, notices, tickers) as ctx:
        assert (await call(ctx.subscribe, ["US.AAPL"], [TICKER]))[0] == futu.RET_OK
        assert sim.send_gtw_event(7, "kicked out elsewhere") == 1
        await until(lambda: len(notices.items) >= 1, 3, "the GtwEvent")
        assert notices.items[0] == ("GTW_EVENT", "KickedOut", "kicked out elsewhere")

        sim.inject("link_lost", duration=0.8)
        await until(lambda: len(notices.items) >= 2, 3, "qot_logined=False")
        assert notices.items[1] == ("CONN_STATUS", None, {"qot_logined": False, "trd_logined": True})
        ret, state = await call(ctx.get_global_state)
        assert ret == futu.RET_OK and state["qot_logined"] is False
        await until(lambda: len(notices.items) >= 3, 3, "qot_logined=True")
        assert notices.items[2][2]["qot_logined"] is True
        n = len(tickers.rows.all())
        await until(lambda: len(tickers.rows.all()) > n, 3, "pushes after the link is back")


async def test_max_push_rate_one_client(sim: OpenDSim) -> None:
    counter = _Count()
    async with connected(sim, counter) as ctx:
        sim.set_rate(20000.0)
        assert (await call(ctx.subscribe, ["HK.00700"], [TICKER]))[0] == futu.RET_OK
        await asyncio.sleep(0.5)
        n0, t0 = counter.n, time.monotonic()
        await asyncio.sleep(2.0)
        per_second = (counter.n - n0) / (time.monotonic() - t0)
        sim.set_rate(0.0)
    print(f"\nfutu-api client received {per_second:.0f} ticker pushes/s; sim stats: {sim.stats}")
    assert per_second > 300


# --- standalone and raw protocol --------------------------------------------------------------------


async def test_run_standalone_prints_venue_and_serves(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(run_standalone(HOST, 0, 3, 5.0))
    out = ""
    try:
        deadline = time.monotonic() + 5
        while "port:" not in out:
            assert time.monotonic() < deadline, "no venue snippet printed"
            await asyncio.sleep(0.02)
            out += capsys.readouterr().out
        match = re.search(r"port: (\d+)", out)
        assert match and f"host: {HOST}" in out and "adapter: futu" in out
        _, writer = await asyncio.open_connection(HOST, int(match.group(1)))
        writer.close()
        await writer.wait_closed()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_frame_codec_round_trip_and_garbage() -> None:
    body = b"\x08\x00" * 10
    frame = encode(ProtoId.KEEP_ALIVE, 42, body)
    assert len(frame) == HEADER_LEN + len(body) and frame[:2] == b"FT"
    assert frame[16:36] == hashlib.sha1(body).digest()
    dec = FrameDecoder()
    got = [f for i in range(len(frame)) for f in dec.feed(frame[i : i + 1])]  # one byte at a time
    assert [(f.proto_id, f.serial, f.body, f.sha_ok) for f in got] == [(1004, 42, body, True)]
    bad = encode(ProtoId.KEEP_ALIVE, 1, body, sha1=b"\0" * 20)
    assert FrameDecoder().feed(bad)[0].sha_ok is False
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"XX" + frame[2:])


async def test_raw_requests_before_init_and_with_bad_sha(sim: OpenDSim) -> None:
    reader, writer = await asyncio.open_connection(HOST, sim.port)
    try:
        req = pb.KeepAlive.Request()
        req.c2s.time = int(time.time())
        body = req.SerializeToString()
        dec = FrameDecoder()

        async def roundtrip(data: bytes) -> Any:
            writer.write(data)
            while True:
                frames = dec.feed(await asyncio.wait_for(reader.read(65536), 3))
                if frames:
                    rsp = pb.KeepAlive.Response()
                    rsp.ParseFromString(frames[0].body)
                    return frames[0], rsp

        frame, rsp = await roundtrip(encode(ProtoId.KEEP_ALIVE, 7, body))
        assert (frame.proto_id, frame.serial) == (1004, 7)
        assert rsp.retType == -1 and "InitConnect" in rsp.retMsg
        frame, rsp = await roundtrip(encode(ProtoId.KEEP_ALIVE, 8, body, sha1=b"\1" * 20))
        assert frame.serial == 8 and rsp.retType == -500 and "sha" in rsp.retMsg
        writer.write(b"XX" + bytes(60))  # not a Futu frame at all: OpenD hangs up
        assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()
