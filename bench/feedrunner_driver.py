"""feedrunner against our Binance simulator, for bench/peer_cryptofeed.py: the counterpart of
bench/cryptofeed_driver.py, measured by that file's `drive`, so both systems are timed the same way.

Run with .venv/bin/python from the repo root: `python -m bench.feedrunner_driver CONFIG.json OUT.json`
(CONFIG and OUT as in bench/cryptofeed_driver.py; also "stale_after", default "30s"). An in-process
Runner as bench/ccxt_stream.run_runner makes it, with LatencySink (the real JSONL sink, which also notes
(symbol, trade id, write time ns) per trade) as its only sink, and the heap frozen once the venue is up
as `feedrunner run` does.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.ccxt_stream import LatencySink, _spec
from bench.cryptofeed_driver import drive, read_config, write_output
from feedrunner.eventloop import new_loop
from feedrunner.runner import Runner, freeze_heap_when_up


class FeedrunnerSystem:
    def __init__(self, cfg: dict[str, Any]) -> None:
        endpoints = {"rest": cfg["rest"], "ws": cfg["ws"]}
        spec = _spec(endpoints, cfg["symbols"], stale_after=cfg.get("stale_after", "30s"))
        self.spec = spec  # the control server on a free port (bench/ccxt_stream._spec)
        self.runner = Runner(self.spec)
        self.dir = tempfile.mkdtemp(prefix="feedrunner-peer-")
        self.sink = LatencySink(self.dir, timed=cfg.get("record", True))
        self.runner.pipeline.sinks = [self.sink]
        self.written = self.sink.written
        self.extra: dict[str, Any] = {}
        self._gaps0 = 0

    async def start(self) -> None:
        await self.runner.start()
        await freeze_heap_when_up(self.runner)

    async def stop(self) -> None:
        lost = self.runner.metrics.registry.get_sample_value("feedrunner_trades_lost_total", {"venue": "binance"})
        self.extra["trades_lost_total"] = int(lost or 0)
        self.extra["sink_gaps"] = self.sink.gaps - self._gaps0  # id gaps in write order, since the reset
        try:
            await self.runner.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            # _spec gives each run a state store of its own in a fresh temporary directory: remove it too.
            state = Path(self.spec.state_url.removeprefix("sqlite:///")).parent
            if state.name.startswith("feedrunner-bench-state-"):
                shutil.rmtree(state, ignore_errors=True)

    def count(self) -> int:
        return self.sink.trades

    def reset(self) -> None:
        self.sink.reset()
        self._gaps0 = self.sink.gaps


def main(argv: list[str]) -> int:
    cfg, out_path = read_config(argv)
    # The loop `feedrunner run` would take for the same event_loop setting (auto: uvloop where installed).
    loop, kind = new_loop(cfg.get("event_loop", "auto"))
    try:
        out = loop.run_until_complete(drive(cfg, FeedrunnerSystem(cfg), "feedrunner"))
    finally:
        loop.close()
    out["extra"]["event_loop"] = kind
    write_output(out_path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
