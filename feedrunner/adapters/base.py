"""The adapter contract every venue family implements, and the bookkeeping they all share.

The runner hands an adapter the *desired* transport per symbol (`apply`); the adapter owns the *actual*
state and converges on it by itself, across reconnects. The circuit breakers live here, not in each
venue module, so the breaker override (open -> polling) is one rule for every venue.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from loguru import logger

from feedrunner.events import Event, Trade
from feedrunner.metrics import Metrics, observe_many
from feedrunner.resilience import (
    BREAKER_VALUE,
    BackoffTimer,
    BreakerState,
    CircuitBreaker,
    Classified,
    ConnState,
    ErrorKind,
    Seq,
    StateMachine,
    Watchdog,
    sequence_step,
)
from feedrunner.spec import Venue

Emit = Callable[[list[Event]], Awaitable[None]]  # takes ownership of the list
EmitNow = Callable[[list[Event]], bool]  # the same, synchronously, or False (and nothing done) if it cannot be


class Adapter(ABC):
    """start / stop / apply(wanted) / status; network failures never escape an adapter."""

    def __init__(self, venue: Venue, emit: Emit, metrics: Metrics) -> None:
        self.venue = venue
        self.name = venue.name
        self.emit = emit
        self.emit_now: EmitNow | None = None  # set by the runner (Pipeline.put_now); None: always `emit`
        self.metrics = metrics
        self.conn = StateMachine(venue.name, on_change=self._on_state)
        self.breaker = CircuitBreaker(venue.name, venue.circuit_breaker, on_change=self._on_breaker)
        self.symbol_breakers: dict[str, CircuitBreaker] = {}
        self.backoff = BackoffTimer(venue.backoff)
        self.watchdog = Watchdog()
        self.wanted: dict[str, str] = {}
        self.quarantined: dict[str, str] = {}
        self.changed = asyncio.Event()
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._last_error = ""
        self.retries: deque[tuple[float, float, str]] = deque(maxlen=100)  # (monotonic, delay, why): status, tests
        self.continuity: TradeContinuity | None = None  # set by adapters whose trades carry ids
        self._handed: dict[str, str] = {}  # symbol -> id of the last trade handed to the pipeline
        self._duplicates = metrics.trades_duplicate.labels(venue.name)
        metrics.sequence_resets.labels(venue.name)
        metrics.close_timeouts.labels(venue.name)
        for state in ConnState:
            metrics.connection_state.labels(venue.name, state.value).set(0)
        metrics.connection_state.labels(venue.name, ConnState.DISCONNECTED.value).set(1)
        metrics.connection_up.labels(venue.name).set(0)
        metrics.circuit_state.labels(venue.name, "venue").set(0)

    # -- the contract ------------------------------------------------------------------------------

    @abstractmethod
    async def run(self) -> None:
        """Connect, converge on the wanted subscriptions, and keep them alive until `stopping` is set."""

    async def start(self) -> None:
        self.spawn(self.run(), f"{self.name}-main")

    async def stop(self) -> None:
        """Cancel the tasks, then close the client, all within `close_timeout`: a venue that never lets go
        (a close frame never answered while it keeps sending) cannot hold up a shutdown or a reload. The
        tasks get half of it, the close the rest; what the deadline cuts short is logged and counted."""
        self.stopping.set()
        self.changed.set()
        loop = asyncio.get_running_loop()
        budget = self.venue.close_timeout
        deadline = loop.time() + budget
        for _ in range(5):  # a task may spawn another while being cancelled: repeat until none is left
            tasks = list(self._tasks)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - budget / 2 - loop.time()))
            for task in pending:
                logger.error("venue {} task {} did not stop within {:g}s", self.name, task.get_name(), budget / 2)
            self._tasks.difference_update(tasks)
            if pending:
                break
        cut = asyncio.timeout_at(deadline)
        try:
            async with cut:
                await self.close()
        except Exception as exc:  # a stop always completes
            if not cut.expired():
                logger.opt(exception=exc).error("venue {} close failed", self.name)
            else:
                self.metrics.close_timeouts.labels(self.name).inc()
                logger.warning(
                    "venue {} close cut short: the venue did not let go within close_timeout {:g}s; its "
                    "connections were dropped without the close handshake",
                    self.name,
                    budget,
                )
        self.conn.move(ConnState.DISCONNECTED, "stopped")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the client library's resources. Bounded by `stop`: when cancelled, drop what is left."""

    def apply(self, wanted: Mapping[str, str]) -> None:
        """Desired transport per symbol; idempotent. Symbols absent are unsubscribed."""
        new = dict(wanted)
        if new != self.wanted:
            self.wanted = new
            self.changed.set()

    def update(self, venue: Venue) -> None:
        """Apply settings that can change live (reload); connection settings need a new adapter instead."""
        old, self.venue = self.venue, venue
        self.backoff.spec = venue.backoff
        for breaker in (self.breaker, *self.symbol_breakers.values()):
            breaker.spec = venue.circuit_breaker
        self.on_update(old, venue)
        self.changed.set()

    def on_update(self, old: Venue, new: Venue) -> None:  # noqa: B027 - optional hook
        """Adapter-specific part of `update` (restart the loops a setting belongs to)."""

    def effective(self, symbol: str) -> str | None:
        """What a symbol should use right now: quarantine, then breakers, then the desired transport."""
        want = self.wanted.get(symbol)
        if want is None or symbol in self.quarantined:
            return None
        if want in ("websocket", "hybrid") and not (
            self.breaker.allows_streaming and self.symbol_breaker(symbol).allows_streaming
        ):
            return "polling"
        return want

    def status(self) -> dict[str, Any]:
        return {
            "venue": self.name,
            "adapter": self.venue.adapter,
            "state": self.conn.state.value,
            "reason": self.conn.reason,
            "since": self.conn.since,
            "breaker": self.breaker.state.value,
            "stale_after": max(self.venue.stale_after.values(), default=15.0),
            "symbols": {s: self.effective(s) for s in self.wanted},
            "quarantined": dict(self.quarantined),
            "open_symbol_breakers": sorted(
                s for s, b in self.symbol_breakers.items() if b.state is not BreakerState.CLOSED
            ),
        }

    # -- shared helpers ----------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("venue {} task {} crashed", self.name, task.get_name())

    def symbol_breaker(self, symbol: str) -> CircuitBreaker:
        b = self.symbol_breakers.get(symbol)
        if b is None:
            b = self.symbol_breakers[symbol] = CircuitBreaker(
                f"{self.name}:{symbol}", self.venue.circuit_breaker, on_change=self._on_breaker
            )
        return b

    def quarantine(self, symbol: str, reason: str) -> None:
        if symbol not in self.quarantined:
            self.quarantined[symbol] = reason
            logger.error("venue {} symbol {} quarantined: {}", self.name, symbol, reason)
            self.metrics.errors.labels(self.name, "bad_symbol").inc()
            self.metrics.quarantined.labels(self.name).set(len(self.quarantined))
            self.changed.set()

    async def deliver(self, event: Event) -> None:
        await self.deliver_many([event])

    async def deliver_many(self, events: list[Event]) -> None:
        """Count, time and emit a batch, in order; metrics are updated once per batch, not per event."""
        if not events:
            return
        first = events[0]
        key = (first.transport, first.kind)
        for i, e in enumerate(events):
            if (e.transport, e.kind) != key:  # mixed batch (rare): split it
                self._account(events[:i], key)
                await self._hand(events[:i], key[1])
                await self.deliver_many(events[i:])
                return
        self._account(events, key)
        await self._hand(events, key[1])

    def deliver_now(self, events: list[Event]) -> bool:
        """`deliver_many` for a batch of one transport and kind, without waiting: False, and nothing done,
        if the pipeline cannot take it at once."""
        first = events[0]
        ids = self._ids(events, first.kind)
        if self.emit_now is None or not self.emit_now(events):
            return False
        self._account(events, (first.transport, first.kind))
        if ids:
            self._handed.update(ids)
        return True

    async def _hand(self, events: list[Event], kind: str) -> None:
        """Emit, then note each symbol's last trade id: once `emit` returns, the pipeline has them."""
        ids = self._ids(events, kind)
        await self.emit(events)
        if ids:
            self._handed.update(ids)

    def _ids(self, events: list[Event], kind: str) -> dict[str, str] | None:
        """Each symbol's last trade id in the batch, where ids are contiguous (read before the pipeline
        owns the list)."""
        if kind != "trade" or self.continuity is None or not self.continuity.contiguous:
            return None
        return {e.symbol: e.id for e in events if e.id is not None}  # type: ignore[attr-defined]

    # -- checkpoints: where each symbol's tape stands, across restarts ----------------------------------

    def trade_checkpoints(self) -> dict[str, int]:
        """Symbol -> id of the last trade handed to the pipeline (seeded ones until a trade follows). Only
        venues with contiguous ids have any: only there does an id say what came before it."""
        return {s: int(i) for s, i in self._handed.items() if i.isdigit()}

    def seed_checkpoints(self, ids: Mapping[str, int]) -> None:
        """Before `start`: resume each symbol's tape from a stored id. Its first trade then goes through the
        gap rule against it (backfilled where the venue allows, else counted lost), and an id below it
        through the reset rule (the venue renumbered meanwhile)."""
        if not ids:
            return
        if self.continuity is None or not self.continuity.contiguous:
            logger.info(
                "venue {}: trade ids do not say what came before them; {} checkpoint(s) unused", self.name, len(ids)
            )
            return
        self.continuity.seed(ids)
        self._handed.update({s: str(n) for s, n in ids.items()})
        logger.info("venue {}: resuming {} symbol(s) from their last delivered trade ids", self.name, len(ids))

    def sequence_reset(self, symbol: str, last: int, new: int) -> None:
        """A trade id went back past what a repeat could explain: the venue renumbered its tape."""
        self.metrics.sequence_resets.labels(self.name).inc()
        logger.warning(
            "venue {} {}: trade id went back from {} to {} (the venue renumbered, e.g. after a restart): "
            "delivering from {} on; trades it numbered before {} are not backfilled",
            self.name,
            symbol,
            last,
            new,
            new,
            new,
        )

    def duplicate_dropped(self, symbol: str) -> None:
        self._duplicates.inc()

    def _account(self, events: list[Event], key: tuple[str, str]) -> None:
        """The batch's count and its exchange-to-receipt latencies, one metrics update each."""
        counter, histogram = self._children(*key)
        counter.inc(len(events))
        latencies = [max(0.0, (e.ts_received - e.ts_exchange) / 1e9) for e in events if e.ts_exchange]
        if latencies:
            observe_many(histogram, latencies)

    def _children(self, transport: str, kind: str) -> tuple[Any, Any]:
        """Labelled metric children, looked up once: labels() costs more than the event's own parsing."""
        key = (transport, kind)
        pair = self._metric_children.get(key)
        if pair is None:
            pair = self._metric_children[key] = (
                self.metrics.messages.labels(self.name, transport, kind),
                self.metrics.latency.labels(self.name, transport),
            )
        return pair

    def count(self, c: Classified, exc: BaseException, symbol: str | None) -> None:
        self.metrics.errors.labels(self.name, c.kind.value).inc()
        self._last_error = f"{c.kind}: {short(exc)}"
        if c.kind not in (ErrorKind.NETWORK,):
            logger.warning("venue {}{} error ({}): {}", self.name, f" {symbol}" if symbol else "", c.kind, short(exc))

    def backfill_failed(self, symbol: str, reason: str, exc: BaseException) -> None:
        """One backfill request failed or timed out: always a line naming the symbol, and a count by reason
        (timeout, network, rate_limit, bad_symbol, auth, unknown), whatever the adapter does next."""
        self.metrics.backfill_failures.labels(self.name, reason).inc()
        logger.warning("venue {} {}: backfill request failed ({}): {}", self.name, symbol, reason, short(exc))

    def backfill_done(self, symbol: str, recovered: int, lost: int, span: str) -> None:
        """A backfill's outcome, one rule for every venue: recovered trades counted, the rest counted as
        lost and logged as an error (nothing is lost silently). `span` says where: "between ids 5 and 9"."""
        self.metrics.trades_backfilled.labels(self.name).inc(recovered)
        if lost:
            self.metrics.trades_lost.labels(self.name).inc(lost)
            logger.error("venue {} {}: {} trade(s) lost {} ({} backfilled)", self.name, symbol, lost, span, recovered)
        elif recovered:
            logger.info("venue {} {}: backfilled {} trade(s) {}", self.name, symbol, recovered, span)

    def fail_auth(self, exc: BaseException) -> None:
        """Credentials rejected: retrying only gets the key banned. Stop this venue; an operator must act."""
        logger.error(
            "venue {} stopped: authentication failed: {}. Fix the credentials and restart.",
            self.name,
            short(exc),
        )
        self.conn.move(ConnState.FAILED, f"authentication failed: {short(exc)}")
        self.stopping.set()

    def seen(self, symbol: str, channel: str) -> None:
        """A streamed message arrived: feed the watchdog, and let a recovering symbol breaker close."""
        self.watchdog.seen((symbol, channel))
        breaker = self.symbol_breakers.get(symbol)
        if breaker is not None and (breaker.failures or breaker._state is not BreakerState.CLOSED):
            breaker.success()

    def record_stalls(self, stale: list[tuple[Any, float]], everything: bool) -> None:
        """Log and count each silent subscription; when only some went silent, their symbol breakers count it
        (when all did, the venue is at fault and the caller charges the venue breaker)."""
        for (symbol, channel), silence in stale:
            logger.warning(
                "venue {} {} {} silent for {:.1f}s (stale_after {:g}s)",
                self.name,
                symbol,
                channel,
                silence,
                self.venue.stale_after[channel],
            )
            self.metrics.stalls.labels(self.name, channel).inc()
            if not everything:
                self.symbol_breaker(symbol).failure(f"{channel} silent {silence:.1f}s")
            self.watchdog.seen((symbol, channel))  # re-arm: one stall, one count

    def _on_state(self, venue: str, old: ConnState, new: ConnState, reason: str) -> None:
        self.metrics.connection_state.labels(venue, old.value).set(0)
        self.metrics.connection_state.labels(venue, new.value).set(1)
        self.metrics.connection_up.labels(venue).set(1 if new in (ConnState.CONNECTED, ConnState.DEGRADED) else 0)

    def _on_breaker(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState, reason: str) -> None:
        scope = "venue" if breaker is self.breaker else "symbol"
        log = logger.warning if new is BreakerState.OPEN else logger.info
        log("venue {} breaker {} {} -> {}: {}", self.name, breaker.name, old.value, new.value, reason)
        if scope == "venue":
            self.metrics.circuit_state.labels(self.name, "venue").set(BREAKER_VALUE[new])
        else:
            worst = max((BREAKER_VALUE[b._state] for b in self.symbol_breakers.values()), default=0)
            self.metrics.circuit_state.labels(self.name, "symbol").set(worst)
        self.changed.set()


