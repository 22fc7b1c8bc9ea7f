"""Through the runner onto each real bus: an outage spools and replays, a kill -9 keeps the spool.

The runner streams 5 simulator symbols at 1,000 trades/s each (5k events/s) to a JSONL sink (the
reference: it receives every event) and to the bus. A consumer then reads the bus, de-duplicates by
event id, and must find every trade of the JSONL exactly once, in order per symbol.

NATS and Redis keep their data on disk, so their outage is a kill and a restart. The Kafka-protocol broker
(Tansu) keeps its data in memory only: a kill would take with it what it had acknowledged, which no real
Kafka does, so its outage is a freeze (SIGSTOP), a broker that stops answering, which the producer can
only tell by timeouts. Its kill -9 test kills the broker too and counts only what came after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import spawn

SYMBOLS = ["A/USDT", "B/USDT", "C/USDT", "D/USDT", "E/USDT"]
OUTAGE = 10.0


class Bus:
    """One bus server and what the test needs of it."""

    type = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def sink(self) -> str:
        raise NotImplementedError

    def outage(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        """(event id, record) of every message, in the bus's order per symbol."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class NatsBus(Bus):
    type = "nats"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        from nats_server import NatsServer

        self.server = NatsServer()
        self.server.start()

    def sink(self) -> str:
        return f"{{type: nats, servers: ['{self.server.url}'], stream: MD, subject: 'md.{{venue}}.{{kind}}.{{symbol}}'"

    def outage(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()

    kill = outage

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        from nats_server import read_stream

        msgs = asyncio.run(read_stream(self.server.url, "MD", timeout=30))
        return [(m.headers["Nats-Msg-Id"], json.loads(m.data)) for m in msgs]

    def close(self) -> None:
        self.server.cleanup()


class RedisBus(Bus):
    type = "redis"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        from redis_server import RedisServer

        self.server = RedisServer()
        self.server.start()

    def sink(self) -> str:
        return f"{{type: redis, url: '{self.server.url}', stream: 'md:{{venue}}:{{kind}}'"

    def outage(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()

    kill = outage

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        from redis_server import read_stream

        entries = asyncio.run(read_stream(self.server, "md:binance:trade"))
        return [(f[b"id"].decode(), json.loads(f[b"data"])) for _, f in entries]

    def close(self) -> None:
        self.server.cleanup()


class KafkaBus(Bus):
    type = "kafka"
    topic = "md.binance.trade"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        from kafka_server import KafkaServer

        self.server = KafkaServer()
        self.server.start()
        self.server.create_topic(self.topic, 3)

    def sink(self) -> str:
        return f"{{type: kafka, brokers: ['{self.server.bootstrap}'], topic: 'md.{{venue}}.{{kind}}', linger: 2ms"

    def outage(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGSTOP)

    def recover(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.server.kill()

    def restart_killed(self) -> None:
        self.server.start()
        for name, partitions in self.server.topics.items():
            self.server._create(name, partitions)

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        from kafka_server import consume

        records = consume(self.server.bootstrap, self.topic, timeout=30)
        return [(r.headers["event-id"].decode(), json.loads(r.value)) for r in records]

    def close(self) -> None:
        if self.server.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.server.proc.send_signal(signal.SIGCONT)
        self.server.cleanup()


BUSES = {"kafka": KafkaBus, "nats": NatsBus, "redis": RedisBus}


@pytest.fixture(params=sorted(BUSES))
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    b = BUSES[request.param](tmp_path)
    try:
        yield b
    finally:
        b.close()


def _feeds(tmp: Path, bus: Bus, symbols: list[str], rate: int = 1000) -> None:
    sink = bus.sink() + ", timeout: 2s, retry: {base: 200ms, cap: 1s}, spool: {path: spool}}"
    (tmp / "feeds.yaml").write_text(
        f"""\
version: 1
environment: simulator
simulator: {{seed: 3, rate: {rate}}}
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    transport: websocket
    symbols: [{", ".join(symbols)}]
sinks:
  - {{type: jsonl, path: "out/{{venue}}.jsonl", flush_interval: 100ms}}
  - {sink}
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state.db"}}
shutdown: {{deadline: 20s}}
"""
    )


class Run:
    """`feedrunner run` in a directory, its log in run.log, its metrics over HTTP."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / f"run-{time.monotonic_ns()}.log"
        self.proc = spawn(tmp, stderr=self.log.open("w"))
        self.port = 0
        deadline = time.monotonic() + 60
        while not self.port:
            m = re.search(r"control server on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
            elif time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"the runner did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
            return resp.read()

    def metric(self, name: str, **labels: str) -> float:
        text = self.get("/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def wait(self, what: str, pred: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the runner exited while waiting for {what}:\n{self.log.read_text()[-3000:]}")
            try:
                if pred():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(40)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _jsonl_trades(tmp: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    path = tmp / "out" / "binance.jsonl"
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.setdefault(r["symbol"], []).append(r)
    return out


def _bus_trades(bus: Bus) -> tuple[dict[str, list[int]], int]:
    """Trade ids per symbol in the bus's order, first copy of each event id; and how many copies were extra."""
    seen: set[str] = set()
    out: dict[str, list[int]] = {}
    extra = 0
    for eid, rec in bus.read():
        if eid in seen:
            extra += 1
            continue
        seen.add(eid)
        assert eid == f"binance:{rec['symbol']}:trade:{rec['id']}"
        out.setdefault(rec["symbol"], []).append(int(rec["id"]))
    return out, extra


def _sink(bus: Bus) -> str:
    return bus.type


@pytest.mark.timeout(150)
def test_a_bus_outage_is_spooled_and_replayed_every_trade_once_in_order(bus: Bus, tmp_path: Path):
    _feeds(tmp_path, bus, SYMBOLS)
    run = Run(tmp_path)
    name = _sink(bus)
    try:
        run.wait("deliveries", lambda: run.metric("feedrunner_sink_events_written_total", sink=name) > 5000, 60)
        bus.outage()
        began = time.monotonic()
        run.wait("spooling", lambda: run.metric("feedrunner_sink_spool_events", sink=name) > 1000, 15)
        assert run.metric("feedrunner_sink_up", sink=name) == 0
        status = json.loads(run.get("/status"))
        assert status["sinks"][name]["state"] == "retrying"
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
        spooled = run.metric("feedrunner_sink_spool_events", sink=name)
        assert spooled > 20_000  # about 5k/s for the whole outage
        bus.recover()
        run.wait("the spool drained", lambda: run.metric("feedrunner_sink_spool_events", sink=name) == 0, 60)
        assert run.metric("feedrunner_sink_events_replayed_total", sink=name) >= spooled
        assert run.metric("feedrunner_sink_up", sink=name) == 1
        assert run.metric("feedrunner_sink_events_dropped_total", sink=name) == 0
        time.sleep(1.0)
    finally:
        code = run.stop()
    assert code == 0, run.log.read_text()[-3000:]
    log = run.log.read_text()
    assert f"sink {name} cannot deliver" in log and f"sink {name} delivering again" in log
    reference = _jsonl_trades(tmp_path)
    on_bus, _ = _bus_trades(bus)
    assert set(on_bus) == set(SYMBOLS)
    for symbol in SYMBOLS:
        ids = on_bus[symbol]
        assert ids == sorted(ids), f"{symbol}: out of order on the bus"
        want = [int(r["id"]) for r in reference[symbol]]
        assert ids == want, f"{symbol}: {len(want)} trades in the JSONL, {len(ids)} on the bus"
    assert not list((tmp_path / "spool").glob("*.seg"))  # drained and deleted


@pytest.mark.timeout(150)
def test_kill_dash_nine_while_the_spool_holds_events_then_they_arrive_after_restart(bus: Bus, tmp_path: Path):
    _feeds(tmp_path, bus, SYMBOLS[:2], rate=500)
    run = Run(tmp_path)
    name = _sink(bus)
    run.wait("deliveries", lambda: run.metric("feedrunner_sink_events_written_total", sink=name) > 1000, 60)
    bus.kill()
    killed_at = time.time_ns()
    run.wait("spooling", lambda: run.metric("feedrunner_sink_spool_events", sink=name) > 2000, 20)
    run.kill()  # kill -9: nothing flushed on the way out
    spooled_files = list((tmp_path / "spool").glob("*.seg"))
    assert spooled_files
    if isinstance(bus, KafkaBus):
        bus.restart_killed()
    else:
        bus.recover()
    # The second run streams another symbol (the simulator starts its tape afresh), and first replays.
    _feeds(tmp_path, bus, ["F/USDT"], rate=50)
    again = Run(tmp_path)
    try:
        again.wait("the replay", lambda: again.metric("feedrunner_sink_events_replayed_total", sink=name) > 2000, 60)
        again.wait("the spool drained", lambda: again.metric("feedrunner_sink_spool_events", sink=name) == 0, 60)
    finally:
        code = again.stop()
    assert code == 0, again.log.read_text()[-3000:]
    assert "left by the last run" in again.log.read_text()
    on_bus, _ = _bus_trades(bus)
    reference = _jsonl_trades(tmp_path)
    for symbol in SYMBOLS[:2]:
        # What the JSONL flushed was spooled at the same moment, unbuffered: after the restart it is all on
        # the bus. Kafka's broker was emptied by its kill: only what came after the kill can be there.
        want = {
            int(r["id"]) for r in reference[symbol] if not isinstance(bus, KafkaBus) or r["ts_received"] > killed_at
        }
        missing = want - set(on_bus.get(symbol, []))
        assert not missing, f"{symbol}: {len(missing)} of {len(want)} trades never reached the bus"


@pytest.mark.timeout(90)
def test_a_bus_unreachable_at_start_does_not_stop_the_runner_it_spools_and_says_so(tmp_path: Path):
    from servers import free_port

    class Nowhere(Bus):
        type = "redis"

        def sink(self) -> str:
            return f"{{type: redis, url: 'redis://127.0.0.1:{free_port()}/0'"

    _feeds(tmp_path, Nowhere(tmp_path), SYMBOLS[:1], rate=100)
    run = Run(tmp_path)
    try:
        run.wait("spooling", lambda: run.metric("feedrunner_sink_spool_events", sink="redis") > 200, 30)
        with pytest.raises(urllib.error.HTTPError) as answer:
            run.get("/readyz")
        assert answer.value.code == 503 and b"sink redis: cannot deliver" in answer.value.read()
        assert run.metric("feedrunner_sink_up", sink="redis") == 0
        assert run.metric("feedrunner_sink_events_written_total", sink="jsonl:out/{venue}.jsonl") > 0
    finally:
        code = run.stop()
    assert code == 0
    log = run.log.read_text()
    assert "runner started" in log and "sink redis cannot deliver (open:" in log
    assert "closed with" in log and "replayed at the next start" in log
