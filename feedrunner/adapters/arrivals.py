"""Wake a trade loop when ccxt has parsed a trade of one of its symbols, instead of calling
watch_trades_for_symbols again for every batch.

Each such call rebuilds the set's 100 market lookups, message hashes and futures (about 0.3 ms), and
each message woke one call through a chain of futures: at 1,000 symbols and 5,000 trades/s the calls
alone kept the event loop busy enough that frames waited ~20 ms to be read and trades ~20 ms more in
ccxt's cache. Once a set's watch call has returned (it is subscribed, on a connection ccxt keeps), its
loop waits on one future that the trade parse (binance_frames) completes, and sweeps the symbols that
got trades. ccxt still owns the connection and the subscription; a ccxt future left pending on that
connection (never resolved) is what ccxt rejects when the connection fails or is dropped, which fails the
wait the way a watch call would have failed, and the loop goes back to calling watch (reconnecting and
resubscribing as before).
"""

from __future__ import annotations

import asyncio
from typing import Any


class Arrivals:
    """symbol -> the armed set that streams it; `arrived` is called for every parsed trade."""

    def __init__(self) -> None:
        self._set_of: dict[str, ArmedSet] = {}

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


class ArmedSet:
    def __init__(self, arrivals: Arrivals, name: str, symbols: list[str]) -> None:
        self.arrivals = arrivals
        self.symbols = symbols
        self.hash = f"feedrunner::{name}"  # no message of the venue carries it: only a rejection ends it
        self.dirty: set[str] = set()
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
        return True

    def _ended(self, future: asyncio.Future[Any]) -> None:
        if self._sentinel is not future:
            return
        self._sentinel = None
        if future.cancelled():
            error: BaseException = ConnectionError("the websocket was closed")
        else:
            error = future.exception() or ConnectionError("the websocket was closed")
        self._error = error
        if self.wake is not None and not self.wake.done():
            self.wake.set_exception(error)

    async def next(self) -> list[str]:
        """The symbols that got trades since the last call (waiting for one); raises what ended the
        connection, after which the set is disarmed."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if not self.dirty:
            self.wake = asyncio.get_running_loop().create_future()
            try:
                await self.wake
            finally:
                self.wake = None
        out = list(self.dirty)
        self.dirty.clear()
        return out

    def close(self) -> None:
        """The loop ends: nothing of ours stays in ccxt's futures (it would keep an idle connection open)."""
        self.arrivals.forget(self)
        sentinel, self._sentinel = self._sentinel, None
        client = self._client
        if sentinel is not None and client is not None and client.futures.get(self.hash) is sentinel:
            del client.futures[self.hash]
            sentinel.cancel()
