"""Kafka: every event one message, keyed so a symbol stays on one partition and in order.

confluent-kafka (librdkafka) does the work in its own threads: the idempotent producer (acks=all) keeps
a partition's order through retries without duplicates, and librdkafka batches and compresses per
partition. Python does only what is per message: encode, route, produce, count the delivery report.
Reports are served on the event loop with a non-blocking poll every millisecond, never in a worker
thread: there each report's callback would wait for the GIL, held by a busy feed for up to the switch
interval (5 ms), and a batch of 5,000 reports would crawl at ~12k/s while the feed takes the core.

A send waits for the reports of its own batch only: each batch counts its reports in its own `_Batch`,
so the reports of an earlier batch cut short by the caller's timeout (acknowledged late, or timed out)
never count for a later one. Such a batch is left to finish in the client rather than purged: purging
makes the idempotent producer bump its epoch, which some brokers answer by fencing it.

Topics are never created here: a topic missing from the cluster's metadata is a permanent error naming it.
"""

from __future__ import annotations

import asyncio
import re
import string
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from loguru import logger

from feedrunner.events import Event, event_id
from feedrunner.sinks.base import encode_each
from feedrunner.sinks.bus import BusSink, DeliveryError, Permanent, Transient, render
from feedrunner.spec import KafkaSpec
from feedrunner.spec import Sink as SinkSpec

HEADER = "event-id"
RECORD_OVERHEAD = 64  # bytes a record adds to its key, value and headers (librdkafka counts at most 36)
POLL_SLICE = 0.05  # seconds one poll in a worker thread may block (metadata errors, close)
REPORT_EVERY = 0.001  # seconds between two polls for the delivery reports of a batch
YIELD_EVERY = 1000  # messages produced between two yields to the event loop
CLOSE_FLUSH = 0.5  # seconds close() serves the reports of purged messages
ROUTES_MAX = 100_000  # cached (topic, key) routes; cleared beyond

# Errors no retry fixes: credentials, permissions, a topic that does not exist, a message too large,
# a configuration the client or the broker refuses.
PERMANENT_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.UNSUPPORTED_SASL_MECHANISM,
        KafkaError.ILLEGAL_SASL_STATE,
        KafkaError._SSL,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_CONFIG,
        KafkaError._INVALID_ARG,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
    }
)
_AUTH_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.UNSUPPORTED_SASL_MECHANISM,
        KafkaError.ILLEGAL_SASL_STATE,
        KafkaError._SSL,
    }
)
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def is_permanent(err: KafkaError) -> bool:
    return err.code() in PERMANENT_CODES and not err.fatal()


class _Batch:
    """One send's delivery reports; its `report` is the delivery callback of its messages only."""

    __slots__ = ("abandoned", "done", "error", "failed", "sent")

    def __init__(self) -> None:
        self.sent = 0  # counted by the producing task only
        self.done = 0  # counted by the callbacks only, served on the event loop while the batch is awaited
        self.failed = 0
        self.error: KafkaError | None = None  # the first permanent one, else the first one
        self.abandoned = False  # the send gave up: its wait stops, its late reports change nothing

    @property
    def pending(self) -> int:
        return self.sent - self.done

    def report(self, err: KafkaError | None, _msg: Any) -> None:
        self.done += 1
        if err is not None:
            self.failed += 1
            if self.error is None or (is_permanent(err) and not is_permanent(self.error)):
                self.error = err


class _LogBridge:
    """librdkafka's log lines (one per reconnect attempt while a broker is down) at DEBUG: the delivery
    loop already logs the sink's state changes once."""

    def __init__(self, scrub: Callable[[object], str]) -> None:
        self.scrub = scrub

    def log(self, level: int, fmt: str, *args: Any) -> None:
        logger.opt(lazy=True).debug("librdkafka: {}", lambda: self.scrub(fmt % args))


