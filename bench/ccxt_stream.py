"""Streaming through the runner vs a bare ccxt.pro loop, on one simulator feed in a separate process.

Figures: flood throughput (runner / bare ratio), latency from the simulator's send (the write of the
trade's frame) to the sink's write at 1k, 5k and 10k trades/s, lost trades at each rate, websocket vs
1 s polling latency, and RSS with 1,000 symbols streaming plus its growth over BENCH_SOAK_SECONDS
(default 600). Latency from the trade's own timestamp (`T`, milliseconds, stamped when the simulator's
tick begins) is printed alongside: it adds up to 1 ms of rounding and the simulator's own work.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import psutil
import yaml

from bench.plots import cdf_points
from bench.results import record
from feedrunner.adapters.ccxt import rebase
from feedrunner.events import Event, Trade
from feedrunner.lazyccxt import ccxt
from feedrunner.runner import Runner, freeze_heap_when_up
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.spec import Sink as SinkSpec
from feedrunner.spec import check_text

FLOOD_SECONDS = float(os.environ.get("BENCH_FLOOD_SECONDS", 8))
LATENCY_SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", 10))
SOAK_SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", 600))
RUNS = int(os.environ.get("BENCH_RUNS", 3))
# The simulator writes the trades of each tick together. A venue sends each trade as it happens, so the
# latency runs use a 1 ms tick (about 5 trades a write at 5k/s): at the simulator's default 5 ms, every
# trade also waits for ccxt to parse the 24 written with it. That case is measured too, at 5k/s.
LATENCY_TICK = float(os.environ.get("BENCH_SIM_TICK", 0.001))
COARSE_TICK = 0.005


class Sim:
    """`feedrunner sim binance` in its own process, so it does not share a core's event loop with us.

    It records when each trade's frame was written to the socket (`GET /_sim/sent`): latency is
    measured from there, not from the trade's `T`, which is stamped to the millisecond before the tick's
    frames are even built.
    """

    def __init__(self, symbols: Sequence[str], rate: float, tick: float = COARSE_TICK) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "feedrunner.cli",
                "sim",
                "binance",
                "--port",
                "0",
                "--rate",
                str(rate),
                "--symbols",
                ",".join(symbols),
                "--record-send-times",
                "--tick",
                str(tick),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"rest: (\S+), ws: (\S+)\}", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.endpoints = {"rest": m.group(1), "ws": m.group(2)}

    async def sent(self, since_ns: int = 0) -> dict[str, dict[int, int]]:
        """Send time (ns) per trade id, per symbol, of the trades sent from `since_ns` on."""
        url = f"{self.endpoints['rest']}/_sim/sent?since={since_ns}"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            body = await r.json()
        return {s: {int(i): t for i, t in times.items()} for s, times in body.items()}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class LatencySink(JsonlSink):
    """The real JSONL sink; with `timed`, it also notes when each trade was written and checks id continuity.

    The flood run leaves `timed` off, so the runner is not charged for the benchmark's own bookkeeping
    (the bare loop only counts, too).
    """

    def __init__(self, directory: str, timed: bool = True) -> None:
        super().__init__(SinkSpec(type="jsonl", path=f"{directory}/{{venue}}/{{date}}.jsonl"))
        self.timed = timed
        self.written: list[tuple[str, int, int]] = []  # (symbol, trade id, write time ns)
        self.from_stamp_ns: list[int] = []  # write time minus the trade's exchange timestamp
        self.trades = 0
        self.last: dict[str, int] = {}
        self.gaps = 0

    def write(self, events: Sequence[Event]) -> int:
        n = super().write(events)
        self.trades += n
        if not self.timed:
            return n
        now = time.time_ns()
        for e in events:
            if isinstance(e, Trade):
                tid = int(e.id)  # type: ignore[arg-type]
                self.written.append((e.symbol, tid, now))
                if e.ts_exchange:
                    self.from_stamp_ns.append(now - e.ts_exchange)
                prev = self.last.get(e.symbol)
                if prev is not None and tid != prev + 1:
                    self.gaps += max(0, tid - prev - 1)
                self.last[e.symbol] = tid
        return n

    def reset(self) -> None:
        self.written.clear()
        self.from_stamp_ns.clear()

    def latencies_from(self, sent: dict[str, dict[int, int]]) -> list[int]:
        return latencies(self.written, sent)


def bench_doc(
    endpoints: dict[str, str],
    symbols: Sequence[str],
    transport: str = "websocket",
    sinks: Sequence[dict[str, Any]] = ({"type": "stdout"},),
    stale_after: str = "30s",
    state_url: str | None = None,
) -> dict[str, Any]:
    """The feeds.yaml document of every bench run: one Binance venue on the simulator, trades only."""
    return {
        "version": 1,
        "environment": "live",
        "queue": {"size": 100_000, "overflow": "block"},
        "venues": {
            "binance": {
                "adapter": "ccxt",
                "exchange": "binance",
                "symbols": list(symbols),
                "channels": ["trades"],
                "transport": transport,
                "endpoints": dict(endpoints),
                "stale_after": stale_after,
                "trades_buffer": 10_000,
            }
        },
        "sinks": list(sinks),
        "server": {"listen": "127.0.0.1:0"},  # not 9108: another runner on the machine may hold it
        # A store of its own per run: a store shared between runs would carry one run's trade ids into the
        # next, whose simulator tape has moved on, and count the difference as lost.
        "state": {"url": state_url or f"sqlite:///{tempfile.mkdtemp(prefix='feedrunner-bench-state-')}/state.db"},
    }


def _spec(
    endpoints: dict[str, str],
    symbols: Sequence[str],
    transport: str = "websocket",
    sinks: Sequence[dict[str, Any]] = ({"type": "stdout"},),
    stale_after: str = "30s",
) -> Any:
    doc = bench_doc(endpoints, symbols, transport, sinks, stale_after)
    spec, problems = check_text(yaml.safe_dump(doc), "bench.yaml", {})
    assert spec is not None, problems
    return spec


async def run_runner(
    endpoints: dict[str, str],
    symbols: Sequence[str],
    seconds: float,
    transport: str = "websocket",
    warmup: float = 2.0,
    timed: bool = True,
) -> tuple[LatencySink, Runner, float]:
    runner = Runner(_spec(endpoints, symbols, transport))
    sink = LatencySink(tempfile.mkdtemp(prefix="feedrunner-bench-"), timed)
    runner.pipeline.sinks = [sink]
    await runner.start()
    await freeze_heap_when_up(runner)  # as `feedrunner run` does
    await asyncio.sleep(warmup)
    sink.reset()
    start_trades, t0 = sink.trades, time.monotonic()
    await asyncio.sleep(seconds)
    rate = (sink.trades - start_trades) / (time.monotonic() - t0)
    await runner.stop()
    return sink, runner, rate


def bare_client(endpoints: dict[str, str]) -> Any:
    """Plain ccxt.pro binance pointed at the simulator, with the runner's trade cache size."""
    ex = ccxt.pro.binance(
        {"options": {"tradesLimit": 10_000, "fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False}}
    )
    ex.urls["api"] = rebase(ex.urls["api"], endpoints["rest"], endpoints["ws"])
    return ex


async def run_bare(endpoints: dict[str, str], symbol: str, seconds: float, warmup: float = 2.0) -> float:
    ex = bare_client(endpoints)
    count = 0
    try:
        t_end = time.monotonic() + warmup
        while time.monotonic() < t_end:
            await ex.watch_trades_for_symbols([symbol])
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            count += len(await ex.watch_trades_for_symbols([symbol]))
        return count / (time.monotonic() - t0)
    finally:
        await ex.close()


async def bare_written(
    endpoints: dict[str, str], symbols: Sequence[str], seconds: float, warmup: float = 2.0
) -> list[tuple[str, int, int]]:
    """The latency baseline: plain ccxt.pro, one watch_trades loop per symbol, noting when each trade
    came back (symbol, id, time ns) and doing nothing else with it."""
    ex = bare_client(endpoints)
    seen: list[tuple[str, int, int]] = []
    recording = False

    async def watch(symbol: str) -> None:
        while True:
            trades = await ex.watch_trades(symbol)
            if recording:
                now = time.time_ns()
                seen.extend((symbol, int(t["id"]), now) for t in trades)

    tasks = [asyncio.ensure_future(watch(s)) for s in symbols]
    try:
        await asyncio.sleep(warmup)
        recording = True
        await asyncio.sleep(seconds)
        return seen
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ex.close()


def latencies(written: Sequence[tuple[str, int, int]], sent: dict[str, dict[int, int]]) -> list[int]:
    out = []
    for symbol, tid, at in written:
        t0 = sent.get(symbol, {}).get(tid)
        if t0 is not None:
            out.append(at - t0)
    return out


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e6


async def flood() -> dict[str, Any]:
    symbol = "BTC/USDT"
    sim = Sim([symbol], 20_000)
    try:
        bare, ours = [], []
        for _ in range(RUNS):
            bare.append(await run_bare(sim.endpoints, symbol, FLOOD_SECONDS))
            ours.append((await run_runner(sim.endpoints, [symbol], FLOOD_SECONDS, timed=False))[2])
    finally:
        sim.close()
    b, r = statistics.median(bare), statistics.median(ours)
    return {
        "offered_per_s": 20_000,
        "bare_trades_per_s": round(b),
        "runner_trades_per_s": round(r),
        "ratio": round(r / b, 3),
        "runs": RUNS,
        "target_ratio": 0.85,
    }


async def latency() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for total, tick in ((1_000, LATENCY_TICK), (5_000, LATENCY_TICK), (10_000, LATENCY_TICK), (5_000, COARSE_TICK)):
        key = str(total) if tick == LATENCY_TICK else f"{total}_tick_{tick * 1000:g}ms"
        out[key] = await latency_at(total, tick)
    out["5000"]["target_p99_ms"] = 10
    return out


async def latency_at(total: int, tick: float) -> dict[str, Any]:
    symbols = [f"S{i:02d}/USDT" for i in range(10)]
    sim = Sim(symbols, total / len(symbols), tick)
    try:
        p50s, p99s, stamp_p50s, stamp_p99s, lost, rates = [], [], [], [], 0, []
        bare_p50s: list[float] = []
        bare_p99s: list[float] = []
        for _ in range(RUNS):
            began = time.time_ns()
            sink, runner, rate = await run_runner(sim.endpoints, symbols, LATENCY_SECONDS)
            ours = sink.latencies_from(await sim.sent(began))
            p50s.append(pct(ours, 0.50))
            p99s.append(pct(ours, 0.99))
            stamp_p50s.append(pct(sink.from_stamp_ns, 0.50))
            stamp_p99s.append(pct(sink.from_stamp_ns, 0.99))
            counted = runner.metrics.registry.get_sample_value("feedrunner_trades_lost_total", {"venue": "binance"})
            lost += int(counted or 0) + sink.gaps
            rates.append(rate)
            began = time.time_ns()
            bare = latencies(await bare_written(sim.endpoints, symbols, LATENCY_SECONDS), await sim.sent(began))
            bare_p50s.append(pct(bare, 0.50))
            bare_p99s.append(pct(bare, 0.99))
    finally:
        sim.close()
    return {
        "sim_tick_ms": tick * 1000,
        "p50_ms": round(statistics.median(p50s), 2),
        "p99_ms": round(statistics.median(p99s), 2),
        "p99_ms_runs": [round(v, 2) for v in p99s],
        "bare_ccxt_p50_ms": round(statistics.median(bare_p50s), 2),
        "bare_ccxt_p99_ms": round(statistics.median(bare_p99s), 2),
        "bare_ccxt_p99_ms_runs": [round(v, 2) for v in bare_p99s],
        "from_trade_time_p50_ms": round(statistics.median(stamp_p50s), 2),
        "from_trade_time_p99_ms": round(statistics.median(stamp_p99s), 2),
        "lost_trades": lost,
        "delivered_per_s": round(statistics.median(rates)),
    }


async def polling_vs_ws() -> dict[str, Any]:
    symbols = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    sim = Sim(symbols, 20)
    try:
        ws, _, _ = await run_runner(sim.endpoints, symbols, LATENCY_SECONDS)
        poll, _, _ = await run_runner(sim.endpoints, symbols, LATENCY_SECONDS, transport="polling", warmup=3)
        sent = await sim.sent()
    finally:
        sim.close()
    ws_lat, poll_lat = ws.latencies_from(sent), poll.latencies_from(sent)
    return {
        "websocket_p50_ms": round(pct(ws_lat, 0.5), 2),
        "websocket_p99_ms": round(pct(ws_lat, 0.99), 2),
        "polling_1s_p50_ms": round(pct(poll_lat, 0.5), 2),
        "polling_1s_p99_ms": round(pct(poll_lat, 0.99), 2),
        "cdf_ms": {
            "websocket": cdf_points([v / 1e6 for v in ws_lat]),
            "polling_1s": cdf_points([v / 1e6 for v in poll_lat]),
        },
    }


async def rss_soak() -> dict[str, Any]:
    symbols = [f"X{i:04d}/USDT" for i in range(1000)]
    sim = Sim(symbols, 1)
    proc = psutil.Process()
    try:
        runner = Runner(_spec(sim.endpoints, symbols))
        sink = LatencySink(tempfile.mkdtemp(prefix="feedrunner-bench-"), timed=False)
        runner.pipeline.sinks = [sink]
        base_rss = proc.memory_info().rss
        await runner.start()
        await asyncio.sleep(15)  # subscribe everything, fill the caches
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < SOAK_SECONDS:
            samples.append((time.monotonic() - t0, proc.memory_info().rss))
            await asyncio.sleep(min(10, SOAK_SECONDS / 20))
        samples.append((time.monotonic() - t0, proc.memory_info().rss))
        delivered = sink.trades
        await runner.stop()
    finally:
        sim.close()
    xs = [t for t, _ in samples]
    ys = [r / 2**20 for _, r in samples]
    slope = statistics.linear_regression(xs, ys).slope if len(xs) > 2 else 0.0
    return {
        "symbols": 1000,
        "rss_mb_before_start": round(base_rss / 2**20, 1),
        "rss_mb_start": round(ys[0], 1),
        "rss_mb_end": round(ys[-1], 1),
        "rss_mb_max": round(max(ys), 1),
        "soak_seconds": SOAK_SECONDS,
        "growth_mb_per_hour": round(slope * 3600, 2),
        "trades_delivered": delivered,
        "target_rss_mb": 300,
        "samples": [[round(t, 1), round(mb, 1)] for t, mb in zip(xs, ys, strict=True)],
    }


async def amain() -> dict[str, Any]:
    rss = await rss_soak()  # first, in a process nothing else has grown yet
    figures = {
        "flood": await flood(),
        "latency": await latency(),
        "polling_vs_websocket": await polling_vs_ws(),
        "rss": rss,
    }
    record("ccxt_stream", figures)
    f, lat, pw, rss = figures["flood"], figures["latency"], figures["polling_vs_websocket"], figures["rss"]
    print(
        f"flood (1 symbol offered {f['offered_per_s']}/s, median of {RUNS}): bare ccxt.pro "
        f"{f['bare_trades_per_s']}/s, runner {f['runner_trades_per_s']}/s, ratio {f['ratio']} (target >= 0.85)"
    )
    print("latency, simulator send -> sink write, 10 symbols (from the trade's own timestamp in brackets):")
    for rate, v in lat.items():
        print(
            f"  {rate.split('_')[0]:>6}/s tick {v['sim_tick_ms']:g} ms  p50 {v['p50_ms']:6.2f} ms"
            f"  p99 {v['p99_ms']:6.2f} ms  runs {v['p99_ms_runs']}"
            f"  | bare ccxt.pro p50 {v['bare_ccxt_p50_ms']} / p99 {v['bare_ccxt_p99_ms']} ms"
            f"  (p50 {v['from_trade_time_p50_ms']} / p99 {v['from_trade_time_p99_ms']} ms)"
            f"  delivered {v['delivered_per_s']}/s  lost {v['lost_trades']}"
        )
    print(
        f"websocket p50 {pw['websocket_p50_ms']} ms / p99 {pw['websocket_p99_ms']} ms vs 1 s polling "
        f"p50 {pw['polling_1s_p50_ms']} ms / p99 {pw['polling_1s_p99_ms']} ms"
    )
    print(
        f"RSS with 1,000 symbols streaming: {rss['rss_mb_start']} -> {rss['rss_mb_end']} MB (max {rss['rss_mb_max']})"
        f" over {rss['soak_seconds']:.0f}s, trend {rss['growth_mb_per_hour']} MB/h (target < 300 MB, no growth)"
    )
    return figures


def main() -> dict[str, Any]:
    return asyncio.run(amain())


if __name__ == "__main__":
    main()
