"""feedrunner side by side with cryptofeed 2.4.1 (the peer a user would pick instead), both against our
Binance simulator in its own process, one system at a time, the same simulator process per scenario.

cryptofeed is a bench-only dependency in its own venv, .bench-venv-cryptofeed, built on first use from the
hash-pinned bench/cryptofeed.lock (`uv pip compile --generate-hashes --python-version 3.11
bench/cryptofeed.in -o bench/cryptofeed.lock`) and rebuilt when the lock changes (a stamp holds its hash).
Each system runs in a process of its own: bench/cryptofeed_driver.py (in that venv) and
bench/feedrunner_driver.py (in .venv), both measured by the same code (cryptofeed_driver.drive): the
sink write of feedrunner is LatencySink's, cryptofeed's is its TRADES callback; each notes (symbol, trade
id, time.time_ns()).

Figures, medians of BENCH_RUNS (default 3), ratio feedrunner / cryptofeed:
1. latency from the simulator's send of a trade's frame to the sink write, p50 / p99, at 1k/s and 5k/s
   over 5 symbols, simulator tick 1 ms, BENCH_LATENCY_SECONDS (10) recorded after a 3 s warmup;
2. RSS (psutil, with children) with 200 symbols x 10 trades/s after BENCH_PEER_RSS_SECONDS (60) of
   streaming: feedrunner as a real `feedrunner run` process, cryptofeed as its driver;
3. a clean drop (every websocket closed with 1000) with 10 symbols at 1,000/s, tick 1 ms, 6 s either side
   of it after a 4 s warmup: the longest pause between writes across it against the steady state's, the
   time until every symbol has written a trade the simulator made after the drop (streamed or backfilled),
   and trades lost (ids missing from each symbol's written span);
4. the flood ceiling: 20k, 40k and 80k/s offered over 4 symbols (tick 5 ms), trades/s delivered over
   BENCH_FLOOD_SECONDS (8) after a 2 s warmup, with the rate the simulator actually sent (see flood_at),
   and the CPU each system's process used per trade delivered (psutil, user + system, over the same
   window): where the simulator cannot outrun either system (on 2 cores it takes a core of its own
   near 50k/s), that is what says whose ceiling is higher, 1 s of CPU / (s per trade) on one core.
BENCH_PEER_ONLY=latency,rss,drop,flood runs a subset (for trying things out); BENCH_FEEDRUNNER_LOOP
(auto, uvloop, asyncio) sets feedrunner's event_loop (default auto, as `feedrunner run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import psutil
import yaml

from bench.ccxt_stream import (
    COARSE_TICK,
    FLOOD_SECONDS,
    LATENCY_SECONDS,
    LATENCY_TICK,
    RUNS,
    Sim,
    bench_doc,
    latencies,
    pct,
)
from bench.results import record

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools" / "bin" / "uv"
VENV = ROOT / ".bench-venv-cryptofeed"
LOCK = ROOT / "bench" / "cryptofeed.lock"
STAMP = VENV / ".lock-sha256"
CF_DRIVER = ROOT / "bench" / "cryptofeed_driver.py"
SYSTEMS = ("feedrunner", "cryptofeed")
RSS_SECONDS = float(os.environ.get("BENCH_PEER_RSS_SECONDS", 60))
FEEDRUNNER_LOOP = os.environ.get("BENCH_FEEDRUNNER_LOOP", "auto")  # feedrunner's event_loop setting
ONLY = {s for s in os.environ.get("BENCH_PEER_ONLY", "").split(",") if s}
LATENCY_WARMUP = 3.0
DROP_WARMUP, DROP_SPAN = 4.0, 6.0  # as bench/ccxt_drop: past feedrunner's 3 s stale window, then 6 s each side
FLOOD_WARMUP = 2.0
WORKAROUNDS = [
    "cryptofeed refuses ws:// addresses (WSAsyncConn wants wss://): the driver declares the simulator's "
    "endpoint as wss:// and rewrites each connection's address back to ws:// before it dials",
    "FeedHandler's default uvloop setup fails under uvloop 0.23 ('There is no current event loop' from "
    "asyncio.get_event_loop()): the driver turns uvloop off in cryptofeed's config and runs the feed on a "
    "uvloop loop it creates itself under uvloop's policy",
    "cryptofeed's trade id on Binance is the aggTrade id (`a`); the driver records the event's trade id "
    "`f` (= `l`), which is what the simulator's send times are keyed by",
]


# --- the peer's venv ---------------------------------------------------------------------------------------


def _base_python() -> str:
    venv_python = ROOT / ".venv" / "bin" / "python"
    return str(venv_python if venv_python.exists() else sys.executable)


def ensure_venv() -> Path:
    """.bench-venv-cryptofeed/bin/python, (re)built from bench/cryptofeed.lock when the lock changed."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    python = VENV / "bin" / "python"
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return python
    print(f"building {VENV.name} from {LOCK.relative_to(ROOT)} ...", flush=True)
    subprocess.run([str(UV), "venv", "--clear", "--quiet", "--python", _base_python(), str(VENV)], check=True)
    # --compile-bytecode as `make install` does for .venv: neither start pays for compiling its libraries.
    sync = ["pip", "sync", "--quiet", "--compile-bytecode", "--require-hashes", "--python", str(python), str(LOCK)]
    subprocess.run([str(UV), *sync], check=True)
    STAMP.write_text(digest + "\n")
    return python


