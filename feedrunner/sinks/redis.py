"""Redis Streams: one entry per event in the stream its template names, capped with MAXLEN ~.

Redis does not de-duplicate entries: each carries the event id (field `id`) beside the record (field
`data`, JSON of events.to_dict), so a consumer drops the copies a re-sent batch leaves.

A chunk of events is one EVAL of a short script that XADDs them in order and trims each stream it
touched: one command and one reply per chunk instead of one per event, which is what bounds a client
in Python (redis-py packs and parses every command in Python: ~70k pipelined XADDs/s, against ~275k
entries/s this way). The user needs EVAL besides XADD and XTRIM (ACL `+eval +xadd +xtrim +ping
+client|setname`), and one server holds every stream (a cluster would refuse keys of several slots in
one script). The command is packed here and sent on one connection of redis-py's, which connects,
authenticates and selects the database; the next chunk is packed while the server runs the one
before. A script that fails stops at the refused entry: those before it are added, the batch counts
as failed and is sent again whole. redis-py retries nothing: a failure surfaces at once and the
delivery loop retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from feedrunner.events import Event, event_id
from feedrunner.sinks.base import encode_each
from feedrunner.sinks.bus import BusSink, DeliveryError, Permanent, Transient, render
from feedrunner.spec import RedisSpec
from feedrunner.spec import Sink as SinkSpec

CHUNK = 1000  # entries per script: bounds what a batch holds in flight and how long one script runs (~4 ms)
CONNECT_TIMEOUT = 2.0  # seconds to open a connection, at most
SOCKET_TIMEOUT = 5.0  # seconds a reply may take, at most; never more than the delivery timeout
CLOSE_TIMEOUT = 2.0
KEY_CACHE = 100_000  # stream names remembered; the spec's symbols and kinds bound them well below this
# KEYS: the stream of each entry; ARGV: the cap, then each entry's id and record.
XADD_SCRIPT = b"""local cap = ARGV[1]
local touched = {}
for i = 1, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'id', ARGV[2 * i], 'data', ARGV[2 * i + 1])
  touched[KEYS[i]] = true
end
for key in pairs(touched) do
  redis.call('XTRIM', key, 'MAXLEN', '~', cap)
end
return #KEYS"""


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


_EVAL = _bulk(b"EVAL") + _bulk(XADD_SCRIPT)

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
        self._conn: AbstractConnection | None = None  # the pool's connection the batches go on
        self._cap = _bulk(str(self.conf.maxlen).encode())
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
            self._conn = await self._client.connection_pool.get_connection()
            await self._conn.send_command("PING", check_health=False)
            await self._conn.read_response()
        except Exception as exc:
            await self.close()
            raise self._classify(exc, "PING") from exc

    async def send(self, events: Sequence[Event]) -> None:
        conn = self._conn
        if conn is None:
            raise Transient(f"{self.where()}: not connected")
        try:
            command = self._pack(events[:CHUNK])
            for start in range(CHUNK, len(events) + CHUNK, CHUNK):
                await conn.send_packed_command(command, check_health=False)
                command = self._pack(events[start : start + CHUNK])  # while the server runs the last one
                await conn.read_response(disable_decoding=True)
        except Exception as exc:
            if not isinstance(exc, rex.ResponseError):  # a reply may still be on its way: start afresh
                await conn.disconnect(nowait=True)
            raise self._classify(exc, "XADD") from exc

    def _pack(self, chunk: Sequence[Event]) -> bytes:
        """EVAL of the script over `chunk`, in the protocol's own framing."""
        if not chunk:
            return b""
        n = str(len(chunk)).encode()
        parts = [b"*%d\r\n" % (4 + 3 * len(chunk)), _EVAL, _bulk(n)]
        key = self._key
        parts += [key(e) for e in chunk]
        parts.append(self._cap)
        for e, value in zip(chunk, encode_each(chunk), strict=True):
            eid = event_id(e).encode()
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(eid), eid, len(value), value))
        return b"".join(parts)

    def _key(self, e: Event) -> bytes:
        """The event's stream name, framed as an argument."""
        at = (e.venue, e.kind, e.symbol)
        key = self._keys.get(at)
        if key is None:
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            key = self._keys[at] = _bulk(render(self.conf.stream, e).encode())
        return key

    async def close(self) -> None:
        client, self._client, conn, self._conn = self._client, None, self._conn, None
        with contextlib.suppress(Exception):
            if conn is not None:
                await conn.disconnect(nowait=True)
            if client is not None:
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
