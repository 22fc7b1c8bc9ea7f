"""cryptofeed 2.4.1's Binance feed against our Binance simulator, for bench/peer_cryptofeed.py.

Run INSIDE .bench-venv-cryptofeed (never .venv): `python -P bench/cryptofeed_driver.py CONFIG.json OUT.json`.
It imports neither feedrunner nor bench. The measuring half (`drive`) uses only the standard library and
aiohttp, and bench/feedrunner_driver.py runs feedrunner through that same `drive`, so the two systems are
timed by the same code; cryptofeed itself is imported only in `main`.

CONFIG: {"rest": url, "ws": url, "symbols": ["BTC/USDT", ...], "warmup": s, "seconds": s,
         "drop_at": s (optional: POST a "drop" fault to the simulator that far into the recording),
         "record": bool (default true: note (symbol, trade id, ns) per trade; false: only count),
         "log_file": path (optional, cryptofeed's own log)}
OUT:    {"written": [[symbol, id, ns], ...], "rss_samples_mb": [...], "trades": count in the window,
         "record_start_ns", "record_end_ns", "dropped_at_ns", "symbols_seen", "system", "extra"}

stdout lines, for the parent: "receiving" (first trade arrived; the warmup starts), "recording <ns>",
"recorded <ns>", "done". SIGTERM ends the current wait early; the output is still written.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

FIRST_TRADE_TIMEOUT = 90.0
_PAGE = resource.getpagesize()


class System(Protocol):
    """What `drive` needs from a system under test."""

    written: list[tuple[str, int, int]]  # (unified symbol, trade id, time.time_ns() at the sink write)
    extra: dict[str, Any]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def count(self) -> int: ...  # trades delivered so far (or since the last reset)
    def reset(self) -> None: ...  # forget `written` (the warmup's)


def rss_mb() -> float:
    """This process's resident set, from /proc (psutil is not in the cryptofeed venv)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))


async def _sample_rss(samples: list[float]) -> None:
    while True:
        samples.append(round(rss_mb(), 1))
        await asyncio.sleep(1.0)


async def _inject_drop(rest: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{rest.rstrip('/')}/_sim/faults", json={"fault": "drop"}) as r,
    ):
        r.raise_for_status()


def _say(line: str) -> None:
    print(line, flush=True)


async def drive(cfg: dict[str, Any], system: System, name: str) -> dict[str, Any]:
    """Start, wait for the first trade, warm up, record `seconds` (dropping at `drop_at`), stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    samples: list[float] = []
    sampler: asyncio.Task[None] | None = None
    dropped_at = None
    await system.start()
    try:
        deadline = time.monotonic() + FIRST_TRADE_TIMEOUT
        while system.count() == 0:
            if time.monotonic() > deadline or stop.is_set():
                raise RuntimeError(f"{name}: no trade within {FIRST_TRADE_TIMEOUT:.0f}s")
            await asyncio.sleep(0.01)
        _say("receiving")
        await _pause(stop, float(cfg.get("warmup", 2.0)))
        system.reset()
        start_ns, c0 = time.time_ns(), system.count()
        _say(f"recording {start_ns}")
        sampler = asyncio.ensure_future(_sample_rss(samples))
        seconds = float(cfg["seconds"])
        drop_at = cfg.get("drop_at")
        if drop_at is not None and not stop.is_set():
            await _pause(stop, float(drop_at))
            dropped_at = time.time_ns()
            await _inject_drop(cfg["rest"])
            seconds -= float(drop_at)
        await _pause(stop, seconds)
        end_ns, c1 = time.time_ns(), system.count()
        _say(f"recorded {end_ns}")
    finally:
        if sampler is not None:
            sampler.cancel()
        samples.append(round(rss_mb(), 1))
        try:
            await asyncio.wait_for(system.stop(), 15)
        except Exception as e:  # the figures are taken; a slow shutdown must not lose them
            print(f"{name}: stop failed: {e!r}", file=sys.stderr)
    written = [(s, i, t) for s, i, t in system.written if start_ns <= t <= end_ns]
    return {
        "system": name,
        "written": written,
        "rss_samples_mb": samples,
        "trades": c1 - c0,
        "record_start_ns": start_ns,
        "record_end_ns": end_ns,
        "dropped_at_ns": dropped_at,
        "symbols_seen": len({s for s, _, _ in written}),
        "extra": system.extra,
    }


def read_config(argv: list[str]) -> tuple[dict[str, Any], str]:
    if len(argv) != 3:
        raise SystemExit(f"usage: {argv[0]} CONFIG.json OUT.json")
    with open(argv[1]) as f:
        return json.load(f), argv[2]


def write_output(path: str, out: dict[str, Any]) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    _say("done")


# --- cryptofeed ----------------------------------------------------------------------------------------


def sim_binance(rest: str, ws: str) -> type:
    """cryptofeed's Binance feed with its REST and websocket addresses pointed at the simulator."""
    from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint, WSAsyncConn
    from cryptofeed.exchanges import Binance

    host = ws.split("://", 1)[1].rstrip("/")

    class SimBinance(Binance):
        # Workaround: WSAsyncConn.__init__ raises ValueError for any address not starting "wss://", and
        # the simulator speaks plain ws:// on loopback. The endpoint is declared as wss:// so the check
        # passes, and connect() turns each connection's address back to ws:// before anything dials it
        # (websockets' connect then opens a plain TCP socket, as it would for any ws:// URL).
        websocket_endpoints = [WebsocketEndpoint(f"wss://{host}")]
        # Symbol loading is cryptofeed's own: a blocking GET of /api/v3/exchangeInfo (the simulator's
        # answer has every field Binance._parse_symbol_data reads). l2book is unused (trades only).
        rest_endpoints = [
            RestEndpoint(
                rest.rstrip("/"),
                routes=Routes("/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}"),
            )
        ]

        def connect(self) -> list:
            conns = super().connect()
            for conn, *_ in conns:
                if isinstance(conn, WSAsyncConn) and conn.address.startswith("wss://"):
                    conn.address = "ws://" + conn.address[len("wss://") :]
            return conns

    return SimBinance


