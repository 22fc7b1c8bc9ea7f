"""`feedrunner run` in a subprocess, as an operator starts it: finds the control address in its JSON logs,
drives the CLI against it, and stops it (SIGTERM, then SIGKILL if it outlasts the wait)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CONTROL = re.compile(r"control server on (http://127\.0\.0\.1:\d+)")


class Run:
    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None, log: str = "run.log") -> None:
        self.cwd = cwd
        self.logname = log
        self.log = (cwd / log).open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "feedrunner.cli", "run", *(args or ("feeds.yaml",))],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = CONTROL.search(self.text())
            if m:
                self.url = m.group(1)
                return
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise AssertionError("runner did not start: " + self.text()[-2000:])

    def text(self) -> str:
        return (self.cwd / self.logname).read_text()

    def cli(self, *args: str) -> tuple[int, dict]:
        p = subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", *args, "--url", self.url, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.cwd,
        )
        return p.returncode, json.loads(p.stdout or "{}")

    def rollout(self) -> dict:
        return self.cli("rollout", "status")[1]

    def wait(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.rollout()
            if pred(r):
                return r
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {self.rollout()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """The exit code; a runner that outlasts 30 s after `sig` is killed (and its code is -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.log.close()
        return code
