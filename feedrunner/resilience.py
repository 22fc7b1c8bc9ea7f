"""Backoff, circuit breaker, staleness watchdog, connection states and error classes: shared by adapters.

All of it is pure logic over an injectable clock, so it is unit-tested without sockets; adapters wire
it to their client libraries.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum

from loguru import logger

from feedrunner.spec import Backoff, CircuitBreakerSpec

Clock = Callable[[], float]


class ConnState(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DEGRADED = "degraded"  # connected, but some subscriptions stale, quarantined or on fallback
    FAILED = "failed"  # gave up: auth error or backoff attempts exhausted; needs an operator


class ErrorKind(StrEnum):
    NETWORK = "network"  # reconnect with backoff
    RATE_LIMIT = "rate_limit"  # honour Retry-After, slow down
    AUTH = "auth"  # stop the venue, alert, no hot loop
    BAD_SYMBOL = "bad_symbol"  # quarantine that symbol only
    UNKNOWN = "unknown"  # count, back off, retry


@dataclass(frozen=True, slots=True)
class Classified:
    kind: ErrorKind
    retry_after: float | None = None  # seconds the venue asked us to wait


class BackoffTimer:
    """Capped, jittered exponential delays; reset once a connection has been healthy for reset_after."""

    def __init__(self, spec: Backoff, clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.attempts = 0
        self._clock = clock
        self._rng = rng or random.Random()
        self._healthy_since: float | None = None

    def delay(self, attempt: int) -> float:
        """The un-jittered delay before retry number `attempt` (1-based)."""
        return min(self.spec.cap, self.spec.base * self.spec.factor ** max(0, attempt - 1))

    def next_delay(self) -> float:
        self.attempts += 1
        self._healthy_since = None
        base = self.delay(self.attempts)
        spread = base * self.spec.jitter
        return max(0.0, min(self.spec.cap, base + self._rng.uniform(-spread, spread)))

    @property
    def exhausted(self) -> bool:
        return self.attempts >= self.spec.max_attempts

    def connected(self) -> None:
        """A connection is up; the count resets only once it has stayed healthy for reset_after."""
        self._healthy_since = self._clock()

    def tick(self) -> None:
        if self._healthy_since is not None and self._clock() - self._healthy_since >= self.spec.reset_after:
            self.attempts = 0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """CLOSED -> OPEN after N consecutive failures -> HALF_OPEN after recovery_timeout -> CLOSED on success.

    While OPEN the owner's symbols use polling; HALF_OPEN lets one websocket attempt through, whose
    success closes the breaker and whose failure reopens it for another recovery_timeout.
    """

    def __init__(
        self,
        name: str,
        spec: CircuitBreakerSpec,
        clock: Clock = time.monotonic,
        on_change: Callable[[CircuitBreaker, BreakerState, BreakerState, str], None] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._clock = clock
        self._on_change = on_change

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.spec.recovery_timeout:
            self._move(BreakerState.HALF_OPEN, f"recovery timeout {self.spec.recovery_timeout:g}s elapsed")
        return self._state

    @property
    def allows_streaming(self) -> bool:
        return self.state is not BreakerState.OPEN

    def failure(self, reason: str) -> None:
        self.failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open(f"half-open probe failed: {reason}")
        elif state is BreakerState.CLOSED and self.failures >= self.spec.failure_threshold:
            self._open(f"{self.failures} consecutive failures, last: {reason}")

    def success(self) -> None:
        self.failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED, "half-open probe succeeded")

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        self._move(BreakerState.OPEN, reason)

    def _move(self, new: BreakerState, reason: str) -> None:
        old, self._state = self._state, new
        if old is not new and self._on_change:
            self._on_change(self, old, new, reason)


class Watchdog:
    """Per-subscription silence detector. Arming counts as the last message, so "no first message within
    stale_after" is caught by the same rule as "stopped delivering"."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._limit: dict[Hashable, float] = {}

    def arm(self, key: Hashable, stale_after: float) -> None:
        self._last[key] = self._clock()
        self._limit[key] = stale_after

    def disarm(self, key: Hashable) -> None:
        self._last.pop(key, None)
        self._limit.pop(key, None)

    def seen(self, key: Hashable) -> None:
        if key in self._last:
            self._last[key] = self._clock()

    def silence(self, key: Hashable) -> float:
        return self._clock() - self._last[key] if key in self._last else 0.0

    def stale(self) -> list[tuple[Hashable, float]]:
        now = self._clock()
        return [(k, now - t) for k, t in self._last.items() if now - t > self._limit[k]]

    def keys(self) -> list[Hashable]:
        return list(self._last)


class Seq(StrEnum):
    """What a trade id says about the trade, given the last id delivered for its symbol."""

    NEXT = "next"  # above the last: new (any ids skipped in between are a gap)
    DUPLICATE = "duplicate"  # already delivered: drop it
    RESET = "reset"  # the venue renumbered (a restart): deliver it and count from it


# Ids a trade may fall behind the last delivered one and still be taken for a repeat of it, when neither a
# reconnect nor the venue's timestamps say otherwise. Repeats come from overlapping sources (hybrid polling
# behind the stream, a first push replaying cached prints): at most a page of trades back.
SEQUENCE_RESET_AFTER = 1000


def sequence_step(
    last: int,
    new: int,
    *,
    armed: bool,
    last_ts: int | None = None,
    ts: int | None = None,
    reset_after: int = SEQUENCE_RESET_AFTER,
) -> Seq:
    """Classify trade id `new` against `last`, the last delivered id of its symbol.

    A repeat carries the venue time it had when first delivered, so a trade no newer than the last one is a
    duplicate whatever its id, and one newer than it with a lower id can only come from a renumbered tape.
    Without both times, an id that went back is a renumbering venue when it went back far (more than
    `reset_after`), or when it is the first trade since a reconnect (`armed`): a restarted venue or gateway
    numbers from wherever it likes, and dropping its trades as repeats would lose all of them.
    """
    if new > last:
        return Seq.NEXT
    if new == last or (ts and last_ts and ts <= last_ts):
        return Seq.DUPLICATE
    if (ts and last_ts) or armed or last - new > reset_after:
        return Seq.RESET
    return Seq.DUPLICATE


class StateMachine:
    """A connection's state with every transition logged; listeners feed metrics and health."""

    def __init__(self, venue: str, on_change: Callable[[str, ConnState, ConnState, str], None] | None = None) -> None:
        self.venue = venue
        self.state = ConnState.DISCONNECTED
        self.reason = ""
        self.since = time.time()
        self._on_change = on_change

    def move(self, new: ConnState, reason: str = "") -> None:
        if new is self.state:
            return
        old, self.state, self.reason, self.since = self.state, new, reason, time.time()
        log = logger.warning if new in (ConnState.RECONNECTING, ConnState.DEGRADED, ConnState.FAILED) else logger.info
        log("venue {} {} -> {}{}", self.venue, old.value, new.value, f": {reason}" if reason else "")
        if self._on_change:
            self._on_change(self.venue, old, new, reason)


async def sleep_or_stop(delay: float, stop: asyncio.Event) -> bool:
    """Sleep `delay` seconds unless `stop` is set first; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))
        return True
    except TimeoutError:
        return False
