"""The bus sinks (Kafka on Tansu, NATS JetStream, Redis Streams) through their Delivery, against JSONL.

1. Flood, the sink alone (its ceiling): 200k pre-built trades (20 symbols, the pipeline's batches of
   2,048) written into a Delivery as fast as the bus acknowledges them, its buffer kept below its
   bound so nothing spills to the spool; timed from the first write to the last acknowledgement.
   Baseline, in the same run and on the same events: JsonlSink.write of every batch and one flush.
2. Latency at 5k events/s: batches of 50 every 10 ms, each event stamped (ts_received) as it is written;
   a consumer in another process notes when each message arrives. The first second is warm-up.
3. Through the runner: `feedrunner sim binance` in its own process offers trades; the runner streams
   them with one sink, JSONL or a bus, and the trades per second that sink takes (JSONL: written; a
   bus: acknowledged) are compared. The bus sink's work shares the runner's core with the feed. Twice:
   at the flood rate of bench.ccxt_stream (1 symbol, 20k/s offered), and saturated (2 symbols, 40k/s
   offered, more than one runner parses with a bus sink), where what a bus cannot take in time is
   spooled, as it must be, and counted.
4. Outage at 5k events/s: the bus is unavailable for FEEDRUNNER_BENCH_OUTAGE seconds (default 60): NATS
   and Redis are killed and started again on the same port; Tansu keeps its data in memory only, so it
   is frozen (SIGSTOP) and thawed instead. Then the spool replays; once it is drained a consumer reads
   the whole bus and de-duplicates by event id: every event written must be there.

The servers are the tests' own (tests/*_server.py), on free loopback ports; a missing binary skips its bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import orjson
import pytest
from loguru import logger

from bench.results import record
from feedrunner.events import Trade, event_id
from feedrunner.metrics import Metrics
from feedrunner.sinks import build
from feedrunner.sinks.delivery import Delivery
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.spec import Delivery as DeliverySpec
from feedrunner.spec import KafkaSpec, NatsSpec, RedisSpec, Retry, Secret, SpoolSpec
from feedrunner.spec import Sink as SinkSpec

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))  # the test servers import `servers` from there

RUNS = int(os.environ.get("BENCH_RUNS", 3))
FLOOD_EVENTS = 200_000
BATCH = 2048  # the pipeline's batch (feedrunner.pipeline.BATCH)
SYMBOLS = [f"S{i:02d}/USDT" for i in range(20)]
RATE = 5000
PACE_BATCH = 50
PACE_EVERY = PACE_BATCH / RATE  # 10 ms
LATENCY_SECONDS = 10.0
WARMUP = 1.0
OUTAGE = float(os.environ.get("FEEDRUNNER_BENCH_OUTAGE", 60))
BEFORE_OUTAGE = 5.0
TICK = 1.0  # the pipeline's flush timer at the default flush_interval: spool fsync and gauges
KAFKA_PARTITIONS = 3
# The outage runs with the end-to-end tests' pacing: with the default retry cap (30 s) the first attempt
# after the bus is back may come up to 36 s later, which would be counted as replay time.
OUTAGE_TIMEOUT = 2.0
OUTAGE_RETRY = Retry(base=0.2, cap=1.0)
RUNNER_RATE = 20_000  # trades/s per symbol offered: bench.ccxt_stream's flood
RUNNER_FLOOD = ["BTC/USDT"]
RUNNER_SATURATED = ["BTC/USDT", "ETH/USDT"]
RUNNER_SECONDS = float(os.environ.get("BENCH_FLOOD_SECONDS", 8))
RUNNER_WARMUP = 3.0
NOT_RUN = (pytest.skip.Exception, pytest.fail.Exception, ImportError, RuntimeError, OSError)


def trade(venue: str, i: int, ts: int) -> Trade:
    return Trade(
        venue=venue,
        symbol=SYMBOLS[i % len(SYMBOLS)],
        ts_exchange=ts - 1_000_000,
        ts_received=ts,
        transport="websocket",
        id=str(i),
        price=100.0 + (i % 1000) * 0.01,
        amount=0.001 * (1 + i % 7),
        side="buy" if i & 1 else "sell",
    )


def batches(venue: str, total: int, start: int = 0) -> list[list[Trade]]:
    ts = time.time_ns()
    events = [trade(venue, i, ts + i) for i in range(start, start + total)]
    return [events[i : i + BATCH] for i in range(0, total, BATCH)]


def pct(values: list[int], q: float) -> float:
    """Milliseconds at quantile q of nanosecond values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e6


