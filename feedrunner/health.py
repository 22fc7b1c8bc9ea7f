"""Rolling health windows: O(1) per event, evaluated on demand by the health job.

Events land in one-second buckets per (venue, transport): a count, a latency sum and a coarse latency
histogram (for percentiles), plus per-venue error and reconnect counts and an up/down sample each
second. A window query merges the buckets it spans. A metric with no samples is None: callers must treat
it as inconclusive, never as a pass. So is a windowed metric over less data than its window asks (a
1 h gate 15 s after start has seen 15 s): its reading carries how many seconds it covers.

Memory growth is RSS now minus RSS at the start of the window, sampled once a second from a baseline
taken once the venues are up (`mark_up`): what ccxt allocates loading markets is startup, not growth.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter

import psutil

from feedrunner.events import Event, group_by
from feedrunner.spec import Condition

# Latency histogram edges in seconds: fine below 100 ms, coarse above. A percentile is reported as the
# upper edge of its bucket, so it errs on the pessimistic side.
EDGES = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    math.inf,
)
MAX_WINDOW = 86400  # buckets are kept at most a day
_KEY = attrgetter("venue", "transport", "symbol")


@dataclass(slots=True)
class Bucket:
    second: int
    count: int = 0
    latency_sum: float = 0.0
    latency_n: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * len(EDGES))


@dataclass(slots=True)
class VenueBucket:
    second: int
    errors: int = 0
    reconnects: int = 0
    up: int = 0  # seconds sampled up
    sampled: int = 0


class Series:
    """Buckets of one (venue, transport), newest last, pruned past the longest window in use."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.buckets: deque[Bucket] = deque()

    def _bucket(self, sec: int) -> Bucket:
        if not self.buckets or self.buckets[-1].second != sec:
            self.buckets.append(Bucket(sec))
            while self.buckets and self.buckets[0].second <= sec - self.keep:
                self.buckets.popleft()
        return self.buckets[-1]

    def add(self, now: float, latency: float | None) -> None:
        b = self._bucket(int(now))
        b.count += 1
        if latency is not None:
            b.latency_sum += latency
            b.latency_n += 1
            b.hist[bisect.bisect_left(EDGES, latency)] += 1

    def add_events(self, events: list[Event]) -> tuple[float, int]:
        """`add` for a batch (the hot path); returns the latency sum and count it saw."""
        edges, bisect_left = EDGES, bisect.bisect_left
        b = self.buckets[-1] if self.buckets else None
        total, n = 0.0, 0
        for event in events:
            received = event.ts_received
            sec = received // 1_000_000_000
            if b is None or b.second != sec:
                b = self._bucket(sec)
            b.count += 1
            stamped = event.ts_exchange
            # (a trade stamped to the whole second, as IB's tick-by-tick are, has no latency to read)
            if stamped and not (stamped % 1_000_000_000 == 0 and event.kind == "trade"):
                latency = (received - stamped) / 1e9
                if latency < 0.0:
                    latency = 0.0
                b.latency_sum += latency
                b.latency_n += 1
                b.hist[bisect_left(edges, latency)] += 1
                total += latency
                n += 1
        return total, n

    def window(self, now: float, seconds: float) -> Iterable[Bucket]:
        start = now - seconds
        return (b for b in reversed(self.buckets) if b.second >= start)


@dataclass(slots=True)
class Reading:
    """A metric over a window: None when there is no data (inconclusive), with its sample count and the
    seconds of data it covers (short of the window: inconclusive too)."""

    value: float | None
    samples: int
    covered: float = math.inf


INSTANT_METRICS = frozenset({"staleness", "memory_rss"})  # read now; their window is not a span of data
SLACK = 2.0  # seconds of coverage a window may miss: sampling is once a second, the health job periodic


def _quantile(hist: list[int], n: int, q: float) -> float:
    """The upper edge of the bucket holding rank q*n (the last finite edge for the overflow bucket)."""
    rank, acc = q * n, 0
    for edge, c in zip(EDGES, hist, strict=True):
        acc += c
        if acc >= rank:
            return edge if math.isfinite(edge) else EDGES[-2]
    return EDGES[-2]


