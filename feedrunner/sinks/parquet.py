"""Parquet files per venue, kind and UTC day (or hour) of ts_received, typed columns, crash-safe.

The directory is the path template filled with {venue}, {kind}, {date} and {hour}; each file in it is
named `<HHMMSS>-<random>.parquet` after its first event, so a restart never appends to or overwrites a
file. A file is written as `<name>.parquet.tmp` and renamed into place when it closes (its partition
ended, roll_interval passed, max_open_files evicted it, shutdown), so a reader globbing *.parquet never
sees a file without its footer.

A Parquet file is unreadable until its footer is written, so every open file keeps a write-ahead log
beside it, `<name>.parquet.wal`: the file's rows as JSON lines, buffered and written at each flush (the
pipeline's timer), like a JSONL sink. The log is removed once the file is renamed into place. A sink
starting after an unclean stop (kill -9, a crash) rebuilds each file left behind from its log, so what
was flushed before the stop is kept. Like the JSONL files, the log is not fsynced: a power loss keeps
what the OS had written.

Rows are buffered per file as Arrow record batches, built column by column per batch, and written as a
row group of row_group_rows rows, or with whatever is buffered once the oldest row waited
row_group_interval (checked at each flush); the encoding runs on the sink's own thread.

Faults stay with their directory, as in the JSONL sink: a file that cannot be opened, logged or written
loses its own events (counted in the SinkState) and every other file carries on. A directory that
could not be opened is retried at the next write after a flush. A file that fails is completed if it
still can be; if not, its rows count as lost and its log stays on disk, so the next start recovers what
the log holds.
"""

from __future__ import annotations

import glob
import os
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from loguru import logger

from feedrunner.events import Event, from_dict, group_by
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.spec import ParquetSpec
from feedrunner.spec import Sink as SinkSpec

NS = 1_000_000_000
NS_PER_HOUR = 3600 * NS
NS_PER_DAY = 24 * NS_PER_HOUR
DIR_CACHE = 4096  # formatted directories kept, by (venue, kind, partition start)

_TS = pa.timestamp("ns", tz="UTC")
_LEVELS = pa.list_(pa.struct([("price", pa.float64()), ("amount", pa.float64())]))
_COMMON = [
    ("venue", pa.string()),
    ("symbol", pa.string()),
    ("ts_exchange", _TS),
    ("ts_received", _TS),
    ("transport", pa.string()),
]
SCHEMAS: dict[str, pa.Schema] = {
    "trade": pa.schema(
        [
            *_COMMON,
            ("id", pa.string()),
            pa.field("price", pa.float64(), nullable=False),
            pa.field("amount", pa.float64(), nullable=False),
            ("side", pa.string()),
            pa.field("backfilled", pa.bool_(), nullable=False),
        ]
    ),
    "ticker": pa.schema(
        [*_COMMON, ("bid", pa.float64()), ("ask", pa.float64()), ("last", pa.float64()), ("volume", pa.float64())]
    ),
    "book": pa.schema([*_COMMON, ("bids", _LEVELS), ("asks", _LEVELS), ("sequence", pa.int64())]),
}
# Dictionary pages for the few-valued strings only, and deltas for the timestamps and sequences: a row
# group is written in about a third of the time of pyarrow's defaults (dictionary tried on every column),
# and is smaller. Both are Parquet 2 encodings every current reader decodes.
_DICTIONARY = ["venue", "symbol", "transport", "side"]
_DELTA = ("ts_exchange", "ts_received", "sequence")


def writer_options(kind: str, compression: str) -> dict[str, Any]:
    names = SCHEMAS[kind].names
    return {
        "compression": compression,
        "use_dictionary": [c for c in _DICTIONARY if c in names],
        "column_encoding": {c: "DELTA_BINARY_PACKED" for c in _DELTA if c in names},
    }


# Per kind and column in schema order: its name, how to read it from an event, its Arrow type.
_COLUMNS: dict[str, list[tuple[str, Callable[[Any], Any], pa.DataType]]] = {
    kind: [(f.name, attrgetter(f.name), f.type) for f in schema] for kind, schema in SCHEMAS.items()
}
_VENUE_KIND = attrgetter("venue", "kind")


def record_batch(kind: str, venue: str, events: Sequence[Event], ts_received: list[int]) -> pa.RecordBatch:
    """One file's events as typed columns: one list and one pa.array per column, no per-row dicts.
    A file holds one venue, so its venue column is a constant."""
    columns = []
    for name, get, typ in _COLUMNS[kind]:
        if name == "venue":
            columns.append(pa.repeat(pa.scalar(venue, typ), len(events)))
        elif name == "ts_received":
            columns.append(pa.array(ts_received, typ))
        else:
            columns.append(pa.array(list(map(get, events)), typ))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMAS[kind])


