"""The real futu-api against the OpenD simulator over loopback, through FutuAdapter: outcomes, not calls.

Every adapter is stopped by the fixture, which also checks that stop() is prompt and that no thread the
adapter (or futu-api on its behalf) started is still alive afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import Collector, sample, venue_from, wait_until

from feedrunner.adapters.futu import FutuAdapter, futu
from feedrunner.events import Book, Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import BreakerState, ConnState
from feedrunner.sim.opend import OpenDSim
from feedrunner.spec import Venue

CODES = ["HK.00700", "HK.09988", "US.AAPL", "US.TSLA"]
ALL_SUBS = sorted((c, t) for c in CODES for t in ("QUOTE", "TICKER", "ORDER_BOOK"))

# futu-api's network thread calls Thread.setDaemon(), deprecated since 3.10; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")


def make_venue(port: int, **settings: Any) -> Venue:
    venue = {
        "adapter": "futu",
        "host": "127.0.0.1",
        "port": port,
        "symbols": CODES,
        "channels": ["ticker", "trades", "book"],
        "stale_after": {"default": "2s", "trades": "1s"},
        "poll_interval": "200ms",
        "book_depth": 5,
        "min_subscription": "1s",
        "backoff": {"base": "100ms", "cap": "1s", "jitter": 0, "max_attempts": 50},
        "circuit_breaker": {"failure_threshold": 3, "recovery_timeout": "2s"},
    }
    venue.update(settings)
    return venue_from("futu", venue)


def leftover_threads(baseline: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since `baseline` and still alive, other than futu-api's process-wide network thread
    (one per process, by design) and the loop's idle to_thread workers."""
    return [
        t
        for t in threading.enumerate()
        if t not in baseline
        and t.is_alive()
        and not t.name.startswith("asyncio")
        and not t.name.endswith("(_loop)")  # futu's NetManager singleton
    ]


async def stop_checked(adapter: FutuAdapter, baseline: set[threading.Thread]) -> None:
    started = time.monotonic()
    await adapter.stop()
    assert time.monotonic() - started < 2.0, "stop() must return promptly"
    assert adapter.ctx is None and adapter.conn.state is ConnState.DISCONNECTED
    await wait_until(lambda: not leftover_threads(baseline), 2.0, "futu-api threads to end after stop()")
    assert not [t for t in leftover_threads(baseline) if not t.daemon]


@pytest.fixture
async def sim() -> AsyncIterator[OpenDSim]:
    async with OpenDSim(seed=7, rate=20.0, min_sub_seconds=1.0, keepalive_interval=1) as s:
        yield s


@pytest.fixture
async def run_adapter(sim: OpenDSim) -> AsyncIterator[Callable[..., Any]]:
    started: list[FutuAdapter] = []
    baseline = set(threading.enumerate())

    async def start(transport: str = "websocket", **settings: Any) -> tuple[FutuAdapter, Collector]:
        out = Collector()
        adapter = FutuAdapter(make_venue(sim.port, transport=transport, **settings), out, Metrics())
        started.append(adapter)
        await adapter.start()
        adapter.apply(dict.fromkeys(adapter.venue.symbols, transport))
        return adapter, out

    yield start
    for adapter in started:
        await stop_checked(adapter, baseline)


async def every_kind_for(out: Collector, codes: list[str], since: int = 0, n: int = 1, timeout: float = 8) -> None:
    await wait_until(
        lambda: all(len(out.of(k, c, since)) >= n for k in (Trade, Ticker, Book) for c in codes),
        timeout,
        f"{n} trade(s), ticker(s) and book(s) for {', '.join(codes)}",
    )


