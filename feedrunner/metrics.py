"""Prometheus metrics, Vector-style names: feedrunner_<name>_<unit>[_total], low-cardinality labels.

One registry per runner (not the global default), so tests can run several runners in one process.
Symbol is never a label: venues may list thousands.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "feedrunner_messages_received_total",
            "Normalised events received from venues.",
            ["venue", "transport", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "feedrunner_latency_seconds",
            "Venue timestamp to local receive.",
            ["venue", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connection_up = Gauge(
            "feedrunner_connection_up", "1 while the venue connection delivers.", ["venue"], registry=r
        )
        self.connection_state = Gauge(
            "feedrunner_connection_state", "1 for the venue's current state.", ["venue", "state"], registry=r
        )
        self.reconnects = Counter("feedrunner_reconnects_total", "Reconnect attempts.", ["venue"], registry=r)
        self.errors = Counter("feedrunner_errors_total", "Errors by class.", ["venue", "kind"], registry=r)
        self.stalls = Counter(
            "feedrunner_stalls_total",
            "Subscriptions found silent past stale_after.",
            ["venue", "channel"],
            registry=r,
        )
        self.trades_backfilled = Counter(
            "feedrunner_trades_backfilled_total", "Missed trades recovered over REST.", ["venue"], registry=r
        )
        self.trades_lost = Counter(
            "feedrunner_trades_lost_total",
            "Missed trades that could not be recovered.",
            ["venue"],
            registry=r,
        )
        self.book_resyncs = Counter(
            "feedrunner_book_resyncs_total", "Order books rebuilt from a snapshot.", ["venue"], registry=r
        )
        self.trades_duplicate = Counter(
            "feedrunner_trades_dropped_duplicate_total",
            "Trades dropped because their id was already delivered.",
            ["venue"],
            registry=r,
        )
        self.sequence_resets = Counter(
            "feedrunner_sequence_resets_total",
            "Trade ids that went back (the venue renumbered): delivered, counted from anew.",
            ["venue"],
            registry=r,
        )
        self.backfill_failures = Counter(
            "feedrunner_backfill_failures_total",
            "Backfill requests that failed or timed out, per symbol attempt.",
            ["venue", "reason"],
            registry=r,
        )
        self.close_timeouts = Counter(
            "feedrunner_close_timeouts_total",
            "Adapter stops whose close was cut short by close_timeout.",
            ["venue"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "feedrunner_circuit_state",
            "Breaker state: 0 closed, 1 half-open, 2 open.",
            ["venue", "scope"],
            registry=r,
        )
        self.symbols = Gauge(
            "feedrunner_symbols",
            "Symbols by the transport actually in use.",
            ["venue", "transport"],
            registry=r,
        )
        self.quarantined = Gauge(
            "feedrunner_quarantined_symbols", "Symbols refused by the venue.", ["venue"], registry=r
        )
        self.queue_depth = Gauge("feedrunner_queue_depth", "Events waiting for the sinks.", registry=r)
        self.dropped = Counter(
            "feedrunner_events_dropped_total",
            "Events dropped by the queue overflow policy.",
            ["reason"],
            registry=r,
        )
        self.sink_written = Counter(
            "feedrunner_sink_events_written_total",
            "Events written by each sink (for a bus: acknowledged by it).",
            ["sink"],
            registry=r,
        )
        self.sink_spooled = Counter(
            "feedrunner_sink_events_spooled_total", "Events a bus sink put in its on-disk spool.", ["sink"], registry=r
        )
        self.sink_replayed = Counter(
            "feedrunner_sink_events_replayed_total",
            "Spooled events a bus sink delivered from its spool.",
            ["sink"],
            registry=r,
        )
        self.sink_dropped = Counter(
            "feedrunner_sink_events_dropped_total",
            "Events a bus sink dropped: spool_full (the spool's bound and overflow policy), spool_error (the "
            "spool could not be written), torn (a record cut by an unclean stop).",
            ["sink", "reason"],
            registry=r,
        )
        self.sink_spool_bytes = Gauge(
            "feedrunner_sink_spool_bytes", "Bytes in a bus sink's spool not yet acknowledged.", ["sink"], registry=r
        )
        self.sink_spool_events = Gauge(
            "feedrunner_sink_spool_events", "Events in a bus sink's spool not yet acknowledged.", ["sink"], registry=r
        )
        self.sink_buffer_events = Gauge(
            "feedrunner_sink_buffer_events", "Events in a bus sink's memory buffer.", ["sink"], registry=r
        )
        self.sink_delivery_latency = Histogram(
            "feedrunner_sink_delivery_seconds",
            "From an event's receipt to the bus's acknowledgement of its batch (first event of each batch).",
            ["sink"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.sink_errors = Counter(
            "feedrunner_sink_errors_total",
            "Sink operations that failed (open, write, flush, close, reopen), per file.",
            ["sink", "operation"],
            registry=r,
        )
        self.sink_events_failed = Counter(
            "feedrunner_sink_events_failed_total", "Events a sink could not write (lost).", ["sink"], registry=r
        )
        self.sink_up = Gauge(
            "feedrunner_sink_up",
            "1 while the sink writes: every file writable, or the bus delivering.",
            ["sink"],
            registry=r,
        )
        # What the health checks read, set before every scrape (Runner.refresh_gauges), so Prometheus rules
        # (feedrunner alerts --prometheus) judge the same figures the runner does.
        self.staleness = Gauge(
            "feedrunner_staleness_seconds",
            "Longest silence among the venue's symbols (one never seen counts from start): what staleness reads.",
            ["venue"],
            registry=r,
        )
        self.venue_up = Gauge(
            "feedrunner_venue_up",
            "1 while the venue is connected and delivered within its stale_after: what uptime samples.",
            ["venue"],
            registry=r,
        )
        self.memory_rss = Gauge("feedrunner_memory_rss_bytes", "Resident memory of the runner process.", registry=r)
        self.health_coverage = Gauge(
            "feedrunner_health_coverage_seconds",
            "Seconds of data the health windows hold (since the venues came up); a longer window is inconclusive.",
            registry=r,
        )


def observe_many(child: Any, values: Iterable[float]) -> None:
    """`Histogram.observe` for a batch: one locked increment per bucket touched, not two per value.

    Relies on prometheus_client keeping per-bucket (non-cumulative) counts in `_buckets` and the total in
    `_sum`; tests/test_metrics.py pins that against `observe` itself.
    """
    bounds = child._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for v in values:
        counts[bisect_left(bounds, v)] += 1
        total += v
    child._sum.inc(total)
    for i, n in enumerate(counts):
        if n:
            child._buckets[i].inc(n)
