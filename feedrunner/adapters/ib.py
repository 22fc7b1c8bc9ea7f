"""Interactive Brokers through TWS / IB Gateway with ib_async: streaming over market-data lines, polling by snapshot.

ib_async holds one socket to TWS and reports through events; it never reconnects. So one loop owns the
connection's life, top to bottom: connect with the shared backoff, converge on the wanted subscriptions
(`_reconcile`, driven by `self.changed`), wait for a disconnect or a stall, start over. Every TWS message
code goes through `_on_error`, which maps it onto DESIGN.md's responses. TWS's own link to IB
(1100/1101/1102) and its data farms (2103/2104) fail while our socket stays up: those pause the data
without a reconnect of ours, and the watchdog stays quiet meanwhile, since reconnecting would not help.

"websocket" here means streaming (reqMktData for the ticker channel, tick-by-tick AllLast for trades), so
rollout code stays venue-agnostic. Polling takes a snapshot per symbol every poll_interval: a Ticker, and
for trades the last sale when it changed (a sample, not the tape: IB's historical-data pacing rules out
fetching every trade every second). Gaps in the trade stream are backfilled with reqHistoricalTicks.

IB trades have neither ids nor sub-second times. A trade is known only as (second, price, size), and two
identical prints in a second only by their count; `TapeMerge` emits every print once across the stream,
the backfill and the snapshot samples. Trades that cannot be backfilled cannot be counted either, so
`trades_lost` is never guessed: the unrecovered window is logged instead. For the same reason trades carry
no latency sample; quote updates do, stamped with the millisecond time of the print they bring (RTVolume).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from feedrunner.adapters.base import Adapter, Emit, now_ns, short
from feedrunner.events import Event, Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import BreakerState, Classified, ConnState, ErrorKind, sleep_or_stop
from feedrunner.spec import Venue

try:
    from ib_async import IB, Contract, Forex, Stock
    from ib_async.ib import StartupFetchNONE

    CONNECT_OPTIONS: dict[str, Any] = {"fetchFields": StartupFetchNONE}  # a data feed needs no orders or positions
except ImportError:  # pragma: no cover - ib_async is the dependency; the unmaintained original only as a fallback
    from ib_insync import IB, Contract, Forex, Stock  # type: ignore[no-redef]

    CONNECT_OPTIONS = {}

QUALIFY_OPTIONS = {"returnAll": True} if "returnAll" in inspect.signature(IB.qualifyContractsAsync).parameters else {}

NS = 1_000_000_000
DEFAULT_PORT = 7497  # TWS paper trading
DEFAULT_CLIENT_ID = 1
CONNECT_TIMEOUT = 5.0  # TCP connect plus the API handshake (nextValidId, managedAccounts)
REQUEST_TIMEOUT = 10.0  # contract details, snapshots, historical ticks
HISTORY_PAGE = 1000  # IB's maximum ticks per reqHistoricalTicks
HISTORY_PAGES = 50  # one backfill reads at most 50 pages per symbol
HISTORY_ATTEMPTS = 3
HISTORY_SETTLE = 2.0  # longest wait for a resumed stream to pass its first second before asking for history
INBOX_HIGH, INBOX_LOW = 100_000, 20_000  # events awaiting the pipeline: pause / resume reading the socket
PAUSE_LIMIT = 300.0  # longest the watchdog trusts TWS's word (1100, 2103) that data is paused
READ_CHUNK = 8192  # bytes handed to ib_async's reader at a time (see _client)
RT_VOLUME = "233"  # generic tick: every print with its millisecond time, the only exact clock IB streams
MARKET_DATA_TYPES = {"live": 1, "frozen": 2, "delayed": 3, "delayed_frozen": 4}
FX_PAIR = re.compile(r"([A-Z]{3})\.([A-Z]{3})")

# TWS message codes (https://www.interactivebrokers.com/campus/ibkr-api-page/twsapi-doc/#api-error-codes)
CLIENT_ID_IN_USE = 326
LINK_LOST = frozenset({1100, 2110})  # TWS <-> IB servers; our socket stays up
LINK_RESTORED_DATA_LOST = 1101  # subscriptions are gone: resubscribe every line
LINK_RESTORED_DATA_KEPT = 1102  # subscriptions survive
FARM_BROKEN = frozenset({2103})
FARM_OK = frozenset({2104, 2108})
NOT_CONNECTED = frozenset({502, 504, 1300})
NO_SECURITY = 200
LINE_LIMIT = frozenset({101})  # market-data lines exhausted
TICK_BY_TICK_LIMIT = 10190  # tick-by-tick streams exhausted (IB allows as many as market-depth ones, 3 by default)
NO_PERMISSION = frozenset({354, 10089, 10090, 10168, 10197})
HISTORY_ERRORS = frozenset({162, 165, 166, 366, 386})
RATE_LIMITED = 100
NOTICES = frozenset({2105, 2106, 2107, 2119, 2157, 2158, 10167})  # farm notices and "delayed data shown"
UNKNOWN_REQUEST = 300  # cancelling a request TWS already dropped

LIVE, HISTORY, SAMPLE = 1, 2, 3  # TapeMerge sources


class TwsError(Exception):
    """A TWS error message as an exception, so it is classified and counted like any other failure."""

    def __init__(self, code: int, text: str, req_id: int = -1) -> None:
        super().__init__(f"TWS error {code}: {text}")
        self.code = code
        self.text = text
        self.req_id = req_id


def classify(exc: BaseException) -> Classified:
    """Map a TWS error code or a socket exception onto the response DESIGN.md prescribes."""
    if isinstance(exc, TwsError):
        if exc.code == NO_SECURITY or exc.code in LINE_LIMIT or exc.code in NO_PERMISSION:
            return Classified(ErrorKind.BAD_SYMBOL)
        if exc.code == RATE_LIMITED:
            return Classified(ErrorKind.RATE_LIMIT)
        if exc.code in NOT_CONNECTED or exc.code in LINK_LOST:
            return Classified(ErrorKind.NETWORK)
        return Classified(ErrorKind.UNKNOWN)  # 326 among them: a configuration clash, retried with backoff
    if isinstance(exc, OSError | TimeoutError):  # ConnectionError, ConnectionRefusedError are OSErrors
        return Classified(ErrorKind.NETWORK)
    return Classified(ErrorKind.UNKNOWN)


def contract_for(symbol: str, venue: Venue) -> Contract:
    """The spec's notation as an unqualified contract: an explicit mapping, an FX pair (EUR.USD), else a US stock."""
    spec = venue.contracts.get(symbol)
    if spec is not None:
        exchange = spec.exchange
        if spec.sec_type == "CASH" and exchange == "SMART":
            exchange = "IDEALPRO"  # FX is not SMART-routed; the spec's default exchange means "the usual one"
        return Contract(
            secType=spec.sec_type,
            symbol=spec.symbol,
            exchange=exchange,
            currency=spec.currency,
            primaryExchange=spec.primary_exchange or "",
            lastTradeDateOrContractMonth=spec.last_trade_date or "",
        )
    pair = FX_PAIR.fullmatch(symbol)
    if pair:
        return Forex(pair[1] + pair[2])
    return Stock(symbol, "SMART", "USD")