# --- processes ---------------------------------------------------------------------------------------------


def rss_tree_mb(pid: int) -> float:
    """RSS of a process and all its descendants."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += q.memory_info().rss
    return total / 2**20


async def _end(proc: asyncio.subprocess.Process, grace: float = 20.0) -> None:
    """Terminate a child we started (and its children) if it is still running."""
    if proc.returncode is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    for kid in kids:  # descendants of ours that outlived it
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # the caller's `with` closes it


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


Hook = Callable[[asyncio.subprocess.Process, str], Awaitable[None]]


async def run_driver(
    kind: str, cfg: dict[str, Any], hooks: dict[str, Hook] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """One driver process (see bench/cryptofeed_driver.py for CONFIG and OUT); `hooks` run on its stdout
    lines by first word ("receiving", "recording", "recorded")."""
    tmp = Path(tempfile.mkdtemp(prefix=f"peer-{kind}-"))
    cfg_path, out_path, log_path = tmp / "config.json", tmp / "out.json", tmp / "stderr.log"
    if kind == "cryptofeed":
        cfg = {**cfg, "log_file": str(tmp / "cryptofeed.log")}
        argv = [str(ensure_venv()), "-P", str(CF_DRIVER), str(cfg_path), str(out_path)]
    else:
        argv = [sys.executable, "-m", "bench.feedrunner_driver", str(cfg_path), str(out_path)]
    cfg_path.write_text(json.dumps(cfg))
    limit = timeout or float(cfg.get("warmup", 0)) + float(cfg["seconds"]) + 150
    proc = None
    try:
        with _open_log(log_path) as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err, limit=1 << 20
            )
        assert proc.stdout is not None
        async with asyncio.timeout(limit):
            async for raw in proc.stdout:
                line = raw.decode().strip()
                hook = (hooks or {}).get(line.split(" ", 1)[0])
                if hook is not None:
                    await hook(proc, line)
            rc = await proc.wait()
        if rc != 0 or not out_path.exists():
            raise RuntimeError(f"{kind} driver exited {rc}:\n{_tail(log_path)}\n{_tail(tmp / 'cryptofeed.log')}")
        return json.loads(out_path.read_text())
    finally:
        if proc is not None:
            await _end(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _close_sim(sim: Sim) -> None:
    try:
        sim.close()
    except Exception:
        sim.proc.kill()
        sim.proc.wait()


# --- shared measures -------------------------------------------------------------------------------------


def id_losses(written: Sequence[Sequence[Any]]) -> tuple[int, int]:
    """(ids missing inside each symbol's written span, duplicate writes), whatever the write order."""
    by: dict[str, list[int]] = defaultdict(list)
    for symbol, tid, _ in written:
        by[symbol].append(int(tid))
    missing = dup = 0
    for ids in by.values():
        unique = len(set(ids))
        missing += max(ids) - min(ids) + 1 - unique
        dup += len(ids) - unique
    return missing, dup


def _rate(out: dict[str, Any]) -> float:
    return out["trades"] / max(1e-9, (out["record_end_ns"] - out["record_start_ns"]) / 1e9)


def _med(values: Sequence[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits) if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _endpoints_cfg(sim: Sim, symbols: Sequence[str], **kw: Any) -> dict[str, Any]:
    return {
        "rest": sim.endpoints["rest"],
        "ws": sim.endpoints["ws"],
        "symbols": list(symbols),
        "event_loop": FEEDRUNNER_LOOP,
        **kw,
    }


# --- 1. latency --------------------------------------------------------------------------------------------


async def latency_at(total: int) -> dict[str, Any]:
    symbols = [f"L{i}/USDT" for i in range(5)]
    sim = Sim(symbols, total / len(symbols), LATENCY_TICK)
    runs: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in SYSTEMS}
    try:
        for _ in range(RUNS):
            for kind in SYSTEMS:
                cfg = _endpoints_cfg(sim, symbols, warmup=LATENCY_WARMUP, seconds=LATENCY_SECONDS)
                out = await run_driver(kind, cfg)
                sent = await sim.sent(out["record_start_ns"] - 2_000_000_000)
                lat = latencies(out["written"], sent)
                missing, dup = id_losses(out["written"])
                r = runs[kind]
                r["p50"].append(pct(lat, 0.50))
                r["p99"].append(pct(lat, 0.99))
                r["rate"].append(_rate(out))
                r["lost"].append(missing)
                r["dup"].append(dup)
                r["matched"].append(len(lat) / max(1, len(out["written"])))
    finally:
        _close_sim(sim)
    fig: dict[str, Any] = {"symbols": len(symbols), "sim_tick_ms": LATENCY_TICK * 1000}
    for kind, r in runs.items():
        fig[kind] = {
            "p50_ms": _med(r["p50"]),
            "p99_ms": _med(r["p99"]),
            "p99_ms_runs": [round(v, 2) for v in r["p99"]],
            "delivered_per_s": round(statistics.median(r["rate"])),
            "lost_trades": int(sum(r["lost"])),
            "duplicates": int(sum(r["dup"])),
            "matched_to_send_time": round(min(r["matched"]), 4),
        }
    fig["ratio_p50"] = _ratio(fig["feedrunner"]["p50_ms"], fig["cryptofeed"]["p50_ms"])
    fig["ratio_p99"] = _ratio(fig["feedrunner"]["p99_ms"], fig["cryptofeed"]["p99_ms"])
    return fig


# --- 2. RSS ------------------------------------------------------------------------------------------------


def _feeds_yaml(
    sim: Sim, symbols: Sequence[str], tmp: Path, sink_path: str = "{venue}/{date}.jsonl", **settings: Any
) -> Path:
    """A real feeds.yaml for `feedrunner run`: bench/ccxt_stream's document, with a JSONL sink (under
    tmp/data) and an SQLite store in `tmp`, and any further top-level settings."""
    doc = bench_doc(
        sim.endpoints,
        symbols,
        sinks=[{"type": "jsonl", "path": f"{tmp}/data/{sink_path}"}],
        state_url=f"sqlite:///{tmp}/state.db",
    )
    doc["event_loop"] = FEEDRUNNER_LOOP
    doc.update(settings)
    path = tmp / "feeds.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _jsonl_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "data").rglob("*.jsonl")) if (tmp / "data").exists() else []


async def _sample_until(pid: int, seconds: float, samples: list[float]) -> float:
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        samples.append(round(rss_tree_mb(pid), 1))
        await asyncio.sleep(min(5.0, left))
    return rss_tree_mb(pid)


async def rss_feedrunner(sim: Sim, symbols: Sequence[str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="peer-feedrunner-run-"))
    log = tmp / "stderr.log"
    proc = None
    samples: list[float] = []
    try:
        with _open_log(log) as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "feedrunner.cli",
                "run",
                str(_feeds_yaml(sim, symbols, tmp)),
                cwd=tmp,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 120
        while not any(f.stat().st_size for f in _jsonl_files(tmp)):  # the sink flushes every flush_interval
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"feedrunner run delivered nothing (rc {proc.returncode}):\n{_tail(log)}")
            await asyncio.sleep(0.2)
        rss = await _sample_until(proc.pid, RSS_SECONDS, samples)
        await _end(proc)
        seen: set[str] = set()
        trades = 0
        for f in _jsonl_files(tmp):
            for line in f.read_bytes().splitlines():
                trades += 1
                seen.add(orjson.loads(line).get("symbol", ""))
        return {"rss_mb": rss, "samples": samples, "trades": trades, "symbols_seen": len(seen)}
    finally:
        if proc is not None:
            await _end(proc)
        shutil.rmtree(tmp, ignore_errors=True)