# -- the buses ------------------------------------------------------------------------------------------


class Bus:
    """One server and what the benchmark needs of it; `part` names the topic, subject or stream family."""

    type = ""

    def spec(self, part: str, delivery: DeliverySpec) -> SinkSpec:
        raise NotImplementedError

    def doc(self, part: str) -> dict[str, Any]:
        """The sink as feeds.yaml declares it."""
        raise NotImplementedError

    def prepare(self, part: str, venue: str) -> None:
        """Before a Delivery sends to `part` for `venue`."""

    def consumer(self, part: str, venue: str) -> dict[str, Any]:
        raise NotImplementedError

    def outage(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        raise NotImplementedError

    async def read(self, part: str, venue: str) -> list[str]:
        """Event ids of every message of `part` for `venue`, duplicates included."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class KafkaBus(Bus):
    type = "kafka"

    def __init__(self) -> None:
        from kafka_server import KafkaServer

        self.server = KafkaServer()
        self.server.start()

    @staticmethod
    def topic(part: str, venue: str) -> str:
        return f"{part}.{venue}.trade"

    def spec(self, part: str, delivery: DeliverySpec) -> SinkSpec:
        conf = KafkaSpec(brokers=(self.server.bootstrap,), topic=f"{part}.{{venue}}.{{kind}}")
        return SinkSpec(type="kafka", name="kafka", delivery=delivery, kafka=conf)

    def doc(self, part: str) -> dict[str, Any]:
        return {"type": "kafka", "brokers": [self.server.bootstrap], "topic": f"{part}.{{venue}}.{{kind}}"}

    def prepare(self, part: str, venue: str) -> None:
        self.server.create_topic(self.topic(part, venue), KAFKA_PARTITIONS)

    def consumer(self, part: str, venue: str) -> dict[str, Any]:
        return {"type": "kafka", "bootstrap": self.server.bootstrap, "topic": self.topic(part, venue)}

    def outage(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGSTOP)

    def recover(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGCONT)

    async def read(self, part: str, venue: str) -> list[str]:
        from kafka_server import consume

        records = await asyncio.to_thread(consume, self.server.bootstrap, self.topic(part, venue), None, 120)
        return [r.headers["event-id"].decode() for r in records]

    def close(self) -> None:
        if self.server.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.server.proc.send_signal(signal.SIGCONT)
        self.server.cleanup()


class NatsBus(Bus):
    type = "nats"

    def __init__(self) -> None:
        from nats_server import NatsServer

        self.server = NatsServer()
        self.server.start()

    def spec(self, part: str, delivery: DeliverySpec) -> SinkSpec:
        conf = NatsSpec(
            servers=(Secret(self.server.url),), subject=f"{part}.{{venue}}.{{kind}}.{{symbol}}", stream=part.upper()
        )
        return SinkSpec(type="nats", name="nats", delivery=delivery, nats=conf)

    def doc(self, part: str) -> dict[str, Any]:
        subject = f"{part}.{{venue}}.{{kind}}.{{symbol}}"
        return {"type": "nats", "servers": [self.server.url], "subject": subject, "stream": part.upper()}

    def consumer(self, part: str, venue: str) -> dict[str, Any]:
        return {"type": "nats", "url": self.server.url, "stream": part.upper(), "subject": f"{part}.{venue}.*.*"}

    def outage(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()

    async def read(self, part: str, venue: str) -> list[str]:
        from nats_server import read_stream

        msgs = await read_stream(self.server.url, part.upper(), timeout=120)
        prefix = f"{part}.{venue}."
        return [m.headers["Nats-Msg-Id"] for m in msgs if m.subject.startswith(prefix)]

    def close(self) -> None:
        self.server.cleanup()


class RedisBus(Bus):
    type = "redis"

    def __init__(self) -> None:
        from redis_server import RedisServer

        self.server = RedisServer()
        self.server.start()

    @staticmethod
    def key(part: str, venue: str) -> str:
        return f"{part}:{venue}:trade"

    def spec(self, part: str, delivery: DeliverySpec) -> SinkSpec:
        conf = RedisSpec(url=Secret(self.server.url), stream=f"{part}:{{venue}}:{{kind}}")
        return SinkSpec(type="redis", name="redis", delivery=delivery, redis=conf)

    def doc(self, part: str) -> dict[str, Any]:
        return {"type": "redis", "url": self.server.url, "stream": f"{part}:{{venue}}:{{kind}}"}

    def consumer(self, part: str, venue: str) -> dict[str, Any]:
        return {"type": "redis", "port": self.server.port, "key": self.key(part, venue)}

    def outage(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()

    async def read(self, part: str, venue: str) -> list[str]:
        from redis_server import read_stream

        entries = await read_stream(self.server, self.key(part, venue))
        return [f[b"id"].decode() for _, f in entries]

    def close(self) -> None:
        self.server.cleanup()


BUSES: list[type[Bus]] = [KafkaBus, NatsBus, RedisBus]


def start_buses() -> tuple[list[Bus], dict[str, str]]:
    """The buses whose server starts; the others with why not."""
    up: list[Bus] = []
    skipped: dict[str, str] = {}
    for cls in BUSES:
        try:
            up.append(cls())
        except NOT_RUN as exc:
            skipped[cls.type] = str(exc) or type(exc).__name__
            print(f"  {cls.type}: skipped ({skipped[cls.type]})")
    return up, skipped


# -- the Delivery side ----------------------------------------------------------------------------------


async def until(what: str, pred: Callable[[], bool], timeout: float, step: float = 0.001) -> float:
    """Poll until pred() holds; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g}s")
        await asyncio.sleep(step)
    return time.monotonic()


