"""Symbols moving between polling and websocket at 1,000 symbols: does the venue end up sending twice?

One symbol falling back to polling and returning changes its chunk's symbol set, and ccxt.pro binance
subscribes every set on a connection of its own. Figures: the frames the simulator sends per trade it
generates, before the moves (the baseline, same run) and after them; websocket connections open; and
trades lost. A replaced set left subscribed shows up as more than one frame per trade.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import aiohttp

from bench.ccxt_stream import LatencySink, Sim, _spec
from bench.results import record
from feedrunner.runner import Runner

SYMBOLS = [f"X{i:04d}/USDT" for i in range(1000)]
MOVES = int(os.environ.get("BENCH_MOVES", 10))
WINDOW = 10.0  # seconds per frames-per-trade measurement


async def _stats(sim: Sim) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.endpoints['rest']}/_sim/stats") as r:
        return await r.json()


async def frames_per_trade(sim: Sim) -> float:
    a = await _stats(sim)
    await asyncio.sleep(WINDOW)
    b = await _stats(sim)
    trades = sum(b["trades"].values()) - sum(a["trades"].values())
    return round((b["messages_sent"] - a["messages_sent"]) / max(trades, 1), 3)


async def amain() -> dict[str, Any]:
    sim = Sim(SYMBOLS, 2)
    try:
        runner = Runner(_spec(sim.endpoints, SYMBOLS))
        runner.pipeline.sinks = [LatencySink(tempfile.mkdtemp(prefix="feedrunner-bench-"), timed=False)]
        await runner.start()
        adapter = runner.adapters["binance"]
        await asyncio.sleep(15)  # subscribe everything
        before = await frames_per_trade(sim)
        opened = (await _stats(sim))["connections_total"]
        t0 = time.monotonic()
        desired = dict.fromkeys(SYMBOLS, "websocket")
        for i in range(MOVES):  # spread over the list, as per-symbol breakers would open
            symbol = SYMBOLS[i * len(SYMBOLS) // MOVES + 7]
            adapter.apply({**desired, symbol: "polling"})
            await asyncio.sleep(3)
            adapter.apply(desired)
            await asyncio.sleep(3)
        moves_s = time.monotonic() - t0
        await asyncio.sleep(5)
        after = await frames_per_trade(sim)
        stats = await _stats(sim)
        lost = int(runner.metrics.trades_lost.labels("binance")._value.get())
        await runner.stop()
    finally:
        sim.close()
    figures = {
        "symbols": len(SYMBOLS),
        "moves": MOVES,
        "moves_seconds": round(moves_s, 1),
        "frames_per_trade_before": before,
        "frames_per_trade_after": after,
        "ratio_after_before": round(after / before, 3),
        "connections_open_after": stats["connections"],
        "connections_opened_by_moves": stats["connections_total"] - opened,
        "trades_lost": lost,
        "target_ratio": 1.05,
    }
    record("ccxt_moves", figures)
    print(
        f"{MOVES} symbols out to polling and back, one at a time, at {len(SYMBOLS)} symbols: frames sent per trade "
        f"{before} before, {after} after (ratio {figures['ratio_after_before']}, target <= 1.05); "
        f"{stats['connections']} connections open, {figures['connections_opened_by_moves']} opened by the moves; "
        f"lost {lost}"
    )
    return figures


def main() -> dict[str, Any]:
    return asyncio.run(amain())
