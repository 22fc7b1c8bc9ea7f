"""Normalised events: the one shape every adapter emits and every sink writes.

Timestamps are integer nanoseconds since the epoch: `ts_exchange` as the venue stamped it (None when
the venue gives none), `ts_received` from time.time_ns() when the bytes were parsed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

Transport = Literal["websocket", "polling", "hybrid"]
Level = tuple[float, float]  # (price, amount)


@dataclass(slots=True)
class Trade:
    kind: ClassVar[str] = "trade"
    venue: str
    symbol: str
    ts_exchange: int | None
    ts_received: int
    transport: str
    id: str | None
    price: float
    amount: float
    side: str | None
    backfilled: bool = False


@dataclass(slots=True)
class Ticker:
    kind: ClassVar[str] = "ticker"
    venue: str
    symbol: str
    ts_exchange: int | None
    ts_received: int
    transport: str
    bid: float | None
    ask: float | None
    last: float | None
    volume: float | None


@dataclass(slots=True)
class Book:
    kind: ClassVar[str] = "book"
    venue: str
    symbol: str
    ts_exchange: int | None
    ts_received: int
    transport: str
    bids: list[Level]
    asks: list[Level]
    sequence: int | None


Event = Trade | Ticker | Book


def to_dict(event: Event) -> dict[str, object]:
    """The sink record: venue, symbol, kind, timestamps, transport, then the kind's own fields."""
    out: dict[str, object] = {"venue": event.venue, "symbol": event.symbol, "kind": event.kind}
    for name in event.__slots__:  # type: ignore[union-attr]
        out[name] = getattr(event, name)
    return out


def ms_to_ns(ms: float | int | None) -> int | None:
    return None if ms is None else int(ms) * 1_000_000