class Health:
    def __init__(self, windows: Iterable[float] = (), clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.keep = int(min(MAX_WINDOW, max([300.0, *windows]))) + 2
        self.series: dict[tuple[str, str], Series] = {}
        self.venue: dict[str, deque[VenueBucket]] = {}
        self.last_seen: dict[tuple[str, str, str], float] = {}  # (venue, symbol, transport) -> time
        self.started = clock()
        self.since: float | None = None  # when the venues came up: windows count from here
        self.process = psutil.Process()
        self.rss_start = 0  # the baseline, set by mark_up
        self.rss_samples: deque[tuple[float, int]] = deque()  # (time, rss), once a second from mark_up
        self.sink_latency = Series(self.keep)
        self.per_symbol: dict[tuple[str, str], list[float]] = {}  # (venue, symbol) -> [events, latency EMA]

    # -- feeding: O(1) ------------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        self.observe_many((event,))

    def observe_many(self, events: Iterable[Event]) -> None:
        """Per event: a bucket count and latency; per symbol and batch: last-seen time, count and the
        latency average. Grouped first, so the per-event part is a few operations."""
        series, last_seen, per_symbol = self.series, self.last_seen, self.per_symbol
        for (venue, transport, symbol), group in group_by(events, _KEY).items():
            s = series.get((venue, transport))
            if s is None:
                s = series[(venue, transport)] = Series(self.keep)
            total, n = s.add_events(group)
            last_seen[(venue, symbol, transport)] = group[-1].ts_received / 1e9
            stats = per_symbol.get((venue, symbol))
            if stats is None:
                stats = per_symbol[(venue, symbol)] = [0, 0.0]
            first = stats[0] == 0
            stats[0] += len(group)
            if n:  # an exponential average of batch means: O(1) and enough for a status table
                mean = total / n
                stats[1] = mean if first else 0.9 * stats[1] + 0.1 * mean

    def observe_written(self, event: Event, written_ns: int) -> None:
        self.sink_latency.add(written_ns / 1e9, max(0.0, (written_ns - event.ts_received) / 1e9))

    def _vbucket(self, venue: str) -> VenueBucket:
        sec = int(self.clock())
        q = self.venue.setdefault(venue, deque())
        if not q or q[-1].second != sec:
            q.append(VenueBucket(sec))
            while q and q[0].second <= sec - self.keep:
                q.popleft()
        return q[-1]

    def error(self, venue: str) -> None:
        self._vbucket(venue).errors += 1

    def reconnect(self, venue: str) -> None:
        self._vbucket(venue).reconnects += 1

    def sample_up(self, venue: str, up: bool) -> None:
        """Once a second per venue: connected and delivering, or not."""
        b = self._vbucket(venue)
        b.sampled += 1
        b.up += int(up)

    # -- reading ------------------------------------------------------------------------------------

    def _events(self, venues: Iterable[str], transport: str | None, window: float) -> list[Bucket]:
        now = self.clock()
        out: list[Bucket] = []
        for (v, t), s in self.series.items():
            if v in venues and (transport is None or t == transport):
                out.extend(s.window(now, window))
        return out

    def _venue_window(self, venue: str, window: float) -> list[VenueBucket]:
        start = self.clock() - window
        return [b for b in self.venue.get(venue, ()) if b.second >= start]

    def latency(self, venues: Iterable[str], window: float, q: float | None, transport: str | None = None) -> Reading:
        buckets = self._events(set(venues), transport, window)
        n = sum(b.latency_n for b in buckets)
        if n == 0:
            return Reading(None, 0)
        if q is None:
            return Reading(sum(b.latency_sum for b in buckets) / n, n)
        merged = [sum(b.hist[i] for b in buckets) for i in range(len(EDGES))]
        return Reading(_quantile(merged, n, q), n)

    def latency_series(self, venue: str, seconds: int, step: int) -> dict[str, list[list[float]]]:
        """Per transport of `venue`: [start second, p50, p99, samples] for each `step` seconds of the last
        `seconds` that saw a latency, oldest first (what the status page draws)."""
        start = self.clock() - seconds
        out: dict[str, list[list[float]]] = {}
        for (v, transport), s in self.series.items():
            if v != venue:
                continue
            steps: dict[int, list[int]] = {}
            for b in s.window(self.clock(), seconds):
                if b.latency_n and b.second >= start:
                    merged = steps.setdefault(b.second - b.second % step, [0] * len(EDGES))
                    for i, c in enumerate(b.hist):
                        merged[i] += c
            out[transport] = [
                [t, _quantile(h, sum(h), 0.5), _quantile(h, sum(h), 0.99), sum(h)] for t, h in sorted(steps.items())
            ]
        return out

    def rate(self, venues: Iterable[str], window: float, transport: str | None = None) -> Reading:
        buckets = self._events(set(venues), transport, window)
        n = sum(b.count for b in buckets)
        elapsed = min(window, max(1.0, self.clock() - self.started))
        return Reading(n / elapsed, n)

    def worst(self, venues: Iterable[str], fn: Callable[[str], Reading], higher_is_worse: bool = True) -> Reading:
        readings = [fn(v) for v in venues]
        known = [r for r in readings if r.value is not None]
        if not known:
            return Reading(None, 0)
        pick = max if higher_is_worse else min
        return pick(known, key=lambda r: r.value)  # type: ignore[arg-type,return-value]

    def error_rate(self, venue: str, window: float) -> Reading:
        """Errors / (errors + events): the share of operations that failed."""
        errors = sum(b.errors for b in self._venue_window(venue, window))
        events = sum(b.count for b in self._events({venue}, None, window))
        total = errors + events
        return Reading(errors / total if total else None, total)

    def reconnects_per_hour(self, venue: str, window: float) -> Reading:
        buckets = self._venue_window(venue, window)
        sampled = sum(b.sampled for b in buckets)
        if not sampled:
            return Reading(None, 0)
        return Reading(sum(b.reconnects for b in buckets) * 3600.0 / max(window, 1.0), sampled)

    def uptime(self, venue: str, window: float) -> Reading:
        buckets = self._venue_window(venue, window)
        sampled = sum(b.sampled for b in buckets)
        return Reading(sum(b.up for b in buckets) / sampled if sampled else None, sampled)

    def staleness(self, keys: Iterable[tuple[str, str]], transport: str | None = None) -> Reading:
        """The longest silence among (venue, symbol) pairs; never-seen pairs count from start."""
        now = self.clock()
        worst, n = 0.0, 0
        transports = (transport,) if transport else ("websocket", "polling", "hybrid")
        for venue, symbol in keys:
            seen = max(self.last_seen.get((venue, symbol, t), self.started) for t in transports)
            worst = max(worst, now - seen)
            n += 1
        return Reading(worst if n else None, n)

    def silent(self, keys: Iterable[tuple[str, str]], transport: str, window: float) -> list[tuple[str, str]]:
        """Pairs with no event on `transport` within the window: what makes a gate inconclusive."""
        start = self.clock() - window
        return [k for k in keys if self.last_seen.get((*k, transport), -1.0) < start]

    def mark_up(self) -> None:
        """The venues are up: windows and the memory baseline start now (once; later calls do nothing)."""
        if self.since is None:
            self.since = self.clock()
            self.rss_start = self.process.memory_info().rss
            self.rss_samples.append((self.since, self.rss_start))

    def sample_memory(self) -> None:
        """Once a second from the runner's sampler; nothing before mark_up."""
        if self.since is None:
            return
        now = self.clock()
        self.rss_samples.append((now, self.process.memory_info().rss))
        while len(self.rss_samples) > 1 and self.rss_samples[1][0] <= now - self.keep:
            self.rss_samples.popleft()

    def memory(self) -> tuple[float, float]:
        """RSS now and its growth since the baseline (0 before the venues are up)."""
        rss = self.process.memory_info().rss
        return float(rss), float(rss - self.rss_start) if self.since is not None else 0.0

    def memory_growth(self, window: float) -> Reading:
        """RSS now minus RSS at the window's start; covers only the time since the baseline."""
        if self.since is None or not self.rss_samples:
            return Reading(None, 0, 0.0)
        now = self.clock()
        start = now - window
        before = [s for s in self.rss_samples if s[0] <= start]
        at, rss_then = before[-1] if before else self.rss_samples[0]
        rss_now = self.process.memory_info().rss
        n = sum(1 for t, _ in self.rss_samples if t >= at)
        return Reading(float(rss_now - rss_then), n, now - at)

    def coverage(self) -> float:
        """Seconds of data the windows hold: since the venues came up (0 before)."""
        return 0.0 if self.since is None else self.clock() - self.since

    def cpu_percent(self) -> float:
        return self.process.cpu_percent(interval=None)

    def evaluate(
        self, cond: Condition, venues: Iterable[str], keys: Iterable[tuple[str, str]], transport: str | None
    ) -> Reading:
        """One condition's metric over its window, the worst across the given venues."""
        venues = list(venues)
        w, m = cond.window, cond.metric
        if m == "memory_rss":
            return Reading(self.memory()[0], 1)
        if m == "memory_growth":
            reading = self.memory_growth(w)
        else:
            reading = self._evaluate(m, w, venues, keys, transport)
            if m not in INSTANT_METRICS:
                reading.covered = self.coverage()
        if reading.covered + SLACK < w:
            reading.value = None
        return reading

    def _evaluate(
        self, m: str, w: float, venues: list[str], keys: Iterable[tuple[str, str]], transport: str | None
    ) -> Reading:
        if m.startswith("latency_"):
            q = {"latency_p50": 0.5, "latency_p95": 0.95, "latency_p99": 0.99}.get(m)
            return self.latency(venues, w, q, transport)
        if m == "error_rate":
            return self.worst(venues, lambda v: self.error_rate(v, w))
        if m == "reconnects_per_hour":
            return self.worst(venues, lambda v: self.reconnects_per_hour(v, w))
        if m == "uptime":
            return self.worst(venues, lambda v: self.uptime(v, w), higher_is_worse=False)
        if m == "staleness":
            return self.staleness(keys, transport)
        return self.rate(venues, w, transport)  # message_rate: the metrics are an enum in the schema