async def opened(bus: Bus, part: str, spool_root: str, **conf: Any) -> Delivery:
    spool = SpoolSpec(path=tempfile.mkdtemp(prefix=f"{bus.type}-{part}-", dir=spool_root))
    d = build(bus.spec(part, DeliverySpec(spool=spool, **conf)), Metrics())
    assert isinstance(d, Delivery)
    d.start()
    await until(f"{bus.type} connected", lambda: d.connected, 30, 0.01)
    return d


async def ticking(d: Delivery) -> None:
    while True:
        await asyncio.sleep(TICK)
        d.tick()


async def paced(d: Delivery, venue: str, done: Callable[[], bool]) -> int:
    """Batches of PACE_BATCH every PACE_EVERY seconds, each stamped as it is written; a tick that comes
    late writes at once, so the rate holds on average. Returns how many events were written."""
    n, ticks, t0 = 0, 0, time.monotonic()
    while not done():
        ticks += 1
        delay = t0 + ticks * PACE_EVERY - time.monotonic()
        await asyncio.sleep(max(0.0, delay))
        now = time.time_ns()
        d.write([trade(venue, i, now) for i in range(n, n + PACE_BATCH)])
        n += PACE_BATCH
    return n


async def settled(d: Delivery, timeout: float) -> None:
    """Until the buffer, the batch in flight and the spool are all delivered."""
    await until("delivered", lambda: not d.buffered and not d.inflight and not d.spool, timeout, 0.01)


# -- 1. flood ---------------------------------------------------------------------------------------------


