"""The Parquet sink on real files: typed columns every reader opens (pyarrow, duckdb, pandas), files per
venue, kind and UTC day or hour, row groups cut by rows and by time, files invisible until complete,
faults kept to their directory, rows kept across kill -9 by the write-ahead log, and `feedrunner run`
writing the same events as a JSONL sink beside it."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import Clock, spawn
from loguru import logger

from feedrunner.events import Book, Event, Ticker, Trade
from feedrunner.metrics import Metrics
from feedrunner.sinks import build
from feedrunner.sinks.base import Sink
from feedrunner.sinks.jsonl import JsonlSink
from feedrunner.sinks.parquet import ParquetSink
from feedrunner.spec import ParquetSpec, check_text
from feedrunner.spec import Sink as SinkSpec

NS = 1_000_000_000
T0 = 1_700_000_000 * NS  # 2023-11-14 22:13:20 UTC
MIDNIGHT = 1_700_006_400 * NS  # 2023-11-15 00:00:00 UTC
REPO = Path(__file__).resolve().parents[1]


def trade(i: int, venue: str = "binance", ts: int = T0, symbol: str = "BTC/USDT") -> Trade:
    return Trade(venue, symbol, ts + i - 7 if i % 5 else None, ts + i, "websocket", str(i), 100.0 + i, 0.5, "buy")


def ticker(i: int, ts: int = T0) -> Ticker:
    return Ticker("binance", "ETH/USDT", ts + i - 3, ts + i, "polling", 10.0 + i, 10.5 + i, None, 1000.0)


def book(i: int, ts: int = T0) -> Book:
    return Book("binance", "BTC/USDT", None, ts + i, "websocket", [(99.0, 1.0), (98.0, 2.0)], [(101.0, 0.5)], i)


class Sinks:
    """Parquet sinks on one directory, on a clock (wall) and a monotonic clock the test moves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wall = Clock()
        self.wall.now = T0 / NS
        self.mono = Clock()
        self.opened: list[ParquetSink] = []

    def __call__(self, template: str = "pq/{venue}/{kind}/{date}", **settings: object) -> ParquetSink:
        max_open = settings.pop("max_open_files", 64)
        spec = ParquetSpec(path=str(self.root / template), **settings)  # type: ignore[arg-type]
        sink = ParquetSink(
            SinkSpec(type="parquet", path=spec.path, max_open_files=max_open, parquet=spec),  # type: ignore[arg-type]
            clock=self.wall,
            monotonic=self.mono,
        )
        self.opened.append(sink)
        return sink

    def files(self, pattern: str = "**/*.parquet") -> list[Path]:
        return sorted(self.root.glob(pattern))


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Sinks]:
    s = Sinks(tmp_path)
    try:
        yield s
    finally:
        for sink in s.opened:
            sink.close()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink_id)


