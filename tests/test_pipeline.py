"""The path from adapters to sinks: the bounded batch queue, JSON-lines encoding, batched metrics."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from loguru import logger
from prometheus_client import CollectorRegistry, Histogram

from feedrunner.events import Book, Event, Ticker, Trade, to_dict
from feedrunner.metrics import Metrics, observe_many
from feedrunner.pipeline import Pipeline
from feedrunner.runner import log_loop_exception
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.spec import Sink as SinkSpec
from feedrunner.spec import Spec, check_text


def spec(queue: str) -> Spec:
    text = f"""\
    version: 1
    queue: {queue}
    venues:
      binance: {{adapter: ccxt, exchange: binance, symbols: [BTC/USDT]}}
    """
    s, problems = check_text(textwrap.dedent(text), "feeds.yaml", {})
    assert s is not None, problems
    return s


def trade(i: int, symbol: str = "BTC/USDT") -> Trade:
    return Trade("binance", symbol, 1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i + 5, "websocket",
                 str(i), 100.0 + i, 0.5, "buy")  # fmt: skip


class Memory(Sink):
    def __init__(self) -> None:
        super().__init__(SinkSpec(type="stdout"))
        self.ids: list[str | None] = []
        self.by_symbol: dict[str, list[int]] = {}

    def write(self, events):  # type: ignore[no-untyped-def]
        for e in events:
            self.ids.append(e.id)
            self.by_symbol.setdefault(e.symbol, []).append(int(e.id))
        return len(events)


def dropped(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("feedrunner_events_dropped_total", {"reason": "queue_full"}) or 0.0


async def test_block_holds_the_producer_until_the_sink_catches_up() -> None:
    sink, metrics = Memory(), Metrics()
    pipe = Pipeline(spec("{size: 10, overflow: block}"), [sink], metrics)
    await pipe.put([trade(i) for i in range(8)])
    blocked = asyncio.ensure_future(pipe.put([trade(i) for i in range(8, 12)]))
    await asyncio.sleep(0.05)
    assert not blocked.done() and pipe.depth == 8  # 8 + 4 > 10: waits, nothing dropped
    pipe.start()
    await asyncio.wait_for(blocked, 2)
    await pipe.drain_and_close()
    assert sink.ids == [str(i) for i in range(12)] and dropped(metrics) == 0


async def test_drop_oldest_keeps_the_newest_and_counts_the_rest() -> None:
    sink, metrics = Memory(), Metrics()
    pipe = Pipeline(spec("{size: 10, overflow: drop_oldest}"), [sink], metrics)
    for start in range(0, 30, 6):
        await pipe.put([trade(i) for i in range(start, start + 6)])
        assert pipe.depth <= 10
    await pipe.put([trade(i) for i in range(30, 55)])  # one batch larger than the whole queue
    await pipe.drain_and_close()
    assert sink.ids == [str(i) for i in range(45, 55)]
    assert dropped(metrics) == 45


async def test_a_batch_put_into_an_empty_queue_is_written_before_put_returns() -> None:
    """The latency path: no loop iterations between an adapter's put and the sink's write when idle;
    once something is queued, later batches queue behind it, in order."""
    sink, metrics = Memory(), Metrics()
    pipe = Pipeline(spec("{size: 100, overflow: block}"), [sink], metrics)
    pipe.start()
    await pipe.put([trade(0), trade(1)])
    assert sink.ids == ["0", "1"] and pipe.depth == 0
    pipe._batches.append([trade(2)])  # a batch the consumer has not taken yet
    pipe.depth += 1
    pipe._ready.set()
    await pipe.put([trade(3)])
    assert sink.ids == ["0", "1"] and pipe.depth == 2  # queued behind it, not written past it
    await pipe.drain_and_close()
    assert sink.ids == ["0", "1", "2", "3"]
    await pipe.put([trade(4)])  # after close: queued, never into a closed sink
    assert sink.ids == ["0", "1", "2", "3"]


async def test_put_now_writes_when_nothing_is_queued_and_otherwise_does_nothing() -> None:
    """The adapters' synchronous path: a refusal leaves no trace (nothing accepted, written or queued),
    so the caller can put the same batch through `put` instead, in order."""
    sink, metrics = Memory(), Metrics()
    pipe = Pipeline(spec("{size: 100, overflow: block}"), [sink], metrics)
    assert not pipe.put_now([trade(0)]) and pipe.accepted == 0  # not started
    pipe.start()
    assert pipe.put_now([trade(0), trade(1)]) and sink.ids == ["0", "1"] and pipe.accepted == 2
    pipe._batches.append([trade(2)])  # a batch the consumer has not taken yet
    pipe.depth += 1
    pipe._ready.set()
    assert not pipe.put_now([trade(3)]) and pipe.accepted == 2 and pipe.depth == 1
    await pipe.put([trade(3)])
    await pipe.drain_and_close()
    assert sink.ids == ["0", "1", "2", "3"]


async def test_events_from_several_producers_arrive_in_each_producers_order() -> None:
    sink = Memory()
    pipe = Pipeline(spec("{size: 100, overflow: block}"), [sink], Metrics())
    pipe.start()

    async def produce(symbol: str) -> None:
        for start in range(0, 500, 7):
            await pipe.put([trade(i, symbol) for i in range(start, min(start + 7, 500))])
            await asyncio.sleep(0)

    await asyncio.gather(produce("A/USDT"), produce("B/USDT"))
    await pipe.drain_and_close()
    assert sink.by_symbol == {"A/USDT": list(range(500)), "B/USDT": list(range(500))}


text = st.text(alphabet=st.sampled_from('},{"venue:\\\n\u00e9\u2028x'), max_size=20)


@example([('},{"venue":"x', "},{", '\\"},{"venue":', "trade"), ("},{", "", "", "book")])
@given(st.lists(st.tuples(text, text, text, st.sampled_from(["trade", "ticker", "book"])), min_size=1, max_size=8))
def test_encoded_lines_are_exactly_one_record_each(rows: list[tuple[str, str, str, str]]) -> None:
    """Strings full of the separator's pieces still split at record boundaries only."""
    events: list[Event] = []
    for i, (symbol, tid, side, kind) in enumerate(rows):
        if kind == "trade":
            events.append(Trade("v", symbol, i, i, "websocket", tid, 1.5, 2.0, side))
        elif kind == "ticker":
            events.append(Ticker("v", symbol, None, i, "polling", 1.0, None, 2.0, 3.0))
        else:
            events.append(Book("v", symbol, i, i, "websocket", [(1.0, 2.0)], [(3.0, 4.0)], 7))
    out = encode_lines(events)
    assert out.endswith(b"\n")
    lines = out[:-1].split(b"\n")
    assert lines == [orjson.dumps(to_dict(e)) for e in events]
    assert [json.loads(line)["symbol"] for line in lines] == [e.symbol for e in events]


