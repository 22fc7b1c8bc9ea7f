"""JSONL files from a path template ({venue}, {date}, {kind}, {symbol}), at most max_open_files open.

Writes go to buffered files and reach the disk on flush (every flush_interval, and at shutdown), so a
busy feed does not pay a syscall per event. The date is the UTC day the event was received.

Faults stay with the file they hit: a path that cannot be opened, written or flushed loses its own
events (counted) while every other file keeps being written. A path that could not be opened is retried
at each flush, not at each write (a failing open costs two syscalls and an exception). A file renamed or
removed under us (logrotate) is noticed at the next flush, by its inode, and reopened at its path.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import IO

from loguru import logger

from feedrunner.events import Event, group_by
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.spec import Sink as SinkSpec


class Unopened(Exception):
    """The path could not be opened and waits for the next flush to be retried."""


PATH_CACHE = 4096  # formatted paths kept per day, by (venue, kind, symbol)
NS_PER_DAY = 86_400_000_000_000


@dataclass(slots=True)
class OpenFile:
    fh: IO[bytes]
    inode: tuple[int, int]  # (st_dev, st_ino) when opened: a rename away changes what the path names
    pending: int = 0  # events buffered since the last flush, lost if the flush fails


class JsonlSink(Sink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self.template = spec.path or "data/{venue}/{date}.jsonl"
        self._files: OrderedDict[str, OpenFile] = OrderedDict()
        self._day = ("", 0)  # (YYYY-MM-DD, first ns of the next day) cached: strftime per event is costly
        self._paths: dict[tuple[str, str, str], str] = {}  # today's path per (venue, kind, symbol)
        used = [f for f in ("venue", "kind", "symbol") if "{" + f in self.template]
        self._key = attrgetter(*used) if used else (lambda e: None)

    def _date(self, ts_ns: int) -> str:
        day, until = self._day
        if ts_ns < until and day:
            return day
        secs = ts_ns // 1_000_000_000
        day = time.strftime("%Y-%m-%d", time.gmtime(secs))
        self._day = (day, (secs - secs % 86400 + 86400) * 1_000_000_000)
        self._paths.clear()
        return day

    def _path(self, e: Event) -> str:
        date = self._date(e.ts_received)
        key = (e.venue, e.kind, e.symbol)
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) >= PATH_CACHE:
                self._paths.clear()
            path = self._paths[key] = self.template.format(
                venue=e.venue, date=date, kind=e.kind, symbol=e.symbol.replace("/", "-")
            )
        return path

    def _file(self, path: str, retry: bool = False) -> OpenFile:
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        if not retry and self.state.failing.get(path) == "open":
            raise Unopened
        while len(self._files) >= self.spec.max_open_files:
            self._close(*self._files.popitem(last=False))
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fh = p.open("ab", buffering=1 << 16)
        st = os.fstat(fh.fileno())
        f = self._files[path] = OpenFile(fh, (st.st_dev, st.st_ino))
        return f

    def _append(self, path: str, events: list[Event]) -> int:
        try:
            f = self._file(path)
        except Unopened:
            self.state.lost(len(events), path)
            return 0
        except Exception as exc:
            self.state.fail(path, "open", len(events), exc)
            return 0
        try:
            f.fh.write(encode_lines(events))
        except Exception as exc:
            self._lose(path, f, "write", len(events), exc)
            return 0
        f.pending += len(events)
        return len(events)

    def _lose(self, path: str, f: OpenFile, op: str, events: int, exc: Exception) -> None:
        """A file whose write or flush failed is let go with its buffer (counted); the next write reopens it."""
        del self._files[path]
        try:
            f.fh.close()  # retries the flush that just failed; the fd is released either way
        except Exception:  # the same failure, reported below once
            pass
        self.state.fail(path, op, events + f.pending, exc)

    def _close(self, path: str, f: OpenFile) -> None:
        try:
            f.fh.close()
        except Exception as exc:
            self.state.fail(path, "close", f.pending, exc)
            return
        if f.pending:
            self.state.ok(path)

    def write(self, events: Sequence[Event]) -> int:
        """Group by file, then one write of one encoded block per file. Events are grouped by the fields
        the template uses (a template without {symbol} puts a whole batch in one group), and the path is
        looked up once per group unless the batch crosses midnight."""
        written = 0
        for group in group_by(events, self._key).values():
            self._date(group[0].ts_received)
            day_start, day_end = self._day[1] - NS_PER_DAY, self._day[1]
            if all(day_start <= e.ts_received < day_end for e in group):
                written += self._append(self._path(group[0]), group)
            else:  # the day changed inside the batch
                by_path: dict[str, list[Event]] = {}
                for e in group:
                    by_path.setdefault(self._path(e), []).append(e)
                for path, part in by_path.items():
                    written += self._append(path, part)
        return written

    def flush(self) -> None:
        """Flush every file; reopen those renamed or removed since they were opened (one stat per open
        file, per flush); retry the paths that could not be opened, so a fixed path recovers unwritten."""
        moved = []
        for path, f in list(self._files.items()):
            try:
                f.fh.flush()
            except Exception as exc:
                self._lose(path, f, "flush", 0, exc)
                continue
            if f.pending:
                f.pending = 0
                self.state.ok(path)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            except OSError:
                continue
            if st is None or (st.st_dev, st.st_ino) != f.inode:
                moved.append(path)
                del self._files[path]
                self._close(path, f)
        if moved:
            logger.info(
                "sink {}: {} file(s) renamed or removed since opened, reopening at their paths: {}",
                self.name,
                len(moved),
                ", ".join(moved[:5]) + (", ..." if len(moved) > 5 else ""),
            )
        self.state.forget_unwanted()
        for path, op in list(self.state.failing.items()):
            if op == "open" and path not in self._files:
                try:
                    self._file(path, retry=True)
                except Exception as exc:  # still failing: counted, logged when the episode began
                    self.state.fail(path, "open", 0, exc)
                    continue
                self.state.ok(path)

    def reopen(self) -> None:
        """Close every file (flushing it); each path is opened afresh by its next write."""
        self.close()

    def close(self) -> None:
        while self._files:
            self._close(*self._files.popitem(last=False))
