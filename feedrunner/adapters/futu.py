"""Futu through FutuOpenD: futu-api pushes QUOTE, TICKER and ORDER_BOOK; polling pulls snapshots, tickers, books.

futu-api is blocking and runs its own threads (a shared network thread, one callback thread per context,
Timer threads that reconnect). Its handlers only parse and queue (`_post`); one task on our loop drains
the queue in order, so trade continuity has a single owner and the loop never waits on futu. Every
blocking call (subscribe, queries, close) runs on the adapter's own daemon threads, with a deadline.

futu-api reconnects by itself and we let it, but we own the schedule and the subscriptions: its
`_wait_reconnect` asks our backoff for the delay (its own is a fixed 6 s), and after every (re)connect we
resubscribe from our own table (futu-api's forgets a code whose unsubscribe OpenD refused, and turns push
on for everything). A connection that is up but silent is closed and reopened by our watchdog.

Futu's rules: OpenD refuses to cancel a subscription younger than a minute, so an unsubscribe (a symbol
dropped by a reload, a code rejected later) is deferred, logged, and executed once allowed. A transport
switch needs no unsubscribe: OpenD answers Qot_GetTicker / Qot_GetOrderBook only for subscribed codes, so
polling keeps the subscriptions and merely turns their push off. The quota is therefore symbols x
channels whatever the transport, as spec.py counts it, and a rollback to polling takes effect at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger

from feedrunner.adapters.base import Adapter, Emit, TradeContinuity, now_ns, short
from feedrunner.events import Book, Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.resilience import BreakerState, Classified, ConnState, ErrorKind, sleep_or_stop
from feedrunner.spec import Venue

CALL_TIMEOUT = 15.0  # seconds a blocking futu-api call may take before we stop waiting for it
CONNECT_WAIT = 3.0  # how long a query waits for a (re)connecting context before failing
CHUNK = 100  # codes per Qot_Sub request, as futu-api's own resubscription does
SNAPSHOT_CHUNK = 400  # OpenD's limit per Qot_GetSecuritySnapshot
TICKER_HISTORY = 1000  # Qot_GetTicker returns at most this many recent prints
POLL_TICKERS = 100  # prints per poll while keeping up; a poll that falls behind asks for TICKER_HISTORY
PROBE_TICKERS = 50  # recent prints read once per code to learn whether its sequences are contiguous
INBOX_LIMIT = 200_000  # events waiting for the loop; beyond it pushes are dropped (and counted)
CALL_THREADS = 6  # concurrent blocking futu-api calls per adapter (reconcile, polls, probes, backfill, close)

SUBTYPE = {"ticker": "QUOTE", "trades": "TICKER", "book": "ORDER_BOOK"}
CHANNEL = {v: k for k, v in SUBTYPE.items()}
STREAMING = ("websocket", "hybrid")  # "websocket" labels futu's streaming push; the rollout is venue-agnostic
_SIDE = {1: "buy", 2: "sell"}  # Qot_Common.TickerDirection: 1 buyer-initiated, 2 seller-initiated


# -- futu-api, imported without its side effects --------------------------------------------------------


class _ToLoguru(logging.Handler):
    """futu-api's log records, into our logs instead of $HOME/.com.futunn.FutuOpenD/Log."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            logger.opt(depth=0).log(record.levelname, "futu-api: {}", record.getMessage())


def _import_futu() -> Any:
    """Import futu-api, then undo what its import does to the process.

    It opens a log file under $HOME (so HOME points at a throwaway folder while it loads, and the file
    handler is then swapped for one into loguru), prints warnings to stdout (silenced: a stdout sink
    must stay clean), and replaces the SIGINT handler with one that calls os._exit(0), which would skip
    the runner's drain and flush (the previous handler is put back).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    home = None
    if "futu" not in sys.modules:
        home = tempfile.mkdtemp(prefix="feedrunner-futu-")
        saved = os.environ.get("HOME")
        os.environ["HOME"] = home
        try:
            import futu
        finally:
            if saved is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = saved
    import futu
    from futu.common.ft_logger import logger as ftlog

    if main and signal.getsignal(signal.SIGINT) is getattr(futu, "quit_handler", None):
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if not isinstance(ftlog.fileHandler, _ToLoguru):
        old = ftlog.fileHandler
        ftlog.file_logger.removeHandler(old)
        old.close()
        ftlog.fileHandler = _ToLoguru()
        ftlog.file_logger.addHandler(ftlog.fileHandler)
    ftlog.console_level = logging.CRITICAL + 1  # its console handler writes to stdout
    ftlog.file_level = logging.WARNING  # DEBUG (its default) formats a line per push
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
    # A library thread must never keep the runner alive; we still close every one of them in stop().
    futu.SysConfig.set_all_thread_daemon(True)
    return futu


futu = _import_futu()
from futu.common.constant import ContextStatus  # noqa: E402
from futu.common.network_manager import CloseReason  # noqa: E402
from futu.common.utils import merge_qot_mkt_stock_str  # noqa: E402
from futu.quote.quote_query import MarketSnapshotQuery, OrderBookQuery, TickerQuery  # noqa: E402

RET_OK = futu.RET_OK


class FutuError(Exception):
    """A futu-api call answered RET_ERROR (its message is all we get) or did not answer in time."""


class FutuTimeout(FutuError, TimeoutError):
    """A futu-api call OpenD did not answer within CALL_TIMEOUT."""


def classify(exc: BaseException | str) -> Classified:
    """Map a futu-api / OpenD error message onto the response DESIGN.md prescribes."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, TimeoutError | OSError) or any(
        w in low for w in ("disconnect", "timeout", "closed", "status bad", "not connected", "connection", "lost")
    ):
        return Classified(ErrorKind.NETWORK)
    if "too frequent" in low or "frequen" in low or "频率" in text:
        return Classified(ErrorKind.RATE_LIMIT)
    if "unknown stock" in low or "未知股票" in text or "not exist" in low or "is wrong" in low:
        return Classified(ErrorKind.BAD_SYMBOL)
    return Classified(ErrorKind.UNKNOWN)


