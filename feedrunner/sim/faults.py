"""Fault injection shared by every simulator.

Instant faults (drop, reset, restart, link_lost) act on the live connections the moment they are
injected, through the listeners a simulator registers. Lasting faults (stall, malformed, gap, ratelimit,
reject_symbol, refuse) hold for `duration` seconds and the simulator asks `active()` where they matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    DROP = "drop"  # close every connection cleanly
    RESET = "reset"  # abort every connection (TCP RST)
    STALL = "stall"  # stop sending data but keep answering pings / keepalives
    MALFORMED = "malformed"  # send junk frames
    GAP = "gap"  # skip sequence / update ids
    RATELIMIT = "ratelimit"  # 429 with Retry-After, then 418 (Binance); venue-specific elsewhere
    REJECT_SYMBOL = "reject_symbol"  # the symbol is unknown / refused
    REFUSE = "refuse"  # refuse new connections
    RESTART = "restart"  # close everything, stop listening for `duration`, listen again on the same port
    LINK_LOST = "link_lost"  # IB: TWS lost its link to IB's servers (1100, then 1101/1102)


INSTANT = frozenset({Fault.DROP, Fault.RESET, Fault.RESTART, Fault.LINK_LOST})


@dataclass(slots=True)
class ActiveFault:
    fault: Fault
    until: float  # time.monotonic() deadline
    symbol: str | None


class FaultBox:
    """The set of faults in force for one simulator; cheap to query on the hot path."""

    def __init__(self) -> None:
        self._active: list[ActiveFault] = []
        self._listeners: list[Callable[[Fault, float, str | None], None]] = []
        self.injected: dict[Fault, int] = {}

    def on_instant(self, listener: Callable[[Fault, float, str | None], None]) -> None:
        self._listeners.append(listener)

    def inject(self, fault: Fault | str, duration: float = 0.0, symbol: str | None = None) -> None:
        fault = Fault(fault)
        if duration < 0:
            raise ValueError("duration must be >= 0")
        self.injected[fault] = self.injected.get(fault, 0) + 1
        if fault in INSTANT:
            for listener in list(self._listeners):
                listener(fault, duration, symbol)
            if fault is not Fault.LINK_LOST:
                return
        self._active.append(ActiveFault(fault, time.monotonic() + duration, symbol))

    def active(self, fault: Fault, symbol: str | None = None) -> bool:
        """True while `fault` holds for `symbol` (a fault injected without a symbol holds for all)."""
        if not self._active:
            return False
        now = time.monotonic()
        self._active = [f for f in self._active if f.until > now]
        return any(f.fault is fault and (f.symbol is None or f.symbol == symbol) for f in self._active)

    def remaining(self, fault: Fault, symbol: str | None = None) -> float:
        now = time.monotonic()
        return max(
            (f.until - now for f in self._active if f.fault is fault and f.symbol in (None, symbol)),
            default=0.0,
        )

    def clear(self) -> None:
        self._active.clear()
