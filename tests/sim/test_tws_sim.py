"""The real ib_async client against the TWS simulator over loopback: ib_async is the judge of fidelity.

Every test bounds its waits, so a protocol mistake that makes ib_async hang fails in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from ib_async import IB, Contract, Forex, Stock, Ticker
from ib_async.objects import TickByTickAllLast, TickByTickBidAsk, TickByTickMidPoint

from feedrunner.sim.faults import Fault
from feedrunner.sim.tws import TwsSim, run_standalone

HOST = "127.0.0.1"
STOCKS = ("AAPL", "MSFT", "AMZN", "GOOGL", "NVDA")


@pytest.fixture
async def sim() -> AsyncIterator[TwsSim]:
    async with TwsSim(rate=50.0) as s:
        yield s


class Client:
    """One ib_async IB plus what its events reported, so tests assert on outcomes, not internals."""

    def __init__(self) -> None:
        self.ib = IB()
        self.errors: list[tuple[int, int, str]] = []
        self.disconnects = 0
        self.api_errors: list[str] = []
        self.ticks: list[tuple[int, Any]] = []  # (conId, TickData | TickByTick*) across packets
        self.ticks_at: dict[int, int] = {}  # error code -> ticks received when it arrived
        self.ib.errorEvent += self._on_error
        self.ib.disconnectedEvent += self._on_disconnect
        self.ib.client.apiError += self.api_errors.append
        self.ib.pendingTickersEvent += self._on_tickers

    def _on_error(self, req_id: int, code: int, text: str, contract: Contract | None) -> None:
        self.errors.append((req_id, code, text))
        self.ticks_at[code] = len(self.ticks)

    def _on_disconnect(self) -> None:
        self.disconnects += 1

    def _on_tickers(self, tickers: set[Ticker]) -> None:
        # ib_async clears ticker.ticks / tickByTicks on every packet; collect them as they come.
        for t in tickers:
            con_id = t.contract.conId if t.contract else 0
            self.ticks += [(con_id, x) for x in (*t.ticks, *t.tickByTicks)]

    def codes(self) -> list[int]:
        return [code for _, code, _ in self.errors]

    async def connect(self, port: int, client_id: int = 1, api_timeout: float = 3.0) -> IB:
        await asyncio.wait_for(self.ib.connectAsync(HOST, port, clientId=client_id, timeout=api_timeout), 5)
        return self.ib

    def tick_count(self, con_id: int | None = None, kind: type | None = None) -> int:
        return sum(
            1 for cid, x in self.ticks if (con_id is None or cid == con_id) and (kind is None or isinstance(x, kind))
        )


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[], Client]]:
    made: list[Client] = []

    def make() -> Client:
        made.append(Client())
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.ib.disconnect()
        await asyncio.sleep(0)


async def until(pred: Callable[[], bool], within: float = 3.0, what: str = "condition") -> None:
    """Poll `pred` on the loop; a bounded wait so a silent sim fails the test instead of hanging it."""
    for _ in range(int(within / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def qualified(ib: IB, *contracts: Contract) -> list[Contract]:
    result = await asyncio.wait_for(ib.qualifyContractsAsync(*contracts), 3)
    assert all(c is not None for c in result), result
    return list(contracts)


# connection


async def test_connect_async_completes_startup_sync(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    assert ib.isConnected()
    assert ib.managedAccounts() == ["DU123456"]
    assert ib.client.serverVersion() == 176
    assert ib.client.getReqId() >= 1  # nextValidId arrived
    assert ib.wrapper.accountValues  # reqAccountUpdates answered, accountDownloadEnd ended the sync
    await until(lambda: {2104, 2106, 2158} <= set(c.codes()), what="farm status messages")
    assert sim.stats["clients"] == 1


async def test_bare_client_handshake_for_data_only_adapters(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    await asyncio.wait_for(c.ib.client.connectAsync(HOST, sim.port, 2, 3.0), 5)  # type: ignore[no-untyped-call]
    assert c.ib.client.isReady()
    assert c.ib.client.getAccounts() == ["DU123456"]
    (aapl,) = await qualified(c.ib, Stock("AAPL", "SMART", "USD"))
    ticker = c.ib.reqMktData(aapl)
    await until(lambda: ticker.bid > 0 and ticker.last > 0, what="first quote")
    assert sim.stats["requests"] < 10  # no startup sync was sent on this path


async def test_qualify_stock_and_forex(sim: TwsSim, clients: Callable[[], Client]) -> None:
    ib = await clients().connect(sim.port)
    aapl, eur = await qualified(ib, Stock("AAPL", "SMART", "USD"), Forex("EURUSD"))
    assert (aapl.conId, aapl.primaryExchange, aapl.exchange) == (265598, "NASDAQ", "SMART")
    assert (eur.conId, eur.secType, eur.exchange, eur.localSymbol) == (
        12087792,
        "CASH",
        "IDEALPRO",
        "EUR.USD",
    )
    (details,) = await asyncio.wait_for(ib.reqContractDetailsAsync(Stock("IBM", "SMART", "USD")), 3)
    assert details.longName == "INTL BUSINESS MACHINES CORP"
    assert details.contract is not None and details.contract.primaryExchange == "NYSE"
    assert details.tradingSessions()


async def test_unknown_contract_is_error_200_and_not_qualified(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    bogus = Stock("NOSUCH", "SMART", "USD")
    assert await asyncio.wait_for(ib.qualifyContractsAsync(bogus), 3) == [None]
    assert bogus.conId == 0
    assert 200 in c.codes()


async def test_contracts_extend_the_catalogue() -> None:
    extra = {"symbol": "ZZZ", "secType": "STK", "conId": 999001, "primaryExchange": "NYSE", "price": 42.0}
    async with TwsSim(contracts=[extra]) as s:
        ib = IB()
        try:
            await asyncio.wait_for(ib.connectAsync(HOST, s.port, clientId=1, timeout=3), 5)
            (zzz,) = await qualified(ib, Stock("ZZZ", "SMART", "USD"))
            assert zzz.conId == 999001
        finally:
            ib.disconnect()


# market data


async def test_mkt_data_five_stocks_and_fx_update(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    contracts = await qualified(ib, *(Stock(s, "SMART", "USD") for s in STOCKS), Forex("EURUSD"))
    tickers = [ib.reqMktData(x, "233") for x in contracts]
    await until(lambda: all(t.bid > 0 and t.ask > 0 for t in tickers), what="first quotes")
    first = [(t.bid, t.ask, t.last) for t in tickers]
    await until(
        lambda: (
            all(t.bidSize > 0 and t.askSize > 0 for t in tickers) and all(c.tick_count(x.conId) > 20 for x in contracts)
        ),
        what="a stream of ticks on every line",
    )
    stocks, fx = tickers[:-1], tickers[-1]
    for t in tickers:
        assert t.bid < t.ask
    for t in stocks:
        assert t.last > 0 and t.volume > 0 and t.rtVolume > 0 and t.vwap > 0
    assert fx.last != fx.last  # IDEALPRO has no prints: last stays NaN, as with real TWS
    await until(
        lambda: all((t.bid, t.ask, t.last) != f for t, f in zip(tickers, first, strict=True)),
        what="every quote to move",
    )
    assert sim.stats["active_lines"] == 6
    for x in contracts:
        assert ib.cancelMktData(x)
    await until(lambda: sim.stats["active_lines"] == 0, what="lines released")


async def test_tick_by_tick_all_last_bid_ask_midpoint(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    aapl, msft, eur = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT"), Forex("EURUSD"))
    ib.reqTickByTickData(aapl, "AllLast")
    ib.reqTickByTickData(msft, "BidAsk")
    ib.reqTickByTickData(eur, "MidPoint")
    await until(
        lambda: (
            c.tick_count(aapl.conId, TickByTickAllLast) >= 5
            and c.tick_count(msft.conId, TickByTickBidAsk) >= 5
            and c.tick_count(eur.conId, TickByTickMidPoint) >= 1
        ),
        what="tick-by-tick streams",
    )
    last = next(x for cid, x in c.ticks if cid == aapl.conId and isinstance(x, TickByTickAllLast))
    assert last.price > 0 and last.size > 0 and last.exchange == "NASDAQ"
    assert sim.stats["tick_by_tick"] == 3
    for x, kind in ((aapl, "AllLast"), (msft, "BidAsk"), (eur, "MidPoint")):
        assert ib.cancelTickByTickData(x, kind)
    await until(lambda: sim.stats["tick_by_tick"] == 0, what="tick-by-tick cancelled")


async def test_snapshot_completes(sim: TwsSim, clients: Callable[[], Client]) -> None:
    ib = await clients().connect(sim.port)
    aapl, eur = await qualified(ib, Stock("AAPL", "SMART", "USD"), Forex("EURUSD"))
    t1, t2 = await asyncio.wait_for(ib.reqTickersAsync(aapl, eur), 3)
    assert t1.bid > 0 and t1.ask > 0 and t1.last > 0 and t1.close > 0
    assert t2.bid > 0 and t2.ask > 0
    assert sim.stats["active_lines"] == 0  # a snapshot holds no line


async def test_market_data_type_is_reported(sim: TwsSim, clients: Callable[[], Client]) -> None:
    ib = await clients().connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqMarketDataType(3)
    ticker = ib.reqMktData(aapl)
    await until(lambda: ticker.marketDataType == 3 and ticker.bid > 0, what="marketDataType 3")


async def test_line_limit_error_101(clients: Callable[[], Client]) -> None:
    async with TwsSim(rate=20.0, max_lines=3) as s:
        c = clients()
        ib = await c.connect(s.port)
        contracts = await qualified(ib, *(Stock(x, "SMART", "USD") for x in ("AAPL", "MSFT", "AMZN", "NVDA")))
        tickers = [ib.reqMktData(x) for x in contracts]
        await until(lambda: 101 in c.codes(), what="error 101")
        (req_id,) = [r for r, code, _ in c.errors if code == 101]
        assert ib.wrapper.reqId2Ticker[req_id] is tickers[3]
        assert s.stats["active_lines"] == 3
        ib.cancelMktData(contracts[0])
        ib.cancelMktData(contracts[3])  # the refused line: TWS forgets it, so no error 300 either
        await until(lambda: s.stats["active_lines"] == 2, what="line released")
        again = ib.reqMktData(contracts[3])
        await until(lambda: again.bid > 0 and s.stats["active_lines"] == 3, what="line reused")
        assert 300 not in c.codes()


async def test_tick_by_tick_limit_error_10190(clients: Callable[[], Client]) -> None:
    async with TwsSim(rate=20.0, max_tick_by_tick=2) as s:
        c = clients()
        ib = await c.connect(s.port)
        contracts = await qualified(ib, *(Stock(x, "SMART", "USD") for x in ("AAPL", "MSFT", "AMZN")))
        for x in contracts:
            ib.reqTickByTickData(x, "AllLast")
        await until(lambda: 10190 in c.codes(), what="error 10190")
        assert s.stats["tick_by_tick"] == 2
        ticker = ib.reqMktData(contracts[2], "233")  # market-data lines are counted apart
        await until(lambda: ticker.rtVolume > 0, what="RTVolume on a market-data line")


async def test_duplicate_client_id_error_326_and_disconnect(sim: TwsSim, clients: Callable[[], Client]) -> None:
    first, second = clients(), clients()
    await first.connect(sim.port, client_id=7)
    # ib_async never sees apiStart, so connectAsync only gives up at its own timeout.
    with pytest.raises(TimeoutError):
        await second.connect(sim.port, client_id=7, api_timeout=1.0)
    assert 326 in second.codes()
    assert any("already in use" in m for m in second.api_errors)
    assert not second.ib.isConnected()
    assert first.ib.isConnected() and first.disconnects == 0
    await until(lambda: sim.stats["clients"] == 1 and sim.stats["sockets"] == 1, what="socket closed")
    await second.connect(sim.port, client_id=8)  # a unique id is fine


# TWS link and farm


@pytest.mark.parametrize("data_lost", [True, False])
async def test_link_lost_then_restored(sim: TwsSim, clients: Callable[[], Client], data_lost: bool) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ticker = ib.reqMktData(aapl)
    await until(lambda: c.tick_count() > 5, what="ticks before the outage")
    sim.link_lost(0.4, data_lost=data_lost)
    await until(lambda: 1100 in c.codes(), what="1100")
    await asyncio.sleep(0.05)  # ticks written before the 1100 may still be in flight
    during = c.tick_count()
    restored = 1101 if data_lost else 1102
    await until(lambda: restored in c.codes(), within=2, what=str(restored))
    assert c.ticks_at[restored] == during  # nothing flowed while the link was down
    assert ib.isConnected() and c.disconnects == 0
    if data_lost:
        assert 1102 not in c.codes()
        assert sim.stats["active_lines"] == 0
        await asyncio.sleep(0.2)
        assert c.tick_count() == during  # dropped server-side: the client must resubscribe
        ib.cancelMktData(aapl)
        ticker = ib.reqMktData(aapl)
        await until(lambda: c.tick_count() > during + 5, what="ticks after resubscribing")
        assert 300 not in c.codes()
    else:
        assert 1101 not in c.codes()
        await until(lambda: c.tick_count() > during + 5, what="ticks resume by themselves")
        # ib_async re-requests the account summary on 1102; the sim must answer it.
        await until(lambda: bool(ib.wrapper.acctSummary), what="account summary after 1102")
    assert ticker.bid > 0


async def test_farm_lost_2103_then_2104(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqMktData(aapl)
    await until(lambda: c.tick_count() > 5, what="ticks")
    sim.farm_lost(0.4)
    await until(lambda: 2103 in c.codes(), what="2103")
    await asyncio.sleep(0.05)  # ticks written before the 2103 may still be in flight
    during = c.tick_count()
    await until(lambda: c.codes()[-1] == 2104, within=2, what="2104")
    assert c.ticks_at[2104] == during
    await until(lambda: c.tick_count() > during + 5, what="ticks after the farm is back")
    assert ib.isConnected() and c.disconnects == 0


# socket faults


@pytest.mark.parametrize("fault", [Fault.DROP, Fault.RESET, Fault.RESTART])
async def test_socket_fault_disconnects_and_reconnect_works(
    sim: TwsSim, clients: Callable[[], Client], fault: Fault
) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    old = ib.reqMktData(aapl)
    await until(lambda: old.bid > 0, what="quote")
    port = sim.port
    sim.inject(fault, duration=0.5)
    await until(lambda: c.disconnects == 1, what="disconnectedEvent")
    assert not ib.isConnected()
    assert old.updateEvent.done()  # ib_async finishes the old tickers' events on disconnect
    assert c.api_errors[-1] == (
        "[Errno 104] Connection reset by peer" if fault is Fault.RESET else "Peer closed connection."
    )
    if fault is Fault.RESTART:
        assert not sim.stats["listening"]
        with pytest.raises(ConnectionRefusedError):
            await c.connect(port)
        await until(lambda: sim.stats["listening"], what="listening again")
    await c.connect(port)  # same IB object, same port, same client id
    assert sim.port == port
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    new = ib.reqMktData(aapl)
    assert new is not old  # wrapper state was reset; subscriptions must be re-made
    await until(lambda: new.bid > 0, what="quote after reconnect")


async def test_stall_keeps_socket_and_answers_requests(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqMktData(aapl)
    await until(lambda: c.tick_count() > 5, what="ticks")
    sim.inject("stall", duration=0.6)
    await asyncio.sleep(0.05)
    during = c.tick_count()
    (msft,) = await qualified(ib, Stock("MSFT", "SMART", "USD"))  # requests still answered
    assert msft.conId == 272093
    assert await asyncio.wait_for(ib.reqCurrentTimeAsync(), 2)
    await asyncio.sleep(0.3)
    assert c.tick_count() == during
    assert ib.isConnected() and c.disconnects == 0
    await until(lambda: c.tick_count() > during + 5, what="ticks after the stall")


async def test_stall_one_symbol(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    aapl, msft = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT", "SMART", "USD"))
    ib.reqMktData(aapl)
    ib.reqMktData(msft)
    await until(lambda: c.tick_count(aapl.conId) > 5 and c.tick_count(msft.conId) > 5, what="ticks")
    sim.inject(Fault.STALL, duration=0.5, symbol="AAPL")
    await asyncio.sleep(0.05)
    a, m = c.tick_count(aapl.conId), c.tick_count(msft.conId)
    await until(lambda: c.tick_count(msft.conId) > m + 10, what="MSFT still ticking")
    assert c.tick_count(aapl.conId) == a


async def test_refuse_new_connections_only(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    sim.inject(Fault.REFUSE, duration=0.4)
    with pytest.raises(ConnectionRefusedError):
        await clients().connect(sim.port, client_id=2)
    assert ib.isConnected()
    assert await asyncio.wait_for(ib.reqCurrentTimeAsync(), 2)
    await until(lambda: sim.stats["listening"], what="listening again")
    await clients().connect(sim.port, client_id=2)


async def test_reject_symbol_makes_contract_unknown(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    sim.inject(Fault.REJECT_SYMBOL, duration=5.0, symbol="AAPL")
    aapl, msft = Stock("AAPL", "SMART", "USD"), Stock("MSFT", "SMART", "USD")
    assert await asyncio.wait_for(ib.qualifyContractsAsync(aapl, msft), 3) == [None, msft]
    assert 200 in c.codes()
    sim.faults.clear()
    assert await asyncio.wait_for(ib.qualifyContractsAsync(aapl), 3) == [aapl]


async def test_malformed_frames_are_survived(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqMktData(aapl)
    await until(lambda: c.tick_count() > 5, what="ticks")
    sim.inject(Fault.MALFORMED, duration=0.3)
    await asyncio.sleep(0.35)
    n = c.tick_count()
    await until(lambda: c.tick_count() > n + 5, what="ticks after junk frames")
    assert ib.isConnected()


# history and permissions


async def test_historical_ticks_serve_the_tape_including_time_nobody_was_subscribed(
    sim: TwsSim, clients: Callable[[], Client]
) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqTickByTickData(aapl, "AllLast")
    await until(lambda: c.tick_count(aapl.conId, TickByTickAllLast) >= 5, what="prints")
    assert ib.cancelTickByTickData(aapl, "AllLast")
    start = sim.prints("AAPL")[0][0] // 1000
    streamed_until = sim.prints("AAPL")[-1][0]
    await asyncio.sleep(1.2)  # the market keeps trading without a subscriber
    assert sim.prints("AAPL")[-1][0] - streamed_until >= 1000
    ticks = await asyncio.wait_for(
        ib.reqHistoricalTicksAsync(aapl, datetime.fromtimestamp(start, UTC), "", 1000, "TRADES", False), 3
    )
    tape = [(ms // 1000, p, float(n)) for ms, p, n in sim.prints("AAPL")]
    assert [(int(t.time.timestamp()), t.price, t.size) for t in ticks] == tape[: len(ticks)]
    assert len(ticks) >= 60 and ticks[0].exchange == "NASDAQ"
    # A page of 10 still ends on a whole second, so the next page starts at the following one.
    page = await asyncio.wait_for(
        ib.reqHistoricalTicksAsync(aapl, datetime.fromtimestamp(start, UTC), "", 10, "TRADES", False), 3
    )
    last = int(page[-1].time.timestamp())
    assert len(page) >= 10 and sum(1 for sec, _, _ in tape if sec <= last) == len(page)
    before = await asyncio.wait_for(
        ib.reqHistoricalTicksAsync(aapl, "", datetime.fromtimestamp(start + 1, UTC), 5, "TRADES", False), 3
    )
    assert before and all(int(t.time.timestamp()) <= start + 1 for t in before)
    assert sim.stats["history_requests"] == 3


async def test_historical_ticks_refusals(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    now = datetime.now(UTC)
    assert await asyncio.wait_for(ib.reqHistoricalTicksAsync(aapl, now, "", 10, "MIDPOINT", False), 3) == []
    assert await asyncio.wait_for(ib.reqHistoricalTicksAsync(aapl, now, now, 10, "TRADES", False), 3) == []
    bogus = Stock("NOSUCH", "SMART", "USD")
    bogus.conId = 1
    assert await asyncio.wait_for(ib.reqHistoricalTicksAsync(bogus, now, "", 10, "TRADES", False), 3) == []
    sim.history_unavailable(0.3)
    assert await asyncio.wait_for(ib.reqHistoricalTicksAsync(aapl, now, "", 10, "TRADES", False), 3) == []
    assert [code for code in c.codes() if code < 2000] == [162, 162, 200, 162]
    await asyncio.sleep(0.35)
    assert await asyncio.wait_for(ib.reqHistoricalTicksAsync(aapl, now, "", 10, "TRADES", False), 3)


async def test_market_data_permissions_refuse_lines(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    aapl, eur = await qualified(ib, Stock("AAPL", "SMART", "USD"), Forex("EURUSD"))
    sim.deny_market_data("AAPL", 354)
    sim.deny_market_data("EUR.USD", 10197)
    ib.reqMktData(aapl)
    ib.reqTickByTickData(aapl, "AllLast")
    ib.reqMktData(eur)
    await until(lambda: c.codes().count(354) == 2 and 10197 in c.codes(), what="permission errors")
    assert sim.stats["active_lines"] == 0 and sim.stats["tick_by_tick"] == 0
    with pytest.raises(ValueError):
        sim.deny_market_data("AAPL", 99999)
    sim.allow_market_data("AAPL")
    ib.cancelMktData(aapl)
    ticker = ib.reqMktData(aapl)
    await until(lambda: ticker.bid > 0 and sim.stats["active_lines"] == 1, what="a line once allowed")


async def test_quote_is_refreshed_whole_when_data_resumes(sim: TwsSim, clients: Callable[[], Client]) -> None:
    c = clients()
    ib = await c.connect(sim.port)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ib.reqMktData(aapl)
    await until(lambda: c.tick_count() > 20, what="ticks")
    sim.farm_lost(0.3)
    await until(lambda: 2104 in c.codes(), what="2104")
    n = len(c.ticks)
    await until(lambda: {9, 14} <= {x.tickType for _, x in c.ticks[n:]}, what="close and open sent again")


async def test_trading_stops_keep_trading_seconds_after_the_last_subscriber() -> None:
    async with TwsSim(rate=50.0, keep_trading=0.3) as s:
        ib = IB()
        try:
            await asyncio.wait_for(ib.connectAsync(HOST, s.port, clientId=1, timeout=3), 5)
            (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
            ib.reqMktData(aapl)
            await until(lambda: len(s.prints("AAPL")) > 10, what="prints")
            ib.cancelMktData(aapl)
            await until(lambda: s.stats["active_lines"] == 0, what="cancelled")
            n = len(s.prints("AAPL"))
            await until(lambda: s.stats["trading"] == 0, what="trading to stop")
            assert len(s.prints("AAPL")) > n  # it traded on for a while
            m = len(s.prints("AAPL"))
            await asyncio.sleep(0.2)
            assert len(s.prints("AAPL")) == m
        finally:
            ib.disconnect()


# misc


async def test_same_seed_same_tape() -> None:
    a, b, other = TwsSim(seed=7), TwsSim(seed=7), TwsSim(seed=8)
    walk = [[(x.market.trade("AAPL", 0)[0].price) for _ in range(50)] for x in (a, b, other)]
    assert walk[0] == walk[1] != walk[2]


async def test_run_standalone_prints_venue(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(run_standalone(HOST, 0, 1, 5.0))
    out = ""
    try:
        for _ in range(200):
            out += capsys.readouterr().out
            if "port:" in out:
                break
            await asyncio.sleep(0.01)
        port = int(out.split("port:")[1].split()[0])
        ib = IB()
        try:
            await asyncio.wait_for(ib.connectAsync(HOST, port, clientId=1, timeout=3), 5)
            assert ib.isConnected()
        finally:
            ib.disconnect()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
