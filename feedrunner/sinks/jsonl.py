"""JSONL files from a path template ({venue}, {date}, {kind}, {symbol}), at most max_open_files open.

Writes go to buffered files and reach the disk on flush (every flush_interval, and at shutdown), so a
busy feed does not pay a syscall per event. The date is the UTC day the event was received.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from feedrunner.events import Event
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.spec import Sink as SinkSpec

PATH_CACHE = 4096  # formatted paths kept per day, by (venue, kind, symbol)


class JsonlSink(Sink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self.template = spec.path or "data/{venue}/{date}.jsonl"
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self._day = ("", 0)  # (YYYY-MM-DD, first ns of the next day) cached: strftime per event is costly
        self._paths: dict[tuple[str, str, str], str] = {}  # today's path per (venue, kind, symbol)

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

    def _file(self, path: str) -> IO[bytes]:
        fh = self._files.get(path)
        if fh is not None:
            self._files.move_to_end(path)
            return fh
        while len(self._files) >= self.spec.max_open_files:
            _, old = self._files.popitem(last=False)
            old.close()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fh = self._files[path] = p.open("ab", buffering=1 << 16)
        return fh

    def write(self, events: Sequence[Event]) -> int:
        by_path: dict[str, list[Event]] = {}
        for e in events:
            path = self._path(e)
            group = by_path.get(path)
            if group is None:
                by_path[path] = [e]
            else:
                group.append(e)
        for path, group in by_path.items():
            self._file(path).write(encode_lines(group))
        return len(events)

    def flush(self) -> None:
        for fh in self._files.values():
            fh.flush()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
