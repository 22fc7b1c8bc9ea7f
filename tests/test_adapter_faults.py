"""Faults that must neither hang nor hide, for every adapter: a venue that renumbers its trades after a restart,
a backfill request that never returns, a close the venue never answers, a restart after `kill -9`.

The rules are unit-tested as pure logic; each fault then runs with the real client against its simulator (or,
for the close, a tiny websocket server written to misbehave) over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from helpers import Collector, sample, venue_from, wait_until
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

from feedrunner.adapters import ib as ib_adapter
from feedrunner.adapters.base import Adapter, TradeContinuity
from feedrunner.adapters.ccxt import CcxtAdapter
from feedrunner.adapters.futu import FutuAdapter
from feedrunner.adapters.ib import IbAdapter
from feedrunner.events import Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import SEQUENCE_RESET_AFTER, Seq, sequence_step
from feedrunner.sim.binance import BinanceSim
from feedrunner.sim.opend import OpenDSim
from feedrunner.sim.tws import TwsSim

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # futu-api's, not ours

FAST = {"backoff": {"base": "100ms", "cap": "1s", "jitter": 0, "max_attempts": 50}}


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="INFO")
    yield lines
    logger.remove(sink)


def ccxt_venue(endpoints: dict[str, str], **settings: Any) -> Any:
    return venue_from(
        "binance",
        {
            "adapter": "ccxt",
            "exchange": "binance",
            "symbols": ["BTC/USDT"],
            "channels": ["trades"],
            "endpoints": endpoints,
            "stale_after": "3s",
            "poll_interval": "200ms",
            **FAST,
            **settings,
        },
    )


@contextlib.asynccontextmanager
async def running(adapter: Adapter, transport: str = "websocket") -> AsyncIterator[None]:
    await adapter.start()
    adapter.apply(dict.fromkeys(adapter.venue.symbols, transport))
    try:
        yield
    finally:
        await adapter.stop()


def trade(symbol: str, tid: int, ts: int | None) -> Trade:
    return Trade("v", symbol, ts, 0, "websocket", str(tid), 1.0, 1.0, None)


# -- the rule: duplicate or renumbered ----------------------------------------------------------------


@given(st.integers(0, 10**9), st.integers(1, 10**6), st.booleans(), st.none() | st.integers(1, 10**6))
def test_an_id_above_the_last_is_always_new(last, ahead, armed, ts):
    assert sequence_step(last, last + ahead, armed=armed, last_ts=ts, ts=ts) is Seq.NEXT


@given(
    st.integers(0, 10**9), st.integers(0, 10**6), st.booleans(), st.integers(10**6, 10**12), st.integers(0, 10**6 - 1)
)
def test_a_trade_no_newer_than_the_last_delivered_is_a_repeat_however_far_back(last, back, armed, last_ts, older):
    """A repeat carries the venue time it had the first time: it can never be newer than the last delivered."""
    assert sequence_step(last, last - back, armed=armed, last_ts=last_ts, ts=last_ts - older) is Seq.DUPLICATE


@given(st.integers(0, 10**9), st.integers(1, 10**6), st.none() | st.integers(1, 10**6))
def test_an_id_that_goes_back_right_after_a_reconnect_is_a_reset(last, back, newer):
    last_ts = None if newer is None else 10**12
    ts = None if newer is None else 10**12 + newer
    assert sequence_step(last, last - back, armed=True, last_ts=last_ts, ts=ts) is Seq.RESET


@given(st.integers(10**6, 10**9), st.integers(1, 10**5))
def test_without_a_reconnect_only_a_long_way_back_is_a_reset(last, back):
    got = sequence_step(last, last - back, armed=False)
    assert got is (Seq.RESET if back > SEQUENCE_RESET_AFTER else Seq.DUPLICATE)


def test_the_same_id_again_is_a_repeat_even_right_after_a_reconnect():
    assert sequence_step(500, 500, armed=True) is Seq.DUPLICATE


def test_continuity_rebaselines_on_a_reset_and_keeps_counting_gaps_and_repeats():
    resets: list[tuple[str, int, int]] = []
    repeats: list[str] = []
    c = TradeContinuity(True, on_reset=lambda *a: resets.append(a), on_duplicate=repeats.append)
    assert c.check(trade("X", 100, 1_000)) == (True, 0)
    assert c.check(trade("X", 103, 1_003)) == (True, 2)  # a gap of two
    assert c.check(trade("X", 102, 1_002)) == (False, 0)  # a late repeat
    c.arm(["X", "Y"])  # reconnected; Y has no baseline, so nothing to arm
    assert c.armed == {"X"}
    assert c.check(trade("X", 103, 1_003)) == (False, 0)  # the venue replays its last print: still a repeat
    assert c.check(trade("X", 7, 5_000)) == (True, 0)  # renumbered: new, nothing missing before it
    assert c.check(trade("X", 9, 5_002)) == (True, 1)  # and gaps count from the new baseline
    assert c.check(trade("X", 8, 5_001)) == (False, 0)  # no longer armed: a small step back is a repeat
    assert resets == [("X", 103, 7)] and repeats == ["X", "X", "X"]
    c.seed({"X": 50})  # a restart from a checkpoint counts as a reconnect
    assert c.check(trade("X", 10, 6_000)) == (True, 0) and resets[-1] == ("X", 50, 10)


# -- A: trade ids that go back after a restart --------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_binance_restarting_with_renumbered_ids_keeps_delivering(transport, logs):
    async with BinanceSim(["BTC/USDT"], seed=5, rate=40) as sim:
        out = Collector()
        adapter = CcxtAdapter(ccxt_venue(sim.endpoints, transport=transport), out, Metrics())
        async with running(adapter, transport):
            await wait_until(lambda: len(out.of(Trade)) >= 20, 10, "trades")
            last = sim.last_trade_id("BTC/USDT")
            assert last > 1000
            sim.inject("restart", duration=0.5, renumber=100)  # the venue comes back numbering from 100
            await wait_until(lambda: sum(int(t.id) < 1000 for t in out.of(Trade)) >= 40, 15, "renumbered trades")
            await asyncio.sleep(0.5)
            ids = [int(t.id) for t in out.of(Trade)]
            renumbered = [n for n in ids if n < 1000]
            assert renumbered == list(range(renumbered[0], renumbered[0] + len(renumbered)))  # in order, once
            assert sample(adapter, "feedrunner_sequence_resets_total") == 1
            assert sample(adapter, "feedrunner_trades_lost_total") == 0
            (line,) = [m for m in logs if "went back" in m]
            delivered_before = max(n for n in ids if n >= 1000)
            assert line.startswith("WARNING") and "binance BTC/USDT" in line
            assert f"from {delivered_before} to {renumbered[0]}" in line


async def test_opend_restarting_with_renumbered_sequences_keeps_delivering(logs):
    async with OpenDSim(seed=7, rate=20.0, min_sub_seconds=1.0, keepalive_interval=1) as sim:
        out = Collector()
        venue = venue_from(
            "futu",
            {
                "adapter": "futu",
                "host": "127.0.0.1",
                "port": sim.port,
                "symbols": ["HK.00700"],
                "channels": ["trades"],
                "stale_after": "2s",
                "min_subscription": "1s",
                **FAST,
            },
        )
        adapter = FutuAdapter(venue, out, Metrics())
        async with running(adapter):
            await wait_until(lambda: len(out.of(Trade)) >= 10, 10, "trades")
            sim.inject("restart", duration=1.0, renumber=5)
            await wait_until(lambda: sum(int(t.id) < 1000 for t in out.of(Trade)) >= 20, 15, "renumbered trades")
            ids = [int(t.id) for t in out.of(Trade)]
            renumbered = [n for n in ids if n < 1000]
            assert renumbered == list(range(renumbered[0], renumbered[0] + len(renumbered)))
            assert sample(adapter, "feedrunner_sequence_resets_total") == 1
            (line,) = [m for m in logs if "went back" in m]
            assert f"futu HK.00700: trade id went back from {max(ids)} to {renumbered[0]}" in line


# -- B: a backfill request that never returns -------------------------------------------------------


async def test_ib_history_request_that_never_answers_is_reported_for_its_symbol(monkeypatch, logs):
    monkeypatch.setattr(ib_adapter, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(ib_adapter, "HISTORY_ATTEMPTS", 2)
    async with TwsSim(seed=3, rate=50.0) as sim:
        out = Collector()
        venue = venue_from(
            "ib",
            {
                "adapter": "ib",
                "host": "127.0.0.1",
                "port": sim.port,
                "client_id": 12,
                "symbols": ["AAPL", "MSFT"],
                "channels": ["trades"],
                "stale_after": "3s",
                **FAST,
            },
        )
        adapter = IbAdapter(venue, out, Metrics())
        async with running(adapter):
            await wait_until(lambda: {t.symbol for t in out.of(Trade)} == {"AAPL", "MSFT"}, 10, "trades")
            sim.history_unanswered("AAPL", 60.0)
            sim.inject("restart", duration=0.5)  # both symbols miss trades: both backfill from history
            await wait_until(
                lambda: sample(adapter, "feedrunner_backfill_failures_total", reason="timeout") >= 2, 15, "2 timeouts"
            )
            await wait_until(lambda: not adapter.status()["backfilling"], 10, "the backfills to end")
            failed = [m for m in logs if "backfill request failed" in m]
            assert len(failed) >= 2 and all("venue ib AAPL: backfill request failed (timeout)" in m for m in failed)
            assert [m for m in logs if m.startswith("ERROR") and "AAPL: trades from" in m]  # gave up, said so
            assert any(t.backfilled and t.symbol == "MSFT" for t in out.of(Trade))  # the other symbol recovered
            assert not any(t.backfilled and t.symbol == "AAPL" for t in out.of(Trade))


# -- C: a close the venue never answers ------------------------------------------------------------


class StubbornVenue:
    """A Binance-style websocket that streams trades and, once asked to close, keeps streaming and never
    answers the close frame (an aiohttp server in graceful shutdown behaves so for about a minute)."""

    def __init__(self) -> None:
        self.open = 0
        self.closes_asked = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> StubbornVenue:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        self.open += 1
        streams: list[str] = []
        pusher = asyncio.ensure_future(self._push(ws, streams))
        try:
            async for msg in ws:  # ends at the client's close frame, which is never answered
                if msg.type is WSMsgType.TEXT:
                    req = json.loads(msg.data)
                    streams += req.get("params", [])
                    await ws.send_str(json.dumps({"result": None, "id": req["id"]}))
            self.closes_asked += 1
            await pusher  # until the client drops the socket
        finally:
            pusher.cancel()
            self.open -= 1
        return ws

    @staticmethod
    async def _push(ws: web.WebSocketResponse, streams: list[str]) -> None:
        tid = 0
        while True:
            await asyncio.sleep(0.005)
            for stream in [s for s in streams if s.endswith("@trade")]:
                tid += 1
                now = int(time.time() * 1000)
                event = {"e": "trade", "E": now, "s": stream.split("@")[0].upper(), "t": tid, "p": "60000.0"}
                event |= {"q": "0.1", "T": now, "m": True, "M": True}
                try:
                    await ws.send_str(json.dumps(event))
                except (ConnectionError, RuntimeError):
                    return  # the client dropped the socket


async def test_ccxt_stop_is_bounded_when_the_venue_never_answers_the_close(logs):
    async with BinanceSim(["BTC/USDT"], rate=0) as sim, StubbornVenue() as venue:
        out = Collector()
        adapter = CcxtAdapter(ccxt_venue({"rest": sim.rest_url, "ws": venue.url}, close_timeout="1s"), out, Metrics())
        await adapter.start()
        adapter.apply({"BTC/USDT": "websocket"})
        await wait_until(lambda: len(out.of(Trade)) >= 20, 10, "trades from the stubborn venue")
        started = time.monotonic()
        await asyncio.wait_for(adapter.stop(), 10)  # an unbounded close would hang here
        took = time.monotonic() - started
        assert venue.closes_asked == 1  # the close frame went out, and was never answered
        assert took < 1.0 + 0.6, f"stop took {took:.2f}s with close_timeout 1s"
        assert sample(adapter, "feedrunner_close_timeouts_total") == 1
        assert [m for m in logs if m.startswith("WARNING venue binance close cut short")]
        await wait_until(lambda: venue.open == 0, 3, "the socket dropped, not left open behind the adapter")
        print(f"\nstop returned in {took:.2f}s against a venue that never answers the close (close_timeout 1s)")


class _Stuck(Adapter):
    """An adapter whose client never lets go: the rule in Adapter.stop, whatever the venue family."""

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        await asyncio.Event().wait()


async def test_every_adapter_stop_is_bounded_by_close_timeout(logs):
    venue = venue_from("stuck", {"adapter": "ib", "symbols": ["AAPL"], "close_timeout": "300ms"})
    adapter = _Stuck(venue, Collector(), Metrics())
    await adapter.start()
    started = time.monotonic()
    await asyncio.wait_for(adapter.stop(), 5)
    assert time.monotonic() - started < 0.3 + 0.7  # the bound, with room for a loaded machine
    assert sample(adapter, "feedrunner_close_timeouts_total") == 1
    assert adapter.conn.state.value == "disconnected"
    assert [m for m in logs if "close cut short" in m and "close_timeout 0.3s" in m]


# -- D: resuming from checkpoints -------------------------------------------------------------------


async def test_a_seeded_start_backfills_from_the_checkpoint_once(logs):
    async with BinanceSim(["BTC/USDT", "ETH/USDT"], seed=9, rate=40) as sim:
        await wait_until(lambda: sim.stats["trades"]["BTC/USDT"] >= 60, 5, "a tape that goes back 50 trades")
        current = sim.last_trade_id("BTC/USDT")
        out = Collector()
        adapter = CcxtAdapter(ccxt_venue(sim.endpoints, symbols=["BTC/USDT", "ETH/USDT"]), out, Metrics())
        adapter.seed_checkpoints({"BTC/USDT": current - 50})  # as a restart after kill -9 would
        async with running(adapter):
            await wait_until(lambda: all(len(out.of(Trade, s)) >= 20 for s in ("BTC/USDT", "ETH/USDT")), 10, "trades")
            btc = out.of(Trade, "BTC/USDT")
            ids = [int(t.id) for t in btc]
            assert ids[:50] == list(range(current - 49, current + 1))  # those 50 first, in order
            assert all(t.backfilled for t in btc[:50])
            out.assert_contiguous()  # once each, no hole
            assert sample(adapter, "feedrunner_trades_backfilled_total") >= 50
            assert not any(t.backfilled for t in out.of(Trade, "ETH/USDT"))  # no checkpoint: starts now
            checkpoints = adapter.trade_checkpoints()
            assert checkpoints["BTC/USDT"] == int(out.of(Trade, "BTC/USDT")[-1].id)
            assert checkpoints["ETH/USDT"] == int(out.of(Trade, "ETH/USDT")[-1].id)


async def test_a_checkpoint_above_the_venue_is_a_reset_not_a_silent_drop(logs):
    async with BinanceSim(["BTC/USDT"], seed=9, rate=40) as sim:
        out = Collector()
        adapter = CcxtAdapter(ccxt_venue(sim.endpoints), out, Metrics())
        adapter.seed_checkpoints({"BTC/USDT": 10**9})  # stored before the venue renumbered
        async with running(adapter):
            await wait_until(lambda: len(out.of(Trade)) >= 20, 10, "trades")
            assert sample(adapter, "feedrunner_sequence_resets_total") == 1
            assert [m for m in logs if f"went back from {10**9} to" in m]


async def test_checkpoints_hold_only_what_the_pipeline_took():
    venue = ccxt_venue({"rest": "http://127.0.0.1:1", "ws": "ws://127.0.0.1:1"})
    gate, entered = asyncio.Event(), asyncio.Event()

    async def emit(events: list[Any]) -> None:
        entered.set()
        await gate.wait()  # a full queue: the batch is not the pipeline's yet

    adapter = CcxtAdapter(venue, emit, Metrics())
    adapter.seed_checkpoints({"BTC/USDT": 10})
    handing = asyncio.ensure_future(adapter.deliver_many([trade("BTC/USDT", 11, 1), trade("BTC/USDT", 12, 2)]))
    await entered.wait()
    assert adapter.trade_checkpoints() == {"BTC/USDT": 10}
    gate.set()
    await handing
    assert adapter.trade_checkpoints() == {"BTC/USDT": 12}


def test_adapters_without_trade_ids_ignore_checkpoints(logs):
    venue = venue_from("ib", {"adapter": "ib", "symbols": ["AAPL"]})
    adapter = IbAdapter(venue, Collector(), Metrics())
    adapter.seed_checkpoints({"AAPL": 5})
    assert adapter.trade_checkpoints() == {}
    assert [m for m in logs if "1 checkpoint(s) unused" in m]
