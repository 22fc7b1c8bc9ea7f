"""IB adapter throughput and reconnect time against the TWS simulator.

Throughput: the simulator runs in its own process (`feedrunner sim ib`); this process runs only
ib_async + IbAdapter with a counting emit, so the figures are per adapter process. Baseline in the same
run: the TWS messages the bare ib_async client decoded (numMsgRecv) for the events we emitted.
Reconnect: in-process simulator, drop / restart injected, time until every symbol streams again.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import statistics
import subprocess
import sys
import time

import psutil
import yaml
from loguru import logger

from bench.results import record
from feedrunner.adapters.ib import IbAdapter
from feedrunner.events import Trade
from feedrunner.metrics import Metrics
from feedrunner.sim.tws import TwsSim
from feedrunner.spec import check_text

STOCKS = [
    "AAPL",
    "MSFT",
    "AMZN",
    "GOOGL",
    "NVDA",
    "TSLA",
    "META",
    "AMD",
    "NFLX",
    "INTC",
    "QQQ",
    "SPY",
    "IBM",
    "JPM",
    "KO",
    "XOM",
]


def venue(port: int, symbols: list[str], **kw):
    v = {
        "adapter": "ib",
        "host": "127.0.0.1",
        "port": port,
        "client_id": 5,
        "symbols": symbols,
        "channels": ["trades", "ticker"],
        "stale_after": "5s",
        "backoff": {"base": "100ms", "cap": "1s", "jitter": 0, "reset_after": "500ms"},
        "circuit_breaker": {"failure_threshold": 1000},
    }
    v.update(kw)
    spec, problems = check_text(
        yaml.safe_dump({"version": 1, "environment": "live", "venues": {"ib": v}}), "b.yaml", {}
    )
    assert spec, problems
    return spec.venues[0]


class Count:
    def __init__(self) -> None:
        self.tickers = self.trades = 0
        self.last: dict[str, float] = {}

    async def __call__(self, events) -> None:
        for e in events:
            if isinstance(e, Trade):
                self.trades += 1
            else:
                self.tickers += 1
            self.last[e.symbol] = time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def throughput(rate: float, seconds: float = 8.0) -> dict:
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "feedrunner.cli", "sim", "ib", "--port", str(port), "--rate", str(rate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        sim.stdout.readline()
        out = Count()
        a = IbAdapter(venue(port, STOCKS), out, Metrics())
        await a.start()
        a.apply(dict.fromkeys(STOCKS, "websocket"))
        while a.sessions == 0 or out.tickers == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # warm up

        simproc = psutil.Process(sim.pid)
        simproc.cpu_percent()
        m0, t0, r0 = a.ib.client.connectionStats().numMsgRecv, out.tickers + out.trades, out.trades
        c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.sleep(seconds)
        m1, t1, r1 = a.ib.client.connectionStats().numMsgRecv, out.tickers + out.trades, out.trades
        c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        sim_cpu = simproc.cpu_percent() / 100
        await a.stop()
        wall = w1 - w0
        cpu = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / wall
        return {
            "rate": rate,
            "tws_msgs_per_s": (m1 - m0) / wall,
            "events_per_s": (t1 - t0) / wall,
            "trades_per_s": (r1 - r0) / wall,
            "cpu": cpu,
            "sim_cpu": sim_cpu,
        }
    finally:
        sim.terminate()
        sim.wait()


async def reconnect(fault: str, runs: int = 5) -> list[float]:
    times, delays = [], []
    async with TwsSim(rate=50.0) as sim:
        syms = [*STOCKS[:5], "EUR.USD"]
        out = Count()
        a = IbAdapter(venue(sim.port, syms), out, Metrics())
        await a.start()
        a.apply(dict.fromkeys(syms, "websocket"))
        for _ in range(runs):
            while len(out.last) < len(syms):
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            n = a.sessions
            t = time.monotonic()
            sim.inject(fault, duration=0.5 if fault == "restart" else 0.0)
            while a.sessions == n:
                await asyncio.sleep(0.001)
            up = time.monotonic()
            while not all(out.last.get(s, 0) > up for s in syms):
                await asyncio.sleep(0.001)
            times.append(max(out.last[s] for s in syms) - t)
            delays.append(sum(d for w, d, _ in a.retries if w >= t))
            out.last.clear()
        await a.stop()
    return times, delays


async def amain() -> dict:
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    figures: dict = {"throughput": [], "reconnect": {}}
    for rate in (100.0, 400.0):
        r = await throughput(rate)
        figures["throughput"].append({k: round(v, 2) for k, v in r.items()})
        print(
            f"rate {r['rate']:>6.0f}/s/contract x16 stocks: TWS msgs {r['tws_msgs_per_s']:>8.0f}/s, "
            f"events {r['events_per_s']:>8.0f}/s (trades {r['trades_per_s']:>7.0f}/s), adapter process CPU "
            f"{r['cpu']:.0%} (sim process {r['sim_cpu']:.0%})",
            flush=True,
        )
    for fault in ("drop", "restart"):
        ts, ds = await reconnect(fault)
        excl = [t - d for t, d in zip(ts, ds, strict=True)]
        figures["reconnect"][fault] = {
            "median_ms": round(statistics.median(ts) * 1000),
            "median_excluding_backoff_ms": round(statistics.median(excl) * 1000),
            "runs_ms": [round(x * 1000) for x in ts],
        }
        print(
            f"{fault}: every symbol streaming again after median {statistics.median(ts) * 1000:.0f} ms "
            f"({statistics.median(excl) * 1000:.0f} ms excluding backoff waits), runs "
            f"{', '.join(f'{x * 1000:.0f}' for x in ts)} ms",
            flush=True,
        )
    record("ib_stream", figures)
    return figures


def main() -> dict:
    return asyncio.run(amain())


if __name__ == "__main__":
    main()
