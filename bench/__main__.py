"""`make bench`: run every benchmark, print its table, write bench/results/latest.json and its plots."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = [
    "bench.spec_validate",
    "bench.ccxt_stream",
    "bench.ccxt_moves",
    "bench.ccxt_drop",
    "bench.ib_stream",
    "bench.bus_sinks",
    "bench.peer_cryptofeed",
    "bench.scale_out",
]


def main(argv: list[str]) -> int:
    chosen = [b for b in BENCHMARKS if not argv or any(a in b for a in argv)]
    for name in chosen:
        print(f"== {name}")
        importlib.import_module(name).main()
    importlib.import_module("bench.plots").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