def flood_jsonl(events: list[list[Trade]], root: str) -> float:
    directory = tempfile.mkdtemp(prefix="jsonl-", dir=root)
    sink = JsonlSink(SinkSpec(type="jsonl", path=f"{directory}/{{venue}}/{{date}}.jsonl"))
    t0 = time.perf_counter()
    for b in events:
        sink.write(b)
    sink.flush()
    elapsed = time.perf_counter() - t0
    sink.close()
    shutil.rmtree(directory, ignore_errors=True)
    return sum(map(len, events)) / elapsed


async def flood_bus(bus: Bus, venue: str, events: list[list[Trade]], root: str) -> tuple[float, int]:
    """(events/s, events spooled) for one run."""
    await asyncio.to_thread(bus.prepare, "flood", venue)
    d = await opened(bus, "flood", root)
    ticker = asyncio.create_task(ticking(d))
    try:
        total = sum(map(len, events))
        warm = batches(venue, BATCH, start=total)[0]  # first send's lookups and connection warm-up
        d.write(warm)
        await until(f"{bus.type} warm-up acknowledged", lambda: d.acked >= len(warm), 60)
        bound = d.conf.buffer - BATCH
        t0 = time.perf_counter()
        for b in events:
            while d.buffered > bound:
                await asyncio.sleep(0.001)
            d.write(b)
            await asyncio.sleep(0)  # the pipeline yields between batches too
        target = len(warm) + total
        await until(f"{bus.type} flood acknowledged", lambda: d.acked >= target, 300)
        rate = total / (time.perf_counter() - t0)
        return rate, d.spooled
    finally:
        ticker.cancel()
        await d.close(10)


async def flood(buses: list[Bus], root: str) -> dict[str, Any]:
    jsonl: list[float] = []
    rates: dict[str, list[float]] = {b.type: [] for b in buses}
    spooled: dict[str, int] = {b.type: 0 for b in buses}
    for run in range(RUNS):
        venue = f"f{run}"
        events = batches(venue, FLOOD_EVENTS)
        jsonl.append(flood_jsonl(events, root))
        for bus in buses:
            rate, n = await flood_bus(bus, venue, events, root)
            rates[bus.type].append(rate)
            spooled[bus.type] += n
    base = statistics.median(jsonl)
    out: dict[str, Any] = {
        "events": FLOOD_EVENTS,
        "batch": BATCH,
        "runs": RUNS,
        "target_ratio": 0.8,
        "jsonl": {"events_per_s": round(base), "runs_events_per_s": [round(r) for r in jsonl]},
    }
    for name, rs in rates.items():
        m = statistics.median(rs)
        out[name] = {
            "events_per_s": round(m),
            "ratio_vs_jsonl": round(m / base, 3),
            "runs_events_per_s": [round(r) for r in rs],
            "spooled": spooled[name],
        }
    return out


# -- 2. latency -----------------------------------------------------------------------------------------


def consume(conf: dict[str, Any], ready: MpEvent, stop: MpEvent, expected: Any, out: str) -> None:
    """In a child process: note (ts_received, arrival ns) per message until `expected` have arrived (once
    the parent sets it) or `stop` is set; written to `out` as JSON."""
    stamps: list[int] = []
    arrivals: list[int] = []

    def done() -> bool:
        want = expected.value
        return stop.is_set() or (want >= 0 and len(stamps) >= want)

    def note(payloads: list[bytes]) -> None:
        now = time.time_ns()
        for p in payloads:
            stamps.append(orjson.loads(p)["ts_received"])
            arrivals.append(now)

    kind = conf["type"]
    if kind == "kafka":
        _consume_kafka(conf, ready, done, note)
    elif kind == "nats":
        asyncio.run(_consume_nats(conf, ready, done, note))
    else:
        _consume_redis(conf, ready, done, note)
    Path(out).write_bytes(orjson.dumps([stamps, arrivals]))