class CryptofeedSystem:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.written: list[tuple[str, int, int]] = []
        self.extra: dict[str, Any] = {}
        self._n = 0
        self.fh: Any = None

    def _callback(self) -> Callable[[Any, float], Any]:
        if self.cfg.get("record", True):
            append, now = self.written.append, time.time_ns

            async def on_trade(t: Any, receipt_timestamp: float) -> None:
                # cryptofeed's Binance TRADES are @aggTrade events and t.id is the aggregate id (`a`); the
                # simulator keys send times by trade id, which is the event's `f` (= `l`: one trade each).
                append((t.symbol, t.raw["f"], now()))

        else:

            async def on_trade(t: Any, receipt_timestamp: float) -> None:
                self._n += 1

        return on_trade

    async def start(self) -> None:
        from cryptofeed import FeedHandler
        from cryptofeed.defines import TRADES

        log = self.cfg.get("log_file")
        # Workaround: with its default config ({"uvloop": True}) FeedHandler installs uvloop's policy and
        # FeedHandler.run() then calls asyncio.get_event_loop(), which uvloop 0.23's policy answers with
        # "RuntimeError: There is no current event loop". So uvloop is switched off in cryptofeed's config
        # and `main` installs uvloop's policy and a uvloop loop itself: the feed still runs on uvloop, as
        # a cryptofeed user gets by default. (A config dict replaces cryptofeed's defaults wholesale, so
        # the log settings are given here too: by default it logs to ./feedhandler.log.)
        config: dict[str, Any] = {"uvloop": False, "log": {"disabled": True}}
        if log:
            config["log"] = {"filename": log, "level": "WARNING"}
        self.fh = FeedHandler(config=config)
        feed_cls = sim_binance(self.cfg["rest"], self.cfg["ws"])
        symbols = [s.replace("/", "-") for s in self.cfg["symbols"]]
        self.fh.add_feed(feed_cls(symbols=symbols, channels=[TRADES], callbacks={TRADES: self._callback()}))
        # start_loop=False: start the feeds' tasks on the running loop and return; our own SIGTERM handler
        # (in drive) replaces cryptofeed's, which raises SystemExit out of the loop.
        self.fh.run(start_loop=False, install_signal_handlers=False)

    async def stop(self) -> None:
        await self.fh.stop_async()

    def count(self) -> int:
        return len(self.written) if self.cfg.get("record", True) else self._n

    def reset(self) -> None:
        self.written.clear()


class _Unified:
    """Reports cryptofeed's "BTC-USDT" as the simulator's "BTC/USDT", after the run (not per trade)."""

    def __init__(self, inner: CryptofeedSystem) -> None:
        self.inner, self.extra = inner, inner.extra

    @property
    def written(self) -> list[tuple[str, int, int]]:
        return [(s.replace("-", "/"), i, t) for s, i, t in self.inner.written]

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def count(self) -> int:
        return self.inner.count()

    def reset(self) -> None:
        self.inner.reset()


async def _amain(cfg: dict[str, Any]) -> dict[str, Any]:
    return await drive(cfg, _Unified(CryptofeedSystem(cfg)), "cryptofeed")


def main(argv: list[str]) -> int:
    import uvloop

    cfg, out_path = read_config(argv)
    # See CryptofeedSystem.start: the loop cryptofeed would have set up, made by hand.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        out = loop.run_until_complete(_amain(cfg))
        out["extra"]["cryptofeed_version"] = importlib.metadata.version("cryptofeed")
        out["extra"]["loop"] = type(loop).__module__ + "." + type(loop).__name__
        write_output(out_path, out)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
