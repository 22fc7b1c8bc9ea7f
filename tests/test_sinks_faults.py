"""Sink faults on real files: one bad path loses only its own events, every failure episode is logged
once and counted in events, close errors are reported, and a file renamed away is reopened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import spawn, wait_until
from loguru import logger

from feedrunner.events import Trade
from feedrunner.metrics import Metrics
from feedrunner.pipeline import Pipeline
from feedrunner.runner import Runner
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.sinks.stdout import StdoutSink
from feedrunner.spec import Sink as SinkSpec
from feedrunner.spec import Spec, check_text
from feedrunner.statuscli import render_status

T0 = 1_700_000_000_000_000_000  # 2023-11-14


def trade(i: int, symbol: str) -> Trade:
    return Trade("binance", symbol, T0 + i, T0 + i + 5, "websocket", str(i), 100.0, 0.5, "buy")


def queue_spec() -> Spec:
    text = "version: 1\nvenues:\n  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT]}\n"
    spec, problems = check_text(text, "feeds.yaml", {})
    assert spec is not None, problems
    return spec


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def ids(path: Path) -> list[int]:
    return [int(json.loads(line)["id"]) for line in path.read_text().splitlines()]


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink_id = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    yield lines
    logger.remove(sink_id)


def jsonl(tmp_path: Path, template: str = "out/{symbol}.jsonl") -> JsonlSink:
    return JsonlSink(SinkSpec(type="jsonl", path=str(tmp_path / template)))


async def run_batches(pipe: Pipeline, batches: list[list[Trade]]) -> None:
    """Through the real queue and consumer, flushing after each batch as the timer would."""
    for batch in batches:
        await pipe.put(batch)
        for _ in range(100):
            await asyncio.sleep(0)  # the consumer takes the batch and writes it
            if not pipe.depth:
                break
        await asyncio.sleep(0)
        pipe._flush()


async def test_an_unwritable_path_loses_only_its_own_events(tmp_path: Path) -> None:
    """A directory where ETH's file should be: BTC, in the same batches, is written in full."""
    (tmp_path / "out" / "ETH-USDT.jsonl").mkdir(parents=True)
    sink, metrics = jsonl(tmp_path), Metrics()
    pipe = Pipeline(queue_spec(), [sink], metrics)
    pipe.start()
    # ETH first in every batch: its group is written before BTC's
    await run_batches(pipe, [[trade(i, "ETH/USDT"), trade(i, "BTC/USDT")] for i in range(20)])
    await pipe.drain_and_close()
    assert ids(tmp_path / "out" / "BTC-USDT.jsonl") == list(range(20))
    assert sample(metrics, "feedrunner_sink_events_written_total", sink=sink.name) == 20
    assert sample(metrics, "feedrunner_sink_events_failed_total", sink=sink.name) == 20
    # one attempt when the first batch came, then one per flush, none per write
    assert 2 <= sample(metrics, "feedrunner_sink_errors_total", sink=sink.name, operation="open") <= 22
    assert sample(metrics, "feedrunner_sink_up", sink=sink.name) == 0