# --- transports --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling", "hybrid"])
async def test_hk_and_us_stream_quotes_ticks_and_books(run_adapter, sim, transport):
    adapter, out = await run_adapter(transport)
    await every_kind_for(out, CODES, n=3)
    await wait_until(lambda: all(len(out.of(Trade, c)) >= 15 for c in CODES), 8, "15 trades per code")
    out.assert_contiguous()
    lots = {"HK.00700": 100, "HK.09988": 100, "US.AAPL": 1, "US.TSLA": 1}
    for t in out.of(Trade):
        assert t.side in ("buy", "sell") and t.price > 0 and t.amount % lots[t.symbol] == 0
        assert t.ts_exchange and abs(t.ts_received - t.ts_exchange) < 5e9
    for b in out.of(Book):
        assert 1 <= len(b.bids) <= 5 and len(b.asks) <= 5 and b.bids[0][0] < b.asks[0][0]
        assert [p for p, _ in b.bids] == sorted((p for p, _ in b.bids), reverse=True) and b.ts_exchange
    for k in out.of(Ticker):
        assert k.last and k.volume is not None and k.ts_exchange  # volume is 0 before the first print
    # Bid/ask come from the snapshot when polled, and from the latest streamed book otherwise.
    assert all(k.bid < k.ask for k in out.of(Ticker)[-8:])
    expected = {"websocket": {"websocket"}, "polling": {"polling"}, "hybrid": {"websocket", "polling"}}[transport]
    assert {e.transport for e in out.of(Trade)} <= expected
    assert {e.transport for e in out.events if not isinstance(e, Trade)} == (
        {"polling"} if transport == "polling" else {"websocket"}
    )
    # Polling holds the same subscriptions (OpenD serves tickers and books only for subscribed codes),
    # with push off.
    assert list(sim.subscriptions().values()) == [ALL_SUBS]
    if transport == "polling":
        assert sim.stats["pushes_sent"] == 0
    assert adapter.conn.state is ConnState.CONNECTED and adapter.status()["symbols"] == dict.fromkeys(CODES, transport)


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "restart", "stall", "desync"])
async def test_recovers_with_subscriptions_restored_and_every_trade_once(run_adapter, sim, fault):
    adapter, out = await run_adapter("websocket")
    await every_kind_for(out, CODES, n=3)
    conn_before = set(sim.subscriptions())
    n = len(out.events)
    injected = time.monotonic()
    if fault == "desync":
        sim.malformed_kind = "desync"  # futu-api loses the framing: silence until the context is renewed
        sim.inject("malformed", duration=0.3)
    else:
        sim.inject(fault, duration=2.0 if fault == "stall" else 1.0)  # a stall outlasts stale_after
    await every_kind_for(out, CODES, since=n + 40 if fault != "stall" else n, n=5, timeout=12)
    recovered = time.monotonic() - injected
    # Streaming is back for every code, on a connection that holds every subscription again.
    await wait_until(lambda: list(sim.subscriptions().values()) == [ALL_SUBS], 5, "subscriptions restored")
    # A new connection every time: futu-api's own reconnect, or our watchdog renewing a silent context.
    assert set(sim.subscriptions()) != conn_before and sample(adapter, "feedrunner_reconnects_total") >= 1
    if fault in ("stall", "desync"):
        assert sample(adapter, "feedrunner_stalls_total", channel="trades") >= 1
    await wait_until(lambda: all(len(out.of(Trade, c, n)) >= 20 for c in CODES), 8, "trades after the fault")
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0
    assert adapter.conn.state is ConnState.CONNECTED
    print(f"\n{fault}: every code streaming again {recovered:.2f}s after the fault; retries {list(adapter.retries)}")


async def test_reconnects_follow_our_backoff_not_futus_six_seconds(run_adapter, sim):
    adapter, out = await run_adapter("websocket", circuit_breaker={"failure_threshold": 100})
    await every_kind_for(out, CODES)
    sim.inject("refuse", duration=1.2)
    sim.inject("drop")
    await wait_until(lambda: len(adapter.retries) >= 4, 5, "four reconnect attempts")
    assert adapter.conn.state is ConnState.RECONNECTING
    delays = [d for _, d, _ in list(adapter.retries)[:4]]
    assert delays == [0.1, 0.2, 0.4, 0.8]  # base 100ms, factor 2, no jitter
    n = len(out.events)
    await every_kind_for(out, CODES, since=n, n=5, timeout=8)
    out.assert_contiguous()
    assert adapter.conn.state is ConnState.CONNECTED and sample(adapter, "feedrunner_trades_lost_total") == 0
    assert sample(adapter, "feedrunner_reconnects_total") == len(adapter.retries)


async def test_gap_is_backfilled_once_in_order(run_adapter, sim):
    adapter, out = await run_adapter("websocket", symbols=["HK.00700", "US.AAPL"])
    await every_kind_for(out, ["HK.00700", "US.AAPL"], n=3)
    sim.inject("gap", duration=0.5)  # some prints are never pushed; OpenD's ticker history has them
    await wait_until(lambda: sample(adapter, "feedrunner_trades_backfilled_total") >= 2, 5, "backfill")
    await asyncio.sleep(0.3)
    out.assert_contiguous()
    backfilled = [t for t in out.of(Trade) if t.backfilled]
    assert backfilled and all(t.transport == "polling" for t in backfilled)
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_trades_beyond_opends_history_are_counted_lost(sim):
    baseline = set(threading.enumerate())
    out = Collector()
    venue = make_venue(sim.port, symbols=["HK.00700"], stale_after="10s")
    adapter = FutuAdapter(venue, out, Metrics())
    await adapter.start()
    adapter.apply({"HK.00700": "websocket"})
    try:
        await wait_until(lambda: len(out.of(Trade)) >= 5, 8, "trades")
        sim.inject("stall", duration=1.0)  # the market trades on, fast, while nothing is pushed
        sim.set_rate(3000.0)
        await asyncio.sleep(0.8)
        sim.set_rate(20.0)
        await wait_until(lambda: sample(adapter, "feedrunner_trades_lost_total") > 0, 5, "the loss to be counted")
        await asyncio.sleep(0.3)
        ids = out.trade_ids()["HK.00700"]
        assert ids == sorted(set(ids))  # once each, in order
        holes = ids[-1] - ids[0] + 1 - len(ids)
        assert holes == sample(adapter, "feedrunner_trades_lost_total") > 0  # exactly what is missing
        assert 900 <= sample(adapter, "feedrunner_trades_backfilled_total") <= 1000  # OpenD keeps 1000
    finally:
        await stop_checked(adapter, baseline)


