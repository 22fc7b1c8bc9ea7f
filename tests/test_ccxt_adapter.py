"""The real ccxt client against the Binance-protocol simulator over loopback: outcomes, not calls."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import Collector, sample, venue_from, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from feedrunner.adapters.ccxt import CcxtAdapter, Chunks
from feedrunner.events import Book, Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import BreakerState, ConnState
from feedrunner.sim.binance import BinanceSim
from feedrunner.spec import Venue

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]


def make_venue(endpoints: dict[str, str], **settings: Any) -> Venue:
    venue = {
        "adapter": "ccxt",
        "exchange": "binance",
        "symbols": SYMBOLS,
        "channels": ["trades", "ticker", "book"],
        "endpoints": endpoints,
        "stale_after": "3s",
        "poll_interval": "200ms",
        "backoff": {"base": "100ms", "cap": "1s", "jitter": 0, "max_attempts": 50},
        "circuit_breaker": {"failure_threshold": 3, "recovery_timeout": "2s"},
    }
    venue.update(settings)
    return venue_from("binance", venue)


@pytest.fixture
async def sim() -> AsyncIterator[BinanceSim]:
    async with BinanceSim(SYMBOLS, seed=3, rate=40, ping_interval=5) as s:
        yield s


@pytest.fixture
async def run_adapter(sim: BinanceSim) -> AsyncIterator[Callable[..., Any]]:
    started: list[CcxtAdapter] = []

    async def start(transport: str = "websocket", **settings: Any) -> tuple[CcxtAdapter, Collector]:
        out = Collector()
        adapter = CcxtAdapter(make_venue(sim.endpoints, transport=transport, **settings), out, Metrics())
        adapter.emit_now = out.now  # as the runner gives it the pipeline's
        started.append(adapter)
        await adapter.start()
        adapter.apply(dict.fromkeys(adapter.venue.symbols, transport))
        return adapter, out

    yield start
    for adapter in started:
        await adapter.stop()


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 40)), st.lists(st.integers(0, 40), max_size=30))
def test_chunks_cover_every_symbol_and_a_symbol_moving_changes_one_chunk(start, toggles):
    chunks = Chunks(size=7)
    wanted = {f"S{n}/USDT" for n in start}
    before = chunks.assign(wanted)
    for n in toggles:  # one symbol joins or leaves the websocket at a time
        wanted ^= {f"S{n}/USDT"}
        after = chunks.assign(wanted)
        assert sorted(s for chunk in after.values() for s in chunk) == sorted(wanted)
        assert all(0 < len(chunk) <= 7 for chunk in after.values())
        changed = [i for i in before.keys() | after.keys() if before.get(i) != after.get(i)]
        assert len(changed) <= 1, (before, after)
        before = after


async def all_kinds_for_all_symbols(out: Collector, timeout: float = 10) -> None:
    await wait_until(
        lambda: all(out.of(k, s) for k in (Trade, Ticker, Book) for s in SYMBOLS),
        timeout,
        "trades, tickers and books for every symbol",
    )


@pytest.mark.parametrize("transport", ["websocket", "polling", "hybrid"])
async def test_streams_trades_tickers_and_books(run_adapter, transport):
    adapter, out = await run_adapter(transport)
    await all_kinds_for_all_symbols(out)
    await wait_until(lambda: all(len(out.of(Trade, s)) >= 20 for s in SYMBOLS), 10, "20 trades per symbol")
    out.assert_contiguous()
    for book in out.of(Book):
        assert book.bids[0][0] < book.asks[0][0] and len(book.bids) <= 20
    for ticker in out.of(Ticker):
        assert ticker.bid is not None and ticker.ask is not None and ticker.bid < ticker.ask
    trade = out.of(Trade)[-1]
    assert trade.ts_exchange and trade.ts_received >= trade.ts_exchange - 50_000_000
    expected = {"websocket": {"websocket"}, "polling": {"polling"}, "hybrid": {"websocket", "polling"}}[transport]
    assert {e.transport for e in out.of(Trade)} <= expected
    if transport != "hybrid":
        assert {e.transport for e in out.events} == expected
        # nothing the venue sent twice: re-reading ccxt's own caches is not a duplicate to count
        assert sample(adapter, "feedrunner_trades_dropped_duplicate_total") == 0
    assert adapter.conn.state is ConnState.CONNECTED


@pytest.mark.parametrize("fault", ["drop", "reset", "restart", "malformed", "gap"])
async def test_survives_fault_with_every_trade_once_and_contiguous(run_adapter, sim, fault):
    adapter, out = await run_adapter("websocket")
    await all_kinds_for_all_symbols(out)
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    sim.inject(fault, duration=1.0)
    await wait_until(
        lambda: all(len(out.of(Trade, s)) > before[s] + 60 for s in SYMBOLS),
        20,
        f"trades to flow again after {fault}",
    )
    # A long enough outage may open the breaker (polling meanwhile); either way streaming comes back.
    await wait_until(lambda: all(t.transport == "websocket" for t in out.of(Trade)[-10:]), 15, "websocket again")
    out.assert_contiguous()
    if fault not in ("malformed", "gap"):
        assert sample(adapter, "feedrunner_reconnects_total") >= 1
    if fault == "gap":
        assert sample(adapter, "feedrunner_book_resyncs_total") >= 1
        n = len(out.of(Book))
        await wait_until(lambda: len(out.of(Book)) > n + 10, 10, "books after the resync")
        assert all(b.bids[0][0] < b.asks[0][0] for b in out.of(Book)[n:])
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_a_healthy_stream_that_closes_reconnects_at_once_and_backs_off_only_after_a_failure(run_adapter, sim):
    # Backoff starts at 5 s here: trades flowing again within 3 s of the drop means no backoff was waited.
    adapter, out = await run_adapter(
        "websocket",
        stale_after={"default": "3s", "trades": "1s"},
        backoff={"base": "5s", "cap": "5s", "jitter": 0, "max_attempts": 50},
        circuit_breaker={"failure_threshold": 100},
    )
    await all_kinds_for_all_symbols(out)
    await asyncio.sleep(1.2)  # delivering for a stale window: healthy
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    sim.inject("drop")  # a clean close, as at Binance's 24 h disconnect
    await wait_until(lambda: all(len(out.of(Trade, s)) > before[s] + 5 for s in SYMBOLS), 3, "trades at once")
    assert list(adapter.retries) == []  # no backoff delay was scheduled
    assert sample(adapter, "feedrunner_reconnects_total") == 1  # one outage, however many loops saw it
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0
    # A reconnect that fails (the venue refuses) is where the backoff starts.
    sim.inject("refuse", duration=1.0)
    sim.inject("drop")
    await wait_until(lambda: len(adapter.retries) >= 1, 5, "a backed-off retry")
    assert [d for _, d, _ in adapter.retries][:1] == [5.0]


async def test_reconnects_follow_the_backoff_schedule(run_adapter, sim):
    adapter, out = await run_adapter("websocket", circuit_breaker={"failure_threshold": 100})
    await all_kinds_for_all_symbols(out)
    sim.inject("refuse", duration=2.5)
    sim.inject("drop")
    await wait_until(lambda: len(adapter.retries) >= 4, 10, "four reconnect attempts")
    delays = [d for _, d, _ in list(adapter.retries)[:4]]
    assert delays == [0.1, 0.2, 0.4, 0.8]  # base 100ms, factor 2, no jitter
    times = [t for t, _, _ in list(adapter.retries)[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, delay in zip(gaps, delays, strict=False):
        assert gap >= delay * 0.95  # never retried sooner than the schedule says
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    await wait_until(lambda: all(len(out.of(Trade, s)) > before[s] + 20 for s in SYMBOLS), 15, "recovery")
    out.assert_contiguous()
    await wait_until(lambda: adapter.conn.state is ConnState.CONNECTED, 10, "connected")


async def test_stall_is_detected_within_stale_after_plus_one_second(run_adapter, sim):
    # The ticker stream is 1/s at Binance, so only trades get the tight window.
    adapter, out = await run_adapter("websocket", stale_after={"default": "3s", "trades": "1s"})
    await all_kinds_for_all_symbols(out)
    stalled_at = time.monotonic()
    sim.inject("stall", duration=2.0)
    await wait_until(lambda: sample(adapter, "feedrunner_stalls_total", channel="trades") >= 1, 5, "a stall")
    assert time.monotonic() - stalled_at <= 1.0 + 1.0 + 0.3  # stale_after + 1 s (+ the last message's age)
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    await wait_until(lambda: all(len(out.of(Trade, s)) > before[s] + 40 for s in SYMBOLS), 15, "recovery")
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_breaker_falls_back_to_polling_and_returns_to_websocket(run_adapter, sim):
    adapter, out = await run_adapter(
        "websocket",
        stale_after={"default": "3s", "trades": "500ms"},
        circuit_breaker={"failure_threshold": 2, "recovery_timeout": "2s"},
    )
    await all_kinds_for_all_symbols(out)
    sim.inject("stall", duration=4.0)  # the websocket goes silent; REST keeps answering
    await wait_until(lambda: adapter.breaker.state is BreakerState.OPEN, 6, "the breaker to open")
    n = len(out.events)
    await wait_until(lambda: any(e.transport == "polling" for e in out.events[n:]), 5, "polling fallback")
    assert adapter.conn.state is ConnState.DEGRADED
    await wait_until(lambda: adapter.breaker.state is BreakerState.CLOSED, 15, "a successful half-open probe")
    n = len(out.events)
    await wait_until(lambda: sum(e.transport == "websocket" for e in out.events[n:]) > 30, 10, "websocket again")
    await asyncio.sleep(0.5)
    assert adapter.status()["symbols"] == dict.fromkeys(SYMBOLS, "websocket")
    out.assert_contiguous()


async def test_ratelimit_honours_retry_after(run_adapter, sim):
    adapter, out = await run_adapter("polling", channels=["ticker"])
    await wait_until(lambda: all(out.of(Ticker, s) for s in SYMBOLS), 10, "tickers")
    sim.inject("ratelimit", duration=2.0)
    hit = time.monotonic()
    await wait_until(lambda: sample(adapter, "feedrunner_errors_total", kind="rate_limit") >= 1, 5, "a 429")
    n = len(out.events)
    await wait_until(lambda: len(out.events) > n, 10, "polling to resume")
    assert time.monotonic() - hit >= 1.9  # waited out Retry-After instead of hammering
    assert sample(adapter, "feedrunner_errors_total", kind="rate_limit") <= 2 * len(SYMBOLS)


async def test_rejected_symbol_is_quarantined_alone(run_adapter, sim):
    sim.inject("reject_symbol", duration=30, symbol="ETH/USDT")
    adapter, out = await run_adapter("polling", channels=["trades"])
    await wait_until(lambda: "ETH/USDT" in adapter.quarantined, 10, "quarantine")
    n = len(out.events)
    await wait_until(lambda: {e.symbol for e in out.events[n:]} == {"BTC/USDT", "SOL/USDT"}, 10, "the others")
    assert adapter.conn.state is ConnState.DEGRADED
    assert sample(adapter, "feedrunner_quarantined_symbols") == 1


async def test_unknown_market_is_quarantined_and_others_stream(run_adapter):
    adapter, out = await run_adapter("websocket", symbols=[*SYMBOLS, "NOPE/USDT"])
    adapter.apply(dict.fromkeys([*SYMBOLS, "NOPE/USDT"], "websocket"))
    await all_kinds_for_all_symbols(out)
    assert set(adapter.quarantined) == {"NOPE/USDT"}


async def test_auth_error_stops_the_venue_without_a_hot_loop():
    async with BinanceSim(SYMBOLS, rate=20, api_keys={"the-right-key"}) as sim:
        out = Collector()
        venue = make_venue(
            sim.endpoints,
            transport="polling",
            channels=["trades"],
            credentials={"api_key": "a-wrong-key", "secret": "s"},
        )
        adapter = CcxtAdapter(venue, out, Metrics())
        await adapter.start()
        adapter.apply(dict.fromkeys(SYMBOLS, "polling"))
        try:
            await wait_until(lambda: adapter.conn.state is ConnState.FAILED, 10, "the venue to fail")
            assert "authentication failed" in adapter.conn.reason and "a-wrong-key" not in adapter.conn.reason
            await asyncio.sleep(0.5)  # requests other symbols had in flight when the key was refused may land
            requests = sim.stats["http_requests"]
            await asyncio.sleep(1.5)
            assert sim.stats["http_requests"] == requests  # stopped: no retry loop against a rejected key
            assert sample(adapter, "feedrunner_errors_total", kind="auth") >= 1
        finally:
            await adapter.stop()


async def test_symbols_leaving_the_websocket_are_not_left_streaming(run_adapter, sim):
    """Stopping our loop is not enough: ccxt stays subscribed, parsing and caching for nobody."""
    adapter, out = await run_adapter("websocket", channels=["trades", "ticker"])
    await wait_until(lambda: all(out.of(Trade, s) and out.of(Ticker, s) for s in SYMBOLS), 10, "streams")
    adapter.apply({"BTC/USDT": "polling", "ETH/USDT": "websocket", "SOL/USDT": "websocket"})
    n = len(out.events)
    # apply() only wakes the reconcile pass: the old loop may still deliver BTC over the websocket first
    btc = lambda: {e.transport for e in out.events[n:] if e.symbol == "BTC/USDT"}  # noqa: E731
    await wait_until(lambda: "polling" in btc(), 5, "poll")
    cached = []
    for _ in range(20):  # BTC may still arrive on the old connection: ccxt's cache of it stays pruned
        await asyncio.sleep(0.1)
        cached.append(len(adapter.exchange.trades.get("BTC/USDT") or []))
    assert max(cached) <= 40, cached  # at most about 0.5 s of its 40 trades/s
    adapter.apply(dict.fromkeys(SYMBOLS, "polling"))  # as when the venue's breaker opens
    await wait_until(lambda: sim.stats["connections"] == 0, 5, "the websocket closed once nothing streams")
    assert not any(sim._subs.values())
    n = len(out.events)
    await wait_until(lambda: {e.symbol for e in out.events[n:] if isinstance(e, Trade)} == set(SYMBOLS), 10, "polls")
    assert not adapter.exchange.trades
    out.assert_contiguous()


async def test_a_symbol_set_that_changes_is_streamed_once(run_adapter, sim):
    """One symbol falling back to polling and returning changes its chunk's symbol set. ccxt.pro binance
    subscribes the new set on a connection of its own; the old one must go, or the rest of the chunk
    arrives twice, parsed twice, for as long as the connection lives."""
    adapter, out = await run_adapter("websocket", channels=["trades", "book"])
    await wait_until(lambda: all(out.of(Trade, s) and out.of(Book, s) for s in SYMBOLS), 10, "streams")

    def subscriptions() -> dict[str, int]:
        return {stream: len(conns) for stream, conns in sim._subs.items() if conns}

    def streamed_once(symbols: list[str]) -> bool:
        want = {f"{s.replace('/', '').lower()}@{k}" for s in symbols for k in ("trade", "depth@100ms")}
        return subscriptions() == dict.fromkeys(want, 1) and sim.stats["connections"] == 2

    for _ in range(2):
        adapter.apply({"BTC/USDT": "polling", "ETH/USDT": "websocket", "SOL/USDT": "websocket"})
        await wait_until(lambda: streamed_once(SYMBOLS[1:]), 10, "ETH and SOL on one connection per channel")
        adapter.apply(dict.fromkeys(SYMBOLS, "websocket"))
        await wait_until(lambda: streamed_once(SYMBOLS), 10, "all three back, once each")
    n = len(out.events)
    await wait_until(lambda: {e.symbol for e in out.events[n:] if isinstance(e, Trade)} == set(SYMBOLS), 5, "trades")
    out.assert_contiguous()
    moved = [e for e in out.events if isinstance(e, Trade) and e.backfilled and e.symbol != "BTC/USDT"]
    assert not moved, "ETH and SOL moved connections without a gap to backfill"
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_a_subscribed_trade_set_is_woken_by_the_parse_not_by_a_watch_call_per_batch(run_adapter, sim):
    """Once a set's watch call has returned, its loop waits on the trades ccxt parses for it: hundreds of
    batches, a handful of watch calls. A drop fails that wait like a watch call; the loop watches again
    (reconnecting and resubscribing) and is woken by the parse again, losing nothing."""
    adapter, out = await run_adapter("websocket", channels=["trades"])
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    calls = 0
    watch = adapter.exchange.watch_trades_for_symbols

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await watch(*args, **kwargs)

    adapter.exchange.watch_trades_for_symbols = counted
    n = len(out.events)
    await asyncio.sleep(2.0)  # 3 symbols x 40 trades/s
    assert len(out.events) - n > 150 and calls <= 1
    sim.inject("drop")
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    await wait_until(lambda: all(len(out.of(Trade, s)) > before[s] + 40 for s in SYMBOLS), 10, "trades after")
    assert 1 <= calls <= 3  # watched again after the drop, then woken by the parse once more
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


def parse_through(adapter: CcxtAdapter, wrap: Callable[..., Any]) -> None:
    """The adapter's parse of taken frames, through `wrap(frame, market, parse)`."""
    arrivals = adapter._arrivals
    assert arrivals is not None
    parse = arrivals._parse
    arrivals._parse = lambda frame, market: wrap(frame, market, parse)