def describe(c: Contract) -> str:
    parts = [c.secType, c.symbol, c.currency, c.exchange, c.primaryExchange, c.lastTradeDateOrContractMonth]
    return " ".join(p for p in parts if p)


def _num(x: float | None) -> float | None:
    """ib_async's "no value" is NaN (or -1 for an empty book side); events carry None."""
    return None if x is None or math.isnan(x) or x < 0 else float(x)


class TapeMerge:
    """One symbol's trades as several sources saw them (stream, backfill, snapshot samples), each print once.

    Without ids a print is only (second, price, size), and identical prints within a second are told apart
    by count: a source that saw a key n times proves n prints, so emitting the maximum count over sources
    gives every print exactly once, whichever source brings it first, provided that for every second one
    source saw all that the other did. The adapter arranges that: history is asked for only after the
    resumed stream has left the second it resumed in, so history holds that second whole, every earlier
    one whole, and of its own last second a prefix of what the stream sees in full.
    """

    KEEP = 5  # seconds of counts kept behind the newest streamed print, or back to `hold` while a gap is open

    def __init__(self) -> None:
        self._secs: dict[int, dict[tuple[float, float], list[int]]] = {}  # second -> key -> [emitted, by source]
        self.newest = 0
        self.floor = 0

    def observe(self, source: int, sec: int, price: float, size: float, hold: int | None = None) -> bool:
        """Count one observation; True when it is a print not emitted before."""
        if sec < self.floor:
            return False  # forgotten, and only ever forgotten once complete
        if source == LIVE and sec > self.newest:
            self.newest = sec
            floor = sec - self.KEEP if hold is None else min(sec - self.KEEP, hold)
            if floor > self.floor:
                self.floor = floor
                for old in [s for s in self._secs if s < floor]:
                    del self._secs[old]
        keys = self._secs.get(sec)
        if keys is None:
            keys = self._secs[sec] = {}
        counts = keys.get((price, size))
        if counts is None:
            counts = keys[(price, size)] = [0, 0, 0, 0]
        counts[source] += 1
        if counts[source] > counts[0]:
            counts[0] += 1
            return True
        return False


class Pacer:
    """At most `n` requests per `window` seconds, waiting rather than violating IB's historical-data pacing."""

    def __init__(self, n: int, window: float) -> None:
        self.n = n
        self.window = window
        self._times: deque[float] = deque()

    async def wait(self, stop: asyncio.Event) -> bool:
        """True when stopping."""
        while len(self._times) >= self.n:
            wait = self._times[0] + self.window - time.monotonic()
            if wait <= 0:
                self._times.popleft()
            elif await sleep_or_stop(wait, stop):
                return True
        self._times.append(time.monotonic())
        return False


