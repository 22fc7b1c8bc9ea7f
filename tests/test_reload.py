"""Live reload: each kind of edit applied by reconciling, untouched symbols streaming on without a gap."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from feedrunner.events import Trade
from feedrunner.rollout import State
from feedrunner.runner import Runner
from feedrunner.spec import load_spec

BASE = """\
version: 1
environment: simulator
simulator: {seed: 9, rate: 30}
defaults: {poll_interval: 250ms, backoff: {base: 200ms, cap: 2s}}
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    transport: websocket
    symbols: [A/USDT, B/USDT, C/USDT]
health: {interval: 250ms}
sinks: [{type: jsonl, path: "out/{venue}.jsonl", flush_interval: 100ms}]
server: {listen: "127.0.0.1:0"}
state: {url: "sqlite:///state.db"}
"""


class Tap:
    """Every event the runner writes, kept in memory by wrapping the pipeline's writer."""

    def __init__(self, runner: Runner) -> None:
        self.events: list[Any] = []
        original = runner.pipeline._write

        def write(batch: list[Any]) -> None:
            self.events.extend(batch)
            original(batch)

        runner.pipeline._write = write  # type: ignore[method-assign]

    def trades(self, venue: str = "binance") -> dict[str, list[Trade]]:
        out: dict[str, list[Trade]] = defaultdict(list)
        for e in self.events:
            if isinstance(e, Trade) and e.venue == venue:
                out[e.symbol].append(e)
        return out

    def assert_contiguous(self, symbols: list[str], venue: str = "binance") -> None:
        trades = self.trades(venue)
        for s in symbols:
            ids = [int(t.id) for t in trades[s]]
            assert ids == list(range(ids[0], ids[0] + len(ids))), f"{s}: ids not contiguous"

    def count(self, symbol: str) -> int:
        return len(self.trades()[symbol])


@pytest.fixture
async def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(BASE)
    runner = Runner(load_spec(feeds, env={}))
    tap = Tap(runner)
    await runner.start()
    await wait_until(lambda: all(tap.count(s) > 10 for s in ("A/USDT", "B/USDT", "C/USDT")), 15, "streaming")
    yield runner, tap, feeds
    await runner.stop()


async def edit(runner: Runner, feeds: Path, old: str, new: str) -> tuple[str, list[Any]]:
    text = feeds.read_text()
    assert old in text
    feeds.write_text(text.replace(old, new))
    result, changes, problems = await runner.reload_file(str(feeds))
    assert not problems, problems
    return result, changes


def backfilled(tap: Tap, symbols: list[str]) -> int:
    return sum(t.backfilled for s in symbols for t in tap.trades()[s])


async def test_add_and_remove_symbols_live(running):
    runner, tap, feeds = running
    result, changes = await edit(
        runner, feeds, "symbols: [A/USDT, B/USDT, C/USDT]", "symbols: [A/USDT, B/USDT, D/USDT]"
    )
    assert result == "applied"
    assert {str(c) for c in changes} == {"+ binance: subscribe D/USDT", "- binance: unsubscribe C/USDT"}
    await wait_until(lambda: tap.count("D/USDT") > 10, 15, "the added symbol to stream")
    c_before = tap.count("C/USDT")
    before = {s: tap.count(s) for s in ("A/USDT", "B/USDT")}
    await asyncio.sleep(1.0)
    assert tap.count("C/USDT") <= c_before + 2  # at most what was in flight
    assert all(tap.count(s) > before[s] + 10 for s in before)
    tap.assert_contiguous(["A/USDT", "B/USDT", "D/USDT"])
    assert backfilled(tap, ["A/USDT", "B/USDT"]) == 0  # untouched symbols never had a gap to fill
    assert runner.metrics.registry.get_sample_value("feedrunner_config_reloads_total", {"result": "applied"}) == 1


async def test_switch_transport_and_change_backoff_live(running):
    runner, tap, feeds = running
    adapter = runner.adapters["binance"]
    _, changes = await edit(runner, feeds, "backoff: {base: 200ms, cap: 2s}", "backoff: {base: 200ms, cap: 9s}")
    assert [str(c) for c in changes] == [
        "~ binance: backoff: {base: 0.2, cap: 2.0, factor: 2.0, jitter: 0.2, "
        "max_attempts: 50, reset_after: 60.0} -> {base: 0.2, cap: 9.0, factor: 2.0, "
        "jitter: 0.2, max_attempts: 50, reset_after: 60.0}"
    ]
    assert runner.adapters["binance"] is adapter and adapter.backoff.spec.cap == 9.0  # same connection
    n = len(tap.events)
    await edit(runner, feeds, "transport: websocket", "transport: polling")
    await wait_until(lambda: {e.transport for e in tap.events[n:][-30:]} == {"polling"}, 10, "polling")
    await asyncio.sleep(1.0)
    tap.assert_contiguous(["A/USDT", "B/USDT", "C/USDT"])
    assert runner.metrics.registry.get_sample_value("feedrunner_reconnects_total", {"venue": "binance"}) in (None, 0)