class KafkaSink(BusSink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        assert spec.kafka is not None and spec.delivery is not None
        self.conf: KafkaSpec = spec.kafka
        self.timeout = spec.delivery.timeout
        self.batch = spec.delivery.batch
        self._producer: Producer | None = None
        self._topics: set[str] = set()  # checked to exist since the last open
        self._routes: dict[tuple[str, str, str], tuple[str, bytes]] = {}
        self._errors: list[KafkaError] = []  # client-level errors since the last open (error_cb)
        self._inflight: _Batch | None = None  # the batch a send is waiting for, abandoned by close()
        self._lock = threading.Lock()  # one worker thread serves callbacks at a time
        self._fixed_topic = _fixed(self.conf.topic)
        self._topic_by_symbol = "symbol" in _fields(self.conf.topic)

    def where(self) -> str:
        return f"kafka brokers {','.join(self.conf.brokers)} topic {self.conf.topic}"

    # -- open / close -------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._producer is not None:
            await self._discard()
        self._topics.clear()
        self._errors.clear()
        try:
            producer = Producer(self._config())
        except (KafkaException, ValueError, TypeError) as exc:
            raise Permanent(f"{self.where()}: the client refuses its configuration: {self._scrub(exc)}") from None
        self._producer = producer
        names = await self._metadata(producer, self._fixed_topic, self._budget(0.5))
        if self._fixed_topic is not None:
            self._check_topic(self._fixed_topic, names)
        else:
            self._topics.update(name for name, err in names.items() if err is None)

    async def close(self) -> None:
        if self._producer is not None:
            await self._discard()

    async def _discard(self) -> None:
        """Purge, serve the purged reports briefly, let the producer go; bounded even with every broker dead.

        Nothing acknowledged is lost: a send returns only once its batch is acknowledged, so what is still
        queued belongs to a batch that failed or was cut short, which the delivery loop sends again whole.
        Flushing it to a dead broker would only delay the close."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if self._inflight is not None:
            self._inflight.abandoned = True  # its wait stops polling at once
        task = asyncio.ensure_future(asyncio.to_thread(self._shut, producer))
        del producer  # the worker thread holds the last reference, so librdkafka is destroyed there
        done, _ = await asyncio.wait({task}, timeout=CLOSE_FLUSH + 1.0)
        if not done:
            logger.warning("sink {}: the Kafka client is still shutting down in the background", self.name)

    def _shut(self, producer: Producer) -> None:
        with self._lock:
            try:
                producer.purge()
                producer.flush(CLOSE_FLUSH)
            except (KafkaException, RuntimeError) as exc:
                logger.debug("sink {}: closing the Kafka client: {}", self.name, self._scrub(exc))

    def _config(self) -> dict[str, Any]:
        k = self.conf
        idempotent = k.acks == "all"
        message_ms = max(100, int(self.timeout * 800))  # reports arrive before the caller's timeout
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(k.brokers),
            "client.id": f"feedrunner-{self.name}",
            "acks": k.acks,
            "enable.idempotence": idempotent,
            # Without idempotence a retried request may overtake the next one: one in flight keeps order.
            "max.in.flight.requests.per.connection": 5 if idempotent else 1,
            "compression.type": k.compression,
            "linger.ms": min(k.linger * 1000, message_ms / 2),
            "batch.size": k.batch_bytes,
            "message.max.bytes": max(1000, k.message_max_bytes),
            "message.timeout.ms": message_ms,
            "request.timeout.ms": min(30_000, message_ms),
            "queue.buffering.max.messages": min(2_000_000, max(100_000, 2 * self.batch)),
            "allow.auto.create.topics": False,
            "partitioner": "murmur2_random",  # the Java client's: a key lands where other producers put it
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "log.connection.close": False,
            "security.protocol": k.security_protocol,
            "error_cb": self._on_error,
            "logger": _LogBridge(self._scrub),
        }
        if k.sasl_mechanism:
            conf["sasl.mechanism"] = k.sasl_mechanism
        if k.username is not None:
            conf["sasl.username"] = k.username.reveal()
        if k.password is not None:
            conf["sasl.password"] = k.password.reveal()
        for key, path in (
            ("ssl.ca.location", k.ca_file),
            ("ssl.certificate.location", k.cert_file),
            ("ssl.key.location", k.key_file),
        ):
            if path:
                conf[key] = path
        return conf

    def _on_error(self, err: KafkaError) -> None:
        if len(self._errors) < 100:
            self._errors.append(err)

    # -- send -----------------------------------------------------------------------------------------------

    async def send(self, events: Sequence[Event]) -> None:
        producer = self._producer
        if producer is None:
            raise Transient(f"{self.where()}: not open")
        if not events:
            return
        deadline = time.monotonic() + self._budget(0.9)
        messages = self._encode(events)
        for topic in {m[0] for m in messages} - self._topics:
            self._check_topic(topic, await self._metadata(producer, topic, deadline - time.monotonic()))
        batch = self._inflight = _Batch()
        try:
            await self._produce(producer, messages, batch, deadline)
            await self._wait(producer, batch, deadline)
        except BaseException:
            batch.abandoned = True
            raise
        finally:
            if self._inflight is batch:
                self._inflight = None
        if batch.pending > 0:
            why = "when the sink closed" if batch.abandoned else "in time"
            batch.abandoned = True
            raise Transient(f"{self.where()}: {batch.pending} of {len(messages)} messages unacknowledged {why}")
        if batch.error is not None:
            raise self._failure(batch.error, f"{batch.failed} of {len(messages)} messages failed")

    def _encode(self, events: Sequence[Event]) -> list[tuple[str, bytes, bytes, str]]:
        """(topic, key, value, event id) per event; refuses the batch before any of it is produced when
        one message is larger than message_max_bytes, since sending the rest would repeat on every retry."""
        routes, route = self._routes, self._route
        limit = self.conf.message_max_bytes - RECORD_OVERHEAD - len(HEADER)
        out: list[tuple[str, bytes, bytes, str]] = []
        append = out.append
        for e, value in zip(events, encode_each(events), strict=True):
            r = routes.get((e.venue, e.kind, e.symbol)) or route(e)
            eid = event_id(e)
            if len(value) + len(r[1]) + len(eid) > limit:
                raise Permanent(
                    f"{self.where()}: a {e.kind} of {e.venue} {e.symbol} is {len(value)} bytes, larger than "
                    f"message_max_bytes ({self.conf.message_max_bytes}); its batch is refused"
                )
            append((r[0], r[1], value, eid))
        return out

    def _route(self, e: Event) -> tuple[str, bytes]:
        if len(self._routes) >= ROUTES_MAX:
            self._routes.clear()
        symbol = _TOPIC_UNSAFE.sub("_", e.symbol) if self._topic_by_symbol else None
        r = self._routes[(e.venue, e.kind, e.symbol)] = (
            render(self.conf.topic, e, symbol),
            render(self.conf.key, e).encode(),
        )
        return r

    async def _produce(
        self, producer: Producer, messages: list[tuple[str, bytes, bytes, str]], batch: _Batch, deadline: float
    ) -> None:
        produce, report = producer.produce, batch.report
        for i, (topic, key, value, eid) in enumerate(messages, 1):
            while True:
                try:
                    produce(topic, value, key, on_delivery=report, headers=[(HEADER, eid)])
                    break
                except BufferError:
                    # librdkafka's queue is full: let reports drain it, within the send's time.
                    if time.monotonic() >= deadline:
                        raise Transient(f"{self.where()}: the client's queue stayed full") from None
                    self._poll(producer, batch)
                    await asyncio.sleep(REPORT_EVERY)
                except KafkaException as exc:
                    raise self._failure(exc.args[0], f"cannot produce to {topic}") from None
            batch.sent = i
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def _serve(self, producer: Producer, timeout: float) -> None:
        with self._lock:
            try:
                producer.poll(timeout)
            except KafkaException as exc:
                self._on_error(exc.args[0])

    async def _wait(self, producer: Producer, batch: _Batch, deadline: float) -> None:
        """Serve delivery reports until this batch has all of its own, the deadline passes or the send is
        abandoned. Reports of other batches are served too, and ignored by them."""
        while not batch.abandoned and self._poll(producer, batch) > 0:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(REPORT_EVERY)

    def _poll(self, producer: Producer, batch: _Batch) -> int:
        """One non-blocking poll; the batch's reports still pending."""
        try:
            producer.poll(0)
        except KafkaException as exc:  # a fatal error: the producer is done, open() makes another
            err = exc.args[0]
            self._on_error(err)
            if batch.error is None:
                batch.error = err
            return 0
        return batch.pending

    # -- metadata and errors ---------------------------------------------------------------------------

    async def _metadata(self, producer: Producer, topic: str | None, timeout: float) -> dict[str, KafkaError | None]:
        """Topic name -> its metadata error, for one topic or every topic; Transient when no broker answers
        in time, Permanent when a broker refused our credentials."""
        try:
            md = await asyncio.to_thread(producer.list_topics, topic, max(0.1, timeout))
        except KafkaException as exc:
            await asyncio.to_thread(self._serve, producer, 0)  # error_cb: why it failed, if a broker said
            auth = next((e for e in self._errors if e.code() in _AUTH_CODES), None)
            if auth is not None:
                raise Permanent(f"{self.where()}: the brokers refuse us: {self._scrub(auth.str())}") from None
            raise Transient(f"{self.where()}: no broker answered: {self._scrub(exc.args[0].str())}") from None
        return {name: t.error for name, t in md.topics.items()}

    def _check_topic(self, topic: str, names: dict[str, KafkaError | None]) -> None:
        err = names.get(topic, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        if err is None:
            self._topics.add(topic)
            return
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise Permanent(f"{self.where()}: topic {topic} does not exist; create it (the sink never creates topics)")
        raise self._failure(err, f"topic {topic}")

    def _failure(self, err: KafkaError, what: str) -> DeliveryError:
        cls = Permanent if is_permanent(err) else Transient
        return cls(f"{self.where()}: {what}: {err.name()}: {self._scrub(err.str())}")

    def _budget(self, share: float) -> float:
        """Seconds a step may take: its share of the caller's timeout."""
        return self.timeout * share

    def _scrub(self, text: object) -> str:
        """Credentials never leave in a message, whatever the client put in its own."""
        out = str(text)
        for secret in (self.conf.password, self.conf.username):
            if secret:
                out = out.replace(secret.reveal(), "***")
        return out


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def _fixed(template: str) -> str | None:
    """The topic itself when the template names no placeholder."""
    return None if _fields(template) else template.replace("{{", "{").replace("}}", "}")
