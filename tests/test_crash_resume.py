"""`kill -9` mid-stream, then restart: every trade id of every symbol reaches the sink, the ones that
came during the outage backfilled, because the last delivered id of each symbol was checkpointed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

from helpers import spawn, wait_for

FEEDS = """\
version: 1
environment: live
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    symbols: [BTC/USDT, ETH/USDT]
    endpoints: {{rest: "{rest}", ws: "{ws}"}}
sinks: [{{type: jsonl, path: "out/{{symbol}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
"""


def runner(cwd: Path) -> subprocess.Popen:
    return spawn(cwd, stderr=(cwd / "runner.log").open("a"))


def ids(path: Path) -> list[tuple[int, bool]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append((int(rec["id"]), bool(rec["backfilled"])))
    return out


def test_kill_dash_nine_then_restart_loses_no_trade(tmp_path: Path):
    sim = spawn(
        tmp_path, "sim", "binance", "--port", "0", "--rate", "20", "--symbols", "BTC/USDT,ETH/USDT",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = second = None
    try:
        assert sim.stdout is not None
        found = re.search(r"rest: (\S+), ws: (\S+)\}", sim.stdout.readline())
        assert found, "simulator printed no endpoints"
        (tmp_path / "feeds.yaml").write_text(FEEDS.format(rest=found.group(1), ws=found.group(2)))
        btc, eth = tmp_path / "out" / "BTC-USDT.jsonl", tmp_path / "out" / "ETH-USDT.jsonl"
        first = runner(tmp_path)
        wait_for(lambda: len(ids(btc)) > 150 and len(ids(eth)) > 150, 60, "trades before the crash")
        time.sleep(6)  # past one checkpoint interval
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = {p.name: len(ids(p)) for p in (btc, eth)}
        time.sleep(2)  # the venue trades on while nobody listens
        second = runner(tmp_path)
        wait_for(lambda: all(len(ids(p)) > before[p.name] + 100 for p in (btc, eth)), 60, "trades after restart")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for p in (first, second, sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    log = (tmp_path / "runner.log").read_text()
    for path in (btc, eth):
        got = ids(path)
        unique = sorted({i for i, _ in got})
        assert unique == list(range(unique[0], unique[-1] + 1)), f"{path.name}: a gap after kill -9"
        assert any(b for _, b in got), f"{path.name}: the outage was not backfilled"
    assert "Traceback" not in log
