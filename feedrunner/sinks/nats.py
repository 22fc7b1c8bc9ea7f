"""NATS JetStream: each event published to its subject, acknowledged by the stream, de-duplicated by id.

Every message carries `Nats-Msg-Id: events.event_id(e)`, so a batch sent again after a partial failure
is stored once inside the stream's duplicate window. Publishes go out in order on one connection with
up to `max_pending` acknowledgements outstanding; the server stores them in that order, so each symbol
keeps its order. The client never reconnects by itself: a lost connection fails the batch at once and
the delivery loop decides when to open again.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    AuthorizationError,
    BadSubjectError,
    InvalidUserCredentialsError,
    MaxPayloadError,
    SecureConnFailedError,
    SecureConnRequiredError,
    SecureConnWantedError,
)
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from feedrunner.events import Event, event_id
from feedrunner.sinks.base import encode_each
from feedrunner.sinks.bus import BusSink, Permanent, Transient, render
from feedrunner.spec import NatsSpec
from feedrunner.spec import Sink as SinkSpec

CONNECT_TIMEOUT = 5.0  # seconds for one server's TCP, TLS and handshake; the whole open is bounded too
API_TIMEOUT = 5.0  # seconds for a JetStream API request (stream info, create)
CLOSE_TIMEOUT = 2.0
LIVENESS = 0.25  # seconds between connection checks while acknowledgements are awaited
SUBJECTS_MAX = 100_000  # cached subjects; the spec's symbols and kinds bound them well below this
YIELD_EVERY = 256  # publishes between yields, so the flusher and the ack reader run while a batch goes out
_UNSAFE = re.compile(r"[^\w\-+=:@#]")  # \w is unicode letters, digits and '_'
_AUTH_WORDS = ("authorization", "authentication", "permissions violation")


def safe_token(symbol: str) -> str:
    """A symbol as one subject token: BTC/USDT -> BTC-USDT, BRK.B -> BRK_B; wildcards, dots, spaces and
    control characters can neither split the subject nor widen a subscriber's match."""
    return _UNSAFE.sub("_", symbol.replace("/", "-")) or "_"


def stream_filter(template: str) -> str:
    """The subjects a template can render: each token holding a placeholder becomes `*`."""
    return ".".join("*" if "{" in token else token for token in template.split("."))


def covers(pattern: str, subject: str) -> bool:
    """Whether every subject matching `subject` (which may hold `*`) also matches the stream's `pattern`."""
    want, have = subject.split("."), pattern.split(".")
    for i, token in enumerate(have):
        if token == ">":
            return i < len(want)
        if i >= len(want):
            return False
        if token != "*" and token != want[i]:
            return False
    return len(have) == len(want)


class _Batch:
    """One send's acknowledgements: tokens base..base+n-1, counted as they arrive."""

    __slots__ = ("acked", "base", "error", "n", "wake")

    def __init__(self, base: int, n: int) -> None:
        self.base, self.n, self.acked = base, n, 0
        self.error: Exception | None = None
        self.wake = asyncio.Event()

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.wake.set()


