"""Redis Streams: one XADD per event to the stream its template names, capped with MAXLEN ~.

Redis does not de-duplicate entries: each carries the event id (field `id`) beside the record (field
`data`, JSON of events.to_dict), so a consumer drops the copies a re-sent batch leaves. One connection
sends a batch in order, pipelined in chunks, so every stream keeps the order of its events. redis-py
retries nothing here: a failure surfaces at once and the delivery loop retries the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import orjson
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from feedrunner.events import Event, event_id, to_dict
from feedrunner.sinks.bus import BusSink, DeliveryError, Permanent, Transient, render
from feedrunner.spec import RedisSpec
from feedrunner.spec import Sink as SinkSpec

CHUNK = 1000  # XADDs per round trip: bounds the memory a large batch holds in flight
CONNECT_TIMEOUT = 2.0  # seconds to open a connection, at most
SOCKET_TIMEOUT = 5.0  # seconds a reply may take, at most; never more than the delivery timeout
CLOSE_TIMEOUT = 2.0
KEY_CACHE = 100_000  # stream names remembered; the spec's symbols and kinds bound them well below this
ID, DATA = b"id", b"data"

# Error replies that may clear without an operator: memory freed, a load or script finished, a disk
# error resolved, a failover done.
_TRANSIENT_CODES = frozenset(
    {"OOM", "LOADING", "BUSY", "MISCONF", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS"}
)


class RedisSink(BusSink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        assert spec.redis is not None
        self.conf: RedisSpec = spec.redis
        timeout = spec.delivery.timeout if spec.delivery is not None else SOCKET_TIMEOUT
        self.connect_timeout = min(CONNECT_TIMEOUT, timeout)
        self.socket_timeout = min(SOCKET_TIMEOUT, timeout)
        self._client: Redis | None = None
        self._keys: dict[tuple[str, str, str], bytes] = {}  # (venue, kind, symbol) -> stream key
        self._where = f"{_server(self.conf.url.reveal())} stream {self.conf.stream}"

    async def open(self) -> None:
        await self.close()
        try:
            self._client = Redis.from_url(
                self.conf.url.reveal(),
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0),
                client_name="feedrunner",
            )
            await self._client.ping()
        except Exception as exc:
            await self.close()
            raise self._classify(exc, "ping") from exc

    async def send(self, events: Sequence[Event]) -> None:
        client = self._client
        if client is None:
            raise Transient(f"{self.where()}: not connected")
        try:
            async with client.pipeline(transaction=False) as pipe:
                for start in range(0, len(events), CHUNK):
                    keys = self._queue(pipe, events[start : start + CHUNK])
                    # Every reply is checked: entries before or after a refused one may have been
                    # added, but the batch counts as failed and is sent again whole.
                    replies = await pipe.execute(raise_on_error=False)
                    for key, reply in zip(keys, replies, strict=True):
                        if isinstance(reply, Exception):
                            raise self._classify(reply, f"XADD {key.decode(errors='replace')}")
        except DeliveryError:
            raise
        except Exception as exc:
            raise self._classify(exc, "XADD") from exc

    def _queue(self, pipe: Pipeline, chunk: Sequence[Event]) -> list[bytes]:
        """One XADD per event, arguments pre-encoded. Only a stream's last entry in the chunk trims it:
        the cap is approximate anyway, and trimming once per chunk spares three arguments per entry."""
        keys = [self._key(e) for e in chunk]
        last = {key: i for i, key in enumerate(keys)}
        trim = (b"MAXLEN", b"~", str(self.conf.maxlen).encode(), b"*")
        for i, (key, e) in enumerate(zip(keys, chunk, strict=True)):
            args = (ID, event_id(e).encode(), DATA, orjson.dumps(to_dict(e)))
            if last[key] == i:
                pipe.pipeline_execute_command(b"XADD", key, *trim, *args)
            else:
                pipe.pipeline_execute_command(b"XADD", key, b"*", *args)
        return keys

    def _key(self, e: Event) -> bytes:
        at = (e.venue, e.kind, e.symbol)
        key = self._keys.get(at)
        if key is None:
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            key = self._keys[at] = render(self.conf.stream, e).encode()
        return key

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT)

    def where(self) -> str:
        return self._where

    def _classify(self, exc: BaseException, op: str) -> DeliveryError:
        """Transient when the same command may succeed later; Permanent when an operator must act."""
        reason = f"{self.where()}: {op}: {self._scrub(exc)}"
        if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError | rex.NoPermissionError):
            return Permanent(reason)
        if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError | rex.InvalidResponse):
            return Transient(reason)
        if isinstance(exc, rex.ResponseError):
            code = exc.status_code or str(exc).split(" ", 1)[0]
            return Transient(reason) if code in _TRANSIENT_CODES else Permanent(reason)
        return Permanent(reason)

    def _scrub(self, exc: BaseException) -> str:
        """The error's own words, without the password should the client ever quote its URL."""
        text = str(exc) or type(exc).__name__
        code = getattr(exc, "status_code", None)
        if code and not text.startswith(code):
            text = f"{code} {text}"
        password = _password(self.conf.url.reveal())
        return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        return parse_url(url).get("password")
    except Exception:
        return None


def _server(url: str) -> str:
    """host:port/db of a redis URL, without user or password."""
    try:
        parts = parse_url(url)
    except Exception:
        return "redis (unparsable URL)"
    db = parts.get("db", 0)
    if "path" in parts:
        return f"unix://{parts['path']}?db={db}"
    host = parts.get("host", "localhost")
    host = f"[{host}]" if ":" in host else host
    scheme = "rediss" if url.startswith("rediss:") else "redis"
    return f"{scheme}://{host}:{parts.get('port', 6379)}/{db}"
