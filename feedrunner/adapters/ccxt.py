"""Any ccxt exchange: websocket through ccxt.pro `watch_*`, polling through `fetch_*`.

ccxt neither reconnects in the background nor backs off: the next watch_* call reconnects. So each
channel is one loop that calls watch_*, and every failure goes through one place (`_ws_failed`) that
classifies it, feeds the breakers and sets a shared retry time from the venue's backoff, so several
channel loops failing together count as one reconnect. A connected stream that goes silent is never
noticed by ccxt; our watchdog finds it and closes the socket so the loop reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from feedrunner.adapters import binance_frames, wsreads
from feedrunner.adapters.arrivals import ArmedSet, Arrivals
from feedrunner.adapters.base import Adapter, Emit, TradeContinuity, now_ns
from feedrunner.adapters.base import short as _short
from feedrunner.events import Book, Event, Ticker, Trade, ms_to_ns
from feedrunner.lazyccxt import ccxt
from feedrunner.metrics import Metrics
from feedrunner.resilience import BreakerState, Classified, ConnState, ErrorKind, sleep_or_stop
from feedrunner.spec import Venue

CHUNK = 100  # symbols per multi-symbol watch call (Binance accepts 200 at most)
UNWATCH = {  # channel -> ccxt.pro method and the params its watch used
    "trades": ("un_watch_trades_for_symbols", {}),
    "ticker": ("un_watch_tickers", {"name": "ticker"}),
    "book": ("un_watch_order_book_for_symbols", {}),
}
CONTIGUOUS_TRADE_IDS = frozenset({"binance", "binanceus", "binanceusdm", "binancecoinm"})


def classify(exc: BaseException) -> Classified:
    """Map a ccxt (or socket) exception onto the response DESIGN.md prescribes."""
    if isinstance(exc, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
        return Classified(ErrorKind.RATE_LIMIT)
    if isinstance(exc, ccxt.AuthenticationError | ccxt.PermissionDenied | ccxt.AccountSuspended):
        return Classified(ErrorKind.AUTH)
    if isinstance(exc, ccxt.BadSymbol):
        return Classified(ErrorKind.BAD_SYMBOL)
    if isinstance(exc, ccxt.NetworkError | OSError | TimeoutError | asyncio.TimeoutError):
        return Classified(ErrorKind.NETWORK)
    return Classified(ErrorKind.UNKNOWN)


def rebase(urls: Any, rest: str | None, ws: str | None) -> Any:
    """Point every URL of a ccxt `urls['api']` tree at new base URLs, keeping each path."""
    if isinstance(urls, dict):
        return {k: rebase(v, rest, ws) for k, v in urls.items()}
    if isinstance(urls, str) and "://" in urls:
        base = ws if urls.startswith("ws") else rest
        if base:
            parts = urlsplit(urls)
            return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
    return urls


def to_trade(venue: str, t: dict[str, Any], received: int, transport: str, backfilled: bool = False) -> Trade:
    """A ccxt trade dict, normalised."""
    tid = t.get("id")
    return Trade(
        venue,
        t["symbol"],
        ms_to_ns(t.get("timestamp")),
        received,
        transport,
        None if tid is None else str(tid),
        float(t["price"]),
        float(t["amount"]),
        t.get("side"),
        backfilled,
    )


def _names(symbols: tuple[str, ...] | list[str]) -> str:
    """Symbols for a log line: all of a few, a count and a sample of many."""
    return ",".join(symbols) if len(symbols) <= 10 else f"{len(symbols)} symbols ({','.join(symbols[:5])}, ...)"


def _ignore(*_: Any) -> None:
    """ccxt's cache cleaning, and the message callback of a dropped websocket client."""


def _connection_per_set(exchange: Any) -> bool:
    """ccxt.pro binance (and its family) open a connection per subscribed symbol set, round-robin over
    `options.streamLimits` connections."""
    return isinstance(exchange.options.get("streamLimits"), dict)


class Chunks:
    """Streaming symbols cut into multi-symbol watch calls that stay put: a symbol that leaves or joins
    changes its own chunk only. ccxt subscribes every distinct symbol set anew (ccxt.pro binance on a
    connection of its own), so re-cutting a sorted list would resubscribe every chunk after the change."""

    def __init__(self, size: int = CHUNK) -> None:
        self.size = size
        self._of: dict[str, int] = {}

    def assign(self, symbols: Iterable[str]) -> dict[int, tuple[str, ...]]:
        """Chunk number -> its symbols, sorted."""
        wanted = set(symbols)
        for symbol in [s for s in self._of if s not in wanted]:
            del self._of[symbol]
        sizes = Counter(self._of.values())
        for symbol in sorted(wanted - self._of.keys()):
            i = next(i for i in itertools.count() if sizes[i] < self.size)
            self._of[symbol] = i
            sizes[i] += 1
        members: dict[int, list[str]] = {}
        for symbol, i in self._of.items():
            members.setdefault(i, []).append(symbol)
        return {i: tuple(sorted(members[i])) for i in sorted(members)}


