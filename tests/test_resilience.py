"""Backoff schedule, breaker transitions and the staleness watchdog, on a fake clock."""

from __future__ import annotations

import random

from feedrunner.resilience import BackoffTimer, BreakerState, CircuitBreaker, Watchdog
from feedrunner.spec import Backoff, CircuitBreakerSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_exponential_capped_and_jittered_within_bounds():
    b = BackoffTimer(Backoff(base=1, cap=60, factor=2, jitter=0.2, max_attempts=50), rng=random.Random(3))
    assert [b.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    for n in range(1, 12):
        d = b.next_delay()
        assert 0.8 * b.delay(n) <= d <= min(60, 1.2 * b.delay(n))
    assert b.attempts == 11


def test_backoff_without_jitter_is_exact_and_exhausts():
    b = BackoffTimer(Backoff(base=0.5, cap=3, factor=3, jitter=0, max_attempts=3))
    assert [b.next_delay() for _ in range(3)] == [0.5, 1.5, 3]
    assert b.exhausted


def test_backoff_resets_only_after_a_healthy_period():
    clock = FakeClock()
    b = BackoffTimer(Backoff(base=1, cap=60, jitter=0, reset_after=60), clock=clock)
    for _ in range(4):
        b.next_delay()
    b.connected()
    clock.now += 30
    b.tick()
    assert b.attempts == 4  # a flapping link does not reset the schedule
    clock.now += 31
    b.tick()
    assert b.attempts == 0
    assert b.next_delay() == 1


def test_breaker_opens_after_threshold_half_opens_after_timeout_and_closes_on_success():
    clock = FakeClock()
    changes = []
    br = CircuitBreaker(
        "binance",
        CircuitBreakerSpec(failure_threshold=3, recovery_timeout=10),
        clock,
        on_change=lambda b, old, new, why: changes.append((old.value, new.value)),
    )
    br.failure("x")
    br.failure("x")
    assert br.state is BreakerState.CLOSED and br.allows_streaming
    br.failure("x")
    assert br.state is BreakerState.OPEN and not br.allows_streaming
    clock.now += 9.9
    assert br.state is BreakerState.OPEN
    clock.now += 0.2
    assert br.state is BreakerState.HALF_OPEN and br.allows_streaming
    br.failure("probe")
    assert br.state is BreakerState.OPEN  # one failed probe reopens at once
    clock.now += 10
    assert br.state is BreakerState.HALF_OPEN
    br.success()
    assert br.state is BreakerState.CLOSED and br.failures == 0
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_success_resets_consecutive_failures():
    br = CircuitBreaker("v", CircuitBreakerSpec(failure_threshold=2, recovery_timeout=1), FakeClock())
    br.failure("a")
    br.success()
    br.failure("b")
    assert br.state is BreakerState.CLOSED


def test_watchdog_catches_no_first_message_and_silence():
    clock = FakeClock()
    w = Watchdog(clock)
    w.arm(("BTC/USDT", "trades"), 5)
    w.arm(("ETH/USDT", "trades"), 5)
    clock.now += 4
    w.seen(("ETH/USDT", "trades"))
    assert w.stale() == []
    clock.now += 1.5
    assert w.stale() == [(("BTC/USDT", "trades"), 5.5)]  # never delivered a first message
    clock.now += 4
    assert {k for k, _ in w.stale()} == {("BTC/USDT", "trades"), ("ETH/USDT", "trades")}
    w.disarm(("BTC/USDT", "trades"))
    w.seen(("X", "y"))  # unknown keys are ignored
    assert [k for k, _ in w.stale()] == [("ETH/USDT", "trades")]


def test_a_lower_id_with_a_newer_venue_time_is_a_renumbered_tape_not_a_repeat():
    from feedrunner.resilience import Seq, sequence_step

    assert sequence_step(5000, 4500, armed=False, last_ts=1000, ts=2000) is Seq.RESET
    assert sequence_step(5000, 4500, armed=False, last_ts=1000, ts=1000) is Seq.DUPLICATE  # a replayed print
    assert sequence_step(5000, 4500, armed=False) is Seq.DUPLICATE  # no times, no reconnect, a small step
