"""Scale-out: `feedrunner run --workers 2` against one process on the same machine, and leader failover
between the shards of one deployment on PostgreSQL.

Every run is a real `feedrunner run` process (a supervisor and its workers with --workers 2, a single
runner with --workers 1) against the Binance simulator in a process of its own, with a fresh SQLite store
and a JSONL sink per run (`{shard}` in its path, so each worker writes its own files).

Figures:
1. flood: 16 symbols, 8 in each worker's share (the first 8 names of each share under the rendezvous
   hash, so the offered load splits evenly), offered at each of BENCH_SCALE_FLOOD_RATES (40k and 80k
   trades/s, both above what one process delivers; simulator tick 5 ms). Delivered: trades whose
   `ts_received` falls in a BENCH_FLOOD_SECONDS (8) window after a 3 s warmup, counted in the sink files
   after the run; sent: what the simulator wrote over the same window, from its per-trade send times
   (bench/peer_cryptofeed.sent_rate). CPU (cores) of the simulator, the supervisor, each worker and the
   whole machine over the window, from psutil, and from those the CPU a trade costs the simulator and
   the workers. Medians of BENCH_RUNS (3), 1 and 2 workers alternating; ratio 2 workers / 1 worker,
   also per core the workers used.
2. 1,000 symbols at 5k trades/s in all (5/s each, tick 1 ms), 1 and 2 workers, one run each for
   memory and one for latency. Memory: RSS of the supervisor, of each worker and of the whole tree after
   BENCH_SCALE_RSS_SECONDS (60) of streaming, the product as shipped. Latency: from the simulator's send
   of a trade's frame to the sink's write of it, p50 / p99, over BENCH_SCALE_LATENCY_SECONDS (20) after a
   3 s warmup (alongside: p99 of each third of it, and send -> the adapter's `ts_received`). For those
   runs a sitecustomize on PYTHONPATH makes the `jsonl` sink type of every process of the tree
   TimedJsonlSink: the real JSONL sink that also appends (symbol, trade id, time.time_ns()) of each trade
   to a file of its own.
3. leader failover: three shards (`feedrunner run`, SHARD_INDEX 0-2, `shard: {count: 3}`) on one
   throwaway PostgreSQL (initdb + pg_ctl, as tests/servers.py starts it) and one simulator,
   `coordination: {lease: 3s, poll: 250ms}`, a rollout held in its first phase by a 1 h dwell. The leader
   is killed with SIGKILL; the survivors' /status are read every 25 ms until one of them leads with a
   `rollout.last_evaluated` after the kill. Figure: last_evaluated - kill time (and when the poll saw
   it), with the phase and entered_at checked against the killed leader's. The killed shard is started
   again (as a standby) before the next of BENCH_RUNS failovers.

BENCH_SCALE_ONLY=flood,wide,failover runs a subset.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

from bench.ccxt_stream import COARSE_TICK, FLOOD_SECONDS, LATENCY_TICK, RUNS, Sim, bench_doc, latencies, pct
from bench.peer_cryptofeed import (
    _close_sim,
    _end,
    _feeds_yaml,
    _open_log,
    _tail,
    id_losses,
    rss_tree_mb,
    sent_rate,
)
from bench.results import record
from feedrunner.events import Event, Trade
from feedrunner.sharding import owner
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.spec import Sink as SinkSpec

ROOT = Path(__file__).resolve().parent.parent
FLOOD_RATES = [int(r) for r in os.environ.get("BENCH_SCALE_FLOOD_RATES", "40000,80000").split(",") if r]
FLOOD_WARMUP = 3.0
FLOOD_PER_WORKER = 8  # symbols in each worker's share
WIDE_SYMBOLS = 1000
WIDE_RATE = 5000  # trades/s over all symbols
WIDE_WARMUP = 3.0
RSS_SECONDS = float(os.environ.get("BENCH_SCALE_RSS_SECONDS", 60))
WIDE_LATENCY_SECONDS = float(os.environ.get("BENCH_SCALE_LATENCY_SECONDS", 20))
LEASE, POLL = "3s", "250ms"
STATUS_EVERY = 0.025  # seconds between reads of the survivors' /status after the kill
FAILOVER_DWELL = "1h"
ONLY = {s for s in os.environ.get("BENCH_SCALE_ONLY", "").split(",") if s}
CONTROL = re.compile(r"INFO\s+control server on (http://127\.0\.0\.1:\d+)")  # a worker's lines say [shard i/n]
TS_RECEIVED = re.compile(rb'"ts_received":(\d+)')
TIMED_DIR = "BENCH_TIMED_DIR"
SITECUSTOMIZE = '''\
"""bench/scale_out.py: the jsonl sink type of this process is bench.scale_out.TimedJsonlSink."""
import importlib.abc
import importlib.util
import sys


class _TimedJsonl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "feedrunner.sinks":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module._CLASSES["jsonl"] = "bench.scale_out:TimedJsonlSink"

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _TimedJsonl())
'''


class TimedJsonlSink(JsonlSink):
    """The real JSONL sink; it also appends `symbol trade-id write-ns` of each trade it writes to a file
    of its own in $BENCH_TIMED_DIR, as bench/ccxt_stream.LatencySink notes them (one clock read a batch)."""

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        where = Path(os.environ[TIMED_DIR])
        where.mkdir(parents=True, exist_ok=True)
        self._notes = open(where / f"written-{os.getpid()}-{id(self)}.txt", "a", buffering=1 << 16)

    def write(self, events: Sequence[Event]) -> int:
        n = super().write(events)
        now = time.time_ns()
        self._notes.write("".join(f"{e.symbol} {e.id} {now}\n" for e in events if isinstance(e, Trade)))
        return n

    def flush(self) -> None:
        super().flush()
        self._notes.flush()

    def close(self) -> None:  # also reopen(): the notes file stays open, flushed
        super().close()
        self._notes.flush()


def read_notes(directory: Path) -> list[tuple[str, int, int]]:
    out = []
    for f in sorted(directory.glob("written-*.txt")):
        for line in f.read_text().splitlines():
            symbol, tid, at = line.split(" ")
            out.append((symbol, int(tid), int(at)))
    return out


# --- processes ---------------------------------------------------------------------------------------------


class FeedProc:
    """One `feedrunner run` process (with --workers N > 1, a supervisor and its workers), logging to a file
    in its directory; `url` is its control address."""

    def __init__(self, cwd: Path, workers: int | None = None, env: dict[str, str] | None = None, log: str = "run.log"):
        self.cwd, self.workers, self.env = cwd, workers, env or {}
        self.log = cwd / log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self, timeout: float = 60) -> FeedProc:
        argv = [sys.executable, "-m", "feedrunner.cli", "run", "feeds.yaml"]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        with _open_log(self.log) as err:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while not (m := CONTROL.search(self.log.read_text(errors="replace"))):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"feedrunner run did not start (rc {self.proc.returncode}):\n{_tail(self.log)}")
            await asyncio.sleep(0.1)
        self.url = m.group(1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def status(self, http: aiohttp.ClientSession, timeout: float = 10) -> dict[str, Any]:
        async with http.get(self.url + "/status", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return await r.json()

    def processes(self, status: dict[str, Any]) -> dict[str, int]:
        """name -> pid: "supervisor" and "worker i" from the supervisor's /status, or the runner alone."""
        workers = status.get("workers")
        if not workers:
            return {"worker 0": self.pid}
        return {"supervisor": self.pid, **{f"worker {w['index']}": w["pid"] for w in workers}}

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None:
            await _end(self.proc)


