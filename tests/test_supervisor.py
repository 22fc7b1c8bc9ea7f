"""`feedrunner run --workers N`: the supervisor, its workers and the one control address in front of them.

End to end with real processes on loopback (an external Binance simulator, a supervisor, its workers):
every trade reaches exactly one worker's files, a worker killed with -9 is restarted and resumes from
its checkpoints, SIGTERM drains every worker. The merges, the flags and the restart policy are tested
without a venue: pure functions, fake workers over real sockets, stand-in worker commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import http_get as get
from helpers import spawn, wait_for, wait_until
from prometheus_client.parser import text_string_to_metric_families

from feedrunner import supervisor
from feedrunner.cli import main
from feedrunner.control import ControlServer
from feedrunner.controlapi import SupervisorApi, merge_latency, merge_metrics, merge_reload, merge_status
from feedrunner.sharding import assignment
from feedrunner.spec import Backoff, check_file, check_text

SYMBOLS = [f"S{i:03d}/USDT" for i in range(200)]
LIVE = """\
version: 1
environment: live
workers: 2
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    symbols: [{symbols}]
    endpoints: {{rest: "{rest}", ws: "{ws}"}}
sinks: [{{type: jsonl, path: "out/{{shard}}/{{symbol}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
"""
CONTROL = re.compile(r"INFO\s+control server on (http://127\.0\.0\.1:\d+)")  # the supervisor's: no [shard] tag


# --- helpers -----------------------------------------------------------------------------------------------


def trades(out: Path) -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """shard directory -> symbol file -> (trade id, backfilled) in file order; a line still being written
    (no newline yet) is left for the next read."""
    found: dict[str, dict[str, list[tuple[int, bool]]]] = {}
    for path in sorted(out.glob("*/*.jsonl")):
        text = path.read_text()
        lines = text.split("\n")[:-1]  # the part after the last newline is not a whole line yet
        found.setdefault(path.parent.name, {})[path.stem] = [
            (int(r["id"]), bool(r["backfilled"])) for r in map(json.loads, lines) if r["kind"] == "trade"
        ]
    return found


def all_up(url: str) -> list[dict[str, Any]] | None:
    workers = get(f"{url}/status")["workers"]
    return workers if all(w["up"] for w in workers) else None


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie until its parent reaps it: dead all the same
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@contextmanager
def supervised(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`feedrunner run` (a supervisor) in tmp_path: (process, control URL, log); killed if still running."""
    log = tmp_path / "run.log"
    sup = spawn(tmp_path, stderr=log.open("w"))
    try:
        yield sup, wait_for(lambda: control_url(log), 30, "the supervisor's control server"), log
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def control_url(log: Path) -> str | None:
    m = CONTROL.search(log.read_text()) if log.exists() else None
    return m.group(1) if m else None


# --- end to end ------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_two_workers_split_the_symbols_survive_a_kill_and_stop_cleanly(tmp_path: Path):
    sim = spawn(
        tmp_path, "sim", "binance", "--port", "0", "--rate", "5", "--symbols", ",".join(SYMBOLS),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sup = None
    log = tmp_path / "run.log"
    try:
        assert sim.stdout is not None
        found = re.search(r"rest: (\S+), ws: (\S+)\}", sim.stdout.readline())
        assert found, "simulator printed no endpoints"
        feeds = tmp_path / "feeds.yaml"
        feeds.write_text(LIVE.format(symbols=", ".join(SYMBOLS), rest=found.group(1), ws=found.group(2)))
        spec, problems = check_file(feeds)
        assert spec is not None, problems
        owner = {s.replace("/", "-"): g for (_, s), g in assignment(spec, 2).items()}
        sup = spawn(tmp_path, stderr=log.open("w"))
        url = wait_for(lambda: control_url(log), 30, "the supervisor's control server")
        out = tmp_path / "out"

        # Every symbol streams, each from the worker that owns it, each trade once.
        wait_for(lambda: sum(len(files) for files in trades(out).values()) == len(SYMBOLS), 30, "every symbol")
        status = wait_for(lambda: (s := get(f"{url}/status"))["ready"] and s, 20, "both workers ready")
        assert [(w["index"], w["up"], w["restarts"]) for w in status["workers"]] == [(0, True, 0), (1, True, 0)]
        rows = status["venues"]["binance"]["symbols"]
        assert sorted(rows) == sorted(SYMBOLS)
        assert {s: r["worker"] for s, r in rows.items()} == {s: owner[s.replace("/", "-")] for s in SYMBOLS}
        metrics = get(f"{url}/metrics")
        received = [
            s
            for fam in text_string_to_metric_families(metrics)
            for s in fam.samples
            if s.name == "feedrunner_messages_received_total"
        ]
        assert {s.labels["worker"] for s in received} == {"0", "1"}
        time.sleep(6)  # past one trade checkpoint
        before = trades(out)
        for shard, files in before.items():
            for name, got in files.items():
                assert owner[name] == int(shard), f"{name} written by worker {shard}"
                ids = [i for i, _ in got]
                assert ids == list(range(ids[0], ids[0] + len(ids))), f"{name}: a gap or a duplicate"

        # kill -9 one worker: it is started again and its symbols resume from their checkpoints.
        victim = status["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), 10, "the killed worker to be gone")
        last = {name: got[-1][0] for name, got in trades(out)["1"].items()}  # what it wrote before it died
        again = wait_for(
            lambda: (w := get(f"{url}/status")["workers"][1])["up"] and w["pid"] != victim and w, 30, "the restart"
        )
        assert again["restarts"] == 1
        assert 'feedrunner_worker_restarts_total{worker="1"} 1.0' in get(f"{url}/metrics")
        wait_for(
            lambda: all(trades(out)["1"][n][-1][0] > last[n] + 20 for n in last), 40, "the restarted worker's trades"
        )
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=40) == 0
    finally:
        for p in (sup, sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    after = trades(tmp_path / "out")
    text = log.read_text()
    assert set(after) == {"0", "1"} and sum(len(f) for f in after.values()) == len(SYMBOLS)
    for shard, files in after.items():
        for name, got in files.items():
            ids = [i for i, _ in got]
            unique = sorted(set(ids))
            assert unique == list(range(unique[0], unique[-1] + 1)), f"{name}: trades lost"
            twice = [i for i, n in Tally(ids).items() if n > 1]
            if shard == "0":
                assert not twice, f"{name}: delivered twice by a worker that never stopped"
            else:  # a crash may repeat what was written after the last checkpoint, nothing newer
                assert all(i <= last[name] for i in twice), f"{name}: {twice[:5]} doubled after the restart"
                assert any(b for i, b in got if i > last[name]), f"{name}: the outage was not backfilled"
    assert "worker 1 (pid" in text and "killed by SIGKILL" in text
    assert "Traceback" not in text


def test_workers_die_with_a_supervisor_killed_by_sigkill(tmp_path: Path):
    """PR_SET_PDEATHSIG: no worker outlives its supervisor to hold its shard and its port."""
    (tmp_path / "feeds.yaml").write_text(
        "version: 1\nenvironment: simulator\nworkers: 2\n"
        "venues: {binance: {adapter: ccxt, exchange: binance, channels: [trades], symbols: [A/USDT, B/USDT]}}\n"
        'sinks: [{type: jsonl, path: "out/{shard}.jsonl"}]\n'
        'server: {listen: "127.0.0.1:0"}\nstate: {url: "sqlite:///state/feedrunner.db"}\n'
    )
    log = tmp_path / "run.log"
    sup = spawn(tmp_path, stderr=log.open("w"))
    pids: list[int] = []
    try:
        url = wait_for(lambda: control_url(log), 30, "the supervisor's control server")
        workers = wait_for(lambda: all_up(url), 30, "both workers")
        pids = [w["pid"] for w in workers]
        sup.kill()
        sup.wait()

        wait_for(lambda: all(gone(p) for p in pids), 30, "the workers to die with their supervisor")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the command line ---------------------------------------------------------------------------------------


SIM_FEEDS = """\
version: 1
environment: simulator
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [{symbols}]}}
sinks: [{sinks}]
server: {{listen: "127.0.0.1:0"}}
"""


def write(tmp_path: Path, sinks: str = '{type: jsonl, path: "out/{shard}.jsonl"}', n: int = 20) -> str:
    path = tmp_path / "feeds.yaml"
    path.write_text(SIM_FEEDS.format(symbols=", ".join(SYMBOLS[:n]), sinks=sinks))
    return str(path)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--shard", "3/3"], "--shard 3/3"),
        (["--shard", "1"], "--shard takes INDEX/COUNT"),
        (["--workers", "0"], "--workers takes a whole number >= 1"),
        (["--workers", "many"], "--workers takes a whole number >= 1"),
    ],
)
def test_bad_scale_flags_exit_64_with_the_reason(tmp_path, capsys, flags, said):
    assert main(["run", write(tmp_path), *flags, "--dry-run"]) == 64
    assert said in capsys.readouterr().err


def test_workers_refuse_file_sinks_that_workers_would_share(tmp_path, capsys):
    sinks = (
        '{type: jsonl, path: "out/{shard}.jsonl"}, {type: parquet, path: "pq/{date}"}, {type: jsonl, path: "a.jsonl"}'
    )
    file = write(tmp_path, sinks)
    assert main(["run", file, "--workers", "2"]) == 78
    err = capsys.readouterr().err
    assert f"{file}: sinks[1].parquet.path: several workers would write the same files" in err
    assert f"{file}: sinks[2].path:" in err and "sinks[0]" not in err
    assert main(["run", file, "--workers", "1", "--dry-run"]) == 0  # one process may share them


def test_dry_run_prints_each_workers_share_of_this_hosts_shard(tmp_path, capsys):
    file = write(tmp_path, n=40)
    assert main(["run", file, "--workers", "2", "--shard", "1/2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "workers: 2 (shard 1/2); 4 shard(s) in all" in out
    spec, _ = check_file(file)
    assert spec is not None
    shares = Tally(assignment(spec, 4).values())
    assert f"worker 0 (shard 2/4): {shares[2]} symbols (binance {shares[2]})" in out
    assert f"worker 1 (shard 3/4): {shares[3]} symbols (binance {shares[3]})" in out
    assert f"other hosts: {shares[0] + shares[1]} symbols" in out


# --- the merges -------------------------------------------------------------------------------------------------


WORKER_TEXT = """\
# HELP feedrunner_messages_received_total Events received.
# TYPE feedrunner_messages_received_total counter
feedrunner_messages_received_total{{venue="binance",transport="websocket",kind="trade"}} {n}
# HELP feedrunner_messages_received_created Events received.
# TYPE feedrunner_messages_received_created gauge
feedrunner_messages_received_created{{venue="binance",transport="websocket",kind="trade"}} 1.7e+09
# HELP feedrunner_latency_seconds Latency.
# TYPE feedrunner_latency_seconds histogram
feedrunner_latency_seconds_bucket{{le="0.1"}} {n}
feedrunner_latency_seconds_bucket{{le="+Inf"}} {n}
feedrunner_latency_seconds_count {n}
feedrunner_latency_seconds_sum 1.5
# HELP feedrunner_http_rejected_total Control server requests and connections refused, by reason.
# TYPE feedrunner_http_rejected_total counter
feedrunner_http_rejected_total{{reason="host"}} {n}
"""
OWN_TEXT = """\
# HELP feedrunner_workers Worker processes configured on this host.
# TYPE feedrunner_workers gauge
feedrunner_workers 2.0
# HELP feedrunner_http_rejected_total Control server requests and connections refused, by reason.
# TYPE feedrunner_http_rejected_total counter
feedrunner_http_rejected_total{reason="auth"} 1.0
"""


def test_metrics_merge_labels_each_workers_samples_under_one_family(lines):
    text = merge_metrics(
        {"0": WORKER_TEXT.format(n=3), "1": WORKER_TEXT.format(n=5), "2": "not { an exposition"}, OWN_TEXT
    ).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), "a family named twice"
    assert "# TYPE feedrunner_messages_received_total counter" in text  # counters keep their _total name
    assert "# TYPE feedrunner_messages_received_created gauge" in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    received = {k: v for k, v in samples.items() if k[0] == "feedrunner_messages_received_total"}
    assert sorted((dict(k[1])["worker"], v) for k, v in received.items()) == [("0", 3.0), ("1", 5.0)]
    rejected = {dict(k[1]).get("worker", "-") + ":" + dict(k[1])["reason"]: v for k, v in samples.items()
                if k[0] == "feedrunner_http_rejected_total"}  # fmt: skip
    assert rejected == {"-:auth": 1.0, "0:host": 3.0, "1:host": 5.0}  # the supervisor's own, unlabelled
    buckets = [k for k in samples if k[0] == "feedrunner_latency_seconds_bucket"]
    assert len(buckets) == 4 and samples[("feedrunner_latency_seconds_count", (("worker", "1"),))] == 5.0
    assert samples[("feedrunner_workers", ())] == 2.0
    assert not any(dict(k[1]).get("worker") == "2" for k in samples)  # an unreadable worker is left out
    assert any("worker 2: /metrics unreadable" in r["message"] for r in lines)


SINK_OK = {"state": "ok", "since": None, "last_error": None, "events_written": 100, "events_failed": 0,
           "events_failed_total": 0, "failing_paths": [], "failing_path_count": 0}  # fmt: skip


def worker_status(symbols: dict[str, str], **extra: Any) -> dict[str, Any]:
    rows = {s: {"transport": t, "events": 10, "latency_ms": 1.0, "silent_seconds": 0.1} for s, t in symbols.items()}
    return {
        "venues": {
            "binance": {
                "adapter": "ccxt", "state": "connected", "reason": "", "since": 1.0, "breaker": "closed",
                "symbols": rows, "rate_per_s": 5.0, "quarantined": {}, "open_symbol_breakers": [],
            }
        },
        "skipped": {},
        "queue_depth": 2,
        "events_written": 100,
        "sinks": {"jsonl": dict(SINK_OK)},
        "ready": True,
        "not_ready": [],
        "rss_mb": 80.0,
        "rss_growth_mb": 1.0,
        "alerts": [],
        "rollout": None,
        **extra,
    }  # fmt: skip


def test_status_merge_names_each_symbols_worker_and_the_leaders_rollout():
    a = worker_status({"A/USDT": "websocket"}, leader=False, rollout={"phase": "stale view"})
    b = worker_status({"B/USDT": "polling"}, leader=True, rollout={"phase": "two"})
    b["venues"]["binance"].update(state="reconnecting", reason="socket closed", breaker="open")
    b["sinks"]["jsonl"].update(state="failing", last_error="disk full", failing_paths=["out/1.jsonl"], since=5.0)
    b["ready"], b["not_ready"], b["alerts"] = False, ["binance: no data for 15s"], ["venue binance failed"]
    merged = merge_status({0: a, 1: b}, {2: "not running"})
    venue = merged["venues"]["binance"]
    assert {s: r["worker"] for s, r in venue["symbols"].items()} == {"A/USDT": 0, "B/USDT": 1}
    assert (venue["state"], venue["reason"], venue["breaker"], venue["rate_per_s"]) == (
        "reconnecting", "socket closed", "open", 10.0,
    )  # fmt: skip
    sink = merged["sinks"]["jsonl"]
    assert (sink["state"], sink["last_error"], sink["events_written"], sink["since"]) == (
        "failing",
        "disk full",
        200,
        5.0,
    )
    assert (merged["events_written"], merged["queue_depth"], merged["rss_mb"]) == (200, 4, 160.0)
    assert merged["rollout"] == {"phase": "two"} and merged["leader"] is True
    assert merged["ready"] is False
    assert merged["not_ready"] == ["worker 1: binance: no data for 15s", "worker 2: not running"]
    assert merged["alerts"] == ["worker 1: venue binance failed"]
    assert merge_status({0: a, 1: worker_status({})})["ready"] is True


def test_latency_merge_keeps_the_worst_of_each_point():
    fast = {"binance": {"websocket": [[100, 0.001, 0.002, 10], [105, 0.001, 0.003, 10]]}}
    slow = {"binance": {"websocket": [[105, 0.004, 0.002, 5], [110, 0.002, 0.009, 1]], "polling": [[100, 0.5, 0.9, 2]]}}
    merged = merge_latency([fast, slow])
    assert merged["binance"]["websocket"] == [[100, 0.001, 0.002, 10], [105, 0.004, 0.003, 15], [110, 0.002, 0.009, 1]]
    assert merged["binance"]["polling"] == [[100, 0.5, 0.9, 2]]


def test_reload_merge_lists_each_change_once_with_its_workers():
    change = {"kind": "symbol_added", "target": "binance:X/USDT", "detail": "+", "live": True}
    rollout = {"kind": "rollout", "target": "rollout", "detail": "~", "live": True}
    result, changes, problems = merge_reload(
        {
            0: (200, {"result": "applied", "changes": [change, rollout], "problems": []}),
            1: (200, {"result": "applied", "changes": [rollout], "problems": []}),
            2: None,
        }
    )
    assert result == "applied"
    assert [(c["target"], c["workers"]) for c in changes] == [("binance:X/USDT", [0]), ("rollout", [0, 1])]
    assert problems == ["worker 2: not running (it reads feeds.yaml when it starts)"]
    assert merge_reload({0: (200, {"result": "unchanged", "changes": [], "problems": []})})[0] == "unchanged"
    assert merge_reload({0: "its control server did not answer (TimeoutError)"})[0] == "invalid"


# --- the supervisor's control API over fake workers ----------------------------------------------------


@dataclass
class FakeWorker:
    """A worker's control server: records every request; /status says whether it leads."""

    index: int
    leader: bool
    port: int = 0
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    shard: int = 0
    restarts: int = 0
    pid: int = 0
    up: bool = True
    running: bool = True

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, dict(request.headers)))
        if request.path == "/status":
            return web.json_response(worker_status({f"W{self.index}/USDT": "websocket"}, leader=self.leader))
        if request.path == "/reload":
            change = {"kind": "venue", "target": "binance", "detail": "~", "live": True}
            return web.json_response({"result": "applied", "changes": [change], "problems": []})
        return web.json_response({"acted": request.path_qs, "by": self.index})


class FakeSupervisor:
    def __init__(self, file: str, workers: list[FakeWorker]) -> None:
        from prometheus_client import CollectorRegistry

        self.file = file
        self.spec, problems = check_file(file)
        assert self.spec is not None, problems
        self.workers = workers
        self.stopping = False
        self.registry = CollectorRegistry()
        self.adopted = 0

    def adopt(self, spec: Any) -> None:
        self.adopted += 1


FAKE_FEEDS = """\
version: 1
environment: simulator
workers: 2
venues: {binance: {adapter: ccxt, exchange: binance, channels: [trades], symbols: [S000/USDT]}}
rollout: {phases: [{name: one, symbols: [binance:S000/USDT], dwell: 1h}, {name: all, symbols: all}]}
sinks: [{type: jsonl, path: "o/{shard}"}]
server: {listen: "127.0.0.1:0", token: "${T}"}
"""


@asynccontextmanager
async def fake_workers(tmp_path: Path, leaders: list[bool]) -> AsyncIterator[tuple[str, FakeSupervisor]]:
    """A ControlServer over a SupervisorApi over fake workers, all on 127.0.0.1 port 0."""
    workers = [FakeWorker(i, lead) for i, lead in enumerate(leaders)]
    runners = []
    for w in workers:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", w.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        w.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(FAKE_FEEDS)
    os.environ["T"] = "tok-9"
    sup = FakeSupervisor(str(feeds), workers)
    api = SupervisorApi(sup)  # type: ignore[arg-type]
    control = ControlServer(api)
    await control.start()
    try:
        yield f"http://127.0.0.1:{control.port}", sup
    finally:
        await control.stop()
        await api.close()
        for runner in runners:
            await runner.cleanup()
        os.environ.pop("T", None)


async def call(url: str, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": "Bearer tok-9", "X-Feedrunner": "1"}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers) as r:
        return r.status, await r.json()


async def test_rollout_actions_go_to_the_leading_worker_with_the_token(tmp_path):
    async with fake_workers(tmp_path, [False, True]) as (url, sup):
        status, body = await call(f"{url}/rollout/promote?full=1", "POST")
        assert (status, body) == (200, {"acted": "/rollout/promote?full=1", "by": 1})
        posts = [(w.index, m, p, h) for w in sup.workers for m, p, h in w.seen if m == "POST"]
        assert [(i, p) for i, _, p, _ in posts] == [(1, "/rollout/promote?full=1")]
        _, _, _, headers = posts[0]
        assert headers["X-Feedrunner"] == "1" and headers["Authorization"] == "Bearer tok-9"
        assert headers["Host"] == f"127.0.0.1:{sup.workers[1].port}"
        status, body = await call(f"{url}/status")
        assert [(w["index"], w["leader"]) for w in body["workers"]] == [(0, False), (1, True)]
        assert {s: r["worker"] for s, r in body["venues"]["binance"]["symbols"].items()} == {
            "W0/USDT": 0, "W1/USDT": 1,
        }  # fmt: skip


async def test_rollout_actions_without_a_leader_are_503(tmp_path):
    async with fake_workers(tmp_path, [False, False]) as (url, sup):
        status, body = await call(f"{url}/rollout/pause", "POST")
        assert status == 503 and "leads the rollout" in body["error"]
        assert not [m for w in sup.workers for m, _, _ in w.seen if m == "POST"]


async def test_reload_is_checked_before_any_worker_is_asked(tmp_path):
    async with fake_workers(tmp_path, [True, False]) as (url, sup):
        good = Path(sup.file).read_text()
        Path(sup.file).write_text(good.replace("adapter: ccxt", "adapter: nope"))
        status, body = await call(f"{url}/reload", "POST")
        assert status == 422 and body["result"] == "invalid" and "venues.binance.adapter" in body["problems"][0]
        assert not [m for w in sup.workers for m, _, _ in w.seen if m == "POST"] and sup.adopted == 0
        Path(sup.file).write_text(good)
        status, body = await call(f"{url}/reload", "POST")
        assert status == 200 and body["result"] == "applied"
        assert [c["workers"] for c in body["changes"]] == [[0, 1]]
        assert [p for w in sup.workers for m, p, _ in w.seen if m == "POST"] == ["/reload", "/reload"]
        assert sup.adopted == 1


async def test_readiness_needs_every_worker_up_and_ready(tmp_path):
    async with fake_workers(tmp_path, [True, False]) as (url, sup):
        assert (await call(f"{url}/readyz"))[0] == 200
        sup.workers[1].up = sup.workers[1].running = False
        status, body = await call(f"{url}/readyz")
        assert status == 503 and body["problems"] == ["worker 1: not running"]


# --- restarts and stopping, with stand-in workers ------------------------------------------------------------


def stand_in(script: str) -> Any:
    """A worker command running `script` with the announce path as argv[1]."""
    return lambda w: [sys.executable, "-c", script, str(w.announce)]


ANNOUNCE = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps({'pid': os.getpid(), 'port': 1}))\n"


def sup_spec(tmp_path: Path, extra: str = "") -> Any:
    text = SIM_FEEDS.format(symbols="S000/USDT", sinks='{type: jsonl, path: "o/{shard}"}') + "workers: 2\n" + extra
    spec, problems = check_text(text, str(tmp_path / "feeds.yaml"), {})
    assert spec is not None, [str(p) for p in problems]
    return spec


async def test_a_worker_that_keeps_failing_at_start_is_retried_then_given_up(tmp_path, lines):
    fails = stand_in("import sys, time; time.sleep(0.05); sys.exit(78)")
    healthy = stand_in(ANNOUNCE + "import time; time.sleep(60)")
    sup = supervisor.Supervisor(
        "feeds.yaml",
        sup_spec(tmp_path),
        backoff=Backoff(base=0.05, cap=0.1, max_attempts=3),
        command=lambda w: healthy(w) if w.index == 0 else fails(w),
    )
    assert await asyncio.wait_for(sup.serve(), 20) == 78
    assert [w.history for w in sup.workers] == [[], [78, 78, 78, 78]]
    assert sup.workers[1].restarts == 3 and sup.workers[0].restarts == 0
    assert sup.registry.get_sample_value("feedrunner_worker_restarts_total", {"worker": "1"}) == 3
    said = [r["message"] for r in lines]
    assert any("exited with code 78 (invalid configuration) before it started" in m for m in said)
    assert any("worker 1: 3 exits in a row; giving up" in m for m in said)
    assert sup.workers[0].final is not None  # the healthy one was stopped too


async def test_a_worker_ignoring_sigterm_is_killed_after_the_deadline(tmp_path, monkeypatch, lines):
    monkeypatch.setattr(supervisor, "EXIT_GRACE", 0.3)
    stubborn = stand_in(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + ANNOUNCE + "time.sleep(60)"
    )
    sup = supervisor.Supervisor("feeds.yaml", sup_spec(tmp_path, "shutdown: {deadline: 1s}\n"), command=stubborn)
    serving = asyncio.create_task(sup.serve())
    await wait_until(lambda: len(sup.workers) == 2 and all(w.up for w in sup.workers), 10, "both stand-ins up")
    began = time.monotonic()
    sup.request_stop()
    assert await asyncio.wait_for(serving, 10) == 70
    assert 1.2 < time.monotonic() - began < 5
    assert [w.final for w in sup.workers] == [-signal.SIGKILL, -signal.SIGKILL]
    assert sum("still running 1.3s after SIGTERM: killing it" in r["message"] for r in lines) == 2


def test_status_command_shows_each_symbols_worker_and_the_workers():
    from feedrunner.statuscli import render_status

    merged = merge_status({0: worker_status({"A/USDT": "websocket"}), 1: worker_status({"B/USDT": "polling"})})
    merged["workers"] = [
        {"index": 0, "shard": 0, "pid": 11, "up": True, "restarts": 0, "ready": True, "leader": True, "rss_mb": 80.0},
        {"index": 1, "shard": 1, "pid": None, "up": False, "restarts": 2, "ready": False, "leader": False},
    ]
    text = render_status(merged)
    assert "workers: 1/2 up" in text
    assert "worker 0  shard 0  pid 11  ready  restarts 0  leader  rss 80.0 MB" in text
    assert "worker 1  shard 1  pid -  DOWN  restarts 2" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if "/USDT" in line}
    assert rows["A/USDT"][-1] == "0" and rows["B/USDT"][-1] == "1"
    assert "worker" in next(line for line in text.splitlines() if line.strip().startswith("symbol"))
    single = render_status(worker_status({"A/USDT": "websocket"}))
    assert "worker" not in single  # one runner: no worker column, no workers line


SIMULATED = """\
version: 1
environment: simulator
simulator: {{rate: 5}}
workers: 2
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [{symbols}]}}
sinks: [{{type: jsonl, path: "out/{{shard}}/{{symbol}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
"""


@pytest.mark.timeout(90)
def test_a_reload_reaches_every_worker_and_moves_no_symbol(tmp_path: Path):
    first, more = SYMBOLS[:8], SYMBOLS[8:14]
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(SIMULATED.format(symbols=", ".join(first)))
    with supervised(tmp_path) as (sup, url, log):
        status = wait_for(lambda: (s := get(f"{url}/status"))["ready"] and s, 30, "both workers ready")
        before = {s: r["worker"] for s, r in status["venues"]["binance"]["symbols"].items()}
        assert sorted(before) == first and set(before.values()) == {0, 1}

        feeds.write_text(SIMULATED.format(symbols=", ".join(first + more)))
        req = urllib.request.Request(f"{url}/reload", method="POST", headers={"X-Feedrunner": "1"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        assert body["result"] == "applied", body
        spec, problems = check_file(feeds)
        assert spec is not None, problems
        owner = {s: g for (_, s), g in assignment(spec, 2).items()}

        def grown() -> dict[str, int] | None:
            rows = get(f"{url}/status")["venues"]["binance"]["symbols"]
            return {s: r["worker"] for s, r in rows.items()} if len(rows) == len(first + more) else None

        after = wait_for(grown, 20, "the added symbols")
        assert {s: after[s] for s in first} == before  # nothing moved
        assert after == owner  # each added symbol on the one worker that owns it
        out = tmp_path / "out"
        wait_for(
            lambda: all((out / str(owner[s]) / f"{s.replace('/', '-')}.jsonl").exists() for s in more),
            20,
            "trades of the added symbols",
        )
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=40) == 0
    assert "Traceback" not in log.read_text()


ROLLOUT = """\
version: 1
environment: simulator
simulator: {{rate: 10}}
workers: 2
coordination: {{lease: 2s, poll: 200ms}}
defaults: {{poll_interval: 500ms}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [{symbols}]}}
rollout:
  baseline: polling
  target: websocket
  phases:
    - {{name: one, symbols: [{one}], dwell: 2s}}
    - {{name: all, symbols: all}}
  gates: [{{metric: error_rate, below: 50%, window: 1s}}]
health: {{interval: 250ms}}
sinks: [{{type: jsonl, path: "out/{{shard}}/{{symbol}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
"""


@pytest.mark.timeout(90)
def test_workers_on_one_sqlite_store_share_one_rollout_led_by_one_of_them(tmp_path: Path):
    symbols = SYMBOLS[:8]
    owner = {s: assignment_of(symbols)[s] for s in symbols}
    one = [next(s for s in symbols if owner[s] == w) for w in (0, 1)]  # a symbol of each worker
    (tmp_path / "feeds.yaml").write_text(
        ROLLOUT.format(symbols=", ".join(symbols), one=", ".join(f"binance:{s}" for s in one))
    )
    with supervised(tmp_path) as (sup, url, log):

        def phase_one() -> dict[str, Any] | None:
            s = get(f"{url}/status")
            rows = s["venues"].get("binance", {}).get("symbols", {})
            ok = s["rollout"] and s["rollout"]["phase"] == "one" and len(rows) == len(symbols)
            return (
                s
                if ok and all(rows[x]["transport"] == ("websocket" if x in one else "polling") for x in rows)
                else None
            )

        status = wait_for(phase_one, 30, "phase one on both workers")
        assert sum(1 for w in status["workers"] if w["leader"]) == 1  # one worker leads, the other stands by

        def completed() -> bool:
            s = get(f"{url}/status")
            rows = s["venues"]["binance"]["symbols"]
            return s["rollout"]["state"] == "completed" and all(r["transport"] == "websocket" for r in rows.values())

        wait_for(completed, 30, "the promotion on both workers")
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=40) == 0
    assert "Traceback" not in log.read_text()


def assignment_of(symbols: list[str]) -> dict[str, int]:
    spec, problems = check_text(SIMULATED.format(symbols=", ".join(symbols)), "feeds.yaml", {})
    assert spec is not None, problems
    return {s: g for (_, s), g in assignment(spec, 2).items()}