async def test_a_subscribed_sets_trade_frames_are_taken_before_ccxts_dispatch(run_adapter, sim):
    """Once armed, the set's @trade frames are parsed as they are read: ccxt's trade handler (market
    lookups, cache, futures) no longer runs for them, and what is emitted is still every trade, in order."""
    adapter, out = await run_adapter("websocket", channels=["trades"])
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    handled = 0
    ccxt_handle_trade = adapter.exchange.handle_trade

    def counted(client: Any, message: Any) -> Any:
        nonlocal handled
        handled += 1
        return ccxt_handle_trade(client, message)

    adapter.exchange.handle_trade = counted  # ccxt's dispatch looks it up on the instance per message
    n = len(out.events)
    await asyncio.sleep(2.0)
    assert len(out.events) - n > 150 and handled <= 3
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_taken_trades_are_delivered_from_the_reading_task_unless_the_pipeline_is_busy(run_adapter, sim):
    """Trades that continue their symbol's ids go to the pipeline from the socket's reading task, a batch
    per read; while the pipeline cannot take them at once they go through the set's loop instead, in
    order, and nothing is lost either way."""
    adapter, out = await run_adapter("websocket", channels=["trades"])
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    await asyncio.sleep(0.5)
    before = dict(out.batches)
    await asyncio.sleep(1.5)
    assert out.batches["now"] - before["now"] > 50 and out.batches["emit"] - before["emit"] <= 2
    out.busy = True
    before = dict(out.batches)
    await asyncio.sleep(1.0)
    assert out.batches["now"] == before["now"] and out.batches["emit"] - before["emit"] > 20
    out.busy = False
    n = len(out.events)
    await wait_until(lambda: len(out.events) > n + 60, 5, "trades after")
    out.assert_contiguous()
    assert not [e for e in out.of(Trade) if e.backfilled]
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_trades_taken_while_the_loop_is_held_are_bounded_and_the_hole_is_backfilled(run_adapter, sim):
    """A set holds at most trades_buffer trades a symbol while its loop cannot take them (as ccxt's caches
    do); past that the oldest go, and the continuity check backfills the hole: nothing is lost."""
    adapter, out = await run_adapter("websocket", channels=["trades"], trades_buffer=10)
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    assert adapter._arrivals is not None
    armed = next(iter(adapter._arrivals._by_id.values()))
    out.busy, out.gate = True, asyncio.Event()  # the loop's next emit waits
    held = 0
    for _ in range(30):  # 3 symbols x 40 trades/s: ~120 in 1.5 s against room for 30
        await asyncio.sleep(0.05)
        held = max(held, len(armed.trades))
    assert held == 10 * len(SYMBOLS)
    out.gate.set()
    out.busy = False
    n = len(out.events)
    await wait_until(lambda: len(out.events) > n + 150, 10, "the held trades, backfilled, and more")
    out.assert_contiguous()
    assert [e for e in out.of(Trade) if e.backfilled]
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_trade_frames_ccxt_parses_and_frames_taken_directly_are_emitted_in_id_order(run_adapter, sim):
    """A trade frame of another shape goes to ccxt (its cache, then the sweep); mixed with frames taken
    directly in one batch, each symbol's trades are still emitted in id order, none lost, none repeated."""
    adapter, out = await run_adapter("websocket", channels=["trades"])
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    declined = 0

    def every_other(frame: dict[str, Any], market: dict[str, Any], parse: Callable[..., Any]) -> Any:
        nonlocal declined
        if frame["t"] % 2:
            declined += 1
            return None  # as for a frame of a shape we do not know: ccxt parses it
        return parse(frame, market)

    parse_through(adapter, every_other)
    sim.set_rate(1000)  # several trades of a symbol per tick: each read mixes both kinds
    n = len(out.events)
    await asyncio.sleep(2.0)
    sim.set_rate(40)
    await asyncio.sleep(0.2)
    assert declined > 500 and len(out.events) - n > 2 * declined - 10
    out.assert_contiguous()
    assert not [e for e in out.events[n:] if isinstance(e, Trade) and e.backfilled], "taken out of order"
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_a_message_handler_that_raises_is_logged_and_the_connection_keeps_being_read(run_adapter, sim, lines):
    """ccxt's receive loop stops reading a connection for good when a handler raises. Ours logs it, fails
    the connection's waiting calls (the loop watches again) and reads on: the trade whose frame failed is
    backfilled, nothing is lost."""
    adapter, out = await run_adapter("websocket", channels=["trades"])
    await wait_until(lambda: all(out.of(Trade, s) for s in SYMBOLS), 10, "trades")
    raised = 0

    def raises_once(frame: dict[str, Any], market: dict[str, Any], parse: Callable[..., Any]) -> Any:
        nonlocal raised
        if not raised:
            raised += 1
            raise RuntimeError("handler failed")
        return parse(frame, market)

    parse_through(adapter, raises_once)
    await wait_until(lambda: raised, 5, "the failing frame")
    before = {s: len(out.of(Trade, s)) for s in SYMBOLS}
    await wait_until(lambda: all(len(out.of(Trade, s)) > before[s] + 20 for s in SYMBOLS), 10, "trades after")
    assert any("could not be handled" in r["message"] for r in lines)
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0