def _consume_kafka(conf: dict[str, Any], ready: MpEvent, done: Callable[[], bool], note: Callable) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": conf["bootstrap"],
            "group.id": "feedrunner-bench",  # required by the client; partitions are assigned, never joined
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
            "fetch.min.bytes": 1,
            "log_level": 0,
        }
    )
    try:
        topic = conf["topic"]
        partitions = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ready.set()
        while not done():
            # consume(n, timeout) waits for n messages or the whole timeout: one poll returns at the first
            # message, then consume(timeout=0) takes whatever else has already arrived.
            first = c.poll(0.05)
            if first is None:
                continue
            msgs = [first, *c.consume(1000, timeout=0)]
            note([m.value() for m in msgs if m.error() is None])
    finally:
        c.close()


async def _consume_nats(conf: dict[str, Any], ready: MpEvent, done: Callable[[], bool], note: Callable) -> None:
    import nats

    nc = await nats.connect(conf["url"], allow_reconnect=False, connect_timeout=5)
    try:

        async def on_msg(msg: Any) -> None:
            note([msg.data])

        js = nc.jetstream()
        sub = await js.subscribe(conf["subject"], stream=conf["stream"], cb=on_msg, ordered_consumer=True)
        ready.set()
        while not done():
            await asyncio.sleep(0.05)
        await sub.unsubscribe()
    finally:
        await nc.close()


def _consume_redis(conf: dict[str, Any], ready: MpEvent, done: Callable[[], bool], note: Callable) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=conf["port"], socket_timeout=5)
    last: bytes | str = "0-0"
    try:
        ready.set()
        while not done():
            for _, entries in client.xread({conf["key"]: last}, count=1000, block=100) or ():
                last = entries[-1][0]
                note([f[b"data"] for _, f in entries])
    finally:
        client.close()


class Consumer:
    """The consumer process of one latency run."""

    def __init__(self, conf: dict[str, Any], root: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.expected = ctx.Value("q", -1)
        self.out = os.path.join(root, f"consumer-{time.monotonic_ns()}.json")
        self.proc = ctx.Process(target=consume, args=(conf, self.ready, self.stop, self.expected, self.out))
        self.proc.start()

    async def started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.ready.wait, 0.1):
            if not self.proc.is_alive():
                raise RuntimeError(f"the consumer exited with {self.proc.exitcode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumer did not start within {timeout:g}s")

    async def finish(self, written: int, timeout: float = 30) -> tuple[list[int], list[int]]:
        self.expected.value = written
        await asyncio.to_thread(self.proc.join, timeout)
        if self.proc.is_alive():
            self.stop.set()
            await asyncio.to_thread(self.proc.join, 10)
        return await asyncio.to_thread(self._result)

    def _result(self) -> tuple[list[int], list[int]]:
        stamps, arrivals = orjson.loads(Path(self.out).read_bytes())
        os.unlink(self.out)
        return stamps, arrivals

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


async def latency_bus(bus: Bus, venue: str, root: str) -> dict[str, Any]:
    await asyncio.to_thread(bus.prepare, "lat", venue)
    d = await opened(bus, "lat", root)
    ticker = asyncio.create_task(ticking(d))
    consumer = Consumer(bus.consumer("lat", venue), root)
    try:
        await consumer.started()
        measured_from = time.time_ns() + int(WARMUP * 1e9)
        end = time.monotonic() + WARMUP + LATENCY_SECONDS
        written = await paced(d, venue, lambda: time.monotonic() >= end)
        await settled(d, 60)
        stamps, arrivals = await consumer.finish(written)
    finally:
        consumer.kill()
        ticker.cancel()
        await d.close(10)
    lat = [a - s for s, a in zip(stamps, arrivals, strict=True) if s >= measured_from]
    return {
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) / 1e6 if lat else float("nan"),
        "written": written,
        "received": len(stamps),
        "spooled": d.spooled,
    }


