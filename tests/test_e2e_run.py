"""`feedrunner run` as a subprocess on a temporary feeds.yaml: SIGTERM drains, flushes and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import spawn

FEEDS = """\
version: 1
environment: simulator
simulator: {seed: 5, rate: 50}
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades, ticker, book]
    book_depth: 5
    symbols: [BTC/USDT, ETH/USDT, SOL/USDT]
  ib: {adapter: ib, channels: [ticker, trades], symbols: [AAPL, EUR.USD]}
  futu: {adapter: futu, channels: [ticker, trades, book], symbols: [HK.00700, US.AAPL]}
  kraken: {adapter: ccxt, exchange: kraken, symbols: [BTC/USD]}
sinks: [{type: jsonl, path: "out/{venue}/{kind}.jsonl", flush_interval: 200ms}]
queue: {size: 1000, overflow: block}
logging: {level: INFO, format: json}
server: {listen: "127.0.0.1:0"}
state: {url: "sqlite:///state/feedrunner.db"}
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_streams_to_jsonl_and_exits_zero_on_sigterm(tmp_path: Path, loop: str):
    """Every adapter on each event loop: ccxt over aiohttp, ib_async, futu-api's thread bridge."""
    (tmp_path / "feeds.yaml").write_text(FEEDS + f"event_loop: {loop}\n")
    proc = spawn(tmp_path, stdout=subprocess.PIPE)
    try:
        trades = tmp_path / "out" / "binance" / "trade.jsonl"
        deadline = time.monotonic() + 30
        ib = tmp_path / "out" / "ib" / "trade.jsonl"
        while time.monotonic() < deadline and (
            not trades.exists()
            or trades.stat().st_size < 20_000
            or not ib.exists()
            or not (tmp_path / "out" / "futu" / "trade.jsonl").exists()
            or not (tmp_path / "out" / "binance" / "ticker.jsonl").exists()
        ):
            time.sleep(0.2)
        assert trades.exists(), "no trades were written"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    logs = [json.loads(line)["record"] for line in err.splitlines() if line.startswith("{")]
    messages = [r["message"] for r in logs]
    assert any("venue kraken skipped" in m for m in messages)  # no simulator speaks it: reported, not fatal
    assert any("runner stopped" in m for m in messages)
    assert any(m.startswith(f"event loop: {loop}") for m in messages)
    assert "Traceback" not in err

    ids: dict[str, list[int]] = defaultdict(list)
    for line in trades.read_text().splitlines():  # every line complete: the sink was flushed on shutdown
        record = json.loads(line)
        assert {
            "venue",
            "symbol",
            "kind",
            "ts_exchange",
            "ts_received",
            "transport",
            "id",
            "price",
            "amount",
            "side",
            "backfilled",
        } <= record.keys()
        ids[record["symbol"]].append(int(record["id"]))
    assert set(ids) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
    for symbol, seq in ids.items():
        assert seq == list(range(seq[0], seq[0] + len(seq))), f"{symbol} trade ids not contiguous"
    books = [json.loads(line) for line in (tmp_path / "out" / "binance" / "book.jsonl").read_text().splitlines()]
    assert books and all(len(b["bids"]) <= 5 and b["bids"][0][0] < b["asks"][0][0] for b in books)
    tickers = (tmp_path / "out" / "binance" / "ticker.jsonl").read_text().splitlines()
    assert tickers and json.loads(tickers[-1])["bid"] is not None
    assert not any("venue ib skipped" in m for m in messages)
    ib_trades = [json.loads(x) for x in (tmp_path / "out" / "ib" / "trade.jsonl").read_text().splitlines()]
    assert ib_trades and {t["symbol"] for t in ib_trades} == {"AAPL"}  # FX prints no trades on IDEALPRO
    assert all(t["id"] is None and t["transport"] == "websocket" for t in ib_trades)
    ib_tickers = [json.loads(x) for x in (tmp_path / "out" / "ib" / "ticker.jsonl").read_text().splitlines()]
    assert {t["symbol"] for t in ib_tickers} == {"AAPL", "EUR.USD"}
    futu_trades = [json.loads(x) for x in (tmp_path / "out" / "futu" / "trade.jsonl").read_text().splitlines()]
    for code in ("HK.00700", "US.AAPL"):
        seq = [int(t["id"]) for t in futu_trades if t["symbol"] == code]
        assert seq and seq == list(range(seq[0], seq[0] + len(seq))), f"{code} sequences not contiguous"
    assert (tmp_path / "out" / "futu" / "book.jsonl").exists()


async def test_jsonl_holds_every_trade_once_and_contiguous_across_faults(tmp_path: Path):
    """The whole path (adapter, queue, JSONL sink) through drop, reset, stall and restart."""
    from helpers import wait_until

    from feedrunner.runner import Runner
    from feedrunner.spec import check_text

    text = f"""\
version: 1
environment: simulator
simulator: {{seed: 6, rate: 40}}
defaults: {{stale_after: {{default: 5s, trades: 1s}}, backoff: {{base: 100ms, cap: 1s, jitter: 0}},
           circuit_breaker: {{failure_threshold: 100}}}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [BTC/USDT, ETH/USDT, SOL/USDT]}}
sinks: [{{type: jsonl, path: "{tmp_path}/out/{{symbol}}.jsonl", flush_interval: 100ms}}]
server: {{enabled: false}}
state: {{url: "sqlite:///{tmp_path}/state.db"}}
"""
    spec, problems = check_text(text, "feeds.yaml", {})
    assert spec is not None, problems
    runner = Runner(spec)
    await runner.start()
    try:
        sim = runner.sims[0]
        for fault, duration in (("drop", 0), ("reset", 0), ("stall", 2), ("restart", 1)):
            n = runner.pipeline.written
            sim.inject(fault, duration=duration)
            await wait_until(lambda n=n: runner.pipeline.written > n + 150, 20, f"trades after {fault}")
        stalls = runner.metrics.registry.get_sample_value(
            "feedrunner_stalls_total", {"venue": "binance", "channel": "trades"}
        )
        assert stalls and stalls >= 1
    finally:
        await runner.stop()
    backfilled = 0
    for symbol in ("BTC-USDT", "ETH-USDT", "SOL-USDT"):
        records = [json.loads(line) for line in (tmp_path / "out" / f"{symbol}.jsonl").read_text().splitlines()]
        ids = [int(r["id"]) for r in records]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"{symbol}: a trade missing or twice"
        backfilled += sum(r["backfilled"] for r in records)
    assert backfilled > 0  # the gaps were real, and filled over REST
    assert runner.metrics.registry.get_sample_value("feedrunner_trades_lost_total", {"venue": "binance"}) in (None, 0)