def _is_quota(text: str) -> bool:
    return "quota" in text.lower() or "额度" in text


def _is_hold(text: str) -> bool:
    """OpenD's refusal to cancel a subscription held for less than its minimum."""
    low = text.lower()
    return "at least" in low and "second" in low


@functools.lru_cache(maxsize=4096)
def _code(market: int, symbol: str) -> str:
    return merge_qot_mkt_stock_str(market, symbol)


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000) * 1000


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class _Calls:
    """Daemon threads for futu-api's blocking calls, owned by one adapter.

    Not the loop's default executor: a call can hang inside futu-api for ~20 s when OpenD accepts but
    does not answer, and such calls must neither starve the executor the whole runner shares, nor hold
    up the loop's close (which joins that executor's threads), nor keep the interpreter alive.
    """

    def __init__(self, name: str, size: int = CALL_THREADS) -> None:
        self._name = name
        self._size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((fut, fn, args, kwargs))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            if self._idle == 0 and len(self._threads) < self._size:
                t = threading.Thread(target=self._work, name=f"{self._name}-futu-call", daemon=True)
                self._threads.append(t)
                self._idle += 1
                t.start()
        return fut

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=5.0)
            except queue.Empty:  # idle: go away, unless a call came in meanwhile (submit counted on us)
                with self._lock:
                    if not self._queue.empty():
                        continue
                    self._idle -= 1
                    return
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            fut, fn, args, kwargs = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    fut.set_exception(exc)
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Every thread ends after its current call (futu-api answers those once the context is closed)."""
        with self._lock:
            n = len(self._threads)
        for _ in range(n):
            self._queue.put(None)

    async def run(self, timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result, swallowing a cancel that
        # lands as the call completes, and the cancelled task runs on (stop() would wait for it forever).
        async with asyncio.timeout(timeout):
            return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))


async def _close(calls: _Calls, ctx: Any) -> None:
    """Close a context off the loop: close() waits for the lock futu's network thread holds while it
    parses a read (milliseconds at high rates), then hands the socket to that thread and returns."""
    with contextlib.suppress(Exception):
        await calls.run(2.0, ctx.close)


def _unpack_raw(rsp: Any) -> tuple[int, str, Any]:
    """futu-api's unpack step, minus the DataFrame: the protobuf reply itself, parsed as a push is."""
    if rsp.retType != RET_OK:
        return futu.RET_ERROR, rsp.retMsg, None
    return RET_OK, "", rsp