async def rss_cryptofeed(sim: Sim, symbols: Sequence[str]) -> dict[str, Any]:
    got: dict[str, Any] = {"samples": []}

    async def measure(proc: asyncio.subprocess.Process, line: str) -> None:
        got["rss_mb"] = await _sample_until(proc.pid, RSS_SECONDS, got["samples"])
        proc.terminate()  # the driver ends its recording on SIGTERM and still writes its output

    cfg = _endpoints_cfg(sim, symbols, warmup=0, seconds=RSS_SECONDS + 120, record=False)
    out = await run_driver("cryptofeed", cfg, {"receiving": measure})
    return {"rss_mb": got["rss_mb"], "samples": got["samples"], "trades": out["trades"]}


async def rss() -> dict[str, Any]:
    symbols = [f"R{i:03d}/USDT" for i in range(200)]
    rate = 10
    sim = Sim(symbols, rate, COARSE_TICK)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
    try:
        for _ in range(RUNS):
            runs["feedrunner"].append(await rss_feedrunner(sim, symbols))
            runs["cryptofeed"].append(await rss_cryptofeed(sim, symbols))
    finally:
        _close_sim(sim)
    fig: dict[str, Any] = {"symbols": len(symbols), "rate_per_symbol": rate, "seconds": RSS_SECONDS}
    for kind, rs in runs.items():
        fig[kind] = {
            "rss_mb": _med([r["rss_mb"] for r in rs], 1),
            "rss_mb_runs": [round(r["rss_mb"], 1) for r in rs],
            "samples_mb": rs[-1]["samples"],
            "trades_delivered_runs": [r["trades"] for r in rs],
        }
    fig["feedrunner"]["how"] = "python -m feedrunner.cli run feeds.yaml (jsonl sink, sqlite state, server on :0)"
    fig["feedrunner"]["symbols_seen_runs"] = [r["symbols_seen"] for r in runs["feedrunner"]]
    fig["cryptofeed"]["how"] = "bench/cryptofeed_driver.py, TRADES callback counting only"
    fig["ratio"] = _ratio(fig["feedrunner"]["rss_mb"], fig["cryptofeed"]["rss_mb"])
    return fig