class _ToLoguru(logging.Handler):
    """ib_async logs every TWS message it sees; the adapter classifies and logs those itself, so they go to
    DEBUG. The decoder's complaints about frames it cannot parse are news, so they stay warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        decoder = record.name.lower().endswith(".decoder")
        level = "WARNING" if decoder and record.levelno >= logging.WARNING else "DEBUG"
        logger.log(level, "{}: {}", record.name, record.getMessage())


def _route_library_logging() -> None:
    log = logging.getLogger(IB.__module__.split(".")[0])
    if not any(isinstance(h, _ToLoguru) for h in log.handlers):
        log.addHandler(_ToLoguru())
        log.propagate = False


class IbAdapter(Adapter):
    HISTORY_PACING = (60, 600.0)  # reqHistoricalTicks: IB allows 60 historical requests per 10 minutes

    def __init__(self, venue: Venue, emit: Emit, metrics: Metrics) -> None:
        super().__init__(venue, emit, metrics)
        _route_library_logging()
        self.ib: Any = None
        self.sessions = 0  # connections that completed the handshake: status and tests
        self._contracts: dict[str, Contract] = {}  # qualified; kept across sessions, conIds are stable
        self._by_con_id: dict[int, str] = {}
        self._streams: dict[tuple[str, str], int] = {}  # (symbol, channel) -> reqId of its line
        self._req: dict[int, tuple[str, str]] = {}
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._backfills: dict[str, asyncio.Task[None]] = {}
        self._tapes: dict[str, TapeMerge] = {}
        self._complete: dict[str, int] = {}  # newest second the trade stream delivered
        self._gap_from: dict[str, int] = {}  # second from which trades await backfill
        self._gap_gen: dict[str, int] = {}  # bumped whenever a trade stream stops: a backfill knows if it is stale
        self._resuming: dict[str, tuple[list[int], asyncio.Event]] = {}  # first resumed second; set once past it
        self._sampled: dict[str, tuple[int, float, float]] = {}
        self._quotes: dict[str, tuple[float | None, ...]] = {}
        self._rt_seen: dict[str, datetime | None] = {}  # last RTVolume time; None until the subscription's first
        self._inbox: deque[Event] = deque()
        self._inbox_ready = asyncio.Event()
        self._reading_paused = False
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._api_error = ""
        self._session_up = False
        self._id_in_use: asyncio.Future[str] | None = None
        self._link_down = False
        self._farms_down: set[str] = set()
        self._paused_since = 0.0  # monotonic time TWS last reported data paused (1100 / 2103)
        self._history_lock = asyncio.Lock()
        self._history_for: str | None = None
        self._history_error: TwsError | None = None
        self._pacer = Pacer(*self.HISTORY_PACING)
        self._up_since: float | None = None
        self._probe_window = min(venue.stale_after.values(), default=5.0)
        self._cash_noted: set[str] = set()
        self._rtv_trades: set[str] = set()  # symbols refused a tick-by-tick line: trades from RTVolume instead
        self._rtv_fresh: set[str] = set()  # their market-data line is new: its first RTVolume replays an old print

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.venue.host or '127.0.0.1'}:{self.venue.port or DEFAULT_PORT}"

    @property
    def client_id(self) -> int:
        return self.venue.client_id if self.venue.client_id is not None else DEFAULT_CLIENT_ID

    def _client(self) -> Any:
        ib = IB()
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += self._on_disconnected
        ib.pendingTickersEvent += self._on_tickers
        ib.client.apiError += self._on_api_error
        original = ib.wrapper.tickByTickAllLast

        def tick_by_tick_all_last(
            req_id: int, tick_type: int, ts: int, price: float, size: float, attrib: Any, exchange: str, cond: str
        ) -> None:
            # ib_async stamps the tick with its own receive time and drops TWS's: keep the exchange's second.
            original(req_id, tick_type, ts, price, size, attrib, exchange, cond)
            self._on_print(req_id, ts, price, size)

        ib.wrapper.tickByTickAllLast = tick_by_tick_all_last
        original_string = ib.wrapper.tickString

        def tick_string(req_id: int, tick_type: int, value: str) -> None:
            original_string(req_id, tick_type, value)
            if tick_type == 48:  # RTVolume: price;size;ms;volume;vwap;single
                self._on_rt_volume(req_id, value)

        ib.wrapper.tickString = tick_string

        # ib_async's reader re-slices its whole buffer once per message, so one read costs the square of its
        # size: a 256 KiB read (a client that fell behind) takes half a second, and it falls further behind.
        # Handed small pieces, it stays linear; each piece still ends in one pendingTickersEvent.
        conn = ib.client.conn
        received = conn.data_received

        def data_received(data: bytes) -> None:
            if len(data) <= READ_CHUNK:
                received(data)
                return
            for i in range(0, len(data), READ_CHUNK):
                received(data[i : i + READ_CHUNK])

        conn.data_received = data_received
        return ib

    async def close(self) -> None:
        """Stop's snapshot of the tasks may miss one a racing reconcile spawned (a poll loop, a backfill)."""
        self._session_up = False
        try:
            for _ in range(10):
                if not self._tasks:
                    break
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # also when stop's deadline cuts the wait short
            if self.ib is not None and self.ib.isConnected():
                self.ib.disconnect()

    def on_update(self, old: Venue, new: Venue) -> None:
        """Reload: channels, lines and poll_interval are read at each reconcile or poll; stale_after re-arms.

        Connection settings and contract mappings rebuild the adapter instead (plan.RECONNECT_VENUE_FIELDS).
        """
        if old.stale_after != new.stale_after:
            for key in self.watchdog.keys():
                self.watchdog.arm(key, new.stale_after.get(key[1], 15.0))  # type: ignore[index]
            self._probe_window = min(new.stale_after.values(), default=5.0)

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["market_data_lines"] = {"used": len(self._streams), "limit": self.venue.market_data_lines}
        out["backfilling"] = sorted(self._gap_from)
        out["trades_from_rt_volume"] = sorted(self._rtv_trades)
        return out

    async def run(self) -> None:
        self.ib = self._client()
        self.spawn(self._drain(), f"{self.name}-events")
        self.spawn(self._watchdog(), f"{self.name}-watchdog")
        self.conn.move(ConnState.CONNECTING, f"connecting to TWS at {self.address} as client {self.client_id}")
        while not self.stopping.is_set():
            try:
                await self._connect()
            except Exception as exc:  # every failure is classified; none escapes
                if await self._retry(exc):
                    return
                continue
            failure: BaseException | None = None
            try:
                await self._session()
            except Exception as exc:  # a request on a dying socket, mostly
                failure = exc
            finally:
                self._end_session()
            if self.stopping.is_set():
                return
            if await self._retry(failure or ConnectionError(self._lost_reason or "TWS closed the connection")):
                return

    async def _connect(self) -> None:
        """Connect and finish the handshake, failing fast on 326 (ib_async would only time out)."""
        self._lost.clear()
        self._lost_reason = self._api_error = ""
        self._link_down = False  # TWS reports its link and farms right after the handshake: listen from here
        self._farms_down.clear()
        self._id_in_use = asyncio.get_running_loop().create_future()
        connecting = asyncio.ensure_future(
            self.ib.connectAsync(
                self.venue.host or "127.0.0.1",
                self.venue.port or DEFAULT_PORT,
                clientId=self.client_id,
                timeout=CONNECT_TIMEOUT,
                readonly=True,
                **CONNECT_OPTIONS,
            )
        )
        connecting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: never "never retrieved"
        try:
            done, _ = await asyncio.wait(
                {connecting, self._id_in_use}, timeout=CONNECT_TIMEOUT + 1, return_when=asyncio.FIRST_COMPLETED
            )
            if connecting in done:
                connecting.result()
            elif self._id_in_use.done():
                raise TwsError(CLIENT_ID_IN_USE, self._id_in_use.result())
            else:
                raise TimeoutError(f"TWS at {self.address} did not finish the API handshake")
        finally:
            if not connecting.done():
                connecting.cancel()  # ib_async disconnects on cancellation
            self._id_in_use = None
        if not self.ib.isConnected():
            raise ConnectionError(self._api_error or "TWS closed the connection during the handshake")

    async def _session(self) -> None:
        self._session_up = True
        self.sessions += 1
        self._up_since = None
        self.backoff.connected()
        logger.info(
            "venue {} connected to TWS {} as client {} (server version {})",
            self.name,
            self.address,
            self.client_id,
            self.ib.client.serverVersion(),
        )
        kind = MARKET_DATA_TYPES.get(self.venue.market_data_type, 1)
        if kind != 1:
            self.ib.reqMarketDataType(kind)
        while not self.stopping.is_set() and not self._lost.is_set():
            self.changed.clear()
            await self._reconcile()
            self.backoff.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.5)  # breakers move with time too

    def _end_session(self) -> None:
        """The socket is gone (or going): every line with it. Trade streams leave a gap to backfill."""
        self._session_up = False
        for symbol, channel in list(self._streams):
            self._unsubscribe(symbol, channel, send=False)
        for tasks in (self._polls, self._backfills):
            for task in tasks.values():
                task.cancel()
            tasks.clear()
        self._quotes.clear()
        self._up_since = None
        if self.ib.isConnected():
            self.ib.disconnect()

    async def _retry(self, exc: BaseException) -> bool:
        """Classify a failed or lost connection and wait out the backoff; True when giving up or stopping.

        The breakers are not fed here: streaming and polling ride the same socket, so a lost socket is the
        backoff's business. They count stalls, which only streaming suffers.
        """
        c = classify(exc)
        self.count(c, exc, None)
        if isinstance(exc, TwsError) and exc.code == CLIENT_ID_IN_USE:
            logger.error(
                "venue {}: client id {} is held by another API client of TWS {}; retrying with backoff "
                "(each process needs its own client_id)",
                self.name,
                self.client_id,
                self.address,
            )
        self.metrics.reconnects.labels(self.name).inc()
        if self.backoff.exhausted:
            self.conn.move(ConnState.FAILED, f"gave up after {self.backoff.attempts} attempts: {short(exc)}")
            self.stopping.set()
            return True
        delay = self.backoff.next_delay()
        if c.retry_after is not None:
            delay = max(delay, c.retry_after)
        self.retries.append((time.monotonic(), delay, c.kind.value))
        self.conn.move(ConnState.RECONNECTING, f"{c.kind}: {short(exc)}; retry in {delay:.2f}s")
        return await sleep_or_stop(delay, self.stopping)

    def _drop(self, reason: str) -> None:
        """Give up on this socket: the run loop reconnects with backoff and resubscribes."""
        if not self._session_up:
            return
        self._lost_reason = reason
        self._lost.set()
        self.changed.set()
        if self.ib.isConnected():
            self.ib.disconnect()

    def _on_disconnected(self) -> None:
        if self._session_up and not self._lost.is_set():
            self._lost_reason = self._lost_reason or self._api_error or "TWS closed the connection"
            self._lost.set()
            self.changed.set()

    def _on_api_error(self, message: str) -> None:
        self._api_error = message

    # -- reconcile: desired transports -> lines and poll loops ---------------------------------------

    async def _reconcile(self) -> None:
        trades = "trades" in self.venue.channels
        for symbol in [s for s in self._tapes if not trades or s not in self.wanted or s in self.quarantined]:
            self._forget_continuity(symbol)  # unwanted, not interrupted: nothing to backfill if it returns
        missing = [s for s in self.wanted if s not in self._contracts and s not in self.quarantined]
        if missing and not await self._qualify(missing):
            return
        by_transport: dict[str, list[str]] = {"websocket": [], "polling": [], "hybrid": []}
        for symbol in self.wanted:
            eff = self.effective(symbol)
            if eff is not None and symbol in self._contracts:
                by_transport[eff].append(symbol)
        want: dict[tuple[str, str], None] = {}
        budget = self.venue.market_data_lines
        held = {s for s, _ in self._streams}
        streamed = [s for s in self.wanted if s in by_transport["websocket"] or s in by_transport["hybrid"]]
        for symbol in sorted(streamed, key=lambda s: s not in held):  # lines already held stay with their symbols
            lines = self._lines(symbol)
            if len(want) + len(lines) > budget:
                self.quarantine(
                    symbol,
                    f"needs {len(lines)} more market-data line(s) but all {budget} of market_data_lines are in use",
                )
                continue
            want.update(dict.fromkeys(lines))
        for key in [k for k in self._streams if k not in want]:
            self._unsubscribe(*key)
        new = [k for k in want if k not in self._streams]
        for key in new:
            if not self._subscribe(*key):
                return  # the socket died under us; the session is ending
        polling = [s for s in by_transport["polling"] + by_transport["hybrid"] if s not in self.quarantined]
        for symbol in [s for s in self._polls if s not in polling]:
            self._polls.pop(symbol).cancel()
        started = [s for s in polling if s not in self._polls]
        for symbol in started:
            self._polls[symbol] = self.spawn(self._poll_loop(symbol), f"{self.name}-poll-{symbol}")
        if started:
            logger.info("venue {} polling snapshots: {}", self.name, ",".join(started))
        if new:
            logger.info(
                "venue {} streaming {} line(s): {}", self.name, len(self._streams), ",".join(f"{s}:{c}" for s, c in new)
            )
        for transport, symbols in by_transport.items():
            self.metrics.symbols.labels(self.name, transport).set(
                len([s for s in symbols if s not in self.quarantined])
            )
        self._settle()

    async def _qualify(self, symbols: list[str]) -> bool:
        """Resolve contracts; an unknown or ambiguous one quarantines its symbol only. False: socket trouble."""
        contracts = [contract_for(s, self.venue) for s in symbols]
        try:
            result = await asyncio.wait_for(  # ib_async sends at most 45 requests a second
                self.ib.qualifyContractsAsync(*contracts, **QUALIFY_OPTIONS), REQUEST_TIMEOUT + len(contracts) / 40
            )
        except Exception as exc:
            c = classify(exc)
            self.count(c, exc, None)
            self._drop(f"contract details failed: {short(exc)}")  # TWS that cannot answer this is not serving
            return False
        for symbol, asked, got in zip(symbols, contracts, result, strict=True):
            if got is None:
                self.quarantine(symbol, f"TWS has no security definition for {describe(asked)} (error 200)")
            elif isinstance(got, list):
                self.quarantine(
                    symbol,
                    f"{len(got)} contracts match {describe(asked)}; give an explicit contract "
                    "(exchange, primary_exchange, currency)",
                )
            elif got.conId in self._by_con_id and self._by_con_id[got.conId] != symbol:
                self.quarantine(symbol, f"the same contract (conId {got.conId}) as {self._by_con_id[got.conId]}")
            else:
                self._contracts[symbol] = got
                self._by_con_id[got.conId] = symbol
        return True

    def _lines(self, symbol: str) -> list[tuple[str, str]]:
        """The lines a streamed symbol needs; trades ride its market-data line once TWS refused tick-by-tick."""
        lines = [(symbol, ch) for ch in self.venue.channels if self._streamable(symbol, ch)]
        if symbol in self._rtv_trades and "trades" in self.venue.channels and (symbol, "ticker") not in lines:
            lines.append((symbol, "ticker"))
        return lines

    def _trade_line(self, symbol: str) -> tuple[str, str]:
        return (symbol, "ticker") if symbol in self._rtv_trades else (symbol, "trades")

    def _streamable(self, symbol: str, channel: str) -> bool:
        if channel == "trades" and symbol in self._rtv_trades:
            return False
        if channel == "trades" and self._contracts[symbol].secType == "CASH":
            if symbol not in self._cash_noted:
                self._cash_noted.add(symbol)
                logger.info("venue {} {}: IDEALPRO quotes have no trade prints; no trades line", self.name, symbol)
            return False
        return True

    def _subscribe(self, symbol: str, channel: str) -> bool:
        contract = self._contracts[symbol]
        wrapper = self.ib.wrapper
        try:
            if channel == "ticker":
                generic = RT_VOLUME if contract.secType != "CASH" else ""
                req_id = wrapper.ticker2ReqId["mktData"][self.ib.reqMktData(contract, generic)]
                self._rt_seen[symbol] = None
                self._rtv_fresh.add(symbol)
            else:
                req_id = wrapper.ticker2ReqId["AllLast"][self.ib.reqTickByTickData(contract, "AllLast")]
        except ConnectionError:
            return False
        self._streams[(symbol, channel)] = req_id
        self._req[req_id] = (symbol, channel)
        stale = self.venue.stale_after
        self.watchdog.arm((symbol, channel), stale.get(channel) or min(stale.values()))
        if (symbol, channel) == self._trade_line(symbol) and symbol in self._gap_from:
            self._start_backfill(symbol)
        return True

    def _unsubscribe(self, symbol: str, channel: str, send: bool = True) -> None:
        req_id = self._streams.pop((symbol, channel))
        self._req.pop(req_id, None)
        self.watchdog.disarm((symbol, channel))
        if (symbol, channel) == self._trade_line(symbol):
            self._open_gap(symbol)
        if send and self.ib.isConnected():
            contract = self._contracts[symbol]
            with contextlib.suppress(ConnectionError):  # ib_async also unregisters a line TWS refused
                if channel == "ticker":
                    self.ib.cancelMktData(contract)
                else:
                    self.ib.cancelTickByTickData(contract, "AllLast")

    def _settle(self) -> None:
        """The connection state from what TWS reported and what the symbols use."""
        if not self._session_up:
            return
        if self._link_down:
            self.conn.move(ConnState.RECONNECTING, "TWS lost its connection to IB (1100); data paused, TWS reconnects")
        elif self._farms_down:
            farms = ",".join(sorted(self._farms_down))
            self.conn.move(ConnState.DEGRADED, f"market data farm {farms} broken (2103); data paused")
        elif self.quarantined or any(self.effective(s) != self.wanted[s] for s in self.wanted):
            self.conn.move(ConnState.DEGRADED, "some symbols quarantined or on fallback")
        else:
            self.conn.move(ConnState.CONNECTED, "all symbols on their desired transport")

    # -- TWS messages ------------------------------------------------------------------------------

    def _on_error(self, req_id: int, code: int, text: str, contract: Any) -> None:
        key = self._req.get(req_id)
        symbol = key[0] if key else None
        if symbol is None and contract is not None and getattr(contract, "conId", 0):
            symbol = self._by_con_id.get(contract.conId)
        err = TwsError(code, text, req_id)
        if code == CLIENT_ID_IN_USE:
            if self._id_in_use is not None and not self._id_in_use.done():
                self._id_in_use.set_result(text)
        elif code in LINK_LOST:
            self._link_lost(err)
        elif code in (LINK_RESTORED_DATA_LOST, LINK_RESTORED_DATA_KEPT):
            self._link_restored(data_lost=code == LINK_RESTORED_DATA_LOST)
        elif code in FARM_BROKEN or code in FARM_OK:
            self._farm(text, broken=code in FARM_BROKEN)
        elif symbol is not None and key is None and symbol == self._history_for:
            self._history_error = err  # the backfill request's own failure, whatever the code
        elif code == TICK_BY_TICK_LIMIT and key is not None and key[1] == "trades":
            self._trades_from_rt_volume(key[0], err)
        elif code in LINE_LIMIT or code in NO_PERMISSION or code == NO_SECURITY or code == TICK_BY_TICK_LIMIT:
            if symbol is not None:  # unqualified contracts (conId 0) fail in _qualify instead
                self._refused(symbol, err)
        elif code in NOTICES or 2100 <= code < 2200:
            logger.info("venue {} TWS notice {}: {}", self.name, code, text)
        elif code == UNKNOWN_REQUEST:
            logger.debug("venue {} TWS: {} {}", self.name, code, text)
        else:
            self.count(classify(err), err, symbol)

    def _trades_from_rt_volume(self, symbol: str, err: TwsError) -> None:
        """No tick-by-tick line left: the symbol keeps streaming, its trades read from RTVolume (generic tick
        233) on its market-data line, with millisecond times. TWS may fold prints together there, which the
        simulator does not; gaps are backfilled from history all the same."""
        logger.warning(
            "venue {} {}: TWS refused a tick-by-tick line ({}: {}); trades come from RTVolume on its market-data "
            "line instead",
            self.name,
            symbol,
            err.code,
            err.text,
        )
        self._rtv_trades.add(symbol)
        self._unsubscribe(symbol, "trades")  # ib_async still holds the refused request
        self.changed.set()

    def _refused(self, symbol: str, err: TwsError) -> None:
        if err.code in LINE_LIMIT:
            reason = (
                f"TWS refused a market-data line ({err.code}: {err.text}) with {len(self._streams)} open; the "
                f"account allows fewer than market_data_lines {self.venue.market_data_lines}"
            )
        elif err.code in NO_PERMISSION:
            reason = f"no market-data permission ({err.code}: {err.text})"
        else:
            reason = f"TWS has no security definition ({err.code}: {err.text})"
        self.quarantine(symbol, reason)  # the next reconcile cancels its lines, which ib_async still holds

    def _link_lost(self, err: TwsError) -> None:
        self.count(Classified(ErrorKind.NETWORK), err, None)
        if not self._link_down:
            self._link_down = True
            self._paused_since = time.monotonic()
            for key in self._streams:
                if key == self._trade_line(key[0]):
                    self._open_gap(key[0])
            logger.warning("venue {} {}: data paused until TWS restores its link", self.name, err)
        self._settle()

    def _link_restored(self, data_lost: bool) -> None:
        self._link_down = False
        if data_lost:
            logger.warning(
                "venue {} TWS link restored, data lost (1101): resubscribing {} line(s)", self.name, len(self._streams)
            )
            for key in list(self._streams):
                self._unsubscribe(*key)  # TWS forgot them; reconcile places them again and backfills
            self.changed.set()
        else:
            logger.info("venue {} TWS link restored, data maintained (1102): subscriptions kept", self.name)
            self._resume()
        self._settle()

    def _farm(self, text: str, broken: bool) -> None:
        farm = text.rsplit(":", 1)[-1].strip() or "market data"
        if broken and farm not in self._farms_down:
            if not self._farms_down:
                self._paused_since = time.monotonic()
            self._farms_down.add(farm)
            for key in self._streams:
                if key == self._trade_line(key[0]):
                    self._open_gap(key[0])
            logger.warning("venue {} market data farm {} broken (2103): data paused", self.name, farm)
        elif not broken and self._farms_down:
            self._farms_down.discard(farm)
            if not self._farms_down:
                logger.info("venue {} market data farm {} OK again", self.name, farm)
                self._resume()
        self._settle()

    def _resume(self) -> None:
        """Data flows again on the same lines: the silence was TWS's, not the streams'; backfill what it cost."""
        if self._link_down or self._farms_down:
            return
        for key in self._streams:
            self.watchdog.seen(key)
        for key in self._streams:
            if key == self._trade_line(key[0]) and key[0] in self._gap_from:
                self._start_backfill(key[0])

    # -- streaming ---------------------------------------------------------------------------------

    def _on_tickers(self, tickers: Iterable[Any]) -> None:
        """Quotes of streamed tickers, once per socket read; ib_async clears `ticks` on the next one."""
        if not self._session_up:
            return
        received = 0
        for t in tickers:
            if not t.ticks:
                continue
            symbol = self._by_con_id.get(t.contract.conId) if t.contract is not None else None
            if symbol is None or (symbol, "ticker") not in self._streams:
                continue
            received = received or now_ns()
            self.seen(symbol, "ticker")
            # IB stamps no quote; the venue time of an update is that of the print it brings (RTVolume, in
            # ms), and an update without a new print has none. The first print after subscribing is a replay.
            stamp, rt = None, t.rtTime
            if rt is not None and rt != self._rt_seen.get(symbol):
                if self._rt_seen.get(symbol) is not None:
                    stamp = int(rt.timestamp() * 1000) * 1_000_000
                self._rt_seen[symbol] = rt
            quote = (_num(t.bid), _num(t.ask), _num(t.last), _num(t.volume))
            if quote != self._quotes.get(symbol) and "ticker" in self.venue.channels:
                self._quotes[symbol] = quote
                self._push(Ticker(self.name, symbol, stamp, received, "websocket", *quote))
        if received:
            self._stream_ok()

    def _on_print(self, req_id: int, sec: int, price: float, size: float) -> None:
        key = self._req.get(req_id)
        if key is None or not self._session_up:
            return
        self._trade(key[0], sec, price, size, sec * NS)

    def _on_rt_volume(self, req_id: int, value: str) -> None:
        key = self._req.get(req_id)
        if key is None or not self._session_up:
            return
        symbol = key[0]
        if symbol in self._rtv_fresh:
            self._rtv_fresh.discard(symbol)  # the line's first: a replay of the last print, whoever reads it
            return
        if symbol not in self._rtv_trades:
            return
        price, size, ms = value.split(";", 3)[:3]
        if price and size and ms:  # a volume-only update has no print
            self._trade(symbol, int(ms) // 1000, float(price), float(size), int(ms) * 1_000_000)

    def _trade(self, symbol: str, sec: int, price: float, size: float, ts: int) -> None:
        """One streamed print: the watchdog, the resume mark, then the tape merge decides if it is news."""
        self.seen(symbol, "trades")
        self._stream_ok()
        resuming = self._resuming.get(symbol)
        if resuming is not None:
            first, past = resuming
            if not first:
                first.append(sec)
            elif sec > first[0]:
                past.set()
        if sec > self._complete.get(symbol, 0):
            self._complete[symbol] = sec
        if self._tape(symbol).observe(LIVE, sec, price, size, self._gap_from.get(symbol)):
            self._push(Trade(self.name, symbol, ts, now_ns(), "websocket", None, price, size, None))

    def _stream_ok(self) -> None:
        """Data arrived. Streaming counts as healthy for the breaker only once it kept delivering a stale window."""
        if self._link_down and time.monotonic() - self._paused_since > 1.0:  # not ticks sent before the 1100
            # All data crosses TWS's link: it is back, whether or not a 1101/1102 said so.
            logger.warning("venue {} data flows again without 1101/1102: TWS's link counts as restored", self.name)
            self._link_restored(data_lost=False)
        if self._up_since is None:
            self._up_since = time.monotonic()
        elif (self.breaker.failures or self.breaker._state is not BreakerState.CLOSED) and (
            time.monotonic() - self._up_since >= self._probe_window
        ):
            self.breaker.success()

    async def _watchdog(self) -> None:
        """Silent lines: all of them means TWS or the socket is wedged (reconnect); some, those symbols
        (resubscribe, and their breakers count it). Quiet while TWS itself reports the data paused."""
        while not self.stopping.is_set():
            await asyncio.sleep(0.25)
            if not self._session_up:
                continue
            if (self._link_down or self._farms_down) and time.monotonic() - self._paused_since < PAUSE_LIMIT:
                continue
            stale = self.watchdog.stale()
            if not stale:
                continue
            # All lines go quiet together when TWS or the socket is wedged: half a stale window each is enough,
            # or the few lines that crossed it first would be resubscribed one by one.
            limits = self.venue.stale_after
            everything = all(self.watchdog.silence(k) >= limits[k[1]] / 2 for k in self.watchdog.keys())
            self.record_stalls(stale, everything)
            if everything:
                self.breaker.failure("every line silent")
                self._drop(f"every market-data line silent ({len(stale)} past stale_after)")
            else:
                for symbol in {s for (s, _), _ in stale}:
                    for key in [k for k in self._streams if k[0] == symbol]:
                        self._unsubscribe(*key)
                self.changed.set()

    # -- polling -----------------------------------------------------------------------------------

    async def _poll_loop(self, symbol: str) -> None:
        contract = self._contracts[symbol]
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                (t,) = await asyncio.wait_for(self.ib.reqTickersAsync(contract), REQUEST_TIMEOUT)
                if symbol in self.quarantined:
                    return
                received = now_ns()
                if "ticker" in self.venue.channels and self.effective(symbol) != "hybrid":
                    quote = (_num(t.bid), _num(t.ask), _num(t.last), _num(t.volume))
                    if any(x is not None for x in quote[:3]):
                        self._push(Ticker(self.name, symbol, None, received, "polling", *quote))
                if "trades" in self.venue.channels and contract.secType != "CASH":
                    self._sample(symbol, t, received)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c = classify(exc)
                self.count(c, exc, symbol)
                if isinstance(exc, ConnectionError):
                    return  # the session is ending; the next one starts polling again
                failures += 1
                b = self.venue.backoff
                wait = min(b.cap, b.base * b.factor ** (failures - 1))
                logger.warning(
                    "venue {} poll {} failed ({}): {}; next in {:.1f}s", self.name, symbol, c.kind, exc, wait
                )
                if await sleep_or_stop(wait, self.stopping):
                    return
                continue
            if await sleep_or_stop(self.venue.poll_interval - (time.monotonic() - started), self.stopping):
                return

    def _sample(self, symbol: str, t: Any, received: int) -> None:
        """The snapshot's last sale as a Trade when it is a new one: a sample of the tape, not the tape."""
        price, size = _num(t.last), _num(t.lastSize)
        if price is None or size is None or t.lastTimestamp is None:
            return
        key = (int(t.lastTimestamp.timestamp()), price, size)
        if self._sampled.get(symbol) == key:
            return
        self._sampled[symbol] = key
        if self._tape(symbol).observe(SAMPLE, *key):
            self._push(Trade(self.name, symbol, key[0] * NS, received, "polling", None, price, size, None))

    # -- continuity --------------------------------------------------------------------------------

    def _tape(self, symbol: str) -> TapeMerge:
        tape = self._tapes.get(symbol)
        if tape is None:
            tape = self._tapes[symbol] = TapeMerge()
        return tape

    def _open_gap(self, symbol: str) -> None:
        """A trade stream stopped: what it misses from its newest second on awaits backfill."""
        if symbol not in self.wanted or symbol in self.quarantined or "trades" not in self.venue.channels:
            return  # dropped on purpose: nothing to recover
        self._gap_gen[symbol] = self._gap_gen.get(symbol, 0) + 1
        if symbol in self._complete:
            self._gap_from.setdefault(symbol, self._complete[symbol])

    def _forget_continuity(self, symbol: str) -> None:
        for table in (self._tapes, self._complete, self._gap_from, self._gap_gen, self._sampled, self._resuming):
            table.pop(symbol, None)
        task = self._backfills.pop(symbol, None)
        if task is not None:
            task.cancel()

    def _start_backfill(self, symbol: str) -> None:
        """The trade stream of a symbol with a gap (re)started: backfill once it has left its first second."""
        self._resuming[symbol] = ([], asyncio.Event())
        task = self._backfills.get(symbol)
        if task is None or task.done():
            self._backfills[symbol] = self.spawn(self._backfill(symbol), f"{self.name}-backfill-{symbol}")

    async def _backfill(self, symbol: str) -> None:
        """Historical ticks from the gap's first second to now, page by page, merged with the live stream."""
        contract = self._contracts[symbol]
        recovered = 0
        try:
            while symbol in self._gap_from:
                resuming = self._resuming.get(symbol)
                if resuming is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(resuming[1].wait(), HISTORY_SETTLE)
                    if self._resuming.get(symbol) is resuming:
                        del self._resuming[symbol]
                if self._trade_line(symbol) not in self._streams or self._link_down or self._farms_down:
                    return  # the stream is down again: its return (resubscribe, 1102, 2104) starts over
                start, gen = self._gap_from[symbol], self._gap_gen.get(symbol, 0)
                outcome, n, cursor = await self._backfill_from(symbol, contract, start)
                recovered += n
                if outcome == "interrupted":
                    return  # the socket went: the next session backfills from the same second
                if outcome == "gave_up":
                    logger.error(
                        "venue {} {}: trades from {} on could not be backfilled; IB trades carry no ids, so the "
                        "loss cannot be counted (feedrunner_trades_lost_total excludes it)",
                        self.name,
                        symbol,
                        datetime.fromtimestamp(cursor, UTC).isoformat(),
                    )
                    self._gap_from.pop(symbol, None)
                elif self._gap_gen.get(symbol, 0) == gen:
                    self._gap_from.pop(symbol, None)  # else the stream stopped again meanwhile: read once more
        finally:
            self.backfill_done(symbol, recovered, 0, "after the gap")  # IB's losses cannot be counted: see above

    async def _backfill_from(self, symbol: str, contract: Contract, start: int) -> tuple[str, int, int]:
        """(done | gave_up | interrupted, trades emitted, first second not read)."""
        recovered = pages = attempts = 0
        cursor = start
        while pages < HISTORY_PAGES:
            try:
                ticks = await self._history(symbol, contract, cursor)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, ConnectionError) or not self._session_up:
                    return "interrupted", recovered, cursor
                kind = classify(exc).kind.value
                self.metrics.errors.labels(self.name, kind).inc()
                self.backfill_failed(symbol, "timeout" if isinstance(exc, TimeoutError) else kind, exc)
                attempts += 1
                if attempts >= HISTORY_ATTEMPTS or await sleep_or_stop(float(attempts), self.stopping):
                    return "gave_up", recovered, cursor
                continue
            pages += 1
            received = now_ns()
            tape = self._tape(symbol)
            for tick in ticks:
                sec = int(tick.time.timestamp())
                if tape.observe(HISTORY, sec, tick.price, tick.size):
                    self._push(
                        Trade(
                            self.name,
                            symbol,
                            sec * NS,
                            received,
                            "polling",
                            None,
                            tick.price,
                            tick.size,
                            None,
                            backfilled=True,
                        )
                    )
                    recovered += 1
            if len(ticks) < HISTORY_PAGE:
                return "done", recovered, cursor
            cursor = int(ticks[-1].time.timestamp()) + 1  # pages hold whole seconds
        return "gave_up", recovered, cursor

    async def _history(self, symbol: str, contract: Contract, start: int) -> list[Any]:
        async with self._history_lock:
            if await self._pacer.wait(self.stopping):
                raise asyncio.CancelledError
            self._history_for, self._history_error = symbol, None
            try:
                ticks = await asyncio.wait_for(
                    self.ib.reqHistoricalTicksAsync(
                        contract, datetime.fromtimestamp(start, UTC), "", HISTORY_PAGE, "TRADES", useRth=False
                    ),
                    REQUEST_TIMEOUT,
                )
            finally:
                self._history_for = None
            if self._history_error is not None:
                raise self._history_error
            return list(ticks or [])

    # -- delivery ----------------------------------------------------------------------------------

    def _push(self, event: Event) -> None:
        """Events are made in ib_async's socket callbacks; a task hands them to the pipeline, and reading
        pauses while it lags, so a slow sink slows TWS's socket rather than memory growing without bound."""
        self._inbox.append(event)
        self._inbox_ready.set()
        if len(self._inbox) > INBOX_HIGH and not self._reading_paused:
            transport = getattr(self.ib.client.conn, "transport", None)
            if transport is not None:
                transport.pause_reading()
                self._reading_paused = True

    async def _drain(self) -> None:
        inbox = self._inbox
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            while inbox:
                try:
                    await self.deliver(inbox.popleft())
                except Exception:
                    logger.opt(exception=True).error("venue {} could not deliver an event", self.name)
                if self._reading_paused and len(inbox) < INBOX_LOW:
                    self._reading_paused = False
                    transport = getattr(self.ib.client.conn, "transport", None)
                    if transport is not None:
                        transport.resume_reading()

    async def deliver(self, event: Event) -> None:
        """Trades are counted without a latency sample: IB stamps them to the whole second, so receive minus
        venue time would be up to a second of rounding. Quotes carry RTVolume's millisecond clock."""
        if event.kind == "trade":
            self._children(event.transport, event.kind)[0].inc()
            await self.emit([event])
        else:
            await super().deliver(event)
