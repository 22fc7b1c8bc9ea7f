"""`python -m feedrunner.sim.opend`: a FutuOpenD stand-in for manual runs and demos."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .server import run_standalone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feedrunner.sim.opend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11111, help="OpenD's default API port; 0 picks one")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=5.0, help="trades per second per subscribed code")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_standalone(args.host, args.port, args.seed, args.rate))


if __name__ == "__main__":
    main()