def soon(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Files are completed on the sink's encoder thread: wait for what the loop handed it."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def sql(query: str) -> list[tuple[object, ...]]:
    return duckdb.sql(query).fetchall()


def rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def group_sizes(path: Path) -> list[int]:
    md = pq.ParquetFile(path).metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


# -- columns, readers, layout ------------------------------------------------------------------------


def test_each_kind_is_written_with_typed_columns_that_pyarrow_duckdb_and_pandas_read(sinks: Sinks) -> None:
    sink = sinks()
    events: list[Event] = [trade(i) for i in range(50)] + [ticker(i) for i in range(20)] + [book(i) for i in range(10)]
    events += [trade(i, venue="kraken", symbol="XBT/USD") for i in range(5)]
    assert sink.write(events) == len(events)
    sink.flush()
    sink.close()
    root = sinks.root / "pq"
    assert {p.relative_to(root).parent.as_posix() for p in sinks.files()} == {
        "binance/trade/2023-11-14",
        "binance/ticker/2023-11-14",
        "binance/book/2023-11-14",
        "kraken/trade/2023-11-14",
    }
    assert all(re.fullmatch(r"\d{6}-[0-9a-f]{8}\.parquet", p.name) for p in sinks.files())

    trades = pq.read_table(root / "binance" / "trade")
    ts = pa.timestamp("ns", tz="UTC")
    assert trades.schema.field("ts_received").type == ts and trades.schema.field("ts_exchange").type == ts
    assert trades.schema.field("price").type == pa.float64() and trades.schema.field("backfilled").type == pa.bool_()
    got = trades.to_pylist()
    assert len(got) == 50
    assert got[3]["price"] == 103.0 and got[3]["id"] == "3" and got[3]["side"] == "buy"
    assert got[3]["ts_received"].timestamp() == pytest.approx((T0 + 3) / NS)
    assert got[0]["ts_exchange"] is None and got[1]["ts_exchange"] is not None  # a venue without its own stamp
    assert trades.column("ts_received").cast(pa.int64()).to_pylist() == [T0 + i for i in range(50)]  # exact ns

    tickers = pq.read_table(root / "binance" / "ticker").to_pylist()
    assert tickers[2]["bid"] == 12.0 and tickers[2]["last"] is None and tickers[2]["transport"] == "polling"
    books = pq.read_table(root / "binance" / "book")
    assert books.schema.field("sequence").type == pa.int64()
    assert books.to_pylist()[4]["bids"] == [{"price": 99.0, "amount": 1.0}, {"price": 98.0, "amount": 2.0}]

    glob = f"{root}/*/trade/*/*.parquet"
    assert sql(f"select count(*) from read_parquet('{glob}')")[0] == (55,)
    venues = sql(f"select venue, count(*) from read_parquet('{glob}') group by venue order by venue")
    assert venues == [("binance", 50), ("kraken", 5)]
    bids = sql(f"select bids[1].price from read_parquet('{root}/binance/book/*/*.parquet') limit 1")[0]
    assert bids == (99.0,)
    frame = pq.read_table(root / "binance" / "trade").to_pandas()
    assert str(frame["ts_received"].dtype) == "datetime64[ns, UTC]" and str(frame["price"].dtype) == "float64"
    assert len(frame) == 50


def test_events_on_both_sides_of_midnight_go_to_two_day_directories(sinks: Sinks) -> None:
    sink = sinks()
    batch = [trade(i, ts=MIDNIGHT - 50) for i in range(100)]  # one batch: 50 before midnight, 50 after
    assert sink.write(batch) == 100
    sink.close()
    days = {p.parent.name: rows(p) for p in sinks.files()}
    assert days == {"2023-11-14": 50, "2023-11-15": 50}


def test_hourly_partitions_cut_files_per_hour_with_or_without_hour_in_the_path(sinks: Sinks) -> None:
    hour = 3600 * NS
    events = [trade(i, ts=T0 + (i % 3) * hour) for i in range(30)]  # 22:13, 23:13, 00:13 the next day
    in_day_dirs = sinks("a/{venue}/{date}", partition="hour")
    in_hour_dirs = sinks("b/{venue}/{date}/{hour}")  # {hour} in the path cuts files per hour too
    assert in_day_dirs.write(events) == in_hour_dirs.write(events) == 30
    in_day_dirs.close()
    in_hour_dirs.close()
    a = {(p.parent.name, p.name[:2]): rows(p) for p in sinks.files("a/**/*.parquet")}
    assert a == {("2023-11-14", "22"): 10, ("2023-11-14", "23"): 10, ("2023-11-15", "00"): 10}
    b = {p.relative_to(sinks.root / "b" / "binance").parent.as_posix(): rows(p) for p in sinks.files("b/**/*.parquet")}
    assert b == {"2023-11-14/22": 10, "2023-11-14/23": 10, "2023-11-15/00": 10}


def test_row_groups_are_cut_at_row_group_rows(sinks: Sinks) -> None:
    sink = sinks(row_group_rows=100)
    for start in range(0, 250, 30):
        sink.write([trade(i) for i in range(start, min(start + 30, 250))])
        sink.flush()
    sink.close()
    [path] = sinks.files()
    assert group_sizes(path) == [100, 100, 50]
    assert pq.read_table(path).column("id").to_pylist() == [str(i) for i in range(250)]  # in order


def test_a_row_group_is_written_once_its_oldest_row_waited_row_group_interval(sinks: Sinks) -> None:
    sink = sinks(row_group_interval=5.0)
    sink.write([trade(i) for i in range(30)])
    sinks.mono.now += 4
    sink.flush()
    [tmp] = sinks.files("**/*.parquet.tmp")
    size = tmp.stat().st_size
    sinks.mono.now += 1  # the first row waited 5 s
    sink.flush()
    soon(lambda: tmp.stat().st_size > size, "the row group in the file before it closes")
    sink.write([trade(i) for i in range(30, 50)])
    sink.close()
    assert group_sizes(sinks.files()[0]) == [30, 20]


def test_an_open_file_is_never_globbed_as_parquet_and_compression_is_recorded(sinks: Sinks) -> None:
    sink = sinks(row_group_rows=10)
    sink.write([trade(i) for i in range(25)])
    sink.flush()
    assert sinks.files() == []  # rows are on disk, in the .tmp and the log, but no *.parquet yet
    assert [p.name.split(".", 1)[1] for p in sinks.files("**/*.parquet.*")] == ["parquet.tmp", "parquet.wal"]
    sink.close()
    [path] = sinks.files()
    assert sinks.files("**/*.parquet.*") == []
    md = pq.ParquetFile(path).metadata
    assert {md.row_group(g).column(c).compression for g in range(md.num_row_groups) for c in range(md.num_columns)} == {
        "ZSTD"
    }
    snappy = sinks("snappy/{venue}", compression="snappy")
    snappy.write([trade(1)])
    snappy.close()
    [other] = sinks.files("snappy/**/*.parquet")
    assert pq.ParquetFile(other).metadata.row_group(0).column(0).compression == "SNAPPY"


def test_files_close_when_their_day_ends_and_after_roll_interval(sinks: Sinks) -> None:
    sink = sinks(roll_interval=60.0)
    sink.write([trade(i) for i in range(10)])
    sinks.mono.now += 59
    sink.flush()
    assert sinks.files() == []
    sinks.mono.now += 1
    sink.flush()
    soon(lambda: len(sinks.files()) == 1, "the file to roll")
    assert [rows(p) for p in sinks.files()] == [10]  # complete and renamed into place
    sink.write([trade(i) for i in range(10, 15)])  # a new file in the same directory
    sinks.wall.now = MIDNIGHT / NS  # the day is over: its file closes at the next flush
    sink.flush()
    soon(lambda: len(sinks.files()) == 2, "the day's file to close")
    assert sorted(rows(p) for p in sinks.files()) == [5, 10] and sinks.files("**/*.tmp") == []


def test_at_most_max_open_files_the_least_recently_used_closes_first(sinks: Sinks) -> None:
    sink = sinks(max_open_files=2)
    sink.write([trade(0, venue="a"), trade(1, venue="b")])
    sink.write([trade(2, venue="a")])  # b is now the least recently used
    sink.write([trade(3, venue="c")])
    soon(lambda: len(sinks.files()) == 1, "the least recently used file to close")
    assert [p.parent.parent.parent.name for p in sinks.files()] == ["b"]
    assert len(sinks.files("**/*.parquet.tmp")) == 2
    sink.close()
    assert sorted(rows(p) for p in sinks.files()) == [1, 1, 2]


def test_reopen_puts_every_open_file_in_place_and_the_next_write_starts_a_new_one(sinks: Sinks) -> None:
    sink = sinks()
    sink.write([trade(0), ticker(0)])
    sink.reopen()  # SIGHUP
    assert sorted(p.parts[-3] for p in sinks.files()) == ["ticker", "trade"]
    sink.write([trade(1)])
    sink.close()
    assert [rows(p) for p in sinks.files("**/trade/*/*.parquet")] == [1, 1]


def test_a_directory_that_cannot_be_made_loses_only_its_own_events_until_it_can(sinks: Sinks) -> None:
    sink = sinks()
    (sinks.root / "pq" / "bad").mkdir(parents=True)
    (sinks.root / "pq" / "bad" / "trade").write_text("a file where the directory should be")
    batch = [trade(i, venue="bad") for i in range(3)] + [trade(i, venue="good") for i in range(4)]
    assert sink.write(batch) == 4  # never raises; the good venue's events are written
    assert sink.write([trade(9, venue="bad")]) == 0  # not retried before the next flush
    assert sink.state.events_failed == 4 and sink.state.status()["failing_path_count"] == 1
    sink.flush()
    (sinks.root / "pq" / "bad" / "trade").unlink()
    assert sink.write([trade(10, venue="bad")]) == 1
    sink.flush()
    assert sink.state.status()["state"] == "ok"
    sink.close()
    assert sorted((p.parts[-4], rows(p)) for p in sinks.files()) == [("bad", 1), ("good", 4)]


# -- kill -9 -------------------------------------------------------------------------------------------

DIE = """\
import os, signal, sys, time
from feedrunner.events import Trade
from feedrunner.sinks.parquet import ParquetSink
from feedrunner.spec import ParquetSpec, Sink
now = time.time_ns()
spec = ParquetSpec(path=sys.argv[1], row_group_rows=64)
sink = ParquetSink(Sink(type="parquet", path=spec.path, parquet=spec))
for i in range(300):
    sink.write([Trade("binance", "BTC/USDT", None, now + i, "websocket", str(i), 1.0, 1.0, "buy")])
    if i == 199:
        sink.flush()  # 200 flushed, 100 more only written
os.kill(os.getpid(), signal.SIGKILL)
"""


def die_after_writing(template: str) -> None:
    """A process that writes 300 trades, flushes after 200, and is killed: no close, no atexit."""
    proc = subprocess.run(
        [sys.executable, "-c", DIE, template], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_rows_flushed_before_kill_9_are_recovered_at_the_next_start(sinks: Sinks, logs: list[str]) -> None:
    template = str(sinks.root / "pq" / "{venue}" / "{kind}" / "{date}")
    die_after_writing(template)
    [wal] = sinks.files("**/*.parquet.wal")
    assert sinks.files("**/*.parquet.tmp") and sinks.files() == []  # a torn file, unreadable
    with wal.open("ab") as fh:
        fh.write(b'{"venue":"binance","symbol":"BTC/USDT","kind":"tr')  # a line cut short by the kill
    sink = sinks("pq/{venue}/{kind}/{date}")
    [path] = sinks.files()
    assert path.name == wal.name.removesuffix(".wal")  # the file the dead process had open, in place
    assert sinks.files("**/*.parquet.*") == []  # its log and torn .tmp are gone
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == [str(i) for i in range(200)]  # all the flushed rows
    assert sql(f"select count(*) from read_parquet('{sinks.root}/pq/**/*.parquet')")[0] == (200,)
    [line] = [m for m in logs if "recovered" in m]  # one line per file, naming it, with its row count
    assert str(path) in line and re.search(r"\b200 rows", line)
    metrics = Metrics()
    sink.state.bind(metrics)  # as the pipeline does, after the sink is built
    sink.flush()
    failed = metrics.registry.get_sample_value("feedrunner_sink_events_failed_total", {"sink": sink.name})
    assert failed == sink.state.events_failed == 1  # the torn line, counted lost once metrics can see it
    sinks("pq/{venue}/{kind}/{date}")  # a second start finds nothing more to do
    assert sinks.files() == [path] and rows(path) == 200


def test_a_log_left_beside_a_complete_file_is_removed_not_recovered_twice(sinks: Sinks) -> None:
    sink = sinks()
    sink.write([trade(i) for i in range(5)])
    sink.flush()
    [wal] = sinks.files("**/*.parquet.wal")
    kept = wal.read_bytes()
    sink.close()
    wal.write_bytes(kept)  # as if the process died between the rename and the log's removal
    sinks()
    assert [rows(p) for p in sinks.files()] == [5] and sinks.files("**/*.wal") == []


# -- throughput ----------------------------------------------------------------------------------------


def test_throughput_against_jsonl_on_the_same_events(tmp_path: Path) -> None:
    """200k trades in the pipeline's batches, flushed every 10 batches, then closed (so every row group is
    encoded and every file in place, not just handed over); best of two runs per sink."""
    now = time.time_ns()
    events = [trade(i, ts=now, symbol=f"S{i % 20}/USDT") for i in range(200_000)]
    batches = [events[i : i + 2048] for i in range(0, len(events), 2048)]

    def rate(make: Callable[[int], Sink]) -> float:
        best = math.inf
        for run in range(2):
            sink = make(run)
            start = time.perf_counter()
            for n, batch in enumerate(batches):
                assert sink.write(batch) == len(batch)
                if n % 10 == 9:
                    sink.flush()
            sink.flush()
            sink.close()
            best = min(best, time.perf_counter() - start)
        return len(events) / best

    def parquet_sink(run: int) -> Sink:
        spec = ParquetSpec(path=str(tmp_path / f"pq{run}" / "{venue}/{kind}/{date}"))
        return ParquetSink(SinkSpec(type="parquet", path=spec.path, parquet=spec))

    parquet = rate(parquet_sink)
    jsonl = rate(lambda run: JsonlSink(SinkSpec(type="jsonl", path=str(tmp_path / f"j{run}" / "{venue}.jsonl"))))
    print(f"\nparquet {parquet:,.0f} events/s, jsonl {jsonl:,.0f} events/s, ratio {parquet / jsonl:.2f}")
    total = sql(f"select count(*) from read_parquet('{tmp_path}/pq0/**/*.parquet')")[0]
    assert total == (200_000,)
    assert parquet > 0.1 * jsonl  # columns built per batch; a per-row path would be several times slower


# -- feedrunner run ------------------------------------------------------------------------------------

FEEDS = """\
version: 1
environment: simulator
simulator: {{seed: 3, rate: 200}}
venues:
  futu: {{adapter: futu, channels: [trades, ticker, book], symbols: [HK.00700, US.AAPL]}}
sinks:
  - {{type: parquet, path: "pq/{{venue}}/{{kind}}/{{date}}", flush_interval: 200ms, row_group_rows: 500,
     roll_interval: 3s}}
  - {{type: jsonl, path: "{jsonl}/{{venue}}-{{kind}}.jsonl", flush_interval: 200ms}}
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state.db"}}
"""
KINDS = ("trade", "ticker", "book")


class Run:
    """`feedrunner run` in `cwd`, its log appended to run.log; killed if the test leaves it running."""

    def __init__(self, cwd: Path, jsonl: str) -> None:
        (cwd / "feeds.yaml").write_text(FEEDS.format(jsonl=jsonl))
        self.log = cwd / "run.log"
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.err = self.log.open("a")
        self.proc = spawn(cwd, stderr=self.err)

    def text(self) -> str:
        return self.log.read_text()[self.offset :]

    def wait_started(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while "runner started" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[Run]]:
    started: list[Run] = []
    try:
        yield started
    finally:
        for run in started:
            run.kill()


def lines(path: Path) -> int:
    """Complete JSON lines (a kill may leave the last one cut short)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def parquet_rows(root: Path, kind: str) -> int:
    """Every complete file of the kind opens with pyarrow and with duckdb, and they agree on its rows."""
    files = sorted((root / "pq" / "futu" / kind).glob("*/*.parquet"))
    assert files, f"no {kind} files"
    counts = [pq.read_table(f).num_rows for f in files]
    assert [sql(f"select count(*) from read_parquet('{f}')")[0][0] for f in files] == counts
    return sum(counts)


def test_run_then_sigterm_writes_every_event_the_jsonl_sink_got(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, "j")
    runs.append(run)
    run.wait_started()
    time.sleep(8)
    run.stop()
    assert list(tmp_path.glob("pq/**/*.tmp")) == list(tmp_path.glob("pq/**/*.wal")) == []
    files = list(tmp_path.glob("pq/futu/trade/*/*.parquet"))
    assert len(files) >= 2  # rolled every 3 s, and the rest closed at shutdown
    for kind in KINDS:
        expected = lines(tmp_path / "j" / f"futu-{kind}.jsonl")
        assert expected > 0, kind
        assert parquet_rows(tmp_path, kind) == expected, kind
    assert "Traceback" not in run.text()
    assert "parquet-encoder" not in run.text()  # the encoder thread ended with the sink, not left to block exit


def test_kill_9_then_restart_recovers_what_was_flushed(tmp_path: Path, runs: list[Run]) -> None:
    """Both sinks flush on the same timer; after a kill the Parquet logs hold what was flushed by the last
    tick, while the JSONL files hold that plus whatever their 64 KiB buffers spilled since (and Parquet can
    be one tick ahead if the kill fell between the two sinks' flushes). So per kind the two differ by at
    most the events of one flush interval: asserted as two intervals at the rate observed, plus 20, since
    a timer tick on a loaded machine can come late."""
    first = Run(tmp_path, "j1")
    runs.append(first)
    first.wait_started()
    began = time.monotonic()
    time.sleep(4)
    first.kill()
    elapsed = time.monotonic() - began
    wals = [w for w in tmp_path.glob("pq/**/*.wal") if w.stat().st_size]  # open files with rows flushed
    left = {str(w.relative_to(tmp_path)).removesuffix(".wal") for w in wals}
    assert left, "no file was open at the kill"
    before = {k: lines(tmp_path / "j1" / f"futu-{k}.jsonl") for k in KINDS}
    second = Run(tmp_path, "j2")  # its JSONL files apart: the first run's may end in a line cut short
    runs.append(second)
    second.wait_started()
    time.sleep(1)
    second.stop()
    recovered = re.findall(r"recovered (\S+\.parquet) after an unclean stop: (\d+) rows", second.text())
    assert {p for p, _ in recovered} == left, second.text()[-3000:]  # each file left open, once
    assert all((tmp_path / p).exists() and rows(tmp_path / p) == int(n) > 0 for p, n in recovered)
    assert list(tmp_path.glob("pq/**/*.tmp")) == list(tmp_path.glob("pq/**/*.wal")) == []
    for kind in KINDS:
        after = lines(tmp_path / "j2" / f"futu-{kind}.jsonl")  # a clean stop: both sinks got these
        slack = math.ceil(before[kind] / elapsed * 0.2 * 2) + 20
        assert before[kind] > slack, (kind, before[kind])
        assert abs(parquet_rows(tmp_path, kind) - (before[kind] + after)) <= slack, kind
    assert "Traceback" not in (tmp_path / "run.log").read_text()


def test_the_sink_is_built_from_feeds_yaml(tmp_path: Path) -> None:
    """The spec's parquet settings reach the sink (the registration of `type: parquet`)."""
    text = textwrap.dedent("""\
        version: 1
        venues:
          ib: {adapter: ib, symbols: [AAPL]}
        sinks: [{type: parquet, path: "PATH/{venue}/{date}/{hour}", row_group_rows: 7, compression: gzip}]
        """).replace("PATH", str(tmp_path))
    spec, problems = check_text(text, "feeds.yaml", {})
    assert spec is not None, problems
    sink = build(spec.sinks[0], Metrics())
    assert isinstance(sink, ParquetSink)
    sink.write([trade(i) for i in range(10)])
    sink.close()
    [path] = tmp_path.glob("binance/2023-11-14/22/*.parquet")
    assert group_sizes(path) == [7, 3]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "GZIP"