def test_record_fields_and_order() -> None:
    assert list(to_dict(trade(1))) == [
        "venue", "symbol", "kind", "ts_exchange", "ts_received", "transport",
        "id", "price", "amount", "side", "backfilled",
    ]  # fmt: skip
    assert to_dict(Ticker("v", "S", None, 1, "polling", 1.0, 2.0, 3.0, 4.0))["kind"] == "ticker"
    assert to_dict(Book("v", "S", None, 1, "polling", [], [], None))["kind"] == "book"


def test_jsonl_sink_writes_one_file_per_path_and_flushes(tmp_path: Path) -> None:
    sink = JsonlSink(SinkSpec(type="jsonl", path=str(tmp_path / "{venue}/{symbol}/{date}.jsonl")))
    sink.write([trade(1, "BTC/USDT"), trade(2, "ETH/USDT"), trade(3, "BTC/USDT")])
    sink.close()
    day = "2023-11-14"  # 1_700_000_000 s
    btc = (tmp_path / "binance" / "BTC-USDT" / f"{day}.jsonl").read_text().splitlines()
    eth = (tmp_path / "binance" / "ETH-USDT" / f"{day}.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in btc] == ["1", "3"] and [json.loads(x)["id"] for x in eth] == ["2"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_observe_many_matches_observe(seed: int) -> None:
    """Pins the prometheus_client internals observe_many relies on."""
    rng = random.Random(seed)
    bounds = (0.001, 0.005, 0.01, 0.1, 1.0)
    values = [rng.choice([0.0, *bounds, rng.random(), rng.random() / 100, 5.0]) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "x", buckets=bounds, registry=one)
    h2 = Histogram("h", "x", buckets=bounds, registry=many)
    for v in values:
        h1.observe(v)
    observe_many(h2, values)
    samples = [
        [(s.name, s.labels, round(s.value, 9)) for m in r.collect() for s in m.samples if s.name != "h_created"]
        for r in (one, many)
    ]
    assert samples[0] == samples[1]


def test_stray_task_errors_reach_the_log_not_stderr() -> None:
    """A client library's unretrieved task failure is logged: a dropped socket's at debug, others as errors."""
    lines: list[tuple[str, str]] = []
    sink_id = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(log_loop_exception)
        for exc in (ConnectionResetError("Cannot write to closing transport"), ValueError("boom")):
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": exc})
    finally:
        loop.close()
        logger.remove(sink_id)
    assert ("DEBUG", "asyncio: Task exception was never retrieved: Cannot write to closing transport") in lines
    assert ("ERROR", "asyncio: Task exception was never retrieved") in lines


async def test_flushed_waits_for_what_was_accepted_to_be_written_and_flushed() -> None:
    """A trade checkpoint waits on this: an id may be stored only once its trade is on disk."""

    class Flushing(Memory):
        def __init__(self) -> None:
            super().__init__()
            self.flushed_ids: list[str | None] = []

        def flush(self) -> None:
            self.flushed_ids = list(self.ids)

    sink = Flushing()
    pipe = Pipeline(spec("{size: 100, overflow: block}"), [sink], Metrics())
    await pipe.put([trade(i) for i in range(5)])
    mark = pipe.accepted
    waiting = asyncio.ensure_future(pipe.flushed(mark))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # queued, not written
    pipe._write(pipe._take(100))
    await asyncio.sleep(0.01)
    assert not waiting.done() and sink.ids  # written, not flushed
    await pipe.put([trade(5)])  # arrives after the mark: the flush must not wait for it
    pipe._flush()
    await asyncio.wait_for(waiting, 1)
    assert sink.flushed_ids[:5] == [str(i) for i in range(5)]
    later = asyncio.ensure_future(pipe.flushed(pipe.accepted))
    await asyncio.sleep(0.01)
    assert not later.done()
    await pipe.drain_and_close()  # closing flushes everything
    await asyncio.wait_for(later, 1)