async def until(pred: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            got = await pred()
            if got:
                return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


async def streaming(run: FeedProc, http: aiohttp.ClientSession, symbols: int, timeout: float = 120) -> dict:
    """Wait until every symbol has delivered; the status then."""

    async def every_symbol() -> dict[str, Any] | None:
        st = await run.status(http)
        rows = st.get("venues", {}).get("binance", {}).get("symbols", {})
        return st if len(rows) == symbols and all(r.get("events") for r in rows.values()) else None

    try:
        return await until(every_symbol, timeout, "every symbol streaming", every=0.5)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}:\n{_tail(run.log)}") from None


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process, of this one ("bench") and of the whole machine (busy time)."""
    out = {}
    for name, pid in {**pids, "bench": os.getpid()}.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
    m = psutil.cpu_times()
    out["machine"] = m.user + m.nice + m.system + m.irq + m.softirq + m.steal
    return out


def cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used over the window by each process; "others": by the rest of the machine."""
    out = {k: (after[k] - before[k]) / seconds for k in after if k in before}
    out["others"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
    return {k: round(v, 2) for k, v in out.items()}


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    return out


def _med(values: Sequence[float], digits: int = 0) -> float:
    return round(statistics.median(values), digits) if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _label(n: int) -> str:
    return "1_worker" if n == 1 else f"{n}_workers"


async def _sim_post(sim: Sim, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{sim.endpoints['rest']}{path}", json=body) as r:
        r.raise_for_status()


async def _sim_stats(sim: Sim) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.endpoints['rest']}/_sim/stats") as r:
        return await r.json()


def feeds_yaml(tmp: Path, sim: Sim, symbols: Sequence[str], workers: int) -> None:
    _feeds_yaml(sim, symbols, tmp, "{shard}/{symbol}.jsonl", workers=workers)


def delivered_between(directory: Path, start_ns: int, end_ns: int) -> int:
    """Records in the JSONL files under `directory` received in [start, end]."""
    n = 0
    for f in directory.rglob("*.jsonl"):
        if not f.stat().st_size:
            continue
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            n += sum(1 for m in TS_RECEIVED.finditer(data) if start_ns <= int(m.group(1)) <= end_ns)
    return n


def received_latencies(directory: Path, start_ns: int, end_ns: int, sent: dict[str, dict[int, int]]) -> list[int]:
    """Simulator send -> the adapter's `ts_received`, of the records in the JSONL files received in [start, end]."""
    out = []
    for f in directory.rglob("*.jsonl"):
        for line in f.read_bytes().splitlines():
            r = orjson.loads(line)
            if start_ns <= r["ts_received"] <= end_ns and r.get("id") is not None:
                t0 = sent.get(r["symbol"], {}).get(int(r["id"]))
                if t0 is not None:
                    out.append(r["ts_received"] - t0)
    return out


# --- 1. flood ----------------------------------------------------------------------------------------------


def flood_symbols() -> list[str]:
    """FLOOD_PER_WORKER symbols of each of two shares: the first names the rendezvous hash gives each."""
    shares: dict[int, list[str]] = {0: [], 1: []}
    i = 0
    while any(len(s) < FLOOD_PER_WORKER for s in shares.values()):
        name = f"F{i:02d}/USDT"
        share = shares[owner(f"binance/{name}", 2)]
        if len(share) < FLOOD_PER_WORKER:
            share.append(name)
        i += 1
    return sorted(shares[0] + shares[1])


async def flood_once(sim: Sim, symbols: Sequence[str], workers: int, per_symbol: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="scale-flood-"))
    feeds_yaml(tmp, sim, symbols, workers)
    run = FeedProc(tmp, workers)
    try:
        before_stats = await _sim_stats(sim)
        await run.start()
        async with aiohttp.ClientSession() as http:
            st = await streaming(run, http, len(symbols), timeout=90)
            pids = {"simulator": sim.proc.pid, **run.processes(st)}
            await asyncio.sleep(FLOOD_WARMUP)
            cpu0, t0, start_ns = cpu_seconds(pids), time.monotonic(), time.time_ns()
            await asyncio.sleep(FLOOD_SECONDS)
            cpu1, t1, end_ns = cpu_seconds(pids), time.monotonic(), time.time_ns()
        try:
            await _sim_post(sim, "/_sim/rate", {"rate": 0})  # the send-time record stops rolling over
            sent = await sim.sent(start_ns)
        finally:
            await run.stop()
            await _sim_post(sim, "/_sim/rate", {"rate": per_symbol})
        after_stats = await _sim_stats(sim)
        shards = sorted(p for p in (tmp / "data").iterdir() if p.is_dir())
        per_worker = [delivered_between(p, start_ns, end_ns) / ((end_ns - start_ns) / 1e9) for p in shards]
        await asyncio.sleep(1.0)  # the tape back at full rate before the next run connects
        return {
            "delivered": sum(per_worker),
            "per_worker": per_worker,
            "sent": sent_rate(sent, start_ns, end_ns),
            "cores": cores(cpu0, cpu1, t1 - t0),
            "connections": after_stats["connections_total"] - before_stats["connections_total"],
            "slow_drops": after_stats["slow_consumer_disconnects"] - before_stats["slow_consumer_disconnects"],
        }
    finally:
        await run.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _cores_median(rs: Sequence[dict[str, Any]]) -> dict[str, float]:
    names = sorted({k for r in rs for k in r["cores"]})
    return {k: _med([r["cores"][k] for r in rs if k in r["cores"]], 2) for k in names}


