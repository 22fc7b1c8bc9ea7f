"""The rollout steered through the real CLI against a real `feedrunner run` process, and kill -9 recovery."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runproc import Run

FEEDS = """\
version: 1
environment: simulator
simulator: {{seed: 4, rate: 10}}
defaults: {{poll_interval: 300ms}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [A/USDT, B/USDT, C/USDT]}}
rollout:
  phases:
    - {{name: one, symbols: [binance:A/USDT], dwell: {first_dwell}}}
    - {{name: two, symbols: {{venue: binance, first: 2}}, dwell: 1h}}
    - {{name: all, symbols: all}}
health: {{interval: 250ms}}
sinks: [{{type: jsonl, path: "out/{{venue}}.jsonl"}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
logging: {{format: json}}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_every_operator_action_through_the_cli(workdir):
    (workdir / "feeds.yaml").write_text(FEEDS.format(first_dwell="1h"))
    run = Run(workdir)
    try:
        run.wait(lambda r: r["state"] == "progressing" and r["phase"] == "one", 15, "phase one")
        code, r = run.cli("rollout", "promote")
        assert code == 0 and (r["state"], r["phase"]) == ("progressing", "two")
        code, r = run.cli("rollout", "pause")
        assert code == 0 and r["state"] == "paused"
        code, r = run.cli("rollout", "resume")
        assert code == 0 and r["state"] == "progressing"
        code, r = run.cli("rollout", "resume")
        assert code == 75 and "cannot resume" in r["error"]  # 409 -> EX_TEMPFAIL, with the reason
        code, r = run.cli("rollout", "abort")
        assert code == 0 and r["state"] == "aborted" and r["symbols_on_target"] == 0
        code, r = run.cli("rollout", "retry")
        assert code == 0 and (r["state"], r["phase"]) == ("progressing", "one")
        code, r = run.cli("rollout", "promote", "--full")
        assert code == 0 and r["state"] == "completed" and r["symbols_on_target"] == 3
        code, status = run.cli("status")
        assert code == 0 and status["venues"]["binance"]["symbols"]["C/USDT"]["transport"] == "websocket"
        table = subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", "status", "--url", run.url],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "rollout: completed" in table and "C/USDT" in table
    finally:
        assert run.stop() == 0


def test_kill_dash_nine_mid_phase_resumes_the_same_phase(workdir):
    (workdir / "feeds.yaml").write_text(FEEDS.format(first_dwell="2s"))
    run = Run(workdir)
    before = run.wait(lambda r: r["phase"] == "two", 20, "phase two")
    run.stop(signal.SIGKILL)
    time.sleep(1.0)
    again = Run(workdir)
    try:
        after = again.wait(lambda r: r["last_evaluated"] is not None, 10, "an evaluation after restart")
        assert (after["state"], after["phase"]) == ("progressing", "two")
        assert after["entered_at"] == pytest.approx(before["entered_at"])  # dwell counted from the first entry
        promotions = [h for h in after["history"] if h["to_state"] == "progressing"]
        assert [h["phase"] for h in promotions] == ["one", "two"]  # nothing promoted twice
        db = sqlite3.connect(workdir / "state" / "feedrunner.db")
        jobs = sorted(r[0] for r in db.execute("select id from apscheduler_jobs"))
        db.close()
        assert jobs == ["health", "rollout"]  # replaced, not duplicated
    finally:
        assert again.stop() == 0
