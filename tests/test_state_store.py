"""One runner per state store, a control port in use leaves the store untouched, and SIGTERM ends the
process whatever a reload thread is blocked on."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import spawn

from feedrunner.statelock import StoreBusy, StoreLock

FEEDS = """\
version: 1
environment: simulator
simulator: {{seed: 3, rate: 20}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [BTC/USDT]}}
rollout:
  baseline: polling
  target: websocket
  phases: [{{name: canary, symbols: [binance:BTC/USDT], dwell: 1d}}, {{name: full, symbols: all}}]
  gates: [{{metric: error_rate, below: 5%, window: 1h}}]
sinks: [{{type: jsonl, path: "out/{{venue}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:{port}"}}
state: {{url: "{url}"}}
"""


def start(tmp: Path, name: str, port: int | str, url: str) -> subprocess.Popen:
    d = tmp / name
    d.mkdir(exist_ok=True)
    (d / "feeds.yaml").write_text(FEEDS.format(port=port, url=url))
    return spawn(d)


def wait_started(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Read stderr until the runner says it started; returns what it read."""
    seen = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if "runner started" in line:
            return "".join(seen)
    raise AssertionError("runner did not start:\n" + "".join(seen))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_second_runner_on_one_store_refuses_to_start_and_the_lock_dies_with_its_holder(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = start(tmp_path, "a", 0, url)
    second = third = None
    try:
        wait_started(first)
        second = start(tmp_path, "b", 0, url)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 69, err
        assert "held by another runner" in err and "Traceback" not in err
        assert first.poll() is None  # the holder runs on, untouched
        first.kill()  # kill -9: the lock goes with the process, no stale file to clean up
        first.wait()
        third = start(tmp_path, "c", 0, url)
        wait_started(third)
    finally:
        for p in (first, second, third):
            if p is not None:
                stop(p)


def test_a_control_port_in_use_exits_69_with_nothing_written(tmp_path: Path):
    db = tmp_path / "state.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = start(tmp_path, "a", taken.getsockname()[1], f"sqlite:///{db}")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 69, err
    assert "cannot start" in err and "Traceback" not in err
    if db.exists():  # the store may exist; the rollout must not have been recorded in it
        with sqlite3.connect(db) as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "rollout_history" in tables:
                assert c.execute("SELECT count(*) FROM rollout_history").fetchone()[0] == 0
            assert "rollout_state" not in tables or c.execute("SELECT count(*) FROM rollout_state").fetchone()[0] == 0


def test_sigterm_exits_while_a_reload_is_blocked_on_a_fifo(tmp_path: Path):
    proc = start(tmp_path, "a", 0, f"sqlite:///{tmp_path / 'state.db'}")
    try:
        wait_started(proc)
        feeds = tmp_path / "a" / "feeds.yaml"
        feeds.unlink()
        os.mkfifo(feeds)  # nobody ever writes: an open() for reading would block forever
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        stop(proc)


def test_postgres_advisory_lock_admits_one_runner_and_is_reclaimed_after_a_lost_session(postgres_url: str):
    a_engine, b_engine = sa.create_engine(postgres_url), sa.create_engine(postgres_url)
    a, b = StoreLock(postgres_url, a_engine), StoreLock(postgres_url, b_engine)
    try:
        a.acquire()
        with pytest.raises(StoreBusy, match=r"held by another runner \(backend pid"):
            b.acquire()
        assert a.held()
        with b_engine.connect() as c:  # the holder's session dies (a database restart, a failover)
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"))
        assert not a.held()
        b.acquire()  # the lock died with the session: another runner may take it
        a.release()
        with pytest.raises(StoreBusy):
            a.acquire()
    finally:
        a.release()
        b.release()
        a_engine.dispose()
        b_engine.dispose()


def test_sigterm_exits_while_a_worker_thread_is_blocked(tmp_path: Path):
    """Shutdown does not join threads: a reload whose read never returns (here: check_file patched to
    block forever, as a dead network file system would) leaves SIGTERM's exit code and time intact."""
    d = tmp_path / "a"
    d.mkdir()
    (d / "feeds.yaml").write_text(FEEDS.format(port=0, url=f"sqlite:///{tmp_path / 'state.db'}"))
    code = (
        "import sys, threading, feedrunner.spec as s\n"
        "real = s.check_file\n"
        "calls = []\n"
        "def blocking(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1: threading.Event().wait()\n"
        "    return real(*a, **k)\n"
        "s.check_file = blocking\n"
        "from feedrunner.cli import main\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "feeds.yaml"],
        cwd=d,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_started(proc)
        proc.send_signal(signal.SIGHUP)  # the reload's thread blocks for good
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - start < 15
        assert "blocked thread" in err and "Traceback" not in err
    finally:
        stop(proc)


@pytest.mark.parametrize("form", ["sqlite:///{db}", "sqlite:///file:{db}?uri=true"])
def test_the_sqlite_lock_holds_for_plain_paths_and_file_uris(tmp_path: Path, form: str):
    from feedrunner.rollout import engine_for

    url = form.format(db=tmp_path / "nested" / "state.db")
    a, b = StoreLock(url, engine_for(url)), StoreLock(url, engine_for(url))
    try:
        a.acquire()
        with pytest.raises(StoreBusy, match="held by another runner"):
            b.acquire()
        a.release()
        b.acquire()
    finally:
        a.release()
        b.release()
    assert not (Path.cwd() / "file:").exists()  # a URI is not a directory name