async def test_a_failure_episode_is_logged_once_and_its_recovery_once_with_the_count(
    tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    bad = tmp_path / "out" / "ETH-USDT.jsonl"
    bad.mkdir(parents=True)
    sink, metrics = jsonl(tmp_path), Metrics()
    pipe = Pipeline(queue_spec(), [sink], metrics)
    pipe.start()
    await run_batches(pipe, [[trade(i, "ETH/USDT"), trade(i, "ETH/USDT"), trade(i, "BTC/USDT")] for i in range(300)])
    errors = [m for level, m in logs if level == "ERROR"]
    assert len(errors) == 1 and sink.name in errors[0] and str(bad) in errors[0], errors
    status = sink.state.status()
    assert status["state"] == "failing" and status["events_failed"] == 600 and status["failing_paths"] == [str(bad)]

    bad.rmdir()
    pipe._flush()  # the timer: the path is retried and opens
    await run_batches(pipe, [[trade(i, "ETH/USDT"), trade(i, "BTC/USDT")] for i in range(300, 310)])
    recovered = [m for _, m in logs if "recovered" in m]
    assert len(recovered) == 1 and sink.name in recovered[0] and "600 events failed" in recovered[0], recovered
    assert len([m for level, m in logs if level == "ERROR"]) == 1
    assert sink.state.status()["state"] == "ok" and sample(metrics, "feedrunner_sink_up", sink=sink.name) == 1
    assert sample(metrics, "feedrunner_sink_events_failed_total", sink=sink.name) == 600
    await pipe.drain_and_close()
    assert ids(bad) == list(range(300, 310))


async def test_a_fixed_path_recovers_without_new_events_for_it(tmp_path: Path, logs: list[tuple[str, str]]) -> None:
    """The flush retries a path that could not be opened, so a symbol gone quiet does not stay failing."""
    bad = tmp_path / "out" / "ETH-USDT.jsonl"
    bad.mkdir(parents=True)
    sink = jsonl(tmp_path)
    sink.write([trade(1, "ETH/USDT")])
    sink.flush()
    assert sink.state.problem() is not None
    bad.rmdir()
    sink.flush()
    assert sink.state.problem() is None and any("recovered" in m and "1 events failed" in m for _, m in logs)
    sink.close()


async def test_a_failed_flush_counts_the_buffered_events_and_close_errors_are_reported(
    tmp_path: Path, logs: list[tuple[str, str]]
) -> None:
    """A full disk (/dev/full behind ETH's path): buffered events are lost at flush and at close, counted
    and logged; BTC keeps being written."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    (tmp_path / "out").mkdir()
    full = tmp_path / "out" / "ETH-USDT.jsonl"
    full.symlink_to("/dev/full")
    sink, metrics = jsonl(tmp_path), Metrics()
    pipe = Pipeline(queue_spec(), [sink], metrics)
    pipe.start()
    await run_batches(pipe, [[trade(i, "ETH/USDT"), trade(i, "BTC/USDT")] for i in range(5)])
    assert sample(metrics, "feedrunner_sink_events_failed_total", sink=sink.name) == 5  # each lost at its flush
    assert sample(metrics, "feedrunner_sink_errors_total", sink=sink.name, operation="flush") == 5
    await pipe.put([trade(5, "ETH/USDT"), trade(5, "BTC/USDT")])
    await pipe.drain_and_close()  # ETH's last event is still buffered: its close fails
    assert sample(metrics, "feedrunner_sink_errors_total", sink=sink.name, operation="close") == 1
    assert sample(metrics, "feedrunner_sink_events_failed_total", sink=sink.name) == 6
    errors = [m for level, m in logs if level == "ERROR"]
    assert len(errors) == 2 and str(full) in errors[0] and "closed while failing" in errors[1], errors
    assert ids(tmp_path / "out" / "BTC-USDT.jsonl") == list(range(6))


async def test_a_sink_raising_on_close_is_reported_not_suppressed(logs: list[tuple[str, str]]) -> None:
    class Broken(StdoutSink):
        def close(self) -> None:
            raise OSError(5, "Input/output error")

    sink, metrics = Broken(SinkSpec(type="stdout")), Metrics()
    pipe = Pipeline(queue_spec(), [sink], metrics)
    await pipe.drain_and_close()
    assert sample(metrics, "feedrunner_sink_errors_total", sink="stdout", operation="close") == 1
    assert any(level == "ERROR" and "Input/output error" in m for level, m in logs)


async def test_stdout_closed_under_the_sink_is_one_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[tuple[str, str]]
) -> None:
    closed = (tmp_path / "stdout").open("w")
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    sink, metrics = StdoutSink(SinkSpec(type="stdout")), Metrics()
    pipe = Pipeline(queue_spec(), [sink], metrics)
    pipe.start()
    await run_batches(pipe, [[trade(i, "BTC/USDT")] for i in range(50)])
    await pipe.drain_and_close()
    assert sample(metrics, "feedrunner_sink_events_failed_total", sink="stdout") == 50
    assert len([m for level, m in logs if level == "ERROR" and "is failing" in m]) == 1


def test_a_file_renamed_away_is_reopened_at_the_next_flush(tmp_path: Path, logs: list[tuple[str, str]]) -> None:
    sink = jsonl(tmp_path)
    path = tmp_path / "out" / "BTC-USDT.jsonl"
    sink.write([trade(i, "BTC/USDT") for i in range(10)])
    sink.flush()
    path.rename(path.with_name("BTC-USDT.jsonl.1"))  # logrotate, without a signal
    sink.write([trade(i, "BTC/USDT") for i in range(10, 20)])  # still the open file: lands in .1
    sink.flush()  # notices the inode changed
    sink.write([trade(i, "BTC/USDT") for i in range(20, 30)])
    sink.close()
    assert ids(path.with_name("BTC-USDT.jsonl.1")) == list(range(20))
    assert ids(path) == list(range(20, 30))
    assert any("renamed or removed" in m and str(path) in m for _, m in logs)


def test_reopen_starts_a_fresh_file_at_the_path(tmp_path: Path) -> None:
    sink = jsonl(tmp_path, "out/{venue}.jsonl")
    path = tmp_path / "out" / "binance.jsonl"
    sink.write([trade(i, "BTC/USDT") for i in range(10)])
    path.rename(tmp_path / "rotated.jsonl")
    sink.reopen()  # what SIGHUP calls: the buffered 10 go to the renamed file
    sink.write([trade(i, "BTC/USDT") for i in range(10, 15)])
    sink.close()
    assert ids(tmp_path / "rotated.jsonl") == list(range(10)) and ids(path) == list(range(10, 15))


def test_sighup_reopens_the_files_of_a_running_runner(tmp_path: Path) -> None:
    """`feedrunner run`, a file renamed away, then SIGHUP: no flush timer in reach (1 h), so only the
    signal can move the writes to a fresh file; every trade is in one file or the other, once."""
    (tmp_path / "feeds.yaml").write_text(
        textwrap.dedent("""\
        version: 1
        environment: simulator
        simulator: {seed: 3, rate: 200}
        venues:
          binance: {adapter: ccxt, exchange: binance, channels: [trades], symbols: [BTC/USDT]}
        sinks: [{type: jsonl, path: "out/{symbol}.jsonl", flush_interval: 1h}]
        logging: {level: INFO, format: json}
        server: {enabled: false}
        state: {url: "sqlite:///state.db"}
        """)
    )
    proc = spawn(tmp_path)
    path, rotated = tmp_path / "out" / "BTC-USDT.jsonl", tmp_path / "out" / "BTC-USDT.jsonl.1"
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path.exists(), "no trades were written"
        time.sleep(1.0)
        path.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path.exists(), "SIGHUP did not reopen the file"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    before, after = ids(rotated), ids(path)
    assert before and after
    both = before + after
    assert both == list(range(both[0], both[0] + len(both)))


async def test_a_failing_sink_fails_readyz_and_shows_in_status(tmp_path: Path) -> None:
    bad = tmp_path / "out" / "ETH-USDT.jsonl"
    bad.mkdir(parents=True)
    text = f"""\
version: 1
environment: simulator
simulator: {{seed: 4, rate: 40}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [BTC/USDT, ETH/USDT]}}
sinks: [{{type: jsonl, path: "{tmp_path}/out/{{symbol}}.jsonl", flush_interval: 100ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///{tmp_path}/state.db"}}
"""
    spec, problems = check_text(text, "feeds.yaml", {})
    assert spec is not None, problems
    runner = Runner(spec)
    await runner.start()
    assert runner.control is not None
    base = f"http://127.0.0.1:{runner.control.port}"

    def get(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        name = runner.pipeline.sinks[0].name
        await wait_until(lambda: any(p.startswith("sink") for p in runner.not_ready()), 20, "the sink not ready")
        code, body = await asyncio.to_thread(get, "/readyz")
        assert code == 503 and any(p.startswith(f"sink {name}: failing") for p in body["problems"]), body
        _, status = await asyncio.to_thread(get, "/status")
        row = status["sinks"][name]
        assert row["state"] == "failing" and row["events_failed"] > 0 and row["failing_paths"] == [str(bad)]
        assert row["since"] and str(bad) in row["last_error"] and row["events_written"] > 0
        printed = render_status(status)
        assert f"sink {name}  failing" in printed and "FAILING since" in printed and str(bad) in printed

        bad.rmdir()
        await wait_until(lambda: not runner.not_ready(), 20, "ready again")
        code, _ = await asyncio.to_thread(get, "/readyz")
        _, status = await asyncio.to_thread(get, "/status")
        assert code == 200 and status["sinks"][name]["state"] == "ok"
        assert f"sink {name}  ok" in render_status(status)
    finally:
        await runner.stop()
    assert ids(tmp_path / "out" / "BTC-USDT.jsonl")


def test_a_failing_path_nothing_is_sent_to_any_more_stops_failing_the_sink(tmp_path: Path, monkeypatch):
    """Yesterday's file, or a symbol a reload removed: the sink is judged by what it must write now."""
    import feedrunner.sinks.base as base

    sink = jsonl(tmp_path)
    (tmp_path / "out" / "ETH-USDT.jsonl").mkdir(parents=True)
    sink.write([trade(1, "ETH/USDT")])
    sink.flush()
    assert sink.state.failing
    clock = [base.time.monotonic()]
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    clock[0] += base.FORGET_AFTER / 2
    sink.flush()
    assert sink.state.failing  # still asked for recently enough
    clock[0] += base.FORGET_AFTER
    sink.flush()
    assert not sink.state.failing and sink.state.problem() is None
