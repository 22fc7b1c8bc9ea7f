"""Shared test helpers: polling waits with a deadline, and an event collector standing in for the queue."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from feedrunner.adapters.base import Adapter
from feedrunner.events import Event, Trade
from feedrunner.spec import Venue, check_text


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `pred` until true; fail with `what` after `timeout` seconds. Returns the time it took."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """The blocking `wait_until`, for tests that drive processes: `pred`'s first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def http_get(url: str) -> Any:
    """A control server's answer: JSON when it says so, else text."""
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


class Clock:
    """A clock tests move by hand: `clock.now += 10`."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Collector:
    """An adapter's `emit` (held while `gate` is set and not open) and `now` its `emit_now` (refusing while
    `busy`): keeps every event in memory."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.busy = False
        self.gate: asyncio.Event | None = None
        self.batches = {"emit": 0, "now": 0}

    async def __call__(self, events: list[Event]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.batches["emit"] += 1
        self.events.extend(events)

    def now(self, events: list[Event]) -> bool:
        if self.busy:
            return False
        self.batches["now"] += 1
        self.events.extend(events)
        return True

    def of(self, kind: type, symbol: str | None = None, since: int = 0) -> list[Any]:
        return [e for e in self.events[since:] if isinstance(e, kind) and (symbol is None or e.symbol == symbol)]

    def trade_ids(self) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = defaultdict(list)
        for t in self.of(Trade):
            ids[t.symbol].append(int(t.id))
        return ids

    def assert_contiguous(self) -> None:
        """Every trade id exactly once, in order, with no hole, for every symbol."""
        for symbol, ids in self.trade_ids().items():
            assert ids == list(range(ids[0], ids[0] + len(ids))), f"{symbol}: not contiguous"


def venue_from(name: str, settings: dict[str, Any]) -> Venue:
    """One venue through the real feeds.yaml checks, as the runner would get it."""
    doc = {"version": 1, "environment": "live", "venues": {name: settings}}
    spec, problems = check_text(yaml.safe_dump(doc), "test.yaml", {})
    assert spec is not None, [str(p) for p in problems]
    return spec.venues[0]


def sample(adapter: Adapter, name: str, **labels: str) -> float:
    """A metric of the adapter's venue (0 when never set)."""
    return adapter.metrics.registry.get_sample_value(name, {"venue": adapter.name, **labels}) or 0.0


def spawn(cwd: Path, *args: str, stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    """`feedrunner <args>` (by default `run feeds.yaml`) as a subprocess in `cwd`: text, unbuffered."""
    return subprocess.Popen(
        [sys.executable, "-m", "feedrunner.cli", *(args or ("run", "feeds.yaml"))],
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
