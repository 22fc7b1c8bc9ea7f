"""One reading task per ccxt.pro websocket connection, instead of ccxt's task per message.

ccxt's receive loop makes a task for every message read and reaches the next read through a done
callback and call_soon: three loop iterations per message, and in a burst only the first message is
handled at once, the rest after the trade loop has woken for it (a batch per frame). A task that awaits
`receive()` in a loop handles every frame already read in one pass, as soon as it is read. Only data
frames (text, binary, ping, pong) stay in it: on a close, error or anything else, the message goes to
ccxt's handler and the connection back to ccxt's own loop, which closes it as it always has; a read that
raises is rejected as ccxt's loop rejects it. A handler that raises (ccxt's loop would stop reading the
connection for good, silently) is logged and fails the connection's waiting calls, and reading goes on.

`take`, where given, sees each text frame that decodes to a JSON object before ccxt does, and keeps
the ones it handles from ccxt's dispatch (feedrunner.adapters.arrivals); any it declines goes to ccxt
whole, as read. `drained` is called once every frame read so far has been handled, before the task
waits for more: what was taken from one read can be delivered as one batch, at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType
from loguru import logger

from feedrunner.lazyccxt import ccxt

DATA = frozenset({WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG})
Take = Callable[[Any, dict[str, Any]], bool]
Drained = Callable[[], None]


def install(exchange: Any, take: Take | None = None, drained: Drained | None = None) -> bool:
    """Every connection the exchange opens from now on reads in one task; False (ccxt's loop stays) where
    ccxt's client is not as expected."""
    ccxt_client = getattr(exchange, "client", None)
    if not callable(ccxt_client):
        return False

    def client(url: str) -> Any:
        c = ccxt_client(url)
        own = getattr(type(c), "receive_loop", None)
        if callable(own) and "receive_loop" not in vars(c) and hasattr(c, "handle_message"):
            c.receive_loop = lambda: _start(c, own, take, drained)
        return c

    exchange.client = client
    return True


def _start(client: Any, ccxt_loop: Any, take: Take | None, drained: Drained | None) -> None:
    if client.closed():
        ccxt_loop(client)  # ccxt's answer to a connection that ended before its first read
        return
    reads = _reads(client, ccxt_loop, take, drained)
    client.feedrunner_reads = client.asyncio_loop.create_task(reads)  # held, so never collected while it reads


async def _reads(client: Any, ccxt_loop: Any, take: Take | None, drained: Drained | None) -> None:
    connection = client.connection
    handle = client.handle_message
    text, loads = WSMsgType.TEXT, orjson.loads
    # aiohttp's queue of frames read and not yet received (ccxt's own loop looks at it too); without it,
    # every frame counts as the last of its read
    buffered = getattr(getattr(connection, "_reader", None), "_buffer", ())
    while True:
        if drained is not None and not buffered:
            try:
                drained()
            except Exception as exc:
                logger.warning("websocket {}: delivering what was read failed: {!r}", client.url, exc)
        try:
            message = await connection.receive()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            client.reject(ccxt.NetworkError(str(exc)))
            return
        try:
            if take is not None and message.type is text and message.data[:1] == "{":
                try:
                    frame = loads(message.data)
                except orjson.JSONDecodeError:
                    frame = None  # ccxt's to fail on, as it would have
                if type(frame) is dict and take(client, frame):
                    client.last_message_at = time.time_ns() // 1_000_000  # as ccxt's handler notes it
                    continue
            handle(message)
        except Exception as exc:
            logger.warning("websocket {}: a message could not be handled: {!r}", client.url, exc)
            client.reject(ccxt.NetworkError(f"a message could not be handled: {exc!r}"))
        if message.type not in DATA:
            # ccxt's loop from here on: it answers a close, or a connection that closed, as it always has
            client.asyncio_loop.call_soon(ccxt_loop, client)
            return
        if client.connection is not connection:
            return  # ccxt replaced the connection while a handler ran; the new one reads in its own task
