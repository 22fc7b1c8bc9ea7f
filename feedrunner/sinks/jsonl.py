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
from feedrunner.sinks.base import Sink, dumps
from feedrunner.spec import Sink as SinkSpec


class JsonlSink(Sink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self.template = spec.path or "data/{venue}/{date}.jsonl"
        self._files: OrderedDict[str, IO[str]] = OrderedDict()
        self._day = ("", 0)  # (YYYY-MM-DD, first ns of the next day) cached: strftime per event is costly

    def _date(self, ts_ns: int) -> str:
        day, until = self._day
        if ts_ns < until and day:
            return day
        secs = ts_ns // 1_000_000_000
        day = time.strftime("%Y-%m-%d", time.gmtime(secs))
        self._day = (day, (secs - secs % 86400 + 86400) * 1_000_000_000)
        return day

    def _file(self, path: str) -> IO[str]:
        fh = self._files.get(path)
        if fh is not None:
            self._files.move_to_end(path)
            return fh
        while len(self._files) >= self.spec.max_open_files:
            _, old = self._files.popitem(last=False)
            old.close()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fh = self._files[path] = p.open("a", encoding="utf-8", buffering=1 << 16)
        return fh

    def write(self, events: Sequence[Event]) -> int:
        by_path: dict[str, list[str]] = {}
        for e in events:
            path = self.template.format(
                venue=e.venue, date=self._date(e.ts_received), kind=e.kind, symbol=e.symbol.replace("/", "-")
            )
            by_path.setdefault(path, []).append(dumps(e))
        for path, lines in by_path.items():
            self._file(path).write("\n".join(lines) + "\n")
        return len(events)

    def flush(self) -> None:
        for fh in self._files.values():
            fh.flush()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