async def latency(buses: list[Bus], root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"rate_per_s": RATE, "batch": PACE_BATCH, "seconds": LATENCY_SECONDS, "runs": RUNS}
    out["target_p99_ms"] = 15
    for bus in buses:
        runs = [await latency_bus(bus, f"l{run}", root) for run in range(RUNS)]
        out[bus.type] = {
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
            "max_ms": round(statistics.median(r["max_ms"] for r in runs), 2),
            "p99_ms_runs": [round(r["p99_ms"], 2) for r in runs],
            "written": sum(r["written"] for r in runs),
            "received": sum(r["received"] for r in runs),
            "spooled": sum(r["spooled"] for r in runs),
        }
    return out


# -- 3. through the runner ---------------------------------------------------------------------------


async def runner_rate(sink: dict[str, Any], endpoints: dict[str, str], symbols: list[str]) -> tuple[float, int]:
    """(trades/s the runner's one sink takes after a warm-up, events it spooled meanwhile)."""
    from bench.ccxt_stream import _spec
    from feedrunner.runner import Runner, freeze_heap_when_up

    runner = Runner(_spec(endpoints, symbols, sinks=[sink]))
    d = runner.pipeline.deliveries[0] if runner.pipeline.deliveries else None

    def taken() -> tuple[int, int]:
        return (d.acked, d.spooled) if d is not None else (runner.pipeline.written, 0)

    await runner.start()
    try:
        await freeze_heap_when_up(runner)
        await asyncio.sleep(RUNNER_WARMUP)
        (n0, s0), t0 = taken(), time.monotonic()
        await asyncio.sleep(RUNNER_SECONDS)
        n1, s1 = taken()
        return (n1 - n0) / (time.monotonic() - t0), s1 - s0
    finally:
        await runner.stop()


async def through_runner(buses: list[Bus], root: str, symbols: list[str]) -> dict[str, Any]:
    from bench.ccxt_stream import Sim

    sim = Sim(symbols, RUNNER_RATE)
    rates: dict[str, list[float]] = {"jsonl": [], **{b.type: [] for b in buses}}
    spooled: dict[str, int] = dict.fromkeys(rates, 0)
    try:
        for bus in buses:
            await asyncio.to_thread(bus.prepare, "runner", "binance")
        for run in range(RUNS):
            directory = tempfile.mkdtemp(prefix=f"runner-{run}-", dir=root)
            jsonl = {"type": "jsonl", "path": f"{directory}/{{venue}}/{{date}}.jsonl"}
            rates["jsonl"].append((await runner_rate(jsonl, sim.endpoints, symbols))[0])
            for bus in buses:
                spool = tempfile.mkdtemp(prefix=f"{bus.type}-runner-", dir=root)
                rate, n = await runner_rate({**bus.doc("runner"), "spool": {"path": spool}}, sim.endpoints, symbols)
                rates[bus.type].append(rate)
                spooled[bus.type] += n
    finally:
        sim.close()
    base = statistics.median(rates["jsonl"])
    out: dict[str, Any] = {
        "offered_per_s": RUNNER_RATE * len(symbols),
        "symbols": len(symbols),
        "seconds": RUNNER_SECONDS,
        "runs": RUNS,
        "target_ratio": 0.8,
    }
    for name, rs in rates.items():
        m = statistics.median(rs)
        out[name] = {
            "trades_per_s": round(m),
            "ratio_vs_jsonl": round(m / base, 3),
            "runs": [round(r) for r in rs],
            "spooled": spooled[name],
        }
    return out


# -- 4. outage ------------------------------------------------------------------------------------------