def _worker_cores(c: dict[str, float]) -> float:
    return sum(v for k, v in c.items() if k.startswith("worker ") or k == "supervisor")


def flood_note(fig: dict[str, Any]) -> str:
    one, two = fig["1_worker"], fig["2_workers"]
    offered, busy, n = fig["offered_per_s"], two["cores"].get("machine", 0.0), os.cpu_count() or 1
    notes = []
    if two["sim_sent_per_s"] < 0.95 * offered and two["delivered_per_s"] >= 0.95 * two["sim_sent_per_s"]:
        notes.append(
            f"the simulator, not feedrunner, limited the 2-worker figure: it sent {two['sim_sent_per_s']}/s of "
            f"{offered}/s offered and the workers delivered {two['delivered_per_s'] / two['sim_sent_per_s']:.0%} "
            "of that, so the ratio is a lower bound"
        )
    elif two["delivered_per_s"] < 0.95 * two["sim_sent_per_s"]:
        notes.append(
            f"2 workers delivered {two['delivered_per_s'] / max(1, two['sim_sent_per_s']):.0%} of what the "
            "simulator sent"
        )
    if one["delivered_per_s"] >= 0.95 * one["sim_sent_per_s"]:
        notes.append("1 worker kept up with the simulator: the offered rate did not saturate it")
    if busy >= 0.9 * n:
        notes.append(
            f"all {n} cores were busy with 2 workers (simulator {two['cores'].get('simulator')}, workers "
            f"{round(_worker_cores(two['cores']), 2)} cores): at the CPU each trade cost (simulator "
            f"{fig['sim_us_per_trade']} us, workers {fig['workers_us_per_trade']} us) {n} cores carry about "
            f"{fig['est_machine_ceiling_per_s']}/s with the simulator on them, however many workers"
        )
    others = max(one["cores"].get("others", 0.0), two["cores"].get("others", 0.0))
    if others > 0.2:
        notes.append(f"other processes used up to {others} cores during the windows: figures understated")
    return "; ".join(notes)


