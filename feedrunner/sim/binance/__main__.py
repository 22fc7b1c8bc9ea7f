"""`python -m feedrunner.sim.binance --symbols BTC/USDT,ETH/USDT --rate 100` for manual runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from feedrunner.sim.binance import run_standalone


def main() -> None:
    p = argparse.ArgumentParser(description="Local Binance spot market-data simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=10.0, help="trades per second per symbol")
    p.add_argument("--symbols", default="BTC/USDT,ETH/USDT")
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_standalone(a.host, a.port, a.seed, a.rate, [s for s in a.symbols.split(",") if s]))


if __name__ == "__main__":
    main()
