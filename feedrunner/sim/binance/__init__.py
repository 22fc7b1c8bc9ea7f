"""A local exchange speaking Binance spot's real REST + websocket market-data protocol.

async with BinanceSim(["BTC/USDT"], rate=100) as sim:
    ex = ccxt.pro.binance(ccxt_overrides(sim.endpoints))
"""

from __future__ import annotations

import asyncio
import gc

from feedrunner.sim.binance.ccxt_config import ccxt_overrides
from feedrunner.sim.binance.server import BinanceSim

__all__ = ["BinanceSim", "ccxt_overrides", "run_standalone"]


async def run_standalone(
    host: str,
    port: int,
    seed: int,
    rate: float,
    symbols: list[str],
    record_send_times: bool = False,
    tick: float = 0.005,
) -> None:
    """Serve until cancelled, printing the feeds.yaml venue snippet so a run can be pointed at it."""
    async with BinanceSim(
        symbols, seed=seed, rate=rate, host=host, port=port, record_send_times=record_send_times, tick=tick
    ) as sim:
        gc.collect()
        gc.freeze()  # a process of its own: full collections walking the startup heap paused the feed
        print(f"endpoints: {{rest: {sim.rest_url}, ws: {sim.ws_url}}}", flush=True)
        await asyncio.Event().wait()