async def flood_at(total: int, symbols: Sequence[str]) -> dict[str, Any]:
    per_symbol = total / len(symbols)
    sim = Sim(symbols, per_symbol, COARSE_TICK)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    try:
        for _ in range(RUNS):
            for workers in (1, 2):
                runs[workers].append(await flood_once(sim, symbols, workers, per_symbol))
    finally:
        _close_sim(sim)
    fig: dict[str, Any] = {"offered_per_s": total, "symbols": len(symbols), "sim_tick_ms": COARSE_TICK * 1000}
    for workers, rs in runs.items():
        per_core = [r["delivered"] / max(1e-9, _worker_cores(r["cores"])) for r in rs]
        fig[_label(workers)] = {
            "delivered_per_s": round(_med([r["delivered"] for r in rs])),
            "delivered_per_s_runs": [round(r["delivered"]) for r in rs],
            "delivered_per_s_per_worker": [round(_med(v)) for v in zip(*(r["per_worker"] for r in rs), strict=True)],
            "delivered_per_worker_core": round(_med(per_core)),
            "sim_sent_per_s": round(_med([r["sent"] for r in rs])),
            "sim_sent_per_s_runs": [round(r["sent"]) for r in rs],
            "cores": _cores_median(rs),
            "ws_connections_runs": [r["connections"] for r in rs],
            "sim_slow_consumer_disconnects": sum(r["slow_drops"] for r in rs),
        }
    one, two = fig["1_worker"], fig["2_workers"]
    fig["ratio"] = _ratio(two["delivered_per_s"], one["delivered_per_s"])
    fig["target_ratio"] = 1.7
    fig["ratio_per_worker_core"] = _ratio(two["delivered_per_worker_core"], one["delivered_per_worker_core"])
    # CPU a trade costs, from the 2-worker runs: the simulator's per trade sent, the workers' per trade delivered
    sim_s = _med([r["cores"].get("simulator", 0.0) / max(1.0, r["sent"]) for r in runs[2]], 9)
    work_s = _med([_worker_cores(r["cores"]) / max(1.0, r["delivered"]) for r in runs[2]], 9)
    fig["sim_us_per_trade"] = round(sim_s * 1e6, 1)
    fig["workers_us_per_trade"] = round(work_s * 1e6, 1)
    fig["est_machine_ceiling_per_s"] = round((os.cpu_count() or 1) / (sim_s + work_s)) if sim_s + work_s else None
    fig["note"] = flood_note(fig)
    return fig