class TradeContinuity:
    """Per-symbol trade ids: drops duplicates and finds gaps, so missed trades are backfilled or counted.

    With contiguous ids (Binance: every trade of a symbol gets the next id) a gap is exact, and an id that
    goes back is a repeat or a renumbered tape (`resilience.sequence_step`): a reconnect arms the symbols,
    so that the first trade after it may reset their count. Otherwise only duplicates are caught, through
    a bounded set of recent ids. `on_reset` and `on_duplicate` report what `check` decided.
    """

    def __init__(
        self,
        contiguous: bool,
        recent: int = 4096,
        on_reset: Callable[[str, int, int], None] | None = None,
        on_duplicate: Callable[[str], None] | None = None,
    ) -> None:
        self.contiguous = contiguous
        self.last: dict[str, int] = {}
        self.last_ts: dict[str, int] = {}
        self.armed: set[str] = set()  # symbols whose next trade is their first since a reconnect
        self._recent: dict[str, OrderedDict[str, None]] = {}
        self._recent_cap = recent
        self._on_reset = on_reset or (lambda symbol, last, new: None)
        self._on_duplicate = on_duplicate or (lambda symbol: None)

    def arm(self, symbols: Iterable[str]) -> None:
        """The connection carrying these symbols was lost (or the process restarted): whatever numbering
        the venue comes back with, its first trade is believed."""
        self.armed.update(s for s in symbols if s in self.last)

    def seed(self, ids: Mapping[str, int]) -> None:
        """Resume from stored ids, as after a reconnect: the next trade is measured against them."""
        for symbol, n in ids.items():
            self.last[symbol] = n
            self.last_ts.pop(symbol, None)
        self.arm(ids)

    def continues(self, trades: list[Trade]) -> list[str] | None:
        """The symbols of a batch in which every trade is the next id of its symbol (so `check` would
        find each new, nothing missing, no reset): None if any is not, or its symbol has no last id yet or
        is armed. Nothing changes: `check` each trade once it is delivered."""
        if not self.contiguous:
            return None
        last, armed = self.last, self.armed
        upto: dict[str, int] = {}
        for t in trades:
            symbol, tid = t.symbol, t.id
            prev = upto.get(symbol)
            if prev is None:
                prev = last.get(symbol)
                if prev is None or symbol in armed:
                    return None
            if tid is None or not tid.isdigit() or int(tid) != prev + 1:
                return None
            upto[symbol] = prev + 1
        return list(upto)

    def check(self, trade: Trade) -> tuple[bool, int]:
        """(is new, number of trades missing before it). A reset is new with nothing missing."""
        tid = trade.id
        if tid is None:
            return True, 0
        symbol = trade.symbol
        if self.contiguous and tid.isdigit():
            n = int(tid)
            last = self.last.get(symbol)
            if last is not None and n <= last:
                step = sequence_step(
                    last, n, armed=symbol in self.armed, last_ts=self.last_ts.get(symbol), ts=trade.ts_exchange
                )
                if step is Seq.DUPLICATE:
                    self._on_duplicate(symbol)
                    return False, 0
                self._on_reset(symbol, last, n)
                last = None
            self.last[symbol] = n
            if trade.ts_exchange:
                self.last_ts[symbol] = trade.ts_exchange
            if self.armed:
                self.armed.discard(symbol)
            return True, (n - last - 1) if last is not None else 0
        seen = self._recent.setdefault(symbol, OrderedDict())
        if tid in seen:
            self._on_duplicate(symbol)
            return False, 0
        seen[tid] = None
        if len(seen) > self._recent_cap:
            seen.popitem(last=False)
        if trade.ts_exchange:
            self.last_ts[symbol] = trade.ts_exchange
        return True, 0


def now_ns() -> int:
    return time.time_ns()


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."