async def test_add_a_venue_and_change_phases_live(running):
    runner, tap, feeds = running
    text = feeds.read_text().replace(
        "health:",
        """\
  second:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    symbols: [E/USDT]
rollout:
  phases:
    - {name: canary, symbols: [binance:A/USDT], dwell: 1h}
    - {name: rest, symbols: all}
health:""",
    )
    feeds.write_text(text)
    result, changes, _ = await runner.reload_file(str(feeds))
    assert result == "applied"
    assert {c.kind for c in changes} >= {"venue_added", "rollout"}
    await wait_until(lambda: len(tap.trades("second")["E/USDT"]) > 5, 15, "the new venue to stream")
    await wait_until(lambda: runner.rollout is not None and runner.rollout.phase_name == "canary", 10, "rollout")
    assert runner.adapters["binance"].status()["symbols"] == {
        "A/USDT": "websocket",
        "B/USDT": "polling",
        "C/USDT": "polling",
    }
    # Rename the current phase and add one before it: the stored phase is found by name, or restarts.
    feeds.write_text(feeds.read_text().replace("name: canary", "name: pilot"))
    await runner.reload_file(str(feeds))
    assert runner.rollout.phase_name == "pilot" and runner.rollout.state is State.PROGRESSING
    assert "no longer in feeds.yaml" in runner.rollout.store.history()[-1]["reason"]
    tap.assert_contiguous(["A/USDT"])


async def test_invalid_edit_keeps_everything_running_and_is_counted(running):
    runner, tap, feeds = running
    good = feeds.read_text()
    feeds.write_text(good.replace("transport: websocket", "transport: carrier-pigeon"))
    result, changes, problems = await runner.reload_file(str(feeds))
    assert result == "invalid" and changes == []
    assert "venues.binance.transport: must be one of websocket, polling, hybrid" in str(problems[0])
    n = tap.count("A/USDT")
    await asyncio.sleep(1.0)
    assert tap.count("A/USDT") > n + 10  # still streaming on the old config
    assert runner.spec.venues[0].transport == "websocket"
    assert runner.metrics.registry.get_sample_value("feedrunner_config_reloads_total", {"result": "invalid"}) == 1
    feeds.write_text(good.replace("queue", "queue"))
    result, changes, _ = await runner.reload_file(str(feeds))
    assert result == "unchanged"


async def test_plan_shows_each_change_before_it_is_made(running):
    runner, _, feeds = running
    url = f"http://127.0.0.1:{runner.control.port}"
    edited = feeds.parent / "edited.yaml"
    edited.write_text(
        feeds.read_text()
        .replace("C/USDT]", "C/USDT, D/USDT]")
        .replace("transport: websocket", "transport: hybrid")
        .replace("size", "size")
        .replace("flush_interval: 100ms}]", "flush_interval: 200ms}]")
    )

    def plan(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", "plan", str(path), "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    p = await asyncio.to_thread(plan, edited)
    assert p.returncode == 2, p.stderr
    assert "+ binance: subscribe D/USDT" in p.stdout
    assert "~ binance: transport websocket -> hybrid" in p.stdout
    assert "! sinks: sinks changed  (needs a restart)" in p.stdout
    assert runner.spec.venues[0].transport == "websocket"  # plan changed nothing
    p = await asyncio.to_thread(plan, feeds)
    assert p.returncode == 0 and "No changes" in p.stdout
    bad = feeds.parent / "bad.yaml"
    bad.write_text(feeds.read_text().replace("version: 1", "version: 7"))
    p = await asyncio.to_thread(plan, bad)
    assert p.returncode == 78 and "version: must be 1" in p.stdout


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedrunner.cli", "run", "feeds.yaml", *extra],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
        env={**os.environ},
    )
    return proc, log


def _wait_log(log: Path, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the log:\n{log.read_text()[-3000:]}")


def _symbols_written(tmp: Path) -> set[str]:
    path = tmp / "out" / "binance.jsonl"
    return {json.loads(line)["symbol"] for line in path.read_text().splitlines()} if path.exists() else set()


def test_watch_reloads_after_a_rename_writing_editor_and_sighup_reloads(tmp_path: Path):
    (tmp_path / "feeds.yaml").write_text(BASE)
    proc, log = _start(tmp_path, "--watch")
    try:
        _wait_log(log, "runner started")
        # What vim, emacs and most IDEs do: write a new file, then rename it over the old one.
        tmp = tmp_path / ".feeds.yaml.swp"
        tmp.write_text(BASE.replace("C/USDT]", "C/USDT, D/USDT]"))
        os.replace(tmp, tmp_path / "feeds.yaml")
        _wait_log(log, r"reload: \+ binance: subscribe D/USDT")
        deadline = time.monotonic() + 15
        while "D/USDT" not in _symbols_written(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "D/USDT" in _symbols_written(tmp_path)
        # An in-place edit plus SIGHUP works too (and watch does not reload it twice).
        (tmp_path / "feeds.yaml").write_text(BASE.replace("C/USDT]", "C/USDT, D/USDT, E/USDT]"))
        proc.send_signal(signal.SIGHUP)
        _wait_log(log, r"reload: \+ binance: subscribe E/USDT")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
