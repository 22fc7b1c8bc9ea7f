"""JSONL files from a path template ({venue}, {date}, {kind}, {symbol}), at most max_open_files open.

Writes go to buffered files and reach the disk on flush (every flush_interval, and at shutdown), so a
busy feed does not pay a syscall per event. The date is the UTC day the event was received.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import IO

from feedrunner.events import Event, group_by
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.spec import Sink as SinkSpec

PATH_CACHE = 4096  # formatted paths kept per day, by (venue, kind, symbol)
NS_PER_DAY = 86_400_000_000_000


class JsonlSink(Sink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self.template = spec.path or "data/{venue}/{date}.jsonl"
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
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
        """Group by file, then one write of one encoded block per file. Events are grouped by the fields
        the template uses (a template without {symbol} puts a whole batch in one group), and the path is
        looked up once per group unless the batch crosses midnight."""
        for group in group_by(events, self._key).values():
            self._date(group[0].ts_received)
            day_start, day_end = self._day[1] - NS_PER_DAY, self._day[1]
            if all(day_start <= e.ts_received < day_end for e in group):
                self._file(self._path(group[0])).write(encode_lines(group))
            else:  # the day changed inside the batch
                by_path: dict[str, list[Event]] = {}
                for e in group:
                    by_path.setdefault(self._path(e), []).append(e)
                for path, part in by_path.items():
                    self._file(path).write(encode_lines(part))
        return len(events)

    def flush(self) -> None:
        for fh in self._files.values():
            fh.flush()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