def _raw_query(ctx: Any, pack: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[int, Any]:
    """A blocking query returning the protobuf reply (runs in a worker thread)."""
    query = ctx._get_sync_query_processor(pack, _unpack_raw)
    ret, msg, rsp = query(conn_id=ctx.get_sync_conn_id(), security_firm=ctx.get_security_firm(), **kwargs)
    return ret, (rsp if ret == RET_OK else msg)


# -- messages from futu-api's threads to the loop -------------------------------------------------------


@dataclass(slots=True)
class _Trades:
    symbol: str
    trades: list[Trade]
    streamed: bool


@dataclass(slots=True)
class _History:
    """Recent sequences of a code: tells whether they are contiguous, and where its tape starts."""

    symbol: str
    sequences: list[int]


@dataclass(slots=True)
class _Up:
    ctx: Any


@dataclass(slots=True)
class _Down:
    ctx: Any
    reason: str


@dataclass(slots=True)
class _Retry:
    ctx: Any


@dataclass(slots=True)
class _Notice:
    ctx: Any
    content: Any


@dataclass(slots=True)
class _Held:
    since: float  # monotonic time OpenD confirmed it, for the minimum-hold rule
    push: bool | None  # None: re-send (a silent push is re-registered)


class _Context(futu.OpenQuoteContext):  # type: ignore[misc]
    """OpenQuoteContext that reports its life to the adapter and lets the adapter own reconnection."""

    def __init__(self, host: str, port: int, post: Callable[[object], None]) -> None:
        self._post = post
        self.ever_up = False  # set by the adapter: a failed retry is "unreachable" until the first success
        super().__init__(host, port, is_async_connect=True)  # the blocking form retries forever inside
        self.set_sync_query_connect_timeout(CONNECT_WAIT)  # else a query waits forever for READY

    def close(self, reason: Any = CloseReason.Close) -> None:
        super().close(reason)
        if reason is CloseReason.Close:
            with self._lock:
                if self._status == ContextStatus.CLOSED:
                    # futu-api returns early for a CLOSED context, but a failed connect has already given
                    # it a fresh callback thread (for the next attempt): end that one and any timer too.
                    self._clear()
                    self._close_callback_executor()

    def on_disconnect(self, conn_id: int, reason: Any, msg: str) -> Any:
        with self._lock:
            self._recv_buf.clear()  # it survives reconnects: a torn frame would poison every later one
        self._post(_Down(self, f"{getattr(reason, 'name', reason)}{f': {msg}' if msg else ''}"))
        return super().on_disconnect(conn_id, reason, msg)

    def on_api_socket_reconnected(self) -> Any:
        # Not super(): it resubscribes from futu-api's own record; the adapter resubscribes from its own.
        self._post(_Up(self))
        return RET_OK, ""

    def _wait_reconnect(self, wait_reconnect_interval: float = 6) -> None:
        if wait_reconnect_interval == 0:
            self.reconnect_in(0.0)  # the first connect (is_async_connect)
        else:
            self._post(_Retry(self))  # the adapter answers with reconnect_in(its backoff delay)

    def reconnect_in(self, delay: float) -> None:
        """futu-api's _wait_reconnect with our delay, on a daemon timer (a stuck connect must not pin exit)."""
        with self._lock:
            if (
                not self._auto_reconnect
                or self._reconnect_timer is not None
                or self._status in (ContextStatus.CONNECTED, ContextStatus.CONNECTING, ContextStatus.CLOSING)
            ):
                return
            self._status = ContextStatus.WAIT_RECONNECT
            self._opend_conn_id = 0
            self._conn_id = 0
            timer = threading.Timer(delay, self._reconnect)
            timer.daemon = True
            self._reconnect_timer = timer
            timer.start()


def _handler(base: type, fn: Callable[[Any], None]) -> Any:
    """A push handler that hands the protobuf to `fn` (no DataFrame: pandas caps pushes near 400/s)."""

    class Handler(base):  # type: ignore[misc, valid-type]
        def on_recv_rsp(self, rsp_pb: Any) -> Any:
            fn(rsp_pb)
            return RET_OK, None

    return Handler()


# -- the adapter --------------------------------------------------------------------------------------


class FutuAdapter(Adapter):
    def __init__(self, venue: Venue, emit: Emit, metrics: Metrics) -> None:
        super().__init__(venue, emit, metrics)
        self.ctx: _Context | None = None
        self.host = venue.host or "127.0.0.1"
        self.port = venue.port or 11111
        # Futu sequences grow per code, so "not above the last" is a repeat, unless a restarted OpenD
        # renumbered (TradeContinuity tells them apart); a gap is counted only for codes whose history
        # shows contiguous sequences (`_exact`).
        self.continuity = TradeContinuity(True, on_reset=self.sequence_reset, on_duplicate=self.duplicate_dropped)
        self._exact: dict[str, bool] = {}
        self._suspect: set[str] = set()  # codes that may have missed prints: backfill on their next one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[object] = deque()
        self._inbox_ready = asyncio.Event()
        self._wake_pending = False
        self._up = False  # the current context is READY and ours to subscribe on
        self._conn_gen = 0  # bumped on every up/down: results of calls that straddle one are dropped
        self._subs: dict[tuple[str, str], _Held] = {}  # what OpenD holds for us on this connection
        self._live: dict[str, set[str]] = {}  # symbol -> channels whose pushes we deliver now
        self._deferred: dict[tuple[str, str], float] = {}  # unsubscribes waiting for the minimum hold
        self._waiting: list[str] = []  # symbols that do not fit the quota yet
        self._hold_until = 0.0  # subscription retries paused until then (quota, unknown errors)
        self._hold_failures = 0
        self._down_reason = "connecting"
        self._up_since: float | None = None
        self._probe_window = min(venue.stale_after.values(), default=5.0)
        self._renewing = False
        self._qot_down = False  # OpenD told us its own link to Futu's quote servers is down
        self._top: dict[str, tuple[float, float]] = {}  # best bid/ask from the latest book, for tickers
        self._last_quote: dict[str, tuple[Any, ...]] = {}
        self._calls = _Calls(venue.name)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.spawn(self._drain(), f"{self.name}-drain")
        self.spawn(self._watchdog(), f"{self.name}-watchdog")
        self.spawn(self._poll_loop(), f"{self.name}-poll")
        self.conn.move(ConnState.CONNECTING, f"connecting to OpenD at {self.host}:{self.port}")
        self._open()
        while not self.stopping.is_set():
            self.changed.clear()
            try:
                await self._reconcile()
            except Exception as exc:  # a bug here must not end the venue
                logger.opt(exception=exc).error("venue {} reconcile failed", self.name)
            self.backoff.tick()
            wait = 0.5
            if self._deferred:
                wait = min(wait, max(0.01, min(self._deferred.values()) - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.changed.wait()

    async def close(self) -> None:
        ctx, self.ctx = self.ctx, None
        self._up = False
        try:
            if ctx is not None:
                await _close(self._calls, ctx)
        finally:  # also when stop's deadline cuts the wait short
            self._calls.close()

    def _open(self) -> None:
        """A new context; it connects on futu-api's timer thread and reports through `_post`."""
        ctx = _Context(self.host, self.port, self._post)
        ctx.set_handler(_handler(futu.StockQuoteHandlerBase, self._on_quote_push))
        ctx.set_handler(_handler(futu.TickerHandlerBase, self._on_ticker_push))
        ctx.set_handler(_handler(futu.OrderBookHandlerBase, self._on_book_push))
        ctx.set_handler(_handler(futu.SysNotifyHandlerBase, lambda rsp: self._on_notify_push(ctx, rsp)))
        self.ctx = ctx

    async def _renew(self, why: str) -> None:
        """Close a connected-but-silent context and open a fresh one after our backoff."""
        if self._renewing or self.stopping.is_set():
            return
        self._renewing = True
        try:
            old, self.ctx = self.ctx, None
            self._lost(why)
            if old is not None:
                await _close(self._calls, old)
            delay = self._next_delay(why)
            if delay is None or await sleep_or_stop(delay, self.stopping):
                return
            self._open()
        finally:
            self._renewing = False

    def _lost(self, why: str) -> None:
        """The connection's subscriptions are gone with it; trades may be missing until it is back."""
        self._up = False
        self._conn_gen += 1
        self._subs.clear()
        self._deferred.clear()
        self._live = {}
        for key in self.watchdog.keys():
            self.watchdog.disarm(key)
        if "trades" in self.venue.channels:
            self._suspect.update(self.wanted)
        self.continuity.arm(self.wanted)  # a restarted OpenD may come back renumbered
        self._up_since = None
        self._down_reason = why
        self.conn.move(ConnState.RECONNECTING, why)

    def _next_delay(self, why: str) -> float | None:
        """The wait before the next connect attempt, from our backoff; None once attempts run out."""
        self.breaker.failure(why)
        if self.backoff.exhausted:
            self.conn.move(ConnState.FAILED, f"gave up after {self.backoff.attempts} attempts: {why}")
            self.stopping.set()
            self.changed.set()
            ctx, self.ctx = self.ctx, None
            if ctx is not None:
                ctx.close()  # here and now, once: a task could be cancelled by stop() before it ran
            return None
        delay = self.backoff.next_delay()
        self.retries.append((time.monotonic(), delay, ErrorKind.NETWORK.value))
        self.metrics.reconnects.labels(self.name).inc()
        self.metrics.errors.labels(self.name, ErrorKind.NETWORK.value).inc()
        logger.info("venue {} reconnect attempt {} in {:.2f}s ({})", self.name, self.backoff.attempts, delay, why)
        return delay

    # -- futu-api's threads -> the loop --------------------------------------------------------------

    def _post(self, item: object) -> None:
        """Queue for the loop (any thread). One wake-up per batch, not per push."""
        if len(self._inbox) >= INBOX_LIMIT and isinstance(item, Ticker | Book | _Trades):
            self.metrics.dropped.labels("futu_backlog").inc()
            if isinstance(item, _Trades):
                self._suspect.add(item.symbol)  # contiguous codes see the gap anyway; the others need telling
            return
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
                    loop.call_soon_threadsafe(self._inbox_ready.set)

    async def _drain(self) -> None:
        while not self.stopping.is_set():  # a cancel can be lost (see _Calls.run); stopping cannot
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            self._wake_pending = False
            while self._inbox and not self.stopping.is_set():
                item = self._inbox.popleft()
                try:
                    await self._handle(item)
                except Exception as exc:
                    logger.opt(exception=exc).error("venue {} failed to handle {}", self.name, type(item).__name__)

    async def _handle(self, item: object) -> None:
        if isinstance(item, Ticker):
            if item.transport == "websocket":
                if "ticker" not in self._live.get(item.symbol, ()):
                    return
                self._streamed(item.symbol, "ticker")
                key = (item.ts_exchange, item.last, item.volume)
                if self._last_quote.get(item.symbol) == key:
                    return  # a first push repeats the quote we already have
                self._last_quote[item.symbol] = key
            await self.deliver(item)
        elif isinstance(item, Book):
            if item.transport == "websocket":
                if "book" not in self._live.get(item.symbol, ()):
                    return
                self._streamed(item.symbol, "book")
            await self.deliver(item)
        elif isinstance(item, _Trades):
            await self._on_trades(item)
        elif isinstance(item, _History):
            self._on_history(item)
        elif isinstance(item, _Up):
            self._on_up(item)
        elif isinstance(item, _Down):
            if item.ctx is self.ctx:
                self._lost(f"disconnected from OpenD ({item.reason})")
        elif isinstance(item, _Retry):
            self._on_retry(item)
        elif isinstance(item, _Notice):
            self._on_notice(item)

    def _on_up(self, item: _Up) -> None:
        if item.ctx is not self.ctx or self.stopping.is_set():
            return
        first = self._conn_gen == 0
        item.ctx.ever_up = True
        self._up = True
        self._conn_gen += 1
        self._subs.clear()  # a new connection holds nothing yet
        self.backoff.connected()
        self.conn.move(ConnState.CONNECTED, "OpenD ready" if first else "reconnected to OpenD")
        self.changed.set()

    def _on_retry(self, item: _Retry) -> None:
        if item.ctx is not self.ctx or self.stopping.is_set():
            return
        why = self._down_reason if item.ctx.ever_up else f"cannot reach OpenD at {self.host}:{self.port}"
        delay = self._next_delay(why)
        if delay is None:
            return
        self.conn.move(ConnState.RECONNECTING, f"{why}; retry in {delay:.2f}s")
        item.ctx.reconnect_in(delay)

    def _on_notice(self, item: _Notice) -> None:
        kind, sub, data = item.content if isinstance(item.content, tuple) else (None, None, None)
        if kind == "CONN_STATUS" and isinstance(data, dict) and "qot_logined" in data:
            down = not data["qot_logined"]
            if down and not self._qot_down:
                logger.warning("venue {}: OpenD lost its link to Futu's quote servers", self.name)
                self._suspect.update(self.wanted)
            elif not down and self._qot_down:
                logger.info("venue {}: OpenD's quote link is back", self.name)
                for key in self.watchdog.keys():
                    self.watchdog.seen(key)  # the silence was OpenD's, already accounted for
            self._qot_down = down
            self.changed.set()
        elif kind is not None:
            logger.warning("venue {}: OpenD notice {} {}: {}", self.name, kind, sub, data)

    # -- push parsing (futu-api's callback thread) -------------------------------------------------------

    def _on_quote_push(self, rsp: Any) -> None:
        if rsp.retType != RET_OK:
            return
        received = now_ns()
        for q in rsp.s2c.basicQotList:
            code = _code(q.security.market, q.security.code)
            top = self._top.get(code)
            self._post(
                Ticker(
                    self.name,
                    code,
                    _ns(q.updateTimestamp) if q.HasField("updateTimestamp") else None,
                    received,
                    "websocket",
                    top[0] if top else None,
                    top[1] if top else None,
                    q.curPrice,
                    float(q.hpVolume) if q.HasField("hpVolume") else float(q.volume),
                )
            )

    def _on_ticker_push(self, rsp: Any) -> None:
        if rsp.retType != RET_OK:
            return
        s2c = rsp.s2c
        code = _code(s2c.security.market, s2c.security.code)
        self._post(_Trades(code, self._trades(code, s2c.tickerList, now_ns(), "websocket"), streamed=True))

    def _on_book_push(self, rsp: Any) -> None:
        if rsp.retType == RET_OK:
            self._post(self._book(rsp.s2c, now_ns(), "websocket"))

    def _on_notify_push(self, ctx: Any, rsp: Any) -> None:
        ret, content = futu.SysNotifyHandlerBase.parse_rsp_pb(rsp)
        if ret == RET_OK:
            self._post(_Notice(ctx, content))

    def _trades(self, code: str, tickers: Iterable[Any], received: int, transport: str) -> list[Trade]:
        return [
            Trade(
                self.name,
                code,
                _ns(t.timestamp) if t.HasField("timestamp") else None,
                received,
                transport,
                str(t.sequence),
                t.price,
                float(t.hpVolume) if t.HasField("hpVolume") else float(t.volume),
                _SIDE.get(t.dir),
            )
            for t in tickers
        ]

    def _book(self, s2c: Any, received: int, transport: str) -> Book:
        code = _code(s2c.security.market, s2c.security.code)
        depth = self.venue.book_depth
        bids = [(lvl.price, float(lvl.volume)) for lvl in s2c.orderBookBidList[:depth]]
        asks = [(lvl.price, float(lvl.volume)) for lvl in s2c.orderBookAskList[:depth]]
        stamps = [getattr(s2c, f) for f in ("svrRecvTimeBidTimestamp", "svrRecvTimeAskTimestamp") if s2c.HasField(f)]
        if bids and asks:
            self._top[code] = (bids[0][0], asks[0][0])
        # Futu books carry no sequence: every push is a full top-of-book snapshot.
        return Book(self.name, code, _ns(max(stamps)) if any(stamps) else None, received, transport, bids, asks, None)

    # -- continuity (the loop) ------------------------------------------------------------------------

    async def _on_trades(self, batch: _Trades) -> None:
        symbol = batch.symbol
        if batch.streamed:
            if "trades" not in self._live.get(symbol, ()):
                return
            self._streamed(symbol, "trades")
        trades = sorted(batch.trades, key=lambda t: int(t.id))  # type: ignore[arg-type]
        if symbol not in self.continuity.last:
            trades = trades[-1:]  # a tape starts now, as a stream would
        for trade in trades:
            last = self.continuity.last.get(symbol)
            fresh, missing = self.continuity.check(trade)
            if not fresh:
                continue
            if last is not None and int(trade.id) <= last:  # type: ignore[arg-type]
                last = None  # a reset: counted from here, nothing before it to backfill
            # A gap counts while contiguity is unknown too (the backfill's history settles it); without
            # contiguous sequences only a known outage (`_suspect`) says prints may be missing.
            exact = self._exact.get(symbol)
            if last is not None and ((missing and exact is not False) or (not exact and symbol in self._suspect)):
                await self._backfill(symbol, last, int(trade.id), missing)  # type: ignore[arg-type]
            self._suspect.discard(symbol)
            await self.deliver(trade)

    def _on_history(self, item: _History) -> None:
        seqs = item.sequences
        if len(seqs) >= 2 and item.symbol not in self._exact:
            self._exact[item.symbol] = all(b - a == 1 for a, b in itertools.pairwise(seqs))
            logger.debug(
                "venue {} {}: ticker sequences {}contiguous",
                self.name,
                item.symbol,
                "" if self._exact[item.symbol] else "not ",
            )
        if seqs and item.symbol not in self.continuity.last:
            self.continuity.last[item.symbol] = seqs[-1]

    async def _backfill(self, symbol: str, last: int, upto: int, missing: int) -> None:
        """Recover prints between `last` and `upto` from Qot_GetTicker (the latest 1000), once, in order;
        count what is gone. Without contiguous sequences the count is unknowable: logged, not counted."""
        recovered = 0
        reached = False
        try:
            rsp = await self._query(TickerQuery.pack_req, code=symbol, num=TICKER_HISTORY)
            tickers = list(rsp.s2c.tickerList)
            seqs = [t.sequence for t in tickers]
            self._on_history(_History(symbol, seqs))
            reached = bool(seqs) and min(seqs) <= last + 1
            gap = [t for t in tickers if last < t.sequence < upto]
            for trade in sorted(self._trades(symbol, gap, now_ns(), "polling"), key=lambda t: int(t.id)):  # type: ignore[arg-type]
                trade.backfilled = True
                await self.deliver(trade)
                recovered += 1
        except Exception as exc:
            c = classify(exc)
            self.metrics.errors.labels(self.name, c.kind.value).inc()
            self.backfill_failed(symbol, "timeout" if isinstance(exc, FutuTimeout) else c.kind.value, exc)
        exact = self._exact.get(symbol)
        self.backfill_done(
            symbol, recovered, max(0, missing - recovered) if exact else 0, f"between sequences {last} and {upto}"
        )
        if not exact and not reached:
            logger.error(
                "venue {} {}: OpenD's last {} prints do not reach back to sequence {}: "
                "an unknown number of trades before {} is lost ({} backfilled)",
                self.name,
                symbol,
                TICKER_HISTORY,
                last,
                upto,
                recovered,
            )

    # -- desired -> actual subscriptions -----------------------------------------------------------------

    def _plan(self) -> dict[tuple[str, str], bool]:
        """(symbol, subtype) -> push, for every symbol that fits the quota.

        Subscriptions still held for a deferred unsubscribe count against the quota too; symbols already
        held come first, so a held symbol never makes way for a new one.
        """
        channels = self.venue.channels
        active = [s for s in self.wanted if self.effective(s) is not None]
        active_set = set(active)
        room = self.venue.quota - sum(1 for (s, _) in self._subs if s not in active_set)
        held = [s for s in active if all((s, SUBTYPE[c]) in self._subs for c in channels)]
        held_set = set(held)
        plan: dict[tuple[str, str], bool] = {}
        waiting = []
        for symbol in held + [s for s in active if s not in held_set]:
            if room < len(channels):
                waiting.append(symbol)
                continue
            room -= len(channels)
            push = self.effective(symbol) in STREAMING
            for channel in channels:
                plan[(symbol, SUBTYPE[channel])] = push
        if waiting != self._waiting:
            if waiting:
                logger.warning(
                    "venue {}: {} symbol(s) wait for subscription quota ({} held of {}): {}",
                    self.name,
                    len(waiting),
                    len(self._subs),
                    self.venue.quota,
                    ", ".join(waiting),
                )
            self._waiting = waiting
        return plan

    async def _reconcile(self) -> None:
        plan = self._plan()
        if self._up and time.monotonic() >= self._hold_until:
            changes: dict[tuple[str, bool], list[str]] = {}
            for (symbol, subtype), push in plan.items():
                held = self._subs.get((symbol, subtype))
                if held is None or held.push is not push:
                    changes.setdefault((subtype, push), []).append(symbol)
            for (subtype, push), codes in changes.items():
                for chunk in _chunks(codes, CHUNK):
                    if not self._up:
                        break
                    await self._subscribe(chunk, subtype, push)
            if self._up:
                await self._release(plan)
        self._refresh_live(plan)
        for transport in ("websocket", "polling", "hybrid"):
            n = sum(1 for s in self.wanted if self.effective(s) == transport and s not in self._waiting)
            self.metrics.symbols.labels(self.name, transport).set(n)
        self._settle_state()

    async def _subscribe(self, codes: list[str], subtype: str, push: bool) -> None:
        ctx, gen = self.ctx, self._conn_gen
        if ctx is None:
            return
        try:
            await self._call(ctx.subscribe, codes, [subtype], is_first_push=push, subscribe_push=push)
        except FutuError as exc:
            if gen == self._conn_gen:
                await self._subscribe_failed(codes, subtype, push, exc)
            return
        if gen != self._conn_gen:
            return  # the connection went away meanwhile: this answer belongs to the old one
        now = time.monotonic()
        fresh = []
        for code in codes:
            held = self._subs.get((code, subtype))
            self._subs[(code, subtype)] = _Held(since=held.since if held else now, push=push)
            if held is None:
                fresh.append(code)
            live = self._live.setdefault(code, set())
            if push:
                if CHANNEL[subtype] not in live:
                    live.add(CHANNEL[subtype])
                    self.watchdog.arm((code, CHANNEL[subtype]), self.venue.stale_after[CHANNEL[subtype]])
            else:
                live.discard(CHANNEL[subtype])
                self.watchdog.disarm((code, CHANNEL[subtype]))
        self._hold_failures = 0
        logger.info(
            "venue {} {} {} {} ({} push)",
            self.name,
            "subscribed" if fresh else "re-registered",
            CHANNEL[subtype],
            ",".join(codes),
            "with" if push else "without",
        )
        if subtype == "TICKER":
            unknown = [c for c in fresh if c not in self._exact]
            if unknown:
                self.spawn(self._probe(unknown), f"{self.name}-probe")

    async def _subscribe_failed(self, codes: list[str], subtype: str, push: bool, exc: FutuError) -> None:
        text = str(exc)
        c = classify(exc)
        named = [code for code in codes if code in text]
        if _is_quota(text):
            self.count(Classified(ErrorKind.UNKNOWN), exc, None)
            logger.error("venue {}: OpenD refused {} {}: {}", self.name, subtype, ",".join(codes), text)
            self._pause_subscribing()
        elif c.kind is ErrorKind.BAD_SYMBOL or (named and c.kind is not ErrorKind.NETWORK):
            if named:
                for code in named:
                    self.quarantine(code, text)
                rest = [code for code in codes if code not in named]
                if rest:
                    await self._subscribe(rest, subtype, push)
            elif len(codes) > 1:
                for code in codes:  # OpenD did not say which: find it one code at a time
                    await self._subscribe([code], subtype, push)
            else:
                self.quarantine(codes[0], text)
        else:
            self.count(c, exc, None)
            if c.kind is not ErrorKind.NETWORK:
                self._pause_subscribing()

    def _pause_subscribing(self) -> None:
        self._hold_failures += 1
        b = self.venue.backoff
        delay = min(b.cap, b.base * b.factor ** (self._hold_failures - 1))
        self._hold_until = time.monotonic() + delay

    async def _probe(self, codes: list[str]) -> None:
        """Read each new code's recent prints once: are its sequences contiguous, and where does it start."""
        for code in codes:
            try:
                rsp = await self._query(TickerQuery.pack_req, code=code, num=PROBE_TICKERS)
            except Exception as exc:
                logger.debug("venue {} {}: ticker probe failed: {}", self.name, code, short(exc))
                continue
            self._post(_History(code, [t.sequence for t in rsp.s2c.tickerList]))

    async def _release(self, plan: Mapping[tuple[str, str], bool]) -> None:
        """Unsubscribe what is no longer planned, each once OpenD allows it (min_subscription after)."""
        now = time.monotonic()
        due: dict[str, list[str]] = {}
        newly: dict[str, float] = {}
        for key, held in list(self._subs.items()):
            if key in plan:
                self._deferred.pop(key, None)
                continue
            allowed = held.since + self.venue.min_subscription
            if now < allowed:
                if key not in self._deferred:
                    newly[key[0]] = allowed - now
                self._deferred[key] = allowed
            else:
                due.setdefault(key[1], []).append(key[0])
        for symbol, wait in newly.items():
            logger.info(
                "venue {} unsubscribe {} deferred {:.1f}s: OpenD cancels a subscription only after {:g}s",
                self.name,
                symbol,
                wait,
                self.venue.min_subscription,
            )
        for subtype, codes in due.items():
            for chunk in _chunks(codes, CHUNK):
                await self._unsubscribe(chunk, subtype)

    async def _unsubscribe(self, codes: list[str], subtype: str) -> None:
        ctx, gen = self.ctx, self._conn_gen
        if ctx is None:
            return
        try:
            await self._call(ctx.unsubscribe, codes, [subtype])
        except FutuError as exc:
            if gen != self._conn_gen:
                return
            text, c = str(exc), classify(exc)
            hold = _is_hold(text)  # names the code too, so it is told apart first
            if not hold and (
                c.kind is ErrorKind.BAD_SYMBOL or (c.kind is ErrorKind.UNKNOWN and any(x in text for x in codes))
            ):
                # OpenD no longer knows the code, so it holds nothing for it: forget it here too.
                logger.warning("venue {} dropped {} {} without unsubscribing: {}", self.name, subtype, codes, text)
            else:
                if not hold:  # a hold refusal only means OpenD's clock started after ours
                    self.count(c, exc, None)
                retry = time.monotonic() + (1.0 if hold else max(1.0, self.venue.backoff.cap))
                for code in codes:
                    held = self._subs.get((code, subtype))
                    if held is not None:
                        held.since = retry - self.venue.min_subscription
                    self._deferred[(code, subtype)] = retry
                return
        if gen != self._conn_gen:
            return
        for code in codes:
            self._subs.pop((code, subtype), None)
            self._deferred.pop((code, subtype), None)
            self._live.get(code, set()).discard(CHANNEL[subtype])
            self.watchdog.disarm((code, CHANNEL[subtype]))
        logger.info("venue {} unsubscribed {} {}", self.name, CHANNEL[subtype], ",".join(codes))

    def _refresh_live(self, plan: Mapping[tuple[str, str], bool]) -> None:
        """Deliver pushes only for planned, push-registered subscriptions; watch exactly those."""
        live: dict[str, set[str]] = {}
        for (symbol, subtype), held in self._subs.items():
            if held.push and plan.get((symbol, subtype)):
                live.setdefault(symbol, set()).add(CHANNEL[subtype])
        for symbol, channel in self.watchdog.keys():  # type: ignore[misc]
            if channel not in live.get(symbol, ()):
                self.watchdog.disarm((symbol, channel))
        self._live = live

    def _settle_state(self) -> None:
        if not self._up:
            return
        problem = None
        if self._qot_down:
            problem = "OpenD lost its link to Futu's quote servers"
        elif self.quarantined or self._waiting or any(self.effective(s) != self.wanted[s] for s in self.wanted):
            problem = "some symbols quarantined, waiting for quota or on fallback"
        if problem and self.conn.state is ConnState.CONNECTED:
            self.conn.move(ConnState.DEGRADED, problem)
        elif not problem and self.conn.state is ConnState.DEGRADED:
            self.conn.move(ConnState.CONNECTED, "all symbols on their desired transport")

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["waiting_for_quota"] = list(self._waiting)
        st["deferred_unsubscribes"] = sorted(f"{s}:{CHANNEL[t]}" for s, t in self._deferred)
        return st

    # -- health ----------------------------------------------------------------------------------------

    def _streamed(self, symbol: str, channel: str) -> None:
        """A push arrived: feed the watchdog; a connection that keeps delivering closes the breaker."""
        self.seen(symbol, channel)
        now = time.monotonic()
        if self._up_since is None:
            self._up_since = now
        elif now - self._up_since >= self._probe_window and (
            self.breaker.failures or self.breaker.state is not BreakerState.CLOSED
        ):
            self.breaker.success()

    async def _watchdog(self) -> None:
        """Silent subscriptions on a live connection: every symbol -> a fresh context (with backoff);
        some symbols -> their push is registered again and their symbol breakers count it."""
        while not self.stopping.is_set():
            await asyncio.sleep(0.25)
            if not self._up or self._qot_down:
                continue
            stale = self.watchdog.stale()
            if not stale:
                continue
            # Every symbol silent on some channel is the connection's fault, not theirs.
            everything = {k[0] for k, _ in stale} == {k[0] for k in self.watchdog.keys()}  # type: ignore[index]
            self.record_stalls(stale, everything)
            for (symbol, channel), _ in stale:  # type: ignore[misc]
                if channel == "trades":
                    self._suspect.add(symbol)
                if not everything:
                    held = self._subs.get((symbol, SUBTYPE[channel]))
                    if held is not None:
                        held.push = None
            self._up_since = None
            if everything:
                self.spawn(self._renew(f"{len(stale)} subscription(s) silent past stale_after"), f"{self.name}-renew")
            self.changed.set()

    # -- polling ---------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        interval = self.venue.poll_interval
        while not self.stopping.is_set():
            started = time.monotonic()
            if self._up:
                await self._poll_once()
            if await sleep_or_stop(interval - (time.monotonic() - started), self.stopping):
                return

    async def _poll_once(self) -> None:
        channels = self.venue.channels
        polled = {
            s: eff
            for s in self.wanted
            if (eff := self.effective(s)) in ("polling", "hybrid") and s not in self._waiting
        }
        full = [s for s, eff in polled.items() if eff == "polling"]
        if "ticker" in channels:
            for chunk in _chunks(full, SNAPSHOT_CHUNK):
                await self._guard(self._poll_tickers(chunk), chunk)
        if "trades" in channels:
            for symbol in polled:
                if (symbol, "TICKER") in self._subs:
                    await self._guard(self._poll_trades(symbol), [symbol])
        if "book" in channels:
            for symbol in full:
                if (symbol, "ORDER_BOOK") in self._subs:
                    await self._guard(self._poll_book(symbol), [symbol])

    async def _guard(self, coro: Any, symbols: list[str]) -> None:
        """One poll request; its failure is classified and never ends the loop."""
        try:
            await coro
        except Exception as exc:
            c = classify(exc)
            named = [s for s in symbols if s in str(exc)]
            if c.kind is ErrorKind.BAD_SYMBOL or (named and c.kind is ErrorKind.UNKNOWN):
                for s in named or (symbols if len(symbols) == 1 else []):
                    self.quarantine(s, short(exc))
                if not named and len(symbols) > 1:  # only the snapshot asks for several codes at once
                    for s in symbols:  # not attributable: ask one code at a time
                        await self._guard(self._poll_tickers([s]), [s])
                return
            self.count(c, exc, symbols[0] if len(symbols) == 1 else None)
            if c.kind is ErrorKind.RATE_LIMIT:
                await sleep_or_stop(self.venue.backoff.cap, self.stopping)

    async def _poll_tickers(self, codes: list[str]) -> None:
        rsp = await self._query(MarketSnapshotQuery.pack_req, stock_list=codes)
        received = now_ns()
        for snap in rsp.s2c.snapshotList:
            b = snap.basic
            await self.deliver(
                Ticker(
                    self.name,
                    _code(b.security.market, b.security.code),
                    _ns(b.updateTimestamp) if b.HasField("updateTimestamp") else None,
                    received,
                    "polling",
                    b.bidPrice if b.HasField("bidPrice") else None,
                    b.askPrice if b.HasField("askPrice") else None,
                    b.curPrice,
                    float(b.hpVolume) if b.HasField("hpVolume") else float(b.volume),
                )
            )

    async def _poll_trades(self, symbol: str) -> None:
        last = self.continuity.last.get(symbol)
        rsp = await self._query(TickerQuery.pack_req, code=symbol, num=POLL_TICKERS)
        tickers = list(rsp.s2c.tickerList)
        behind = last is not None and len(tickers) == POLL_TICKERS and tickers[0].sequence > last + 1
        if behind:  # more happened since the last poll than one page holds
            rsp = await self._query(TickerQuery.pack_req, code=symbol, num=TICKER_HISTORY)
            tickers = list(rsp.s2c.tickerList)
        if symbol not in self._exact:
            self._on_history(_History(symbol, [t.sequence for t in tickers]))
        new = [t for t in tickers if last is None or t.sequence > last]
        if last is not None and tickers and tickers[-1].sequence < last:
            new = tickers  # OpenD's newest is below what we had: it renumbered; `check` sorts them out
        if new:
            self._post(_Trades(symbol, self._trades(symbol, new, now_ns(), "polling"), streamed=False))

    async def _poll_book(self, symbol: str) -> None:
        rsp = await self._query(OrderBookQuery.pack_req, code=symbol, num=self.venue.book_depth)
        await self.deliver(self._book(rsp.s2c, now_ns(), "polling"))

    # -- blocking calls, off the loop -----------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A futu-api call on our call threads with a deadline; RET_ERROR becomes FutuError."""
        try:
            ret, data = await self._calls.run(CALL_TIMEOUT, fn, *args, **kwargs)
        except TimeoutError:
            raise FutuTimeout(f"timeout: OpenD did not answer within {CALL_TIMEOUT:g}s") from None
        if ret != RET_OK:
            raise FutuError(str(data))
        return data

    async def _query(self, pack: Callable[..., Any], **kwargs: Any) -> Any:
        ctx = self.ctx
        if ctx is None or not self._up:
            raise FutuError("not connected to OpenD")
        return await self._call(_raw_query, ctx, pack, kwargs)