# --- 3. clean drop -----------------------------------------------------------------------------------------


def drop_measures(out: dict[str, Any], sent: dict[str, dict[int, int]], n_symbols: int) -> dict[str, float]:
    """The longest pause between writes ending after the drop, and the steady state's before it; the time
    from the drop until every symbol has written a trade the simulator sent (or made) after it."""
    at = out["dropped_at_ns"]
    ts = sorted({t for _, _, t in out["written"]})
    pairs = list(itertools.pairwise(ts))
    steady = max((b - a for a, b in pairs if b < at), default=0)
    pause = max((b - a for a, b in pairs if b >= at), default=0)
    first_after: dict[str, int] = {}
    for symbol, tid, t in out["written"]:
        if symbol not in first_after and sent.get(symbol, {}).get(int(tid), 0) >= at:
            first_after[symbol] = t
    every = (max(first_after.values()) - at) / 1e9 if len(first_after) == n_symbols else float("nan")
    missing, dup = id_losses(out["written"])
    return {"pause_s": pause / 1e9, "steady_s": steady / 1e9, "every_symbol_s": every, "lost": missing, "dup": dup}


async def drop() -> dict[str, Any]:
    symbols = [f"D{i:02d}/USDT" for i in range(10)]
    total = 1_000
    sim = Sim(symbols, total / len(symbols), 0.001)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
    try:
        for _ in range(RUNS):
            for kind in SYSTEMS:
                cfg = _endpoints_cfg(
                    sim, symbols, warmup=DROP_WARMUP, seconds=2 * DROP_SPAN, drop_at=DROP_SPAN, stale_after="3s"
                )
                out = await run_driver(kind, cfg)
                m = drop_measures(out, await sim.sent(out["record_start_ns"]), len(symbols))
                m.update({f"driver_{k}": v for k, v in out["extra"].items() if isinstance(v, int)})
                runs[kind].append(m)
    finally:
        _close_sim(sim)
    fig: dict[str, Any] = {"symbols": len(symbols), "offered_per_s": total}
    for kind, rs in runs.items():
        fig[kind] = {
            "pause_ms": _med([r["pause_s"] * 1000 for r in rs], 1),
            "pause_ms_runs": [round(r["pause_s"] * 1000, 1) for r in rs],
            "steady_pause_ms": _med([r["steady_s"] * 1000 for r in rs], 1),
            "every_symbol_again_ms": _med([r["every_symbol_s"] * 1000 for r in rs], 1),
            "lost_trades": sum(r["lost"] for r in rs),
            "duplicates": sum(r["dup"] for r in rs),
        }
    fr = runs["feedrunner"]
    fig["feedrunner"]["sink_gaps"] = sum(r.get("driver_sink_gaps", 0) for r in fr)
    fig["feedrunner"]["trades_lost_total_metric"] = sum(r.get("driver_trades_lost_total", 0) for r in fr)
    fig["ratio_pause"] = _ratio(fig["feedrunner"]["pause_ms"], fig["cryptofeed"]["pause_ms"])
    return fig


