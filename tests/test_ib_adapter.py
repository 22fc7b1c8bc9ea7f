"""The real ib_async client against the TWS simulator over loopback: outcomes, not calls.

The simulator keeps every print on a tape (`sim.prints`), so "every trade exactly once" is checked against
the market itself: across drops, stalls and TWS link outages the adapter's trades, streamed plus backfilled,
must equal the tape second for second.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import Collector, sample, venue_from, wait_until
from ib_async import IB

from feedrunner.adapters import ib as ib_adapter
from feedrunner.adapters.ib import NS, IbAdapter, TapeMerge, contract_for
from feedrunner.events import Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import ConnState
from feedrunner.sim.tws import TwsSim
from feedrunner.spec import Venue

STOCKS = ["AAPL", "MSFT", "AMZN", "GOOGL", "NVDA"]
SYMBOLS = [*STOCKS, "EUR.USD"]


def make_venue(port: int, **settings: Any) -> Venue:
    venue = {
        "adapter": "ib",
        "host": "127.0.0.1",
        "port": port,
        "client_id": 11,
        "symbols": SYMBOLS,
        "channels": ["trades", "ticker"],
        "stale_after": "2s",
        "poll_interval": "200ms",
        "backoff": {"base": "100ms", "cap": "1s", "jitter": 0, "max_attempts": 50},
        "circuit_breaker": {"failure_threshold": 100, "recovery_timeout": "2s"},
    }
    venue.update(settings)
    return venue_from("ib", venue)


def flowing(out: Collector, since: int) -> bool:
    """Quotes for every symbol and trades for every stock after event number `since`."""
    recent = out.events[since:]
    quotes = {e.symbol for e in recent if isinstance(e, Ticker)}
    trades = {e.symbol for e in recent if isinstance(e, Trade) and not e.backfilled}
    return quotes >= set(SYMBOLS) and trades >= set(STOCKS)


@pytest.fixture
async def sim() -> AsyncIterator[TwsSim]:
    async with TwsSim(seed=3, rate=50.0) as s:
        yield s


@pytest.fixture
async def run_adapter(sim: TwsSim) -> AsyncIterator[Callable[..., Any]]:
    """Adapters started through this stop before the simulator does."""
    started: list[IbAdapter] = []

    async def start(port: int, transport: str = "websocket", **settings: Any) -> tuple[IbAdapter, Collector]:
        out = Collector()
        venue = make_venue(port, transport=transport, **settings)
        adapter = IbAdapter(venue, out, Metrics())
        started.append(adapter)
        await adapter.start()
        adapter.apply(dict.fromkeys(venue.symbols, transport))
        return adapter, out

    yield start
    for adapter in started:
        await adapter.stop()


async def streaming(out: Collector, timeout: float = 10) -> None:
    await wait_until(lambda: flowing(out, 0), timeout, "quotes for every symbol and trades for every stock")


async def settled(adapter: IbAdapter, timeout: float = 10) -> None:
    """No gap left to backfill and no backfill running."""
    await wait_until(
        lambda: not adapter._gap_from and all(t.done() for t in adapter._backfills.values()), timeout, "backfill"
    )


def assert_every_print_once(out: Collector, sim: TwsSim) -> None:
    """The adapter's trades equal the simulator's tape for every whole second it covered: none lost, none twice."""
    for symbol in STOCKS:
        trades = out.of(Trade, symbol)
        got = Counter((t.ts_exchange // NS, t.price, t.amount) for t in trades)
        lo = min(t.ts_exchange for t in trades) // NS + 1  # the first and last seconds may be partial
        hi = max(t.ts_exchange for t in trades if not t.backfilled) // NS - 1
        tape = Counter((ms // 1000, p, float(n)) for ms, p, n in sim.prints(symbol) if lo <= ms // 1000 <= hi)
        have = Counter({k: n for k, n in got.items() if lo <= k[0] <= hi})
        assert hi >= lo and sum(tape.values()) > 0
        missing, doubled = tape - have, have - tape
        assert not missing and not doubled, (
            f"{symbol} over [{lo}, {hi}]: missing {dict(missing)}, twice {dict(doubled)}; "
            f"{[(t.ts_exchange // NS, t.price, t.amount, t.backfilled) for t in trades if t.ts_exchange // NS == hi]}"
        )


async def whole_second() -> float:
    """Wait into the next wall-clock second, so a fault lands in a second the check covers whole."""
    now = time.time()
    await asyncio.sleep(1.05 - now % 1)
    return time.time()


async def covered(out: Collector, since: float) -> None:
    """Live trades for every stock in the second after `since`: the check then covers the second it fell in."""
    edge = (int(since) + 1) * NS
    await wait_until(
        lambda: all(any(t.ts_exchange >= edge and not t.backfilled for t in out.of(Trade, s)) for s in STOCKS),
        6,
        "trades of the next second",
    )


def lines(sim: TwsSim) -> tuple[int, int]:
    return sim.stats["active_lines"], sim.stats["tick_by_tick"]


# -- pure logic ----------------------------------------------------------------------------------------


def test_contract_notation() -> None:
    venue = make_venue(1, symbols=["AAPL", "EUR.USD", {"symbol": "GBP", "sec_type": "CASH", "currency": "USD"}])
    aapl, eur, gbp = (contract_for(s, venue) for s in venue.symbols)
    assert (aapl.secType, aapl.symbol, aapl.exchange, aapl.currency) == ("STK", "AAPL", "SMART", "USD")
    assert (eur.secType, eur.symbol, eur.currency, eur.exchange) == ("CASH", "EUR", "USD", "IDEALPRO")
    assert (gbp.secType, gbp.symbol, gbp.currency, gbp.exchange) == ("CASH", "GBP", "USD", "IDEALPRO")


def test_tape_merge_counts_identical_prints_and_takes_the_maximum_over_sources() -> None:
    from feedrunner.adapters.ib import HISTORY, LIVE

    tape = TapeMerge()
    # Two identical prints in second 10, streamed before a gap; the history then holds three of them.
    assert tape.observe(LIVE, 10, 1.5, 100) and tape.observe(LIVE, 10, 1.5, 100)
    assert [tape.observe(HISTORY, 10, 1.5, 100, hold=10) for _ in range(3)] == [False, False, True]
    # The stream resumes inside second 11, the history (asked first) already had both of its prints.
    assert tape.observe(HISTORY, 11, 2.0, 5, hold=10) and tape.observe(HISTORY, 11, 2.0, 7, hold=10)
    assert not tape.observe(LIVE, 11, 2.0, 7, hold=10)
    assert tape.observe(LIVE, 11, 2.0, 7, hold=10)  # a second identical print the history had not seen yet


# -- streaming and polling -----------------------------------------------------------------------------


async def test_streams_quotes_and_trades_for_five_stocks_and_fx(run_adapter, sim):
    adapter, out = await run_adapter(sim.port)
    await streaming(out)
    await wait_until(lambda: all(len(out.of(Trade, s)) >= 100 for s in STOCKS), 10, "100 trades per stock")
    assert not out.of(Trade, "EUR.USD")  # IDEALPRO has no prints, so no trades line is spent on it
    assert lines(sim) == (6, 5)
    for t in out.of(Ticker):
        assert t.bid is not None and t.ask is not None and t.bid < t.ask
        assert (t.last is None) == (t.symbol == "EUR.USD")
    stamped = [t for t in out.of(Ticker) if t.ts_exchange]  # updates that brought a print: its ms time
    assert len(stamped) > 100 and {t.symbol for t in stamped} == set(STOCKS)
    assert all(t.ts_exchange % 1_000_000 == 0 and 0 <= t.ts_received - t.ts_exchange < NS // 4 for t in stamped)
    now = time.time_ns()
    for t in out.of(Trade):
        assert t.ts_exchange % NS == 0 and now - 5 * NS < t.ts_exchange <= t.ts_received
        assert t.id is None and t.amount > 0 and not t.backfilled
    assert {e.transport for e in out.events} == {"websocket"}
    assert adapter.conn.state is ConnState.CONNECTED
    count = sample(adapter, "feedrunner_latency_seconds_count", transport="websocket")
    assert count == len(stamped)  # whole-second trade times are kept out of the latency histogram
    assert sample(adapter, "feedrunner_latency_seconds_sum", transport="websocket") / count < 0.25
    assert_every_print_once(out, sim)


async def test_polling_takes_snapshots_and_holds_no_lines(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, "polling")
    await streaming(out)
    await wait_until(lambda: all(len(out.of(Ticker, s)) >= 5 for s in SYMBOLS), 10, "five snapshots per symbol")
    assert {e.transport for e in out.events} == {"polling"}
    assert lines(sim) == (0, 0)
    for symbol in STOCKS:  # the last sale, once per new print seen
        keys = [(t.ts_exchange, t.price, t.amount) for t in out.of(Trade, symbol)]
        assert len(keys) == len(set(keys))
    assert adapter.conn.state is ConnState.CONNECTED


# -- faults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "reset", "restart"])
async def test_socket_fault_recovers_every_subscription_and_backfills(run_adapter, sim, fault):
    adapter, out = await run_adapter(sim.port)
    await streaming(out)
    n = len(out.events)
    await whole_second()
    sim.inject(fault, duration=1.0)
    took = await wait_until(lambda: flowing(out, n) and adapter.sessions == 2, 10, f"every symbol after {fault}")
    assert took < 1.0 + 2.0 if fault == "restart" else took < 2.0
    assert lines(sim) == (6, 5)
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)
    if fault == "restart":  # a second of market while the sim was down: it came back through history
        assert sample(adapter, "feedrunner_trades_backfilled_total") >= 20
        assert any(kind == "network" for _, _, kind in adapter.retries)
    assert sample(adapter, "feedrunner_trades_lost_total") == 0
    assert adapter.conn.state is ConnState.CONNECTED


async def test_a_gap_history_cannot_fill_is_logged_not_guessed(run_adapter, sim, monkeypatch):
    monkeypatch.setattr(ib_adapter, "HISTORY_ATTEMPTS", 2)
    adapter, out = await run_adapter(sim.port)
    await streaming(out)
    sim.history_unavailable(5.0)
    sim.inject("restart", duration=0.5)
    await wait_until(lambda: adapter.sessions == 2 and flowing(out, len(out.events) - 100), 5, "streaming again")
    await wait_until(lambda: sample(adapter, "feedrunner_errors_total", kind="unknown") >= 10, 5, "5 x 2 refusals")
    await settled(adapter)
    assert sample(adapter, "feedrunner_trades_backfilled_total") == 0
    assert sample(adapter, "feedrunner_trades_lost_total") == 0  # unknown, so not counted: logged instead
    assert adapter.status()["backfilling"] == []


async def test_reconnects_follow_the_backoff_schedule(run_adapter, sim):
    adapter, out = await run_adapter(sim.port)
    await streaming(out)
    await whole_second()
    sim.inject("refuse", duration=2.5)
    sim.inject("drop")
    await wait_until(lambda: len(adapter.retries) >= 4, 10, "four reconnect attempts")
    delays = [d for _, d, _ in list(adapter.retries)[:4]]
    assert delays == [0.1, 0.2, 0.4, 0.8]  # base 100ms, factor 2, no jitter
    times = [t for t, _, _ in list(adapter.retries)[:4]]
    for gap, delay in zip([b - a for a, b in itertools.pairwise(times)], delays, strict=False):
        assert gap >= delay * 0.95  # never retried sooner than the schedule says
    n = len(out.events)
    await wait_until(lambda: flowing(out, n), 10, "recovery")
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)
    assert adapter.conn.state is ConnState.CONNECTED


async def test_stall_is_detected_and_the_silence_backfilled(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, stale_after="1s")
    await streaming(out)
    await whole_second()
    stalled_at = time.monotonic()
    sim.inject("stall", duration=2.0)
    await wait_until(lambda: sample(adapter, "feedrunner_stalls_total", channel="trades") >= 1, 5, "a stall")
    assert time.monotonic() - stalled_at <= 1.0 + 1.0 + 0.3  # stale_after + 1 s (+ the last message's age)
    n = len(out.events)
    await wait_until(lambda: flowing(out, n), 10, "data after the stall")
    assert adapter.sessions >= 2  # every line silent: the socket was replaced
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)
    assert sample(adapter, "feedrunner_trades_backfilled_total") >= 50  # two seconds of market, recovered


async def test_one_silent_symbol_is_resubscribed_alone(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, stale_after="1s")
    await streaming(out)
    before = dict(adapter._streams)
    await whole_second()
    sim.inject("stall", duration=1.5, symbol="AAPL")
    await wait_until(lambda: adapter._streams.get(("AAPL", "trades")) != before[("AAPL", "trades")], 5, "resubscribe")
    assert {k: v for k, v in adapter._streams.items() if k[0] != "AAPL"} == {
        k: v for k, v in before.items() if k[0] != "AAPL"
    }
    assert adapter.sessions == 1 and adapter.symbol_breaker("AAPL").failures >= 1
    n = len(out.events)
    await wait_until(lambda: flowing(out, n), 10, "AAPL again")
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)


async def test_unknown_contract_is_quarantined_and_the_others_stream(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, symbols=[*SYMBOLS, "NOSUCH"])
    await streaming(out)
    assert set(adapter.quarantined) == {"NOSUCH"} and "200" in adapter.quarantined["NOSUCH"]
    assert adapter.conn.state is ConnState.DEGRADED
    assert not out.of(Ticker, "NOSUCH") and lines(sim) == (6, 5)


async def test_market_data_permissions_quarantine_the_symbol(run_adapter, sim):
    sim.deny_market_data("MSFT", 354)
    sim.deny_market_data("EUR.USD", 10197)
    adapter, out = await run_adapter(sim.port)
    await wait_until(lambda: len(adapter.quarantined) == 2, 5, "two quarantines")
    assert "354" in adapter.quarantined["MSFT"] and "10197" in adapter.quarantined["EUR.USD"]
    n = len(out.events)
    others = set(SYMBOLS) - {"MSFT", "EUR.USD"}
    await wait_until(lambda: {e.symbol for e in out.events[n:]} == others, 5, "the others")
    assert sample(adapter, "feedrunner_quarantined_symbols") == 2


# -- TWS link and farms --------------------------------------------------------------------------------


async def test_farm_lost_pauses_then_2104_resumes_and_backfills(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, stale_after="1s")
    await streaming(out)
    await whole_second()
    sim.farm_lost(1.5)
    await wait_until(lambda: adapter.conn.state is ConnState.DEGRADED, 2, "DEGRADED on 2103")
    assert "2103" in adapter.conn.reason
    await wait_until(lambda: adapter.conn.state is ConnState.CONNECTED, 3, "CONNECTED on 2104")
    n = len(out.events)
    await wait_until(lambda: flowing(out, n), 5, "data after 2104")
    assert sample(adapter, "feedrunner_stalls_total", channel="trades") == 0  # TWS said why it was quiet
    assert adapter.sessions == 1 and sim.stats["connections"] == 1
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)
    assert sample(adapter, "feedrunner_trades_backfilled_total") >= 50


@pytest.mark.parametrize("data_lost", [True, False], ids=["1101-resubscribe", "1102-keep"])
async def test_link_lost_then_restored(run_adapter, sim, data_lost):
    adapter, out = await run_adapter(sim.port, stale_after="1s")
    await streaming(out)
    before = dict(adapter._streams)
    await whole_second()
    sim.link_lost(1.5, data_lost=data_lost)
    await wait_until(lambda: adapter.conn.state is ConnState.RECONNECTING, 2, "RECONNECTING on 1100")
    assert "1100" in adapter.conn.reason and lines(sim) == (6, 5)
    await wait_until(lambda: adapter.conn.state is ConnState.CONNECTED, 3, "CONNECTED after the link is back")
    n = len(out.events)
    await wait_until(lambda: flowing(out, n), 5, "data after the link is back")
    assert lines(sim) == (6, 5)
    if data_lost:  # TWS dropped every line: all placed again, on new request ids
        assert set(adapter._streams) == set(before) and not set(adapter._streams.values()) & set(before.values())
    else:  # data maintained: the very same lines
        assert adapter._streams == before
    assert adapter.sessions == 1 and sim.stats["connections"] == 1
    assert sample(adapter, "feedrunner_stalls_total", channel="trades") == 0
    await settled(adapter)
    await covered(out, time.time())
    assert_every_print_once(out, sim)


async def test_reload_changes_channels_and_symbols_in_place(run_adapter, sim):
    adapter, out = await run_adapter(sim.port)
    await streaming(out)
    adapter.update(make_venue(sim.port, channels=["ticker"], stale_after="3s"))
    adapter.apply(dict.fromkeys([s for s in SYMBOLS if s != "NVDA"], "websocket"))
    await wait_until(lambda: lines(sim) == (5, 0), 5, "trades lines and NVDA released")
    assert {limit for _, limit in adapter.watchdog._limit.items()} == {3.0}
    n = len(out.events)
    await wait_until(lambda: {e.symbol for e in out.events[n:]} == set(SYMBOLS) - {"NVDA"}, 5, "the rest")
    assert adapter.sessions == 1 and not any(isinstance(e, Trade) for e in out.events[n:])
    assert not adapter._gap_from and not adapter._tapes  # dropped on purpose: nothing to backfill


# -- limits, client ids, shutdown ----------------------------------------------------------------------


async def test_line_limit_101_quarantines_the_extra_symbol(run_adapter):
    async with TwsSim(rate=20.0, max_lines=3) as small:
        stocks = ["AAPL", "MSFT", "AMZN", "NVDA"]
        adapter, out = await run_adapter(small.port, symbols=stocks, channels=["ticker"], market_data_lines=10)
        await wait_until(lambda: len(adapter.quarantined) == 1, 5, "a quarantine")
        ((symbol, reason),) = adapter.quarantined.items()
        assert "101" in reason and "market_data_lines 10" in reason
        n = len(out.events)
        await wait_until(lambda: {e.symbol for e in out.events[n:]} == set(stocks) - {symbol}, 5, "the others")
        assert small.stats["active_lines"] == 3
        await adapter.stop()  # before the sim goes


async def test_trades_ride_rtvolume_when_tick_by_tick_lines_run_out(run_adapter):
    async with TwsSim(seed=3, rate=50.0, max_tick_by_tick=2) as small:
        adapter, out = await run_adapter(small.port)
        await wait_until(lambda: len(adapter._rtv_trades) == 3, 5, "three symbols refused tick-by-tick")
        assert not adapter.quarantined and small.stats["tick_by_tick"] == 2
        await streaming(out)
        await whole_second()
        small.inject("drop")
        n = len(out.events)
        await wait_until(lambda: flowing(out, n) and adapter.sessions == 2, 5, "streaming again")
        await settled(adapter)
        await covered(out, time.time())
        assert_every_print_once(out, small)  # from both sources, across the drop
        for symbol in adapter._rtv_trades:  # RTVolume's clock is the millisecond
            assert any(t.ts_exchange % NS for t in out.of(Trade, symbol) if not t.backfilled)
        await adapter.stop()


async def test_runtime_line_budget_is_never_exceeded(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, symbols=["AAPL", "MSFT"], market_data_lines=4)
    await wait_until(lambda: {e.symbol for e in out.of(Trade)} == {"AAPL", "MSFT"}, 5, "two stocks")
    adapter.apply(dict.fromkeys(["AAPL", "MSFT", "AMZN"], "websocket"))  # a reload asking for more than the budget
    await wait_until(lambda: "AMZN" in adapter.quarantined, 5, "AMZN refused")
    assert "market_data_lines" in adapter.quarantined["AMZN"] and "4" in adapter.quarantined["AMZN"]
    for _ in range(5):
        assert sum(lines(sim)) <= 4
        await asyncio.sleep(0.05)
    assert not out.of(Ticker, "AMZN")


async def test_client_id_in_use_fails_fast_and_retries_with_backoff(run_adapter, sim):
    other = IB()
    await asyncio.wait_for(other.connectAsync("127.0.0.1", sim.port, clientId=11, timeout=3), 5)
    try:
        adapter, out = await run_adapter(sim.port)
        await wait_until(lambda: len(adapter.retries) >= 3, 5, "three refused attempts")
        assert {kind for _, _, kind in adapter.retries} == {"unknown"}
        assert adapter.conn.state is ConnState.RECONNECTING and "326" in adapter.conn.reason
    finally:
        other.disconnect()
    await streaming(out)


async def test_stop_leaves_nothing_running(run_adapter, sim):
    adapter, out = await run_adapter(sim.port, "hybrid")
    await streaming(out)
    sim.inject("drop")
    await wait_until(lambda: adapter.sessions == 2, 5, "a reconnect")
    await adapter.stop()
    assert not adapter._tasks
    await asyncio.sleep(0.1)
    mine = [t for t in asyncio.all_tasks() if t.get_name().startswith("ib-") and not t.done()]
    assert not mine
    assert not adapter.ib.isConnected() and adapter.conn.state is ConnState.DISCONNECTED
    await wait_until(lambda: sim.stats["sockets"] == 0, 2, "the socket closed")
    n = len(out.events)
    await asyncio.sleep(0.2)
    assert len(out.events) == n