async def flood() -> dict[str, Any]:
    symbols = flood_symbols()
    return {str(total): await flood_at(total, symbols) for total in FLOOD_RATES}


# --- 2. 1,000 symbols: RSS and latency ---------------------------------------------------------------------


async def wide_rss(sim: Sim, symbols: Sequence[str], workers: int) -> dict[str, Any]:
    """The product as shipped (plain JSONL sink): RSS after RSS_SECONDS of streaming."""
    tmp = Path(tempfile.mkdtemp(prefix="scale-rss-"))
    feeds_yaml(tmp, sim, symbols, workers)
    run = FeedProc(tmp, workers)
    samples: list[float] = []
    try:
        await run.start()
        async with aiohttp.ClientSession() as http:
            st = await streaming(run, http, len(symbols))
            pids = {"simulator": sim.proc.pid, **run.processes(st)}
            t_stream = time.monotonic()
            cpu0 = cpu_seconds(pids)
            while (left := RSS_SECONDS - (time.monotonic() - t_stream)) > 0:
                samples.append(round(rss_tree_mb(run.pid), 1))
                await asyncio.sleep(min(5.0, left))
            cpu1, t1 = cpu_seconds(pids), time.monotonic()
            rss = rss_mb({k: v for k, v in pids.items() if k != "simulator"})
            total = rss_tree_mb(run.pid)
        served = [r.get("worker", 0) for r in st["venues"]["binance"]["symbols"].values()]
        return {
            "symbols_per_worker": [served.count(i) for i in range(workers)],
            "rss_mb_total": round(total, 1),
            "rss_mb": rss,
            "rss_mb_samples": samples,
            "seconds_streaming": RSS_SECONDS,
            "cores": cores(cpu0, cpu1, t1 - t_stream),
        }
    finally:
        await run.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def wide_latency(sim: Sim, symbols: Sequence[str], workers: int) -> dict[str, Any]:
    """Every sink of the tree a TimedJsonlSink: send -> sink write over WIDE_LATENCY_SECONDS."""
    tmp = Path(tempfile.mkdtemp(prefix="scale-latency-"))
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    feeds_yaml(tmp, sim, symbols, workers)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), TIMED_DIR: str(tmp / "timed")}
    run = FeedProc(tmp, workers, env)
    try:
        await run.start()
        async with aiohttp.ClientSession() as http:
            await streaming(run, http, len(symbols))
        await asyncio.sleep(WIDE_WARMUP)
        start_ns = time.time_ns()
        await asyncio.sleep(WIDE_LATENCY_SECONDS)
        end_ns = time.time_ns()
        sent = await sim.sent(start_ns - 2_000_000_000)
        await run.stop()
        written = [w for w in read_notes(tmp / "timed") if start_ns <= w[2] <= end_ns]
        lat = latencies(written, sent)
        received = received_latencies(tmp / "data", start_ns, end_ns, sent)
        cuts = [start_ns + k * (end_ns - start_ns) // 3 for k in range(4)]
        thirds = [latencies([w for w in written if cuts[k] <= w[2] < cuts[k + 1]], sent) for k in range(3)]
        missing, dup = id_losses(written) if written else (0, 0)
        return {
            "latency_seconds": WIDE_LATENCY_SECONDS,
            "p50_ms": round(pct(lat, 0.50), 2),
            "p99_ms": round(pct(lat, 0.99), 2),
            "p99_ms_thirds": [round(pct(part, 0.99), 2) for part in thirds],
            "received_p50_ms": round(pct(received, 0.50), 2),
            "received_p99_ms": round(pct(received, 0.99), 2),
            "latency_samples": len(lat),
            "matched_to_send_time": round(len(lat) / max(1, len(written)), 4),
            "delivered_per_s": round(len(written) / ((end_ns - start_ns) / 1e9)),
            "lost_trades": missing,
            "duplicates": dup,
        }
    finally:
        await run.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def wide() -> dict[str, Any]:
    symbols = [f"W{i:04d}/USDT" for i in range(WIDE_SYMBOLS)]
    sim = Sim(symbols, WIDE_RATE / len(symbols), LATENCY_TICK)
    fig: dict[str, Any] = {"symbols": len(symbols), "offered_per_s": WIDE_RATE, "sim_tick_ms": LATENCY_TICK * 1000}
    try:
        for workers in (1, 2):
            fig[_label(workers)] = await wide_rss(sim, symbols, workers)
        for workers in (1, 2):
            fig[_label(workers)].update(await wide_latency(sim, symbols, workers))
    finally:
        _close_sim(sim)
    one, two = fig["1_worker"], fig["2_workers"]
    fig["ratio_rss_total"] = _ratio(two["rss_mb_total"], one["rss_mb_total"])
    fig["ratio_p99"] = _ratio(two["p99_ms"], one["p99_ms"])
    return fig


# --- 3. leader failover ------------------------------------------------------------------------------------

FAILOVER_SYMBOLS = [f"S{i:02d}/USDT" for i in range(12)]


def failover_doc(endpoints: dict[str, str], phase_one: Sequence[str], out: Path, url: str) -> dict[str, Any]:
    """bench_doc with three shards on PostgreSQL and a rollout whose first phase outlasts the run."""
    doc = bench_doc(
        endpoints,
        FAILOVER_SYMBOLS,
        sinks=[{"type": "jsonl", "path": f"{out}/{{shard}}/{{symbol}}.jsonl", "flush_interval": "200ms"}],
        stale_after="5s",
        state_url=url,
    )
    doc["venues"]["binance"]["poll_interval"] = "200ms"
    doc.update(
        shard={"index": "${SHARD_INDEX}", "count": 3},
        coordination={"lease": LEASE, "poll": POLL},
        rollout={
            "baseline": "polling",
            "target": "websocket",
            "phases": [
                {"name": "one", "symbols": [f"binance:{s}" for s in phase_one], "dwell": FAILOVER_DWELL},
                {"name": "all", "symbols": "all"},
            ],
            "gates": [{"metric": "error_rate", "below": "50%", "window": "1s"}],
        },
        health={"interval": "250ms"},
    )
    return doc


def postgres() -> contextlib.AbstractContextManager[str]:
    """The tests' throwaway PostgreSQL cluster (initdb + pg_ctl on a free port), as a context manager."""
    sys.path.insert(0, str(ROOT / "tests"))
    import servers

    return contextlib.contextmanager(servers.postgres)()


async def _statuses(shards: dict[int, FeedProc], http: aiohttp.ClientSession) -> dict[int, dict[str, Any]]:
    got = await asyncio.gather(*(s.status(http, timeout=2) for s in shards.values()), return_exceptions=True)
    return {i: st for i, st in zip(shards, got, strict=True) if isinstance(st, dict)}


async def _start_shard(tmp: Path, index: int, n: int) -> FeedProc:
    return await FeedProc(tmp, env={"SHARD_INDEX": str(index)}, log=f"shard{index}-{n}.log").start()


async def failover_once(tmp: Path, shards: dict[int, FeedProc], http: aiohttp.ClientSession, n: int) -> dict[str, Any]:
    async def settled() -> tuple[int, dict[str, Any]] | None:
        """One leader in phase one, every shard following it there."""
        sts = await _statuses(shards, http)
        leading = [i for i, st in sts.items() if st["leader"]]
        if len(sts) != len(shards) or len(leading) != 1:
            return None
        if any(st["rollout"]["phase"] != "one" or st["rollout"]["state"] != "progressing" for st in sts.values()):
            return None
        return leading[0], sts[leading[0]]["rollout"]

    first, before = await until(settled, 60, "one leader, every shard in phase one")
    survivors = {i: s for i, s in shards.items() if i != first}
    killed_at = time.time()
    shards[first].kill()

    async def new_leader() -> tuple[int, dict[str, Any]] | None:
        for i, st in (await _statuses(survivors, http)).items():
            if st["leader"] and (st["rollout"]["last_evaluated"] or 0) > killed_at:
                return i, st["rollout"]
        return None

    second, after = await until(new_leader, 30, "a standby to lead", every=STATUS_EVERY)
    seen = time.time() - killed_at
    await shards[first].stop()  # reaped
    shards[first] = await _start_shard(tmp, first, n + 1)  # back, as a standby
    return {
        "killed_shard": first,
        "new_leader_shard": second,
        "took_s": after["last_evaluated"] - killed_at,
        "seen_s": seen,
        "same_phase": after["phase"] == before["phase"],
        "same_entered_at": after["entered_at"] == before["entered_at"],
    }


async def failover() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="scale-failover-"))
    sim = Sim(FAILOVER_SYMBOLS, 10, COARSE_TICK)
    shards: dict[int, FeedProc] = {}
    runs: list[dict[str, Any]] = []
    try:
        with postgres() as url:
            phase_one = [next(s for s in FAILOVER_SYMBOLS if owner(f"binance/{s}", 3) == i) for i in range(3)]
            doc = failover_doc(sim.endpoints, phase_one, tmp / "out", url)
            (tmp / "feeds.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            try:
                for i in range(3):  # one after the other, as an operator's StatefulSet starts them
                    shards[i] = await _start_shard(tmp, i, 0)
                async with aiohttp.ClientSession() as http:
                    for n in range(RUNS):
                        runs.append(await failover_once(tmp, shards, http, n))
            finally:
                await asyncio.gather(*(s.stop() for s in shards.values()))
    finally:
        _close_sim(sim)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "shards": 3,
        "lease": LEASE,
        "poll": POLL,
        "status_poll_ms": STATUS_EVERY * 1000,
        "dwell": FAILOVER_DWELL,
        "takeover_ms": _med([r["took_s"] * 1000 for r in runs], 1),
        "takeover_ms_runs": [round(r["took_s"] * 1000, 1) for r in runs],
        "seen_ms": _med([r["seen_s"] * 1000 for r in runs], 1),
        "seen_ms_runs": [round(r["seen_s"] * 1000, 1) for r in runs],
        "same_phase": all(r["same_phase"] for r in runs),
        "same_entered_at": all(r["same_entered_at"] for r in runs),
        "killed_then_leading": [[r["killed_shard"], r["new_leader_shard"]] for r in runs],
    }