# --- 4. flood ----------------------------------------------------------------------------------------------


async def _sim_get(sim: Sim, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.endpoints['rest']}{path}") as r:
        return await r.json()


async def _sim_rate(sim: Sim, rate: float) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{sim.endpoints['rest']}/_sim/rate", json={"rate": rate}):
        pass


def sent_rate(sent: dict[str, dict[int, int]], start_ns: int, end_ns: int) -> float:
    """Trades/s the simulator wrote over [start, end], from its per-trade send times. It keeps the last
    100,000 per symbol (5 s at 20k/s), so each symbol counts over the part of the window still held."""
    total = 0.0
    for times in sent.values():
        inside = [t for t in times.values() if start_ns <= t <= end_ns]
        if len(inside) > 1:
            total += len(inside) / max(1e-9, (max(inside) - min(inside)) / 1e9)
    return total


async def flood_at(total: int) -> dict[str, Any]:
    """Offered `total`/s; delivered/s over the window, and what the simulator actually sent then.

    /_sim/stats is no clock for the window: with the simulator's loop saturated its answers came 1-2 s
    late. So its tape is paused (rate 0) as soon as the window ends, which stops its send-time record
    rolling over, and the send rate is taken from those per-trade times; the rate is restored after.
    """
    symbols = [f"F{i}/USDT" for i in range(4)]
    per_symbol = total / len(symbols)
    sim = Sim(symbols, per_symbol, COARSE_TICK)
    runs: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in SYSTEMS}

    cpu: dict[str, float] = {}

    def cpu_now(proc: asyncio.subprocess.Process) -> float:
        t = psutil.Process(proc.pid).cpu_times()
        return t.user + t.system

    async def recording(proc: asyncio.subprocess.Process, line: str) -> None:
        cpu["start"] = cpu_now(proc)

    async def pause_tape(proc: asyncio.subprocess.Process, line: str) -> None:
        cpu["used"] = cpu_now(proc) - cpu.pop("start", float("nan"))
        await _sim_rate(sim, 0)

    try:
        for _ in range(RUNS):
            for kind in SYSTEMS:
                before = await _sim_get(sim, "/_sim/stats")
                cfg = _endpoints_cfg(sim, symbols, warmup=FLOOD_WARMUP, seconds=FLOOD_SECONDS, record=False)
                try:
                    out = await run_driver(kind, cfg, {"recording": recording, "recorded": pause_tape})
                    sent = await sim.sent(out["record_start_ns"])
                finally:
                    await _sim_rate(sim, per_symbol)
                after = await _sim_get(sim, "/_sim/stats")
                r = runs[kind]
                r["delivered"].append(_rate(out))
                r["cpu_us"].append(cpu.pop("used", float("nan")) / max(1, out["trades"]) * 1e6)
                r["sim_sent"].append(sent_rate(sent, out["record_start_ns"], out["record_end_ns"]))
                r["reconnects"].append(after["connections_total"] - before["connections_total"] - 1)
                r["slow_drops"].append(after["slow_consumer_disconnects"] - before["slow_consumer_disconnects"])
                await asyncio.sleep(1.0)  # the tape back at full rate before the next run connects
    finally:
        _close_sim(sim)
    fig: dict[str, Any] = {"offered_per_s": total, "symbols": len(symbols), "sim_tick_ms": COARSE_TICK * 1000}
    for kind, r in runs.items():
        fig[kind] = {
            "delivered_per_s": round(statistics.median(r["delivered"])),
            "delivered_per_s_runs": [round(v) for v in r["delivered"]],
            "sim_sent_per_s": round(statistics.median(r["sim_sent"])),
            "sim_sent_per_s_runs": [round(v) for v in r["sim_sent"]],
            "cpu_us_per_trade": _med(r["cpu_us"]),
            "cpu_us_per_trade_runs": [round(v, 2) for v in r["cpu_us"]],
            "reconnects": int(sum(r["reconnects"])),
            "sim_slow_consumer_disconnects": int(sum(r["slow_drops"])),
        }
    fig["ratio"] = _ratio(fig["feedrunner"]["delivered_per_s"], fig["cryptofeed"]["delivered_per_s"])
    fig["ratio_cpu_per_trade"] = _ratio(fig["feedrunner"]["cpu_us_per_trade"], fig["cryptofeed"]["cpu_us_per_trade"])
    return fig


