"""The pause a clean close costs: the Binance simulator (its own process) closes every websocket cleanly,
as at Binance's 24 h disconnect or a venue's maintenance, while 10 symbols trade at 100/s each.

Figures, medians of BENCH_RUNS: the longest pause between two sink writes across the drop (the time
from the last trade written before it to the first after), the time from the drop until every symbol
has written a trade the simulator sent after it (so streamed on a new connection), and the trades
lost (ids missing in the sink plus feedrunner_trades_lost_total).
The baseline in the same run is the steady state's longest pause between writes over as long a span.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from typing import Any

import aiohttp

from bench.ccxt_stream import RUNS, LatencySink, Sim, _spec
from bench.results import record
from feedrunner.runner import Runner, freeze_heap_when_up

SYMBOLS = [f"D{i:02d}/USDT" for i in range(10)]
RATE = 1_000  # trades/s over all symbols
STALE = "3s"  # a stream counts as healthy once it has delivered for this long
SPAN = 6.0  # seconds observed around the drop


def longest_pause(times_ns: list[int]) -> tuple[float, int]:
    """The longest time between two writes (s), and when the write that ended it happened (ns)."""
    ts = sorted(set(times_ns))
    gap, end = max(((b - a, b) for a, b in itertools.pairwise(ts)), default=(0, 0))
    return gap / 1e9, end


async def inject(endpoints: dict[str, str], fault: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{endpoints['rest']}/_sim/faults", json={"fault": fault}):
        pass


async def one_run(sim: Sim) -> dict[str, float]:
    runner = Runner(_spec(sim.endpoints, SYMBOLS, stale_after=STALE))
    sink = LatencySink(tempfile.mkdtemp(prefix="feedrunner-bench-"))
    runner.pipeline.sinks = [sink]
    await runner.start()
    await freeze_heap_when_up(runner)
    await asyncio.sleep(4.0)  # past the stale window: healthy
    sink.reset()
    await asyncio.sleep(SPAN)
    steady, _ = longest_pause([t for _, _, t in sink.written])
    sink.reset()
    gaps_before = sink.gaps
    dropped_at = time.time_ns()
    await inject(sim.endpoints, "drop")
    await asyncio.sleep(SPAN)
    pause, _ = longest_pause([t for _, _, t in sink.written])
    sent = await sim.sent(dropped_at)  # trades the simulator sent on a new connection, after the drop
    after: dict[str, int] = {}
    for symbol, tid, t in sink.written:
        if symbol not in after and tid in sent.get(symbol, {}):
            after[symbol] = t
    lost = runner.metrics.registry.get_sample_value("feedrunner_trades_lost_total", {"venue": "binance"}) or 0
    await runner.stop()
    return {
        "pause_s": pause,
        "steady_pause_s": steady,
        "every_symbol_s": (max(after.values()) - dropped_at) / 1e9 if len(after) == len(SYMBOLS) else float("nan"),
        "lost": int(lost) + sink.gaps - gaps_before,
    }


async def amain() -> dict[str, Any]:
    sim = Sim(SYMBOLS, RATE / len(SYMBOLS), 0.001)
    try:
        runs = [await one_run(sim) for _ in range(RUNS)]
    finally:
        sim.close()
    figures = {
        "symbols": len(SYMBOLS),
        "offered_per_s": RATE,
        "pause_ms": round(statistics.median(r["pause_s"] for r in runs) * 1000, 1),
        "pause_ms_runs": [round(r["pause_s"] * 1000, 1) for r in runs],
        "steady_pause_ms": round(statistics.median(r["steady_pause_s"] for r in runs) * 1000, 1),
        "every_symbol_again_ms": round(statistics.median(r["every_symbol_s"] for r in runs) * 1000, 1),
        "lost_trades": sum(r["lost"] for r in runs),
        "runs": RUNS,
    }
    record("ccxt_drop", figures)
    print(
        f"clean drop, {len(SYMBOLS)} symbols at {RATE}/s in all, median of {RUNS}: longest pause in sink writes "
        f"{figures['pause_ms']} ms (runs {figures['pause_ms_runs']}) against {figures['steady_pause_ms']} ms "
        f"in steady state; every symbol streaming again after {figures['every_symbol_again_ms']} ms; "
        f"lost {figures['lost_trades']}"
    )
    return figures


def main() -> dict[str, Any]:
    return asyncio.run(amain())


if __name__ == "__main__":
    main()