class NatsSink(BusSink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        assert spec.nats is not None and spec.delivery is not None
        self.cfg: NatsSpec = spec.nats
        self.timeout = spec.delivery.timeout
        self.filter = stream_filter(self.cfg.subject)
        self._hosts = [_host_port(s.reveal()) for s in self.cfg.servers]
        self._secrets = [v.reveal() for v in (self.cfg.password, self.cfg.token) if v is not None]
        for url in (urlsplit(_with_scheme(s.reveal())) for s in self.cfg.servers):
            self._secrets += [part for part in (url.username, url.password) if part]  # nats://token@host too
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._prefix = ""
        self._next = 0  # the next ack token on this connection
        self._batch: _Batch | None = None
        self._subjects: dict[tuple[str, str, str], str] = {}  # (venue, kind, symbol) -> subject

    def where(self) -> str:
        return f"nats {','.join(self._hosts)} subject {self.cfg.subject} stream {self.cfg.stream}"

    # -----------------------------------------------------------------------------------------------
    # open

    async def open(self) -> None:
        await self.close()
        nc = Client()
        try:
            await self._connect(nc)
            self._nc, self._js = nc, nc.jetstream(timeout=API_TIMEOUT)
            self._prefix = nc.new_inbox() + "."
            self._next = 0
            await nc.subscribe(
                self._prefix + "*", cb=self._on_ack, pending_msgs_limit=max(65536, 4 * self.cfg.max_pending)
            )
            await self._ensure_stream()
        except BaseException:
            await self.close()
            await _close_quietly(nc)
            raise

    async def _connect(self, nc: Client) -> None:
        c = self.cfg
        tls = self._tls()
        attempt = min(CONNECT_TIMEOUT, self.timeout)
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[s.reveal() for s in c.servers],
                    name=f"feedrunner {self.name}",
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # each server twice, then the open fails
                    reconnect_time_wait=0.1,  # type: ignore[arg-type]
                    connect_timeout=attempt,  # type: ignore[arg-type]
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_lost,
                    closed_cb=self._on_lost,
                    user=c.username.reveal() if c.username else None,
                    password=c.password.reveal() if c.password else None,
                    token=c.token.reveal() if c.token else None,
                    user_credentials=c.creds_file,
                    tls=tls,
                    pending_size=8 << 20,
                ),
                timeout=2 * attempt * len(c.servers) + 1,
            )
        except (AuthorizationError, InvalidUserCredentialsError, SecureConnRequiredError, SecureConnWantedError) as e:
            raise Permanent(f"{self.where()}: connection refused: {self._say(e)}") from e
        except (FileNotFoundError, PermissionError, ssl.SSLCertVerificationError) as e:
            raise Permanent(f"{self.where()}: cannot connect: {self._say(e)}") from e
        except NatsError as e:
            if any(w in str(e).lower() for w in _AUTH_WORDS):
                raise Permanent(f"{self.where()}: authentication refused: {self._say(e)}") from e
            raise Transient(f"{self.where()}: cannot connect: {self._say(e)}") from e
        except (TimeoutError, OSError, SecureConnFailedError) as e:
            raise Transient(f"{self.where()}: cannot connect: {self._say(e)}") from e

    def _tls(self) -> ssl.SSLContext | None:
        c = self.cfg
        if not (c.ca_file or c.cert_file or c.key_file):
            return None
        try:
            ctx = ssl.create_default_context(cafile=c.ca_file)
            if c.cert_file:
                ctx.load_cert_chain(c.cert_file, c.key_file)
        except (OSError, ssl.SSLError) as e:
            raise Permanent(f"{self.where()}: cannot load TLS files: {self._say(e)}") from e
        return ctx

    async def _ensure_stream(self) -> None:
        """The stream must exist and capture every subject the template renders."""
        assert self._js is not None
        name = self.cfg.stream
        try:
            info = await self._js.stream_info(name)
        except NotFoundError:
            if not self.cfg.create_stream:
                raise Permanent(f"{self.where()}: stream {name} does not exist and create_stream is false") from None
            await self._create_stream()
            return
        except (TimeoutError, NatsError) as e:
            raise Transient(f"{self.where()}: cannot look up stream {name}: {self._say(e)}") from e
        subjects = info.config.subjects or [name]
        if not any(covers(p, self.filter) for p in subjects):
            raise Permanent(
                f"{self.where()}: stream {name} captures {', '.join(subjects)}, not {self.filter}: "
                f"add {self.filter} to its subjects or point the sink at another stream"
            )

    async def _create_stream(self) -> None:
        assert self._js is not None
        config = StreamConfig(
            name=self.cfg.stream,
            subjects=[self.filter],
            storage=StorageType.FILE,
            duplicate_window=self.cfg.duplicate_window,
        )
        try:
            await self._js.add_stream(config)
        except APIError as e:
            if e.code is not None and e.code >= 500:
                raise Transient(f"{self.where()}: cannot create stream {self.cfg.stream}: {self._say(e)}") from e
            if e.err_code == 10058:  # created meanwhile by another runner: check what it captures
                await self._ensure_stream()
                return
            raise Permanent(f"{self.where()}: cannot create stream {self.cfg.stream}: {self._say(e)}") from e
        except (TimeoutError, NatsError) as e:
            raise Transient(f"{self.where()}: cannot create stream {self.cfg.stream}: {self._say(e)}") from e

    # -----------------------------------------------------------------------------------------------
    # send

    async def send(self, events: Sequence[Event]) -> None:
        if not events:
            return
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise Transient(f"{self.where()}: not connected")
        batch = self._batch = _Batch(self._next, len(events))
        self._next += len(events)
        try:
            async with asyncio.timeout(self.timeout):
                await self._publish(nc, batch, events)
                while batch.acked < batch.n and batch.error is None:
                    await self._wait(nc, batch)
        except TimeoutError:
            raise Transient(
                f"{self.where()}: {batch.n - batch.acked} of {batch.n} messages unacknowledged after {self.timeout}s"
            ) from None
        finally:
            self._batch = None
        if batch.error is not None:
            raise await self._classify(batch.error, events)

    async def _publish(self, nc: Client, batch: _Batch, events: Sequence[Event]) -> None:
        limit, prefix, subjects, subject_of = self.cfg.max_pending, self._prefix, self._subjects, self._subject
        token = batch.base
        for i, (e, value) in enumerate(zip(events, encode_each(events), strict=True)):
            if i - batch.acked >= limit or i % YIELD_EVERY == 0:
                while i - batch.acked >= limit and batch.error is None:
                    await self._wait(nc, batch)
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            if batch.error is not None:
                return
            subject = subjects.get((e.venue, e.kind, e.symbol)) or subject_of(e)
            try:
                await nc.publish(subject, value, reply=f"{prefix}{token}", headers={"Nats-Msg-Id": event_id(e)})
            except (MaxPayloadError, BadSubjectError) as err:
                raise Permanent(f"{self.where()}: {subject} refused: {self._say(err)}") from err
            except (NatsError, OSError) as err:
                raise Transient(f"{self.where()}: cannot publish: {self._say(err)}") from err
            token += 1

    def _subject(self, e: Event) -> str:
        if len(self._subjects) >= SUBJECTS_MAX:
            self._subjects.clear()
        subject = self._subjects[(e.venue, e.kind, e.symbol)] = render(self.cfg.subject, e, symbol=safe_token(e.symbol))
        return subject

    async def _wait(self, nc: Client, batch: _Batch) -> None:
        """Until an ack or a failure wakes the batch; a connection the client closed without calling back
        (it can fail inside its own close) is noticed within LIVENESS seconds rather than at the timeout."""
        batch.wake.clear()
        try:
            async with asyncio.timeout(LIVENESS):
                await batch.wake.wait()
        except TimeoutError:
            if not nc.is_connected:
                batch.fail(Transient(f"{self.where()}: connection lost"))

    async def _on_ack(self, msg: Msg) -> None:
        batch = self._batch
        if batch is None:
            return
        try:
            index = int(msg.subject[len(self._prefix) :]) - batch.base
        except ValueError:
            return
        if not 0 <= index < batch.n:
            return  # an earlier batch's, arriving late
        data = msg.data
        if not data or b'"error":{' in data:  # no responders (empty, status 503), or a JetStream error
            batch.fail(_AckError(index, msg))
        batch.acked += 1
        batch.wake.set()

    async def _classify(self, error: Exception, events: Sequence[Event]) -> Exception:
        if not isinstance(error, _AckError):
            return error
        subject = self._subject(events[error.index])
        if error.status == "503" or error.code == 503:
            # No stream answered: JetStream restarting, or the stream gone or changed under the sink.
            try:
                async with asyncio.timeout(API_TIMEOUT):
                    await self._ensure_stream_still()
            except Permanent as p:
                return p
            except TimeoutError:
                pass
            return Transient(f"{self.where()}: no stream answered for {subject}")
        if error.code is not None and error.code >= 500:
            return Transient(f"{self.where()}: {subject} not stored: {error.description}")
        return Permanent(f"{self.where()}: {subject} refused by the stream: {error.description}")

    async def _ensure_stream_still(self) -> None:
        """The stream check of open(), without creating: a stream deleted while running is an operator's
        matter, and the next open creates it again when create_stream allows."""
        assert self._js is not None
        try:
            info = await self._js.stream_info(self.cfg.stream)
        except NotFoundError:
            raise Permanent(f"{self.where()}: stream {self.cfg.stream} no longer exists") from None
        except (TimeoutError, NatsError):
            return
        subjects = info.config.subjects or [self.cfg.stream]
        if not any(covers(p, self.filter) for p in subjects):
            raise Permanent(f"{self.where()}: stream {self.cfg.stream} no longer captures {self.filter}")

    # -----------------------------------------------------------------------------------------------
    # connection events and close

    async def _on_error(self, e: Exception) -> None:
        """The client's errors surface through the calls that fail; nothing to log here."""

    async def _on_lost(self) -> None:
        if self._batch is not None:
            self._batch.fail(Transient(f"{self.where()}: connection lost"))

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if self._batch is not None:
            self._batch.fail(Transient(f"{self.where()}: closed"))
        if nc is not None:
            await _close_quietly(nc)

    def _say(self, e: BaseException) -> str:
        """An exception as text for a message, with any credential it might echo blanked out."""
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _AckError(Exception):
    """A negative acknowledgement, kept raw until send() classifies it."""

    def __init__(self, index: int, msg: Msg) -> None:
        super().__init__(index)
        self.index = index
        self.status = (msg.headers or {}).get("Status")
        self.code: int | None = None
        self.description = "no response"
        if msg.data:
            try:
                err = orjson.loads(msg.data).get("error") or {}
            except orjson.JSONDecodeError:
                err = {}
            self.code = err.get("code")
            self.description = str(err.get("description", "error"))


async def _close_quietly(nc: Client) -> None:
    try:
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
    except Exception:
        pass


def _with_scheme(url: str) -> str:
    return url if "://" in url else f"nats://{url}"


def _host_port(url: str) -> str:
    """host:port of a server URL, without user, password or token."""
    try:
        parts = urlsplit(_with_scheme(url))
        host = parts.hostname or "?"
        port = parts.port or 4222
    except ValueError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
