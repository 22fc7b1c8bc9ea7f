"""Normalised events: the one shape every adapter emits and every sink writes.

Timestamps are integer nanoseconds since the epoch: `ts_exchange` as the venue stamped it (None when
the venue gives none), `ts_received` from time.time_ns() when the bytes were parsed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
    """The sink record: venue, symbol, kind, timestamps, transport, then the kind's own fields.

    `venue` must stay the first key: `sinks.base.encode_lines` relies on it to split a batch.
    """
    return _RECORD[type(event)](event)  # type: ignore[operator]


def _trade(e: Trade) -> dict[str, object]:
    return {
        "venue": e.venue,
        "symbol": e.symbol,
        "kind": "trade",
        "ts_exchange": e.ts_exchange,
        "ts_received": e.ts_received,
        "transport": e.transport,
        "id": e.id,
        "price": e.price,
        "amount": e.amount,
        "side": e.side,
        "backfilled": e.backfilled,
    }


def _ticker(e: Ticker) -> dict[str, object]:
    return {
        "venue": e.venue,
        "symbol": e.symbol,
        "kind": "ticker",
        "ts_exchange": e.ts_exchange,
        "ts_received": e.ts_received,
        "transport": e.transport,
        "bid": e.bid,
        "ask": e.ask,
        "last": e.last,
        "volume": e.volume,
    }


def _book(e: Book) -> dict[str, object]:
    return {
        "venue": e.venue,
        "symbol": e.symbol,
        "kind": "book",
        "ts_exchange": e.ts_exchange,
        "ts_received": e.ts_received,
        "transport": e.transport,
        "bids": e.bids,
        "asks": e.asks,
        "sequence": e.sequence,
    }


_RECORD = {Trade: _trade, Ticker: _ticker, Book: _book}


def group_by(events: Iterable[Event], key: Callable[[Event], Any]) -> dict[Any, list[Event]]:
    """Events by key, each group in arrival order (one pass; the batch paths use it per batch)."""
    groups: dict[Any, list[Event]] = {}
    for e in events:
        k = key(e)
        group = groups.get(k)
        if group is None:
            groups[k] = [e]
        else:
            group.append(e)
    return groups


def ms_to_ns(ms: float | int | None) -> int | None:
    return None if ms is None else int(ms) * 1_000_000


def event_id(e: Event) -> str:
    """A stable id a consumer de-duplicates by: `venue:symbol:kind:key`, the key being the venue's trade
    id, else the book's sequence, else the venue's timestamp, else the time received. A replayed event
    (the spool, a restart's backfill of a trade) carries the same id as the first delivery."""
    if isinstance(e, Trade):
        key = e.id if e.id is not None else f"{e.ts_exchange or e.ts_received}:{e.price}:{e.amount}"
    elif isinstance(e, Book) and e.sequence is not None:
        key = str(e.sequence)
    else:
        key = str(e.ts_exchange or e.ts_received)
    return f"{e.venue}:{e.symbol}:{e.kind}:{key}"


def from_dict(d: dict[str, Any]) -> Event:
    """The event a sink record (to_dict) was made from: the spool stores records, replay rebuilds them."""
    kind = d["kind"]
    base = (d["venue"], d["symbol"], d["ts_exchange"], d["ts_received"], d["transport"])
    if kind == "trade":
        return Trade(*base, d["id"], d["price"], d["amount"], d["side"], d.get("backfilled", False))
    if kind == "ticker":
        return Ticker(*base, d["bid"], d["ask"], d["last"], d["volume"])
    if kind == "book":
        return Book(*base, [tuple(x) for x in d["bids"]], [tuple(x) for x in d["asks"]], d["sequence"])
    raise ValueError(f"unknown event kind {kind!r}")
