"""The sink interface: write batches, flush on a timer and at shutdown, reopen on SIGHUP, close.

A sink never raises for an I/O error: it reports it to its `SinkState` per file (or per stream) and
keeps writing everything else.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import orjson
from loguru import logger

from feedrunner.events import Event, to_dict
from feedrunner.metrics import Metrics
from feedrunner.spec import Sink as SinkSpec

SHOWN = 5  # failing paths listed in the status
FORGET_AFTER = 300.0  # seconds a failing path may go unasked before it stops counting as failing


class SinkState:
    """A sink's health: which paths fail, since when and how many events they cost.

    An episode lasts while any path fails. It is logged twice: an ERROR when it starts (naming the path)
    and one line when the last failing path recovers, with the events lost meanwhile. Every failed
    operation is counted in feedrunner_sink_errors_total{sink,operation}, every lost event in
    feedrunner_sink_events_failed_total{sink}. Only the failure path does any work here.
    """

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.failing: dict[str, str] = {}  # path -> the operation that failed last on it
        self.wanted: dict[str, float] = {}  # failing path -> when events last came for it (monotonic)
        self.since: float | None = None  # when the current episode started
        self.last_error: str | None = None
        self.episode_events = 0
        self.episode_paths = 0
        self.events_written = 0
        self.events_failed = 0
        self.metrics: Metrics | None = None  # once a pipeline owns the sink
        self._failed: Any = None  # its feedrunner_sink_events_failed_total child

    def bind(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._failed = metrics.sink_events_failed.labels(self.sink)  # exported at 0 from the start
        metrics.sink_up.labels(self.sink).set(0 if self.failing else 1)

    def fail(self, where: str, op: str, events: int, exc: BaseException) -> None:
        """`events` could not be written because `op` failed on `where` (a path, or the sink's batches)."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        error = self.last_error = f"cannot {op} {where}: {reason}"
        if self.metrics is not None:
            self.metrics.sink_errors.labels(self.sink, op).inc()
        if where not in self.failing:
            if self.since is None:
                self.since = time.time()
                self.episode_events = self.episode_paths = 0
                if self.metrics is not None:
                    self.metrics.sink_up.labels(self.sink).set(0)
                logger.error("sink {} is failing: {}; its lost events are counted until it recovers", self.sink, error)
            else:
                logger.debug("sink {} is failing on one more path: {}", self.sink, error)
            self.episode_paths += 1
        self.failing[where] = op
        self.lost(events, where)

    def lost(self, events: int, where: str | None = None) -> None:
        """`events` not written, for a path already failing (no new attempt, so no new error)."""
        if where is not None and (events or where not in self.wanted):
            self.wanted[where] = time.monotonic()
        self.events_failed += events
        self.episode_events += events
        if self._failed is not None and events:
            self._failed.inc(events)

    def forget_unwanted(self, after: float = FORGET_AFTER) -> None:
        """A failing path nothing was sent to for `after` seconds (yesterday's file, a symbol a reload
        removed) stops counting as failing: a sink is judged by what it is asked to write now."""
        now = time.monotonic()
        for where in [w for w, t in self.wanted.items() if now - t > after and w in self.failing]:
            self.ok(where, f"no events for {where} in {after:g}s, no longer retried")

    def ok(self, where: str, why: str | None = None) -> None:
        """`where` was written (or opened) again; the episode ends when nothing else fails."""
        self.wanted.pop(where, None)
        if self.failing.pop(where, None) is None:
            return
        if why is not None:
            logger.warning("sink {}: {}", self.sink, why)
        if self.failing:
            return
        assert self.since is not None
        logger.info(
            "sink {} recovered after {:.1f}s ({}): {} events failed during the episode, on {} path(s)",
            self.sink,
            time.time() - self.since,
            "nothing left failing" if why else f"{where} is writable again",
            self.episode_events,
            self.episode_paths,
        )
        self.since = None
        if self.metrics is not None:
            self.metrics.sink_up.labels(self.sink).set(1)

    def problem(self) -> str | None:
        if self.since is None:
            return None
        return (
            f"sink {self.sink}: failing for {time.time() - self.since:.0f}s on {len(self.failing)} path(s), "
            f"{self.episode_events} events failed; last: {self.last_error}"
        )

    def status(self) -> dict[str, Any]:
        return {
            "state": "failing" if self.failing else "ok",
            "since": self.since,
            "last_error": self.last_error,
            "events_written": self.events_written,
            "events_failed": self.episode_events if self.failing else 0,  # in the current episode
            "events_failed_total": self.events_failed,
            "failing_paths": sorted(self.failing)[:SHOWN],
            "failing_path_count": len(self.failing),
        }


class Sink(ABC):
    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.kinds = frozenset(spec.kinds)
        self.name = spec.label
        self.state = SinkState(self.name)

    @abstractmethod
    def write(self, events: Sequence[Event]) -> int:
        """Write a batch (already filtered by kind); return how many were written. Failures go to
        `self.state`, per file: one file failing never stops the others."""

    def flush(self) -> None:  # noqa: B027 - optional
        pass

    def reopen(self) -> None:  # noqa: B027 - optional
        """Let go of open files so the next write opens each path afresh (logrotate's SIGHUP)."""

    def close(self) -> None:
        self.flush()


_SPLIT = b'},{"venue":'
_JOIN = b'}\n{"venue":'


def encode_lines(events: Sequence[Event]) -> bytes:
    """A batch as JSON lines, newline-terminated, in one orjson call.

    One call for the batch is several times cheaper than one per event (orjson's output buffer is
    allocated once, not per line). The list is then cut into lines at each `},{"venue":`, which can only
    be the boundary between two records: inside a JSON string every `"` is escaped, so the unescaped
    quote before `venue` must open a key, and `venue` is every record's first key and no nested key.
    """
    if not events:
        return b""
    return orjson.dumps([to_dict(e) for e in events])[1:-1].replace(_SPLIT, _JOIN) + b"\n"


def encode_each(events: Sequence[Event]) -> list[bytes]:
    """Each event's JSON record, from one orjson call for the batch (as `encode_lines`): a message per
    event on a bus costs one split instead of one encoder per event. orjson escapes every newline inside a
    string, so the only newlines are the ones `encode_lines` put between records."""
    if not events:
        return []
    return orjson.dumps([to_dict(e) for e in events])[1:-1].replace(_SPLIT, _JOIN).split(b"\n")


def dumps(event: Event) -> str:
    """One record as a JSON line without its newline (tools, tests)."""
    return orjson.dumps(to_dict(event)).decode()