async def test_opends_quote_link_loss_is_surfaced(run_adapter, sim):
    adapter, out = await run_adapter("websocket", symbols=["HK.00700"])
    await every_kind_for(out, ["HK.00700"])
    sim.inject("link_lost", duration=1.0)
    await wait_until(lambda: adapter.conn.state is ConnState.DEGRADED, 3, "degraded")
    assert "quote servers" in adapter.conn.reason
    await wait_until(lambda: adapter.conn.state is ConnState.CONNECTED, 5, "connected again")
    n = len(out.events)
    await every_kind_for(out, ["HK.00700"], since=n, n=3)
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


async def test_breaker_falls_back_to_polling_and_returns(run_adapter, sim):
    adapter, out = await run_adapter(
        "websocket",
        symbols=["HK.00700", "US.AAPL"],
        stale_after="500ms",
        circuit_breaker={"failure_threshold": 2, "recovery_timeout": "1500ms"},
    )
    await every_kind_for(out, ["HK.00700", "US.AAPL"])
    sim.inject("stall", duration=3.0)  # pushes stop; OpenD still answers queries
    await wait_until(lambda: adapter.breaker.state is BreakerState.OPEN, 5, "the breaker to open")
    n = len(out.events)
    await wait_until(lambda: {e.transport for e in out.events[n:]} == {"polling"}, 3, "polling fallback")
    assert adapter.conn.state is ConnState.DEGRADED
    await wait_until(lambda: adapter.breaker.state is BreakerState.CLOSED, 10, "a successful half-open probe")
    n = len(out.events)
    await wait_until(lambda: sum(e.transport == "websocket" for e in out.events[n:]) > 20, 5, "streaming again")
    assert adapter.status()["symbols"] == {"HK.00700": "websocket", "US.AAPL": "websocket"}
    out.assert_contiguous()
    assert sample(adapter, "feedrunner_trades_lost_total") == 0


# --- Futu's rules ------------------------------------------------------------------------------------


async def test_unknown_code_is_quarantined_and_the_others_stream(run_adapter):
    adapter, out = await run_adapter("websocket", symbols=[*CODES, "HK.99999"])
    await every_kind_for(out, CODES)
    await wait_until(lambda: "HK.99999" in adapter.quarantined, 3, "quarantine")
    assert set(adapter.quarantined) == {"HK.99999"} and not out.of(Trade, "HK.99999")
    assert adapter.conn.state is ConnState.DEGRADED
    assert sample(adapter, "feedrunner_quarantined_symbols") == 1


async def test_code_rejected_midstream_is_quarantined_alone(run_adapter, sim):
    adapter, out = await run_adapter("websocket", symbols=["HK.00700", "US.AAPL"])
    await every_kind_for(out, ["HK.00700", "US.AAPL"])
    sim.inject("reject_symbol", duration=30, symbol="US.AAPL")
    await wait_until(lambda: "US.AAPL" in adapter.quarantined, 5, "quarantine")
    n = len(out.events)
    await every_kind_for(out, ["HK.00700"], since=n, n=5)
    assert {e.symbol for e in out.events[n + 5 :]} == {"HK.00700"}
    assert adapter.breaker.state is BreakerState.CLOSED  # one code's silence is not the venue's


