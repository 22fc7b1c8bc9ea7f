"""Wake a trade loop when a trade of one of its symbols arrives, instead of calling
watch_trades_for_symbols again for every batch, and take a subscribed set's trade frames straight from
the socket's reader.

Each watch call rebuilds the set's 100 market lookups, message hashes and futures (about 0.3 ms), and
each message woke one call through a chain of futures: at 1,000 symbols and 5,000 trades/s the calls
alone kept the event loop busy enough that frames waited ~20 ms to be read and trades ~20 ms more in
ccxt's cache. Once a set's watch call has returned (it is subscribed, on a connection ccxt keeps), its
loop waits for what arrives.

Arrived how: a public spot `@trade` frame on the set's own connection, for one of its markets, becomes
a Trade (binance_frames.event) as it is read, before ccxt's message dispatch (a dict of ~40 bound
methods built per message), its market lookups, trade cache and futures: those cost ~3x the parse, and
in a burst every frame waits for the ones before it. Once the reading task has handled everything read
(`drained`), the set's trades go to the pipeline from there, as one batch, if its loop is idle and the
adapter can deliver them at once (each continues its symbol's ids, the queue is empty); otherwise the
loop is woken and takes them. Every other message, and any trade frame of another shape, goes to ccxt
as before; such a trade's parse marks its symbol, and the loop sweeps it from ccxt's cache together with
the taken ones, in id order. ccxt still owns the connection and the subscription; a ccxt future left
pending on that connection (never resolved) is what ccxt rejects when the connection fails or is
dropped, which fails the wait the way a watch call would have failed (after the trades already taken are
delivered), and the loop goes back to calling watch (reconnecting and resubscribing as before).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from feedrunner.events import Trade

Parse = Callable[[dict[str, Any], dict[str, Any]], "Trade | None"]  # (frame, market) -> the trade, or None
Deliver = Callable[[list[Trade]], bool]  # deliver now, or False (and nothing done) if it cannot be


class Arrivals:
    """symbol -> the armed set that streams it; `arrived` is called for every trade ccxt parses, `take`
    for every message before ccxt sees it."""

    def __init__(self, parse: Parse | None = None, deliver: Deliver | None = None, per_symbol: int = 1000) -> None:
        self.per_symbol = per_symbol  # trades held per symbol of a set while its loop is busy (trades_buffer)
        self._set_of: dict[str, ArmedSet] = {}
        self._by_id: dict[str, ArmedSet] = {}  # market id -> the armed set whose connection carries it
        self._parse = parse
        self._deliver = deliver
        self._taken: list[ArmedSet] = []  # sets that took trades since the last `drained`

    def take(self, client: Any, frame: dict[str, Any]) -> bool:
        """Queue a public trade frame on the armed set that subscribed it on this connection; False
        (ccxt's to handle) for any other message (feedrunner.adapters.wsreads offers each)."""
        if frame.get("e") != "trade":
            return False
        armed = self._by_id.get(frame.get("s"))  # type: ignore[arg-type]
        if armed is None or armed._client is not client or armed._sentinel is None or self._parse is None:
            return False
        trade = self._parse(frame, armed.markets[frame["s"]])
        if trade is None:
            return False
        if not armed.trades:
            self._taken.append(armed)
        armed.trades.append(trade)
        return True

    def drained(self) -> None:
        """Every frame read so far is handled (feedrunner.adapters.wsreads): each set's taken trades are
        delivered now, as one batch, where its loop is idle waiting for them and nothing of another path
        (ccxt's cache) is pending; otherwise its loop is woken to take them in order."""
        if not self._taken:
            return
        sets, self._taken = self._taken, []
        failed: Exception | None = None
        for armed in sets:
            if not armed.trades:
                continue
            wake = armed.wake
            idle = wake is not None and not wake.done()
            delivered = False
            try:
                delivered = idle and not armed.dirty and self._deliver is not None and self._deliver(list(armed.trades))
            except Exception as exc:  # the loop takes them instead; the reading task logs it
                failed = failed or exc
            if delivered:
                armed.trades.clear()
            elif idle:
                wake.set_result(None)  # type: ignore[union-attr]
        if failed is not None:
            raise failed

    def arrived(self, symbol: str) -> None:
        armed = self._set_of.get(symbol)
        if armed is not None:
            armed.dirty.add(symbol)
            wake = armed.wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    def watch(self, name: str, symbols: list[str]) -> ArmedSet:
        armed = ArmedSet(self, name, symbols)
        for s in symbols:
            self._set_of[s] = armed
        return armed

    def forget(self, armed: ArmedSet) -> None:
        for s in armed.symbols:
            if self._set_of.get(s) is armed:
                del self._set_of[s]
        self._unmap(armed)

    def _map(self, armed: ArmedSet) -> None:
        for market_id in armed.markets:
            self._by_id[market_id] = armed

    def _unmap(self, armed: ArmedSet) -> None:
        for market_id in armed.markets:
            if self._by_id.get(market_id) is armed:
                del self._by_id[market_id]


class ArmedSet:
    def __init__(self, arrivals: Arrivals, name: str, symbols: list[str]) -> None:
        self.arrivals = arrivals
        self.symbols = symbols
        self.hash = f"feedrunner::{name}"  # no message of the venue carries it: only a rejection ends it
        self.dirty: set[str] = set()  # symbols with trades in ccxt's cache
        # from frames taken before ccxt saw them; bounded as ccxt's caches are (tradesLimit a symbol): past
        # it the oldest go, and the continuity check finds the hole and backfills it
        self.trades: deque[Trade] = deque(maxlen=arrivals.per_symbol * max(1, len(symbols)))
        self.markets: dict[str, dict[str, Any]] = {}  # market id -> market, while armed
        self.wake: asyncio.Future[None] | None = None
        self._client: Any = None
        self._sentinel: Any = None
        self._error: BaseException | None = None

    @property
    def armed(self) -> bool:
        return self._sentinel is not None

    def arm(self, exchange: Any) -> bool:
        """After a watch call returned: find the connection that carries this set's subscription and leave
        a future pending on it. False (stay on watch calls) when ccxt's internals are not as expected."""
        clients = getattr(exchange, "clients", None)
        if not isinstance(clients, dict):
            return False
        # ccxt.pro binance gives each symbol set a stream (a connection) of its own, by the set's hash;
        # another connection may carry these symbols too (a set being replaced): only the set's own will do.
        streams = getattr(exchange, "options", {}).get("streamBySubscriptionsHash")
        stream = streams.get("multipleTrades::" + ",".join(self.symbols)) if isinstance(streams, dict) else None
        key = "trade::" + self.symbols[0]
        found = [
            c
            for url, c in clients.items()
            if key in getattr(c, "subscriptions", {}) and (stream is None or str(url).endswith("/" + str(stream)))
        ]
        if len(found) != 1 or not hasattr(found[0], "future"):
            return False
        client = found[0]
        self._client, self._error = client, None
        self._sentinel = client.future(self.hash)
        self._sentinel.add_done_callback(self._ended)
        self.arrivals._unmap(self)
        self.markets = _spot_markets(exchange, self.symbols)
        self.arrivals._map(self)
        return True

    def _ended(self, future: asyncio.Future[Any]) -> None:
        if self._sentinel is not future:
            return
        self._sentinel = None
        self.arrivals._unmap(self)
        if future.cancelled():
            error: BaseException = ConnectionError("the websocket was closed")
        else:
            error = future.exception() or ConnectionError("the websocket was closed")
        self._error = error
        if self.wake is not None and not self.wake.done():
            self.wake.set_exception(error)

    async def next(self) -> tuple[list[Trade], list[str]]:
        """(the trades taken from frames, the symbols with trades in ccxt's cache) since the last call,
        waiting for either; once both are empty, raises what ended the connection (the set is disarmed)."""
        if not self.dirty and not self.trades:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self.wake = asyncio.get_running_loop().create_future()
            try:
                await self.wake
            except asyncio.CancelledError:
                raise
            except BaseException:
                if not self.dirty and not self.trades:
                    raise
                # the connection ended after more trades came: they are taken first, the error next call
            finally:
                self.wake = None
        trades = list(self.trades)
        self.trades.clear()
        dirty = list(self.dirty)
        self.dirty.clear()
        return trades, dirty

    def close(self) -> None:
        """The loop ends: nothing of ours stays in ccxt's futures (it would keep an idle connection open)."""
        self.arrivals.forget(self)
        self.markets = {}
        sentinel, self._sentinel = self._sentinel, None
        client = self._client
        if sentinel is not None and client is not None and client.futures.get(self.hash) is sentinel:
            del client.futures[self.hash]
            sentinel.cancel()


def _spot_markets(exchange: Any, symbols: list[str]) -> dict[str, dict[str, Any]]:
    """market id -> market for the set's spot symbols: what ccxt's handle_trade resolves a frame's `s` to
    on a spot connection (an id like BTCUSDT also names a swap market)."""
    out: dict[str, dict[str, Any]] = {}
    markets = getattr(exchange, "markets", None) or {}
    for symbol in symbols:
        market = markets.get(symbol)
        if isinstance(market, dict) and market.get("type") == "spot" and isinstance(market.get("id"), str):
            out[market["id"]] = market
    return out
