"""`python -m feedrunner.sim.tws`: a standalone TWS stand-in for manual runs against feeds.yaml."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .server import run_standalone


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m feedrunner.sim.tws", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7497, help="7497 is TWS paper trading's default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=5.0, help="market steps per second per subscribed contract")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_standalone(args.host, args.port, args.seed, args.rate))


if __name__ == "__main__":
    main()