async def outage_bus(bus: Bus, root: str) -> dict[str, Any]:
    venue = "o1"
    await asyncio.to_thread(bus.prepare, "out", venue)
    d = await opened(bus, "out", root, timeout=OUTAGE_TIMEOUT, retry=OUTAGE_RETRY)
    stop = False
    peak = {"bytes": 0, "events": 0}

    async def sample() -> None:
        while True:
            peak["bytes"] = max(peak["bytes"], d.spool.bytes)
            peak["events"] = max(peak["events"], d.spool.events)
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(ticking(d)), asyncio.create_task(sample())]
    producer = asyncio.create_task(paced(d, venue, lambda: stop))
    try:
        await asyncio.sleep(BEFORE_OUTAGE)
        await asyncio.to_thread(bus.outage)
        await asyncio.sleep(OUTAGE)
        spooled_in_outage = d.spooled
        await asyncio.to_thread(bus.recover)
        up = time.monotonic()
        replayed_before = d.replayed
        delivering = await until("delivering again", lambda: not d.failing, 120, 0.005)
        drained = await until("the spool drained", lambda: not d.spool, 300, 0.005)
        replayed = d.replayed - replayed_before
        await asyncio.sleep(2.0)
        stop = True
        written = await producer
        await settled(d, 60)
    finally:
        stop = True
        for t in [*tasks, producer]:
            t.cancel()
        await d.close(10)
    ids = await bus.read("out", venue)
    distinct = set(ids)
    want = {event_id(trade(venue, i, 0)) for i in range(written)}
    return {
        "outage_s": OUTAGE,
        "written": written,
        "spooled": d.spooled,
        "spooled_during_outage": spooled_in_outage,
        "spool_peak_bytes": peak["bytes"],
        "spool_peak_events": peak["events"],
        "reconnect_s": round(delivering - up, 2),
        "replayed": replayed,
        "replay_events_per_s": round(replayed / max(drained - delivering, 1e-6)),
        "recovery_to_drained_s": round(drained - up, 2),
        "received": len(ids),
        "duplicates": len(ids) - len(distinct),
        "unexpected": len(distinct - want),
        "lost": len(want - distinct),
        "dropped": d.dropped,
    }


async def outage(buses: list[Bus], root: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "outage_s": OUTAGE,
        "rate_per_s": RATE,
        "delivery_timeout_s": OUTAGE_TIMEOUT,
        "retry": {"base_s": OUTAGE_RETRY.base, "cap_s": OUTAGE_RETRY.cap},
    }
    for bus in buses:
        out[bus.type] = await outage_bus(bus, root)
    return out


# -- report ---------------------------------------------------------------------------------------------


def show_flood(f: dict[str, Any], skipped: dict[str, str]) -> None:
    print(
        f"1. flood: {f['events']:,} trades, {len(SYMBOLS)} symbols, batches of {f['batch']:,}, buffer kept below its"
        f" bound; median of {f['runs']} runs"
    )
    print(f"  {'sink':<6} {'events/s':>10} {'vs JSONL':>9} {'spooled':>8}  runs (events/s)")
    j = f["jsonl"]
    print(f"  {'jsonl':<6} {j['events_per_s']:>10,} {1:>9.2f} {'-':>8}  {j['runs_events_per_s']}")
    for name in ("kafka", "nats", "redis"):
        if name in skipped:
            print(f"  {name:<6} skipped: {skipped[name]}")
            continue
        b = f[name]
        print(
            f"  {name:<6} {b['events_per_s']:>10,} {b['ratio_vs_jsonl']:>9.3f} {b['spooled']:>8}"
            f"  {b['runs_events_per_s']}"
        )
    print(f"  goal: bus / JSONL >= {f['target_ratio']}")


def show_latency(lat: dict[str, Any], skipped: dict[str, str]) -> None:
    print(
        f"2. latency, write into the Delivery -> a consumer in another process, {lat['rate_per_s']:,} events/s"
        f" ({lat['batch']} every {PACE_EVERY * 1000:g} ms) for {lat['seconds']:g} s; median of {lat['runs']} runs"
    )
    print(f"  {'bus':<6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'received/written':>17}  p99 runs")
    print(f"  {'jsonl':<6} {'N/A':>7} {'N/A':>7} {'N/A':>8}")
    for name in ("kafka", "nats", "redis"):
        if name in skipped:
            print(f"  {name:<6} skipped: {skipped[name]}")
            continue
        b = lat[name]
        got = f"{b['received']}/{b['written']}"
        print(f"  {name:<6} {b['p50_ms']:>7.2f} {b['p99_ms']:>7.2f} {b['max_ms']:>8.2f} {got:>17}  {b['p99_ms_runs']}")
    print(f"  goal: p99 <= {lat['target_p99_ms']} ms")