async def test_reload_within_the_minimum_hold_is_deferred_and_the_quota_never_exceeded():
    baseline = set(threading.enumerate())
    async with OpenDSim(seed=3, rate=20.0, quota=6, min_sub_seconds=1.5) as sim:
        out = Collector()
        venue = make_venue(sim.port, symbols=["HK.00700", "US.AAPL"], quota=6, min_subscription="1500ms")
        adapter = FutuAdapter(venue, out, Metrics())
        await adapter.start()
        adapter.apply({"HK.00700": "websocket", "US.AAPL": "websocket"})
        try:
            await every_kind_for(out, ["HK.00700", "US.AAPL"])
            adapter.apply({"HK.00700": "websocket", "HK.09988": "websocket"})  # a reload swaps US.AAPL out
            await wait_until(lambda: adapter.status()["deferred_unsubscribes"], 2, "the unsubscribe deferred")
            assert adapter.status()["waiting_for_quota"] == ["HK.09988"]  # the quota is still held
            held = next(iter(sim.subscriptions().values()))
            assert {c for c, _ in held} == {"HK.00700", "US.AAPL"}
            await wait_until(lambda: out.of(Trade, "HK.09988"), 4, "HK.09988 to stream once US.AAPL is released")
            held = next(iter(sim.subscriptions().values()))
            assert {c for c, _ in held} == {"HK.00700", "HK.09988"} and len(held) == 6
            assert not adapter.status()["deferred_unsubscribes"] and not adapter.status()["waiting_for_quota"]
            # OpenD never had to refuse anything: no unsubscribe too early, no subscription over quota.
            assert sample(adapter, "feedrunner_errors_total", kind="unknown") == 0
            n = len(out.events)
            await every_kind_for(out, ["HK.00700", "HK.09988"], since=n, n=3)
            assert "US.AAPL" not in {e.symbol for e in out.events[n:]}
            assert adapter.conn.state is ConnState.CONNECTED
        finally:
            await stop_checked(adapter, baseline)


async def test_switch_to_polling_needs_no_unsubscribe_so_it_is_immediate(sim, run_adapter):
    sim.min_sub_seconds = 60.0  # OpenD would refuse any unsubscribe for the whole test
    adapter, out = await run_adapter("websocket", symbols=["HK.00700", "US.AAPL"], min_subscription="1m")
    await every_kind_for(out, ["HK.00700", "US.AAPL"])
    held = sim.subscriptions()
    adapter.apply({"HK.00700": "polling", "US.AAPL": "polling"})  # a rollback, seconds after subscribing
    switched = time.monotonic()
    await wait_until(lambda: out.events[-1].transport == "polling", 2, "polling")
    n = len(out.events)
    await every_kind_for(out, ["HK.00700", "US.AAPL"], since=n, n=2)
    assert {e.transport for e in out.events[n:]} == {"polling"} and time.monotonic() - switched < 3
    assert sim.subscriptions() == held  # same connection, same subscriptions, push off
    pushed = sim.stats["pushes_sent"]
    await asyncio.sleep(0.4)
    assert sim.stats["pushes_sent"] == pushed
    adapter.apply({"HK.00700": "websocket", "US.AAPL": "websocket"})  # and promoted again
    n = len(out.events)
    await wait_until(lambda: sum(e.transport == "websocket" for e in out.events[n:]) > 20, 3, "streaming")
    out.assert_contiguous()  # one tape across both switches
    assert sample(adapter, "feedrunner_errors_total", kind="unknown") == 0


# --- lifecycle ---------------------------------------------------------------------------------------


async def test_stop_while_reconnecting_is_prompt_and_leaves_no_thread(sim):
    baseline = set(threading.enumerate())
    adapter = FutuAdapter(
        make_venue(sim.port, backoff={"base": "5s", "cap": "5s", "jitter": 0}), Collector(), Metrics()
    )
    await adapter.start()
    adapter.apply(dict.fromkeys(CODES, "websocket"))
    await wait_until(lambda: adapter.conn.state is ConnState.CONNECTED, 5, "connected")
    sim.inject("refuse", duration=10)
    sim.inject("drop")
    await wait_until(lambda: len(adapter.retries) == 1, 3, "a reconnect scheduled 5 s out")
    await stop_checked(adapter, baseline)


async def test_unreachable_opend_is_retried_with_backoff_then_given_up():
    baseline = set(threading.enumerate())
    async with OpenDSim() as probe:
        port = probe.port  # a port that was just freed: connections are refused
    backoff = {"base": "50ms", "cap": "200ms", "jitter": 0, "max_attempts": 4}
    adapter = FutuAdapter(make_venue(port, backoff=backoff), Collector(), Metrics())
    await adapter.start()
    adapter.apply(dict.fromkeys(CODES, "websocket"))
    await wait_until(lambda: len(adapter.retries) >= 2, 3, "connect attempts")
    assert adapter.conn.state is ConnState.RECONNECTING and "cannot reach OpenD" in adapter.conn.reason
    await wait_until(lambda: adapter.conn.state is ConnState.FAILED, 3, "the venue to give up")
    assert "gave up after 4 attempts" in adapter.conn.reason
    await asyncio.sleep(0.5)
    assert len(adapter.retries) == 4  # no attempt after giving up
    await stop_checked(adapter, baseline)


def test_import_leaves_the_process_alone():
    assert signal.getsignal(signal.SIGINT) is not getattr(futu, "quit_handler", None)
    from futu.common.ft_logger import logger as ftlog

    assert not isinstance(ftlog.fileHandler, logging.FileHandler)  # no log file under $HOME
    assert ftlog.console_level > logging.CRITICAL  # nothing on stdout, which a sink may own