def warm_up(compression: str) -> None:
    """Convert and encode one empty batch per kind, at start: pyarrow's first conversion from Python
    objects loads its pandas support when pandas is installed, and its first Parquet write sets up the
    codec, a second or more that would otherwise stall the event loop at the first write."""
    for kind in SCHEMAS:
        table = pa.Table.from_batches([record_batch(kind, "", [], [])])
        pq.write_table(table, pa.BufferOutputStream(), **writer_options(kind, compression))


@dataclass(slots=True)
class OpenFile:
    where: str  # the directory: faults are reported per partition, whichever file in it failed
    path: str  # <dir>/<name>.parquet, where the file appears once complete
    writer: pq.ParquetWriter  # on path + ".tmp"; used by the encoder thread only, once opened
    wal: IO[bytes]  # path + ".wal", unbuffered: `logged` is written at each flush
    until: int  # ns: the partition's end
    opened: float  # monotonic
    batches: list[pa.RecordBatch] = field(default_factory=list)  # rows not yet handed to the encoder
    buffered: int = 0  # rows in `batches`
    since: float = 0.0  # monotonic: when the oldest buffered row came
    logged: list[bytes] = field(default_factory=list)  # log lines not yet written
    pending: int = 0  # events logged since the last flush
    rows: int = 0  # rows accepted since the file was opened
    encoding: Future[None] | None = None  # the last row group handed to the encoder
    error: Exception | None = None  # set by the encoder: a row group failed, the file cannot be completed


def _write_log(f: OpenFile) -> None:
    data = memoryview(b"".join(f.logged))
    f.logged = []
    while data:
        data = data[f.wal.write(data) :]


def _encode(f: OpenFile, table: pa.Table, rows: int) -> None:
    """On the encoder thread: one or more row groups. A failure is kept for the loop to report."""
    if f.error is None:
        try:
            f.writer.write_table(table, row_group_size=rows)
        except Exception as exc:
            f.error = exc


def _complete(f: OpenFile, rest: pa.Table | None, rows: int) -> Exception | None:
    """On the encoder thread, after the file's row groups: the last one, the footer, the rename into
    place, then the log's removal. On failure the .tmp is never renamed, the log gets the lines it still
    lacked (for the next start's recovery), and the error is returned."""
    exc = f.error
    if exc is None:
        try:
            if rest is not None:
                f.writer.write_table(rest, row_group_size=rows)
            f.writer.close()
            os.replace(f.path + ".tmp", f.path)
        except Exception as e:
            exc = e
    if exc is not None:
        for cleanup in (f.writer.close, lambda: _write_log(f), f.wal.close):
            try:
                cleanup()
            except Exception:  # the same failure, reported once by the loop
                pass
        return exc
    try:
        f.wal.close()
        os.unlink(f.path + ".wal")
    except OSError as e:  # the file is complete; a start removes the stale log beside it
        logger.warning("cannot remove {}.wal: {}", f.path, e.strerror or e)
    return None