# --- report ------------------------------------------------------------------------------------------------


def _row(label: str, one: Any, two: Any, ratio: Any = None) -> str:
    if ratio is None and isinstance(one, int | float) and isinstance(two, int | float) and one:
        ratio = round(two / one, 3)
    return f"  {label:<46} {one!s:>12} {two!s:>12} {'' if ratio is None else ratio!s:>8}"


def _cores_text(c: dict[str, float]) -> str:
    parts = [f"sim {c.get('simulator', '-')}"]
    if "supervisor" in c:
        parts.append(f"sup {c['supervisor']}")
    parts += [f"w{k.split()[1]} {v}" for k, v in sorted(c.items()) if k.startswith("worker ")]
    parts.append(f"bench {c.get('bench', '-')}, others {c.get('others', '-')}, machine {c.get('machine', '-')}")
    return ", ".join(parts)


def _s(values: Sequence[Any]) -> str:
    return "/".join(map(str, values))


def table(fig: dict[str, Any]) -> str:
    lines = [_row(f"(flood, failover: medians of {fig['runs']} runs)", "1 worker", "2 workers", "2w/1w")]
    for rate, v in fig.get("flood", {}).items():
        one, two = v["1_worker"], v["2_workers"]
        head = f"flood {int(rate) // 1000}k/s offered, {v['symbols']} sym: delivered /s"
        lines.append(_row(head, one["delivered_per_s"], two["delivered_per_s"]))
        lines.append(_row("  per worker /s", "", _s(two["delivered_per_s_per_worker"]), "-"))
        lines.append(_row("  simulator actually sent /s", one["sim_sent_per_s"], two["sim_sent_per_s"], "-"))
        per_core = (one["delivered_per_worker_core"], two["delivered_per_worker_core"])
        lines.append(_row("  delivered /s per core the workers used", *per_core))
        drops = [_s([max(r["ws_connections_runs"]), r["sim_slow_consumer_disconnects"]]) for r in (one, two)]
        lines.append(_row("  websockets a run (max) / slow-consumer drops", *drops, "-"))
        lines.append(f"    cores, 1 worker : {_cores_text(one['cores'])}")
        lines.append(f"    cores, 2 workers: {_cores_text(two['cores'])}")
        if v["note"]:
            lines.append(f"    note: {v['note']}")
    if "wide" in fig:
        v = fig["wide"]
        one, two = v["1_worker"], v["2_workers"]
        head = f"{v['symbols']} sym, {v['offered_per_s']}/s: RSS MB after {one['seconds_streaming']:g}s"
        lines.append(_row(head, one["rss_mb_total"], two["rss_mb_total"]))
        per = _s([mb for k, mb in sorted(two["rss_mb"].items()) if k.startswith("worker ")])
        lines.append(_row("  RSS MB per worker", one["rss_mb"].get("worker 0"), per, "-"))
        lines.append(_row("  RSS MB supervisor", "-", two["rss_mb"].get("supervisor"), "-"))
        lines.append(_row("  symbols per worker", _s(one["symbols_per_worker"]), _s(two["symbols_per_worker"]), "-"))
        lines.append(f"    cores over the RSS run, 1 worker : {_cores_text(one['cores'])}")
        lines.append(f"    cores over the RSS run, 2 workers: {_cores_text(two['cores'])}")
        head = f"  latency over {one['latency_seconds']:g}s: send -> sink write p50 ms"
        lines.append(_row(head, one["p50_ms"], two["p50_ms"]))
        lines.append(_row("  latency p99 ms", one["p99_ms"], two["p99_ms"]))
        lines.append(_row("  of which send -> adapter receipt p50 ms", one["received_p50_ms"], two["received_p50_ms"]))
        lines.append(_row("  send -> adapter receipt p99 ms", one["received_p99_ms"], two["received_p99_ms"]))
        lines.append(_row("  p99 ms per third of the run", _s(one["p99_ms_thirds"]), _s(two["p99_ms_thirds"]), "-"))
        lines.append(_row("  delivered /s", one["delivered_per_s"], two["delivered_per_s"]))
        lost = [_s([r["lost_trades"], r["duplicates"]]) for r in (one, two)]
        lines.append(_row("  lost / duplicates", *lost, "-"))
    if "failover" in fig:
        v = fig["failover"]
        lines.append(
            f"  leader failover, 3 shards on PostgreSQL (lease {v['lease']}, poll {v['poll']}), median of "
            f"{len(v['takeover_ms_runs'])}: kill -9 -> new leader's first evaluation {v['takeover_ms']} ms "
            f"(runs {v['takeover_ms_runs']}); seen on /status after {v['seen_ms']} ms; "
            f"same phase {v['same_phase']}, same entered_at {v['same_entered_at']}"
        )
    return "\n".join(lines)


def _wanted(name: str) -> bool:
    return not ONLY or name in ONLY


async def amain() -> dict[str, Any]:
    t0 = time.monotonic()
    figures: dict[str, Any] = {"runs": RUNS, "cores": os.cpu_count(), "flood_seconds": FLOOD_SECONDS}
    figures["machine_busy_percent_before"] = await asyncio.to_thread(psutil.cpu_percent, 2.0)
    if _wanted("failover"):
        figures["failover"] = await failover()
    if _wanted("wide"):
        figures["wide"] = await wide()
    if _wanted("flood"):
        figures["flood"] = await flood()
    figures["wall_seconds"] = round(time.monotonic() - t0)
    record("scale_out", figures)
    print(
        f"feedrunner run --workers 2 vs 1 worker on {os.cpu_count()} cores (machine "
        f"{figures['machine_busy_percent_before']}% busy before); leader failover between shards"
    )
    print(table(figures))
    print(f"({figures['wall_seconds']} s)")
    return figures


def main() -> dict[str, Any]:
    return asyncio.run(amain())


if __name__ == "__main__":
    main()
