"""The shipped feeds.yaml runs as `make run` runs it: every venue streams, /readyz is 200, and the
rollout is still in its first phase (no start-up effect may look like a reason to roll back)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_SECONDS = 20


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_shipped_file_streams_every_venue_and_keeps_its_first_phase(tmp_path: Path):
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FEEDRUNNER_LISTEN": "127.0.0.1:0",
        "FEEDRUNNER_DATA": str(tmp_path / "data"),
        "FEEDRUNNER_STATE": f"sqlite:///{tmp_path / 'state.db'}",
    }
    env.pop("ALERT_WEBHOOK", None)
    log = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedrunner.cli", "run", str(REPO / "feeds.yaml")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
    )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"control server on http://127\.0\.0\.1:(\d+)", (tmp_path / "stderr.log").read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.2)
        assert port, "the control server never came up:\n" + (tmp_path / "stderr.log").read_text()[-3000:]
        time.sleep(RUN_SECONDS)
        code, ready = _get(port, "/readyz")
        _, status = _get(port, "/status")
        assert proc.poll() is None, "the runner exited"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    text = (tmp_path / "stderr.log").read_text()
    assert code == 200, ready
    rollout = status["rollout"]
    assert (rollout["state"], rollout["phase"]) == ("progressing", "canary"), rollout
    assert "rolled_back" not in text and "rollback:" not in text
    for venue in ("binance", "futu", "ib"):
        files = list((tmp_path / "data" / venue).glob("*.jsonl"))
        assert files and sum(f.stat().st_size for f in files) > 0, f"{venue} wrote nothing"
        kinds = {json.loads(line)["kind"] for f in files for line in f.read_text().splitlines()}
        assert {"trade", "ticker"} <= kinds, (venue, kinds)
    assert proc.returncode == 0
    assert "Traceback" not in text