class ParquetSink(Sink):
    """Row groups are encoded and compressed on one thread of the sink's own (pyarrow releases the GIL
    there), so a 100k-row group costs the event loop a slice of its Arrow table, not the tens of
    milliseconds of its encoding; one thread keeps each file's row groups, footer and rename in order.
    At most one row group per file waits for it: a slow disk holds up the writes, not the memory."""

    def __init__(
        self,
        spec: SinkSpec,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(spec)
        self.pq = spec.parquet or ParquetSpec(path=spec.path or ParquetSpec.path)
        self.template = self.pq.path
        hourly = self.pq.partition == "hour" or "{hour" in self.template
        self.step = NS_PER_HOUR if hourly else NS_PER_DAY
        self.compression = self.pq.compression
        self._clock = clock
        self._monotonic = monotonic
        self._files: OrderedDict[tuple[str, str, int], OpenFile] = OrderedDict()
        self._dirs: dict[tuple[str, str, int], str] = {}
        self._period = (0, 0)  # (start, end) in ns of the last partition looked up
        self._blocked: set[str] = set()  # directories that failed to open since the last flush
        self._unreported = 0  # rows a recovery could not read, counted once metrics are bound
        self._encoder: ThreadPoolExecutor | None = None  # started at the first row group, ended by close()
        self._closing: list[tuple[OpenFile, Future[Exception | None]]] = []
        warm_up(self.compression)
        self.recover()

    # -- partitions and files ----------------------------------------------------------------------

    def _bounds(self, ts: int) -> tuple[int, int]:
        start, end = self._period
        if start <= ts < end:
            return self._period
        start = ts - ts % self.step
        self._period = (start, start + self.step)
        return self._period

    def _dir(self, key: tuple[str, str, int]) -> str:
        where = self._dirs.get(key)
        if where is None:
            if len(self._dirs) >= DIR_CACHE:
                self._dirs.clear()
            venue, kind, start = key
            t = time.gmtime(start // NS)
            where = self._dirs[key] = self.template.format(
                venue=venue, kind=kind, date=time.strftime("%Y-%m-%d", t), hour=time.strftime("%H", t)
            )
        return where

    def _open(self, key: tuple[str, str, int], where: str, first_ts: int) -> OpenFile:
        while len(self._files) >= self.spec.max_open_files:
            self._finish(self._files.popitem(last=False)[1])
        os.makedirs(where, exist_ok=True)
        name = f"{time.strftime('%H%M%S', time.gmtime(first_ts // NS))}-{os.urandom(4).hex()}"
        path = os.path.join(where, name + ".parquet")
        wal = open(path + ".wal", "xb", buffering=0)
        try:
            writer = pq.ParquetWriter(path + ".tmp", SCHEMAS[key[1]], **writer_options(key[1], self.compression))
        except BaseException:
            wal.close()
            os.unlink(path + ".wal")
            raise
        f = self._files[key] = OpenFile(where, path, writer, wal, key[2] + self.step, self._monotonic())
        if where in self.state.failing:
            self.state.ok(where)
        return f

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix=f"parquet-encoder-{self.name}")
        return self._encoder.submit(fn, *args)

    def _cut(self, f: OpenFile, everything: bool) -> None:
        """Hand full row groups of row_group_rows rows to the encoder; with `everything`, the rest too."""
        rows = self.pq.row_group_rows
        table = pa.Table.from_batches(f.batches, f.writer.schema)
        keep = 0 if everything else table.num_rows % rows
        f.batches = table.slice(table.num_rows - keep).to_batches() if keep else []
        f.buffered = keep
        f.since = self._monotonic()
        if f.encoding is not None:
            f.encoding.result()  # the previous one is done, unless the disk is slower than the feed
        f.encoding = self._submit(_encode, f, table.slice(0, table.num_rows - keep), rows)

    def _finish(self, f: OpenFile) -> None:
        """Complete a file already taken out of `_files` (on the encoder; reported by `_settle`)."""
        rest = pa.Table.from_batches(f.batches, f.writer.schema) if f.buffered else None
        f.batches = []
        self._closing.append((f, self._submit(_complete, f, rest, self.pq.row_group_rows)))

    def _settle(self, wait: bool) -> None:
        """Report the completions that failed (their rows are lost), of those done or, with `wait`, all."""
        waiting = []
        for f, done in self._closing:
            if wait or done.done():
                exc = done.result()
                if exc is not None:
                    self.state.fail(f.where, "close", f.rows, exc)
            else:
                waiting.append((f, done))
        self._closing = waiting

    def _abandon(self, key: tuple[str, str, int], f: OpenFile, op: str, exc: Exception) -> None:
        """Let go of a file whose log or row group failed: it is completed if it still can be."""
        del self._files[key]
        self.state.fail(f.where, op, 0, exc)
        self._finish(f)

    # -- the sink interface ------------------------------------------------------------------------

    def write(self, events: Sequence[Event]) -> int:
        """Group by venue and kind; a group inside one partition (the usual case) is one file's batch."""
        written = 0
        for (venue, kind), group in group_by(events, _VENUE_KIND).items():
            ts = [e.ts_received for e in group]
            start, end = self._bounds(ts[0])
            if start <= min(ts) and max(ts) < end:
                written += self._append((venue, kind, start), group, ts)
                continue
            parts: dict[int, list[Event]] = {}
            for e in group:  # the day or hour changed inside the batch
                parts.setdefault(self._bounds(e.ts_received)[0], []).append(e)
            for start, part in parts.items():
                written += self._append((venue, kind, start), part, [e.ts_received for e in part])
        return written

    def _append(self, key: tuple[str, str, int], events: list[Event], ts: list[int]) -> int:
        n = len(events)
        where = self._dir(key)
        if where in self._blocked:
            self.state.lost(n, where)
            return 0
        f = self._files.get(key)
        if f is None:
            try:
                f = self._open(key, where, ts[0])
            except Exception as exc:
                self._blocked.add(where)
                self.state.fail(where, "open", n, exc)
                return 0
        else:
            self._files.move_to_end(key)
        try:
            batch = record_batch(key[1], key[0], events, ts)
            lines = encode_lines(events)
        except Exception as exc:  # an event that does not fit its kind's columns
            self.state.fail(where, "write", n, exc)
            return 0
        if not f.buffered:
            f.since = self._monotonic()
        f.batches.append(batch)
        f.logged.append(lines)
        f.buffered += n
        f.pending += n
        f.rows += n
        if f.buffered >= self.pq.row_group_rows:
            self._cut(f, everything=False)
        return n

    def flush(self) -> None:
        """Write each file's log; close the files whose partition ended or whose roll_interval passed;
        hand over the row groups that waited row_group_interval; report what failed on the encoder."""
        now_ns = int(self._clock() * NS)
        now = self._monotonic()
        self._settle(wait=False)
        for key, f in list(self._files.items()):
            if f.error is not None:
                self._abandon(key, f, "write", f.error)
                continue
            try:
                _write_log(f)
            except Exception as exc:
                self._abandon(key, f, "flush", exc)
                continue
            if f.pending:
                f.pending = 0
                self.state.ok(f.where)
            if now_ns >= f.until or now - f.opened >= self.pq.roll_interval:
                del self._files[key]
                self._finish(f)
            elif f.buffered and now - f.since >= self.pq.row_group_interval:
                self._cut(f, everything=True)
        self._blocked.clear()
        self._report()
        self.state.forget_unwanted()

    def reopen(self) -> None:
        """Close every file (renamed into place); the next write opens new ones."""
        self.close()

    def close(self) -> None:
        """Complete every file and wait for the encoder, whose thread then ends."""
        while self._files:
            self._finish(self._files.popitem(last=False)[1])
        self._settle(wait=True)
        if self._encoder is not None:
            self._encoder.shutdown()
            self._encoder = None
        self._report()

    def _report(self) -> None:
        if self._unreported:
            self.state.lost(self._unreported)
            self._unreported = 0

    # -- recovery after an unclean stop ------------------------------------------------------------

    def _wal_pattern(self) -> str:
        """The glob of every log the template can produce: each placeholder one path segment's `*`."""
        parts = []
        for literal, name, _, _ in string.Formatter().parse(self.template):
            parts.append(glob.escape(literal))
            if name is not None:
                parts.append("*")
        return os.path.join("".join(parts), "*.parquet.wal")

    def recover(self) -> None:
        """Rebuild every file an unclean stop left open from its log, under the template's directories."""
        for wal in sorted(glob.glob(self._wal_pattern())):
            path = wal.removesuffix(".wal")
            try:
                self._recover_file(path)
            except Exception as exc:  # the log stays for the next start
                self.state.fail(os.path.dirname(path), "recover", 0, exc)

    def _recover_file(self, path: str) -> None:
        if os.path.exists(path):  # completed; only the log's removal was cut short
            _remove(path + ".tmp")
            os.unlink(path + ".wal")
            return
        with open(path + ".wal", "rb") as fh:
            lines = fh.read().split(b"\n")
        unread = 1 if lines.pop() else 0  # the part after the last newline: a line cut short
        events: list[Event] = []
        for line in lines:
            try:
                events.append(from_dict(orjson.loads(line)))
            except Exception:
                unread += 1
        kind = events[0].kind if events else ""
        rows = [e for e in events if e.kind == kind]  # a file holds one kind
        unread += len(events) - len(rows)
        if rows:
            batches = [
                record_batch(kind, venue, part, [e.ts_received for e in part])
                for (venue, _), part in group_by(rows, _VENUE_KIND).items()
            ]
            table = pa.Table.from_batches(batches, SCHEMAS[kind])
            options = writer_options(kind, self.compression)
            pq.write_table(table, path + ".tmp", row_group_size=self.pq.row_group_rows, **options)
            os.replace(path + ".tmp", path)
        else:
            _remove(path + ".tmp")
        os.unlink(path + ".wal")
        self._unreported += unread
        if rows or unread:
            logger.info(
                "sink {}: recovered {} after an unclean stop: {} rows from its log{}",
                self.name,
                path,
                len(rows),
                f", {unread} unreadable (counted lost)" if unread else "",
            )


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