# --- report ------------------------------------------------------------------------------------------------


def _row(label: str, fr: Any, cf: Any, ratio: Any = None) -> str:
    if ratio is None and isinstance(fr, int | float) and isinstance(cf, int | float) and cf:
        ratio = round(fr / cf, 3)
    return f"  {label:<44} {fr!s:>12} {cf!s:>12} {'' if ratio is None else ratio!s:>8}"


def table(fig: dict[str, Any]) -> str:
    lines = [_row(f"(medians of {fig['runs']})", "feedrunner", "cryptofeed", "fr/cf")]
    for rate, v in fig.get("latency", {}).items():
        fr, cf = v["feedrunner"], v["cryptofeed"]
        lines.append(_row(f"latency {rate}/s, 5 sym, tick 1ms: p50 ms", fr["p50_ms"], cf["p50_ms"]))
        lines.append(_row(f"latency {rate}/s: p99 ms", fr["p99_ms"], cf["p99_ms"]))
        lines.append(_row(f"latency {rate}/s: delivered /s", fr["delivered_per_s"], cf["delivered_per_s"]))
        lines.append(_row(f"latency {rate}/s: lost (all runs)", fr["lost_trades"], cf["lost_trades"], "-"))
    if "rss" in fig:
        v = fig["rss"]
        lines.append(
            _row(
                f"RSS MB, 200 sym x 10/s after {v['seconds']:g}s", v["feedrunner"]["rss_mb"], v["cryptofeed"]["rss_mb"]
            )
        )
        fr_t, cf_t = v["feedrunner"]["trades_delivered_runs"], v["cryptofeed"]["trades_delivered_runs"]
        lines.append(
            _row(
                "  trades delivered in the RSS run (sanity)", int(statistics.median(fr_t)), int(statistics.median(cf_t))
            )
        )
    if "drop" in fig:
        fr, cf = fig["drop"]["feedrunner"], fig["drop"]["cryptofeed"]
        lines.append(_row("clean drop, 10 sym 1k/s: longest pause ms", fr["pause_ms"], cf["pause_ms"]))
        lines.append(_row("  steady-state longest pause ms", fr["steady_pause_ms"], cf["steady_pause_ms"]))
        lines.append(_row("  every symbol past the drop ms", fr["every_symbol_again_ms"], cf["every_symbol_again_ms"]))
        lines.append(_row("  trades lost (all runs)", fr["lost_trades"], cf["lost_trades"], "-"))
    for rate, v in fig.get("flood", {}).items():
        fr, cf = v["feedrunner"], v["cryptofeed"]
        lines.append(
            _row(
                f"flood {int(rate) // 1000}k/s offered, 4 sym: delivered /s",
                fr["delivered_per_s"],
                cf["delivered_per_s"],
            )
        )
        lines.append(_row("  simulator actually sent /s", fr["sim_sent_per_s"], cf["sim_sent_per_s"], "-"))
        if "cpu_us_per_trade" in fr:
            lines.append(_row("  CPU µs per trade delivered", fr["cpu_us_per_trade"], cf["cpu_us_per_trade"]))
    return "\n".join(lines)


def _wanted(name: str) -> bool:
    return not ONLY or name in ONLY


def cryptofeed_version(python: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('cryptofeed'))"
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


async def amain(cf_version: str) -> dict[str, Any]:
    t0 = time.monotonic()
    figures: dict[str, Any] = {"runs": RUNS, "cryptofeed_version": cf_version, "workarounds": WORKAROUNDS}
    if _wanted("latency"):
        figures["latency"] = {str(total): await latency_at(total) for total in (1_000, 5_000)}
    if _wanted("drop"):
        figures["drop"] = await drop()
    if _wanted("flood"):
        figures["flood"] = {str(total): await flood_at(total) for total in (20_000, 40_000, 80_000)}
    if _wanted("rss"):
        figures["rss"] = await rss()
    figures["wall_seconds"] = round(time.monotonic() - t0)
    record("peer_cryptofeed", figures)
    print(f"feedrunner vs cryptofeed {cf_version}, the same Binance simulator (ratio < 1: feedrunner lower)")
    print(table(figures))
    print(f"({figures['wall_seconds']} s)")
    return figures


def main() -> dict[str, Any]:
    return asyncio.run(amain(cryptofeed_version(ensure_venv())))


if __name__ == "__main__":
    main()