class CcxtAdapter(Adapter):
    def __init__(self, venue: Venue, emit: Emit, metrics: Metrics) -> None:
        super().__init__(venue, emit, metrics)
        self.exchange: Any = None
        self.continuity = TradeContinuity(
            venue.exchange in CONTIGUOUS_TRADE_IDS, on_reset=self.sequence_reset, on_duplicate=self.duplicate_dropped
        )
        self._retry_at = 0.0  # monotonic time before which no loop may reconnect
        self._ws_sets: dict[str, tuple[str, ...]] = {}  # loop name -> symbols it serves
        self._chunks = Chunks()
        self._loops: dict[str, asyncio.Task[Any]] = {}
        self._reading: set[str] = set()  # websocket loops whose watch has returned data since they started
        self._up_since: float | None = None  # when the websocket last started delivering
        self._last_data = 0.0  # when it last delivered
        self._failed_at = -1e9  # when the last outage was counted
        self._probe_window = min(venue.stale_after.values(), default=5.0)
        self._markets_checked: set[str] = set()  # symbols looked up again after load_markets missed them
        self._markets_pending: set[str] = set()
        self._seen_stamp: dict[tuple[str, str], Any] = {}
        self._arrivals: Arrivals | None = None  # binance: trade loops woken by the parse, see arrivals.py
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}  # last ticker timestamp / book nonce emitted

    # -- lifecycle ---------------------------------------------------------------------------------

    def _client(self) -> Any:
        v = self.venue
        cls = getattr(ccxt.pro, v.exchange)
        config: dict[str, Any] = {
            "enableRateLimit": v.rate_limit if v.rate_limit is not None else not v.endpoints,
            "options": {"tradesLimit": v.trades_buffer},
        }
        for key, field in (("apiKey", "api_key"), ("secret", "secret"), ("password", "password")):
            if field in v.credentials:
                config[key] = v.credentials[field].reveal()
        client = cls(config)
        if isinstance(client, ccxt.pro.binance) and binance_frames.install(client, self._arrived):
            name = self.name
            self._arrivals = Arrivals(
                lambda frame, market: binance_frames.event(name, frame, market, now_ns()),
                self._deliver_taken,
                v.trades_buffer,
            )
        arrivals = self._arrivals
        wsreads.install(client, arrivals.take if arrivals else None, arrivals.drained if arrivals else None)
        if v.endpoints:
            client.urls["api"] = rebase(client.urls["api"], v.endpoints.get("rest"), v.endpoints.get("ws"))
            if v.exchange.startswith("binance"):
                # A testnet, proxy or simulator serves spot only: one exchangeInfo request, no sapi calls.
                client.options["fetchMarkets"] = {"types": ["spot"]}
                client.options["fetchCurrencies"] = False
                client.options["fetchMargins"] = False  # with a key set, ccxt would ask sapi for margin pairs
        if v.exchange.startswith("binance"):
            client.options["fetchTradesMethod"] = "publicGetTrades"  # trade ids, as the @trade stream has
        if _connection_per_set(client):
            # The round-robin wraps around after 50 sets by default. Never wrap: a set that replaces another
            # must get a connection of its own, so that the one it replaces can be unsubscribed without
            # silencing it (see _unwatch).
            client.options["streamLimits"] = dict.fromkeys(client.options["streamLimits"], 2**31)
        client.clean_cache = _ignore  # _prune owns ccxt's caches: ccxt's unsubscribe would drop live ones
        return client

    async def close(self) -> None:
        """ccxt's own close() waits in tasks of its own for every websocket's close handshake, which a venue
        that keeps sending and never answers stalls for good. Ours are cancellable, so `stop`'s deadline
        aborts them; the REST session then closes locally."""
        ex = self.exchange
        if ex is None:
            return
        clients = list(getattr(ex, "clients", {}).values())
        if clients:
            ex.clients.clear()
        try:
            await _close_clients(clients, None)
        finally:
            with contextlib.suppress(Exception):
                await ex.close()

    async def run(self) -> None:
        self.exchange = self._client()
        if not await self._load_markets():
            return
        self.conn.move(ConnState.CONNECTED, "markets loaded")
        self.spawn(self._watchdog(), f"{self.name}-watchdog")
        while not self.stopping.is_set():
            self.changed.clear()
            self._reconcile()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.5)  # breakers move with time too

    async def _load_markets(self) -> bool:
        self.conn.move(ConnState.CONNECTING, "loading markets")
        while not self.stopping.is_set():
            try:
                await self.exchange.load_markets()
                self.backoff.connected()
                return True
            except Exception as exc:  # every failure is classified; none escapes
                c = classify(exc)
                self.count(c, exc, None)
                if c.kind is ErrorKind.AUTH:
                    self.fail_auth(exc)
                    return False
                if self.backoff.exhausted:
                    self.conn.move(ConnState.FAILED, f"gave up after {self.backoff.attempts} attempts: {exc}")
                    return False
                delay = self._delay(c)
                self.conn.move(
                    ConnState.RECONNECTING,
                    f"load_markets failed ({c.kind}): {_short(exc)}; retry in {delay:.1f}s",
                )
                if await sleep_or_stop(delay, self.stopping):
                    return False
        return False

    def on_update(self, old: Venue, new: Venue) -> None:
        """Restart only the loops a changed setting belongs to; channels follow from reconcile by name."""
        restart = []
        if old.poll_interval != new.poll_interval:
            restart += [n for n in self._loops if n.startswith("poll:")]
        if old.book_depth != new.book_depth:
            restart += [n for n in self._loops if ":book:" in n]
        for name in dict.fromkeys(restart):
            self._stop_loop(name)
        if old.stale_after != new.stale_after:
            for symbol, channel in self.watchdog.keys():  # type: ignore[misc]
                self.watchdog.arm((symbol, channel), new.stale_after.get(channel, 15.0))
            self._probe_window = min(new.stale_after.values(), default=5.0)
        if self.exchange is not None and old.trades_buffer != new.trades_buffer:
            self.exchange.options["tradesLimit"] = new.trades_buffer

    async def _reload_markets(self, symbols: list[str]) -> None:
        """A symbol added by a reload may be newly listed: ask the venue once before quarantining it."""
        try:
            await self.exchange.load_markets(reload=True)
        except Exception as exc:
            self.count(classify(exc), exc, None)
        self._markets_pending.difference_update(symbols)
        self._markets_checked.update(symbols)
        self.changed.set()

    # -- reconcile: desired transports -> loops ------------------------------------------------------

    def _reconcile(self) -> None:
        by_transport: dict[str, list[str]] = {"websocket": [], "polling": [], "hybrid": []}
        for symbol in self.wanted:
            eff = self.effective(symbol)
            if eff is not None and symbol not in self.quarantined:
                by_transport[eff].append(symbol)
        unknown = [s for s in self.wanted if s not in self.exchange.markets and s not in self.quarantined]
        fresh = [s for s in unknown if s not in self._markets_checked and s not in self._markets_pending]
        if fresh:
            self._markets_pending.update(fresh)
            self.spawn(self._reload_markets(fresh), f"{self.name}-reload-markets")
        for symbol in unknown:
            if symbol in self._markets_checked:
                self.quarantine(symbol, f"not a market of {self.venue.exchange}")
            by_transport = {k: [s for s in v if s != symbol] for k, v in by_transport.items()}
        chunks = self._chunks.assign(by_transport["websocket"] + by_transport["hybrid"])
        polling = sorted(by_transport["polling"] + by_transport["hybrid"])
        wanted_loops: dict[str, tuple[str, ...]] = {}
        for channel in self.venue.channels:
            for i, chunk in chunks.items():
                wanted_loops[f"ws:{channel}:{i}"] = chunk
            for symbol in polling:
                if channel == "trades" or symbol not in by_transport["hybrid"]:
                    wanted_loops[f"poll:{channel}:{symbol}"] = (symbol,)
        for name in list(self._loops):
            if self._ws_sets.get(name) != wanted_loops.get(name):
                self._stop_loop(name)
        for name, symbols in wanted_loops.items():
            if name not in self._loops:
                self._start_loop(name, symbols)
        self._prune()
        for transport in ("websocket", "polling", "hybrid"):
            self.metrics.symbols.labels(self.name, transport).set(len(by_transport[transport]))
        if self.conn.state is ConnState.CONNECTED and (
            self.quarantined or any(self.effective(s) != self.wanted[s] for s in self.wanted)
        ):
            self.conn.move(ConnState.DEGRADED, "some symbols quarantined or on fallback")
        elif (
            self.conn.state is ConnState.DEGRADED
            and not self.quarantined
            and all(self.effective(s) == self.wanted[s] for s in self.wanted)
        ):
            self.conn.move(ConnState.CONNECTED, "all symbols on their desired transport")

    def _start_loop(self, name: str, symbols: tuple[str, ...]) -> None:
        kind, channel, _ = name.split(":", 2)
        transport = "websocket" if kind == "ws" else "polling"
        for s in symbols:
            if transport == "websocket":
                self.watchdog.arm((s, channel), self.venue.stale_after[channel])
        coro = self._ws_loop(name, channel, list(symbols)) if kind == "ws" else self._poll_loop(channel, symbols[0])
        self._loops[name] = self.spawn(coro, f"{self.name}-{name}")
        self._ws_sets[name] = symbols
        logger.info("venue {} subscribe {} {} {}", self.name, transport, channel, _names(symbols))

    def _stop_loop(self, name: str) -> None:
        task = self._loops.pop(name)
        symbols = self._ws_sets.pop(name)
        self._reading.discard(name)
        task.cancel()
        kind, channel, _ = name.split(":", 2)
        if kind == "ws":
            for s in symbols:
                self.watchdog.disarm((s, channel))
            self.spawn(self._unwatch(channel, symbols), f"{self.name}-unwatch-{channel}")
        logger.info(
            "venue {} unsubscribe {} {} {}",
            self.name,
            "websocket" if kind == "ws" else "polling",
            channel,
            _names(symbols),
        )

    # -- websocket ---------------------------------------------------------------------------------

    async def _unwatch(self, channel: str, symbols: tuple[str, ...]) -> None:
        """Stopping a loop leaves ccxt subscribed: the venue keeps sending and ccxt keeps parsing and
        caching for nobody (a breaker falling back to polling on 1,000 symbols held hundreds of MB that
        way), and the symbols its replacement streams arrive twice. Once the reconcile pass that stopped
        the loop has started its replacements, the stopped set is unsubscribed where that cannot silence a
        live stream:
        - none of its symbols streams any more; or
        - the exchange gives each symbol set a connection of its own (ccxt.pro binance, kept from wrapping
          around by `_client`), and the replacements have delivered, so the symbols move over without a
          gap. The connection it leaves idle is closed.
        Where all sets share one connection, unsubscribing would silence the replacement: the old set's
        streams are the replacement's there, and `_prune` forgets what the venue sends for symbols that left.
        With no loop left at all, the sockets close.
        """
        await asyncio.sleep(0)
        ex = self.exchange
        if self.stopping.is_set() or ex is None:
            return
        live = self._live_sets(channel)
        replacements = [name for name, syms in live.items() if set(syms) & set(symbols)]
        per_set = _connection_per_set(ex)
        method, params = UNWATCH[channel]
        if (
            symbols not in live.values()
            and (per_set or not replacements)
            and getattr(ex, "clients", None)
            and hasattr(ex, method)
        ):
            await self._until_reading(replacements, self.venue.stale_after[channel])
            if self.stopping.is_set() or symbols in self._live_sets(channel).values():
                return  # stopped meanwhile, or the very same set is streamed again: its subscription is live
            try:
                await asyncio.wait_for(getattr(ex, method)(list(symbols), dict(params)), timeout=5)
            except Exception as exc:  # the socket may be gone already: then there is nothing to undo
                logger.debug("venue {} unsubscribe {} {}: {}", self.name, channel, _names(symbols), _short(exc))
            if per_set:
                await self._drop_ws_clients("its symbol set was unsubscribed", idle_only=True)
        self._prune()
        if not self._streaming():
            await self._drop_ws_clients("no symbol streams over the websocket any more")

    async def _until_reading(self, loops: list[str], timeout: float) -> None:
        """Wait, at most `timeout`, until the loops still running have each had a watch call return data."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if all(name in self._reading or name not in self._loops for name in loops):
                return
            await asyncio.sleep(0.05)

    def _live_sets(self, channel: str) -> dict[str, tuple[str, ...]]:
        return {name: syms for name, syms in self._ws_sets.items() if name.startswith(f"ws:{channel}:")}

    def _streamed(self, channel: str) -> set[str]:
        return {s for syms in self._live_sets(channel).values() for s in syms}

    def _prune(self) -> None:
        """Forget ccxt's cached data of symbols no loop streams (a subscription left behind still fills it)."""
        ex = self.exchange
        for channel, cache in (("trades", ex.trades), ("ticker", ex.tickers), ("book", ex.orderbooks)):
            if isinstance(cache, dict) and cache:
                streamed = self._streamed(channel)
                for symbol in [s for s in cache if s not in streamed]:
                    cache.pop(symbol, None)

    def _arrived(self, symbol: str) -> None:
        if self._arrivals is not None:
            self._arrivals.arrived(symbol)

    async def _ws_loop(self, name: str, channel: str, symbols: list[str]) -> None:
        armed = self._arrivals.watch(name, symbols) if channel == "trades" and self._arrivals else None
        try:
            await self._ws_reads(name, channel, symbols, armed)
        finally:
            if armed is not None:
                armed.close()

    async def _ws_reads(self, name: str, channel: str, symbols: list[str], armed: ArmedSet | None) -> None:
        ex = self.exchange
        depth = self.venue.book_depth
        reading = False
        while not self.stopping.is_set():
            if await self._wait_retry():
                return
            began = time.monotonic()
            try:
                if armed is not None and armed.armed:  # subscribed: take what arrived
                    taken, dirty = await armed.next()
                    if dirty:
                        received = now_ns()
                        swept = [to_trade(self.name, t, received, "websocket") for t in self._swept_trades(dirty)]
                        taken = _in_order(taken, swept)
                    await self._on_events(taken, "websocket")
                elif channel == "trades":
                    trades = await ex.watch_trades_for_symbols(symbols)
                    returned = {id(t) for t in trades}  # the sweep re-reads these from the same cache
                    swept = [t for t in self._swept_trades(symbols) if id(t) not in returned]
                    await self._on_trades([*trades, *swept], "websocket")
                    if armed is not None:
                        armed.arm(ex)
                else:
                    if channel == "ticker":
                        await ex.watch_tickers(symbols, {"name": "ticker"})
                    else:
                        await ex.watch_order_book_for_symbols(symbols, depth)
                    await self._sweep(channel, symbols)
                self._ws_ok()
                if not reading:
                    reading = True
                    self._reading.add(name)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self.stopping.is_set() or (task is not None and task.cancelling()):
                    raise  # we are being stopped
                await self._ws_failed(
                    ccxt.NetworkError(f"watch cancelled by the client library: {exc}"), symbols, began
                )
            except Exception as exc:
                await self._ws_failed(exc, symbols, began)

    def _swept_trades(self, symbols: list[str]) -> list[dict[str, Any]]:
        """Every symbol's unreported trades from ccxt's caches, not only those of the one symbol a watch
        call returned: the others that arrived in the same read would otherwise stay there until their own
        symbol happened to resolve a later call. Each cache is emptied once read, or 1,000 symbols x
        tradesLimit parsed trades would sit in memory for nothing (getLimit's counters reset on the next
        append by themselves)."""
        caches = self.exchange.trades
        if not isinstance(caches, dict):
            return []
        out: list[dict[str, Any]] = []
        for symbol in symbols:
            cache = caches.get(symbol)
            if not cache:
                continue
            n = cache.getLimit(symbol, None)
            if n:
                out += cache[-n:]
            if hasattr(cache, "_deque"):
                cache._deque.clear()
        return out

    async def _sweep(self, channel: str, symbols: list[str]) -> None:
        """Tickers and books of every symbol that moved, for the same reason as `_swept_trades`."""
        ex = self.exchange
        for symbol in symbols:
            if channel == "ticker":
                t = ex.tickers.get(symbol)
                if t is not None and t.get("timestamp") != self._seen_stamp.get(("ticker", symbol)):
                    self._seen_stamp[("ticker", symbol)] = t.get("timestamp")
                    await self._on_ticker(t, "websocket")
            else:
                ob = ex.orderbooks.get(symbol)
                if (
                    ob is not None
                    and ob.get("nonce") is not None
                    and ob["nonce"] != self._seen_stamp.get(("book", symbol))
                ):
                    self._seen_stamp[("book", symbol)] = ob["nonce"]
                    await self._on_book(ob, "websocket")

    def _ws_ok(self) -> None:
        """Data arrived. The connection counts as healthy (breaker success, backoff reset clock) only once it
        has kept delivering for a stale window: right after a reconnect ccxt returns a book built from a
        REST snapshot, which proves nothing about the stream."""
        now = self._last_data = time.monotonic()
        if self._up_since is None:
            self._up_since = now
            if self.conn.state in (ConnState.RECONNECTING, ConnState.CONNECTING):
                self.conn.move(ConnState.CONNECTED, "streaming")
            self.backoff.connected()
        self.backoff.tick()
        if now - self._up_since >= self._probe_window and (
            self.breaker.failures or self.breaker.state is not BreakerState.CLOSED
        ):
            self.breaker.success()

    async def _ws_failed(self, exc: BaseException, symbols: list[str], began: float) -> None:
        """One loop's watch failed; `began` is when that watch was called, so a call made before the
        outage was counted (on the same socket) is part of it, and one made after is a new failure."""
        c = classify(exc)
        self.continuity.arm(symbols)  # the venue may come back renumbered
        if c.kind is ErrorKind.BAD_SYMBOL:
            bad = [s for s in symbols if s in str(exc) or self.exchange.market_id(s) in str(exc)] or symbols[:1]
            for s in bad:
                self.quarantine(s, _short(exc))
            return
        if c.kind is ErrorKind.AUTH:
            self.count(c, exc, None)
            self.fail_auth(exc)
            return
        if isinstance(exc, ccxt.ChecksumError | ccxt.InvalidNonce):
            # A diff-depth update id skipped: ccxt drops the book; the next watch refetches the snapshot.
            self.metrics.book_resyncs.labels(self.name).inc()
            logger.warning(
                "venue {} order book sequence gap: resynchronising from a snapshot ({})", self.name, _short(exc)
            )
        now = time.monotonic()
        if now < self._retry_at or began < self._failed_at:
            return  # another loop already counted this outage (and set the retry time)
        # A stream that was healthy up to this moment (a venue's maintenance or 24 h disconnect, a load
        # balancer) reconnects at once: backoff starts from the first reconnect that fails.
        healthy = (
            self._up_since is not None
            and now - self._up_since >= self._probe_window
            and now - self._last_data < self._probe_window
            and c.kind is ErrorKind.NETWORK
        )
        self.count(c, exc, None)
        self._up_since = None
        self._failed_at = now
        self.breaker.failure(f"{c.kind}: {_short(exc)}")
        self.metrics.reconnects.labels(self.name).inc()
        if self.backoff.exhausted:
            self.conn.move(ConnState.FAILED, f"gave up after {self.backoff.attempts} attempts: {_short(exc)}")
            self.stopping.set()
            return
        delay = 0.0 if healthy else self._delay(c)
        self._retry_at = now + delay
        when = f"retry in {delay:.2f}s" if delay else "reconnecting at once (it was healthy)"
        self.conn.move(ConnState.RECONNECTING, f"{c.kind}: {_short(exc)}; {when}")

    async def _wait_retry(self) -> bool:
        delay = self._retry_at - time.monotonic()
        return delay > 0 and await sleep_or_stop(delay, self.stopping)

    def _delay(self, c: Classified) -> float:
        delay = self.backoff.next_delay()
        if c.kind is ErrorKind.RATE_LIMIT:
            retry_after = _retry_after(self.exchange)
            if retry_after is not None:
                delay = max(delay, retry_after)
        self.retries.append((time.monotonic(), delay, c.kind.value))
        return delay

    async def _watchdog(self) -> None:
        """Close the socket under silent subscriptions so their loops reconnect; count every stall.

        When everything went silent the venue is at fault (its breaker counts it, through the failed
        watch calls); when only some symbols did, their own breakers count it.
        """
        while not self.stopping.is_set():
            await asyncio.sleep(0.25)
            stale = self.watchdog.stale()
            if not stale:
                continue
            everything = {k[0] for k, _ in stale} == {k[0] for k in self.watchdog.keys()}
            self.record_stalls(stale, everything)
            await self._drop_ws_clients(f"{len(stale)} subscription(s) silent past stale_after")
            self.changed.set()

    async def _drop_ws_clients(self, why: str, idle_only: bool = False) -> None:
        """Fail the pending watch calls with a NetworkError (ccxt's own close() would cancel them) and
        forget the clients, so the next watch call opens a fresh connection and resubscribes. With
        `idle_only`, only the clients left with no subscription and no pending call.

        A dropped client is detached first: frames it reads while closing (ccxt handles the last one
        after close() returns) must not refill the caches, and its late close must not evict the new
        client ccxt keys under the same url (ccxt skips that when the client has an error)."""
        clients = getattr(self.exchange, "clients", {})
        dropped = []
        for url, client in list(clients.items()):
            if idle_only and (client.subscriptions or client.futures):
                continue
            clients.pop(url, None)
            error = ccxt.NetworkError(f"{self.name}: {why}")
            client.error = error
            client.on_message_callback = _ignore
            client.reject(error)
            dropped.append(client)
        timeout = self.venue.close_timeout
        if not await _close_clients(dropped, timeout):
            logger.warning("venue {}: a websocket close was not answered within {:g}s: aborted", self.name, timeout)

    # -- polling -----------------------------------------------------------------------------------

    async def _poll_loop(self, channel: str, symbol: str) -> None:
        ex = self.exchange
        interval = self.venue.poll_interval
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if channel == "trades":
                    await self._poll_trades(symbol)
                elif channel == "ticker":
                    await self._on_ticker(await ex.fetch_ticker(symbol), "polling")
                else:
                    await self._on_book(await ex.fetch_order_book(symbol, self._book_limit()), "polling")
                failures = 0
                if self.conn.state in (ConnState.RECONNECTING, ConnState.CONNECTING) and not self._streaming():
                    self.conn.move(ConnState.CONNECTED, "polling")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c = classify(exc)
                self.count(c, exc, symbol)
                self.continuity.arm((symbol,))  # the venue may come back renumbered
                if c.kind is ErrorKind.BAD_SYMBOL:
                    self.quarantine(symbol, _short(exc))
                    return
                if c.kind is ErrorKind.AUTH:
                    self.fail_auth(exc)
                    return
                failures += 1
                wait = min(
                    self.venue.backoff.cap,
                    self.venue.backoff.base * self.venue.backoff.factor ** (failures - 1),
                )
                if c.kind is ErrorKind.RATE_LIMIT:
                    wait = max(wait, _retry_after(ex) or 0.0)
                logger.warning(
                    "venue {} poll {} {} failed ({}): {}; next in {:.1f}s",
                    self.name,
                    channel,
                    symbol,
                    c.kind,
                    _short(exc),
                    wait,
                )
                if await sleep_or_stop(wait, self.stopping):
                    return
                continue
            if await sleep_or_stop(interval - (time.monotonic() - started), self.stopping):
                return

    def _streaming(self) -> bool:
        return any(name.startswith("ws:") for name in self._loops)

    def _book_limit(self) -> int:
        depth = self.venue.book_depth
        for allowed in (5, 10, 20, 50, 100, 500, 1000, 5000):  # Binance accepts only these limits
            if depth <= allowed:
                return allowed
        return depth

    async def _poll_trades(self, symbol: str) -> None:
        last = self.continuity.last.get(symbol)
        if last is None:
            trades = await self.exchange.fetch_trades(symbol, limit=1)  # start from now, like a stream would
        else:
            trades = await self._fetch_since(symbol, last)
        await self._on_trades(trades, "polling")

    async def _fetch_from_id(self, symbol: str, from_id: int) -> list[dict[str, Any]]:
        """Trades from `from_id` on. With an API key, /historicalTrades reaches any id; without one (ccxt
        refuses to call it keyless) /trades gives the latest 1,000, which covers any short gap."""
        ex = self.exchange
        market = ex.market(symbol)
        if ex.apiKey:
            raw = await ex.publicGetHistoricalTrades({"symbol": market["id"], "fromId": from_id, "limit": 1000})
        else:
            raw = await ex.publicGetTrades({"symbol": market["id"], "limit": 1000})
        trades = ex.parse_trades(raw, market)
        if trades and int(trades[-1]["id"]) < from_id - 1:
            return trades  # the venue's newest is below what we had: it renumbered; `check` sorts them out
        return [t for t in trades if int(t["id"]) >= from_id]

    async def _fetch_since(self, symbol: str, last_id: int) -> list[dict[str, Any]]:
        if self.continuity.contiguous:
            return await self._fetch_from_id(symbol, last_id + 1)
        since = self.continuity.last_ts.get(symbol)
        return await self.exchange.fetch_trades(symbol, since=since // 1_000_000 if since else None)

    # -- normalisation and continuity --------------------------------------------------------------

    def _deliver_taken(self, trades: list[Trade]) -> bool:
        """Streamed trades delivered at once, from the socket's reading task, when each continues its
        symbol's ids exactly (the common case) and the pipeline takes them now; False, and nothing done,
        otherwise (a gap to backfill, a repeat, a reconnect's first trade, a busy queue): `_on_events`
        then has them from the set's loop."""
        c = self.continuity
        symbols = c.continues(trades)
        if symbols is None:
            return False
        if not self.deliver_now(trades):  # type: ignore[arg-type]
            return False
        for t in trades:
            c.check(t)  # new, nothing missing: as `continues` found
        for symbol in symbols:
            self.seen(symbol, "trades")
        self._ws_ok()
        return True

    async def _on_trades(self, trades: list[dict[str, Any]], transport: str) -> None:
        """Normalise a batch of ccxt trades, then as `_on_events`."""
        received, name = now_ns(), self.name
        await self._on_events([to_trade(name, t, received, transport) for t in trades], transport)

    async def _on_events(self, trades: list[Trade], transport: str) -> None:
        """Drop repeats, backfill before the first trade after a gap; emit in order.

        Symbols with a gap (every symbol, after a reconnect) are backfilled concurrently, each emitting
        its recovered trades and then its own that followed; the others are emitted at once.
        """
        check, last_ids = self.continuity.check, self.continuity.last
        out: list[Event] = []
        gapped: dict[str, list[tuple[Trade, int, int | None]]] = {}  # symbol -> (trade, missing, last before)
        if transport == "websocket":
            for symbol in {t.symbol for t in trades}:
                self.seen(symbol, "trades")
        for event in trades:
            symbol = event.symbol
            last = last_ids.get(symbol)
            fresh, missing = check(event)
            if not fresh:
                continue
            if symbol in gapped:
                gapped[symbol].append((event, missing, last))
            elif missing and last is not None:
                gapped[symbol] = [(event, missing, last)]
            else:
                out.append(event)
        await self.deliver_many(out)
        if gapped:
            await asyncio.gather(*(self._backfilled(symbol, events) for symbol, events in gapped.items()))

    async def _backfilled(self, symbol: str, events: list[tuple[Trade, int, int | None]]) -> None:
        """One symbol's trades from its first gap on, each gap backfilled before the trade after it."""
        out: list[Event] = []
        for event, missing, last in events:
            if missing and last is not None:
                await self.deliver_many(out)
                out = []
                await self._backfill(symbol, last, int(event.id), missing)  # type: ignore[arg-type]
            out.append(event)
        await self.deliver_many(out)

    async def _backfill(self, symbol: str, last: int, upto: int, missing: int) -> None:
        """Recover trades (last, upto) over REST, in order, once; count whatever cannot be had."""
        recovered = 0
        cursor = last
        try:
            while cursor + 1 < upto:
                batch = await self._fetch_from_id(symbol, cursor + 1)
                got = [t for t in batch if t.get("id") is not None and cursor < int(t["id"]) < upto]
                if not got:
                    break
                received = now_ns()
                events: list[Event] = []
                hole = False
                for t in sorted(got, key=lambda t: int(t["id"])):
                    if int(t["id"]) != cursor + 1:
                        hole = True  # the venue's history has a hole too: stop, count the rest as lost
                        break
                    events.append(to_trade(self.name, t, received, "polling", backfilled=True))
                    cursor += 1
                recovered += len(events)
                await self.deliver_many(events)
                if hole:
                    break
        except Exception as exc:
            c = classify(exc)
            self.metrics.errors.labels(self.name, c.kind.value).inc()
            self.backfill_failed(symbol, "timeout" if isinstance(exc, ccxt.RequestTimeout) else c.kind.value, exc)
        self.backfill_done(symbol, recovered, missing - recovered, f"between ids {last} and {upto}")

    async def _on_ticker(self, t: dict[str, Any], transport: str) -> None:
        symbol = t["symbol"]
        if transport == "websocket":
            self.seen(symbol, "ticker")
        await self.deliver(
            Ticker(
                self.name,
                symbol,
                ms_to_ns(t.get("timestamp")),
                now_ns(),
                transport,
                t.get("bid"),
                t.get("ask"),
                t.get("last"),
                t.get("baseVolume"),
            )
        )

    async def _on_book(self, ob: dict[str, Any], transport: str) -> None:
        symbol = ob["symbol"]
        if transport == "websocket":
            self.seen(symbol, "book")
        depth = self.venue.book_depth
        await self.deliver(
            Book(
                self.name,
                symbol,
                ms_to_ns(ob.get("timestamp")),
                now_ns(),
                transport,
                [(float(p), float(q)) for p, q, *_ in ob["bids"][:depth]],
                [(float(p), float(q)) for p, q, *_ in ob["asks"][:depth]],
                ob.get("nonce"),
            )
        )

    # -- errors ------------------------------------------------------------------------------------


def _in_order(taken: list[Trade], swept: list[Trade]) -> list[Trade]:
    """Trades taken from frames and swept from ccxt's cache (a frame of another shape, or another
    connection still carrying the symbol) in one batch, each symbol's in id order: the continuity check
    would take an older trade after a newer one for a repeat."""
    if not swept:
        return taken
    try:
        return sorted([*swept, *taken], key=lambda t: int(t.id))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return [*swept, *taken]


async def _close_clients(clients: list[Any], timeout: float | None) -> bool:
    """Close ccxt websocket clients together; False when `timeout` passed first. A close still waiting
    (for a venue that never answers the close frame) is cancelled, which makes aiohttp drop its socket."""
    tasks = [asyncio.ensure_future(c.aiohttp_close()) for c in clients]
    if not tasks:
        return True
    for task in tasks:
        task.add_done_callback(_retrieve)
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending
    finally:
        for task in tasks:
            task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A close's own failure changes nothing: the socket is gone either way."""
    if not task.cancelled():
        task.exception()


def _retry_after(exchange: Any) -> float | None:
    headers = getattr(exchange, "last_response_headers", None) or {}
    for key, value in headers.items():
        if key.lower() == "retry-after":
            with contextlib.suppress(ValueError):
                return float(value)
    return None