def show_runner(r: dict[str, Any], skipped: dict[str, str], what: str) -> None:
    print(
        f"3. through the runner, {what}: binance simulator offering {r['offered_per_s']:,} trades/s over"
        f" {r['symbols']} symbol(s), one sink, {r['seconds']:g} s after warm-up; median of {r['runs']} runs"
    )
    print(f"  {'sink':<6} {'trades/s':>10} {'vs JSONL':>9} {'spooled':>8}  runs (trades/s)")
    for name in ("jsonl", "kafka", "nats", "redis"):
        if name in skipped:
            print(f"  {name:<6} skipped: {skipped[name]}")
            continue
        b = r[name]
        print(f"  {name:<6} {b['trades_per_s']:>10,} {b['ratio_vs_jsonl']:>9.3f} {b['spooled']:>8}  {b['runs']}")
    print(f"  goal: bus / JSONL >= {r['target_ratio']} (a bus: trades acknowledged; JSONL: trades written)")


def show_outage(o: dict[str, Any], skipped: dict[str, str]) -> None:
    print(
        f"4. outage of {o['outage_s']:g} s at {o['rate_per_s']:,} events/s, one run per bus (delivery timeout"
        f" {o['delivery_timeout_s']:g} s, retry {o['retry']['base_s']:g}..{o['retry']['cap_s']:g} s)"
    )
    print(
        f"  {'bus':<6} {'written':>8} {'spooled':>8} {'peak MB':>8} {'reconnect s':>11} {'replay ev/s':>11}"
        f" {'to drained s':>12} {'dups':>6} {'lost':>5}"
    )
    for name in ("kafka", "nats", "redis"):
        if name in skipped:
            print(f"  {name:<6} skipped: {skipped[name]}")
            continue
        b = o[name]
        print(
            f"  {name:<6} {b['written']:>8} {b['spooled']:>8} {b['spool_peak_bytes'] / 2**20:>8.1f}"
            f" {b['reconnect_s']:>11.2f} {b['replay_events_per_s']:>11,} {b['recovery_to_drained_s']:>12.2f}"
            f" {b['duplicates']:>6} {b['lost']:>5}"
        )
    print("  reconnect: bus back -> first acknowledgement; replay rate: from then to the spool drained; lost must be 0")


async def amain() -> dict[str, Any]:
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    began = time.monotonic()
    root = tempfile.mkdtemp(prefix="feedrunner-bench-bus-")
    buses, skipped = await asyncio.to_thread(start_buses)
    try:
        figures: dict[str, Any] = {"load_average_start": [round(x, 2) for x in load], "skipped": skipped}
        figures["flood"] = await flood(buses, root)
        show_flood(figures["flood"], skipped)
        figures["latency"] = await latency(buses, root)
        show_latency(figures["latency"], skipped)
        figures["runner_flood"] = await through_runner(buses, root, RUNNER_FLOOD)
        show_runner(figures["runner_flood"], skipped, "at the flood rate")
        figures["runner_saturated"] = await through_runner(buses, root, RUNNER_SATURATED)
        show_runner(figures["runner_saturated"], skipped, "saturated")
        figures["outage"] = await outage(buses, root)
        show_outage(figures["outage"], skipped)
    finally:
        for bus in buses:
            bus.close()
        shutil.rmtree(root, ignore_errors=True)
    figures["seconds"] = round(time.monotonic() - began, 1)
    record("bus_sinks", figures)
    print(f"bus sinks benchmark: {figures['seconds']:.0f} s")
    return figures


def main() -> dict[str, Any]:
    logger.disable("feedrunner")  # one line per open and close of every run; the tables say what matters
    try:
        return asyncio.run(amain())
    finally:
        logger.enable("feedrunner")


if __name__ == "__main__":
    main()
