"""A deterministic market per symbol: random-walk prices, contiguous trade ids, a consistent book.

Every simulator draws from this model, so the same seed gives the same tape whatever the protocol.
`round(x, n)` (a decimal conversion) dominated the cost of a print, so prices are rounded through a memo
and quantities through an exact integer short-cut: the tape is unchanged, a print costs about a third less.
The book is a price ladder around the mid; each step moves the mid and changes a few levels, and every
change bumps the book's update id, which is what diff-depth streams and snapshots are checked against.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from dataclasses import dataclass, field

Level = tuple[float, float]  # (price, qty)


@dataclass(slots=True)
class SimTrade:
    id: int
    price: float
    qty: float
    buyer_is_maker: bool
    ts_ms: int


@dataclass(slots=True)
class BookDiff:
    first_update_id: int
    last_update_id: int
    bids: list[tuple[float, float]]  # (price, qty); qty 0 removes the level
    asks: list[tuple[float, float]]
    ts_ms: int


@dataclass(slots=True)
class SymbolState:
    symbol: str
    rng: random.Random
    tick: float
    mid: float
    open: float
    high: float
    low: float
    volume: float = 0.0
    quote_volume: float = 0.0
    trade_id: int = 0
    update_id: int = 1000
    trade_count: int = 0
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    last: SimTrade | None = None
    bid_low: float = 0.0  # the ladder's far ends, kept so a print never scans the book for them
    ask_high: float = 0.0


def _base_price(symbol: str) -> float:
    known = {"BTC": 60000.0, "ETH": 3000.0, "SOL": 150.0, "BNB": 550.0, "XRP": 0.55, "EUR": 1.08}
    base = symbol.replace("-", "/").replace(".", "/").split("/")[0].upper()
    if base in known:
        return known[base]
    return 10.0 + (zlib.crc32(symbol.encode()) % 50000) / 100.0


_CACHE_MAX = 1 << 20  # memoised price roundings: prices sit on a tick grid and repeat


def _q4(x: float) -> float:
    """round(x, 4) for 0 <= x < 1e5 without round's decimal conversion; defers to round() near a tie."""
    y = x * 10000.0
    frac = y - math.floor(y)
    if abs(frac - 0.5) < 1e-7:
        return round(x, 4)
    return round(y) / 10000.0


class MarketModel:
    """Seeded per-symbol markets; call `trade()` to advance one symbol by one print."""

    LEVELS = 50

    def __init__(self, seed: int = 1, symbols: list[str] | tuple[str, ...] = ()) -> None:
        self._r10: dict[float, float] = {}
        self.seed = seed
        self._symbols: dict[str, SymbolState] = {}
        for s in symbols:
            self.add(s)

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._symbols

    def add(self, symbol: str, price: float | None = None) -> SymbolState:
        if symbol in self._symbols:
            return self._symbols[symbol]
        rng = random.Random(f"{self.seed}:{symbol}")
        mid = price if price is not None else _base_price(symbol)
        tick = 10 ** (len(str(int(mid))) - 6) if mid >= 1 else 0.00001
        mid = round(round(mid / tick) * tick, 10)
        st = SymbolState(symbol=symbol, rng=rng, tick=tick, mid=mid, open=mid, high=mid, low=mid)
        st.trade_id = 1000 + rng.randrange(1000)
        for i in range(1, self.LEVELS + 1):
            st.bids[round(mid - i * tick, 10)] = round(rng.uniform(0.1, 5.0), 4)
            st.asks[round(mid + i * tick, 10)] = round(rng.uniform(0.1, 5.0), 4)
        st.bid_low, st.ask_high = min(st.bids), max(st.asks)
        self._symbols[symbol] = st
        return st

    def _round10(self, x: float) -> float:
        r = self._r10.get(x)
        if r is None:
            r = round(x, 10)
            if len(self._r10) < _CACHE_MAX:
                self._r10[x] = r
        return r

    def state(self, symbol: str) -> SymbolState:
        return self._symbols[symbol]

    def trade(self, symbol: str, now_ms: int | None = None) -> tuple[SimTrade, BookDiff]:
        """One print: move the mid, record the trade, and return the book changes it caused."""
        st = self._symbols[symbol]
        rng = st.rng
        ts = now_ms if now_ms is not None else int(time.time() * 1000)
        r10 = self._round10
        step = rng.choice((-1, 0, 0, 1))
        st.mid = r10(st.mid + step * st.tick)
        buyer_is_maker = rng.random() < 0.5
        price = r10(st.mid - st.tick if buyer_is_maker else st.mid + st.tick)
        qty = _q4(0.001 + (2.0 - 0.001) * rng.random())  # random.uniform's documented formula
        st.trade_id += 1
        st.trade_count += 1
        trade = SimTrade(st.trade_id, price, qty, buyer_is_maker, ts)
        st.last = trade
        st.high = max(st.high, price)
        st.low = min(st.low, price)
        st.volume += qty
        st.quote_volume += qty * price
        return trade, self._rebook(st, ts)

    def _rebook(self, st: SymbolState, ts: int) -> BookDiff:
        """The mid's level leaves the book, the three levels either side get new sizes, and each side is
        topped up or trimmed at its far end back to LEVELS (the ladder stays contiguous on the tick grid,
        so the far ends are tracked, not searched for)."""
        r10, rnd = self._round10, st.rng.random
        first = st.update_id + 1
        bids: list[tuple[float, float]] = []
        asks: list[tuple[float, float]] = []
        mid, tick = st.mid, st.tick
        sb, sa = st.bids, st.asks
        if sb.pop(mid, None) is not None:
            bids.append((mid, 0.0))
            if mid == st.bid_low:
                st.bid_low = r10(mid + tick)
        if sa.pop(mid, None) is not None:
            asks.append((mid, 0.0))
            if mid == st.ask_high:
                st.ask_high = r10(mid - tick)
        for i in range(1, 4):
            bp, ap = r10(mid - i * tick), r10(mid + i * tick)
            bq, aq = _q4(0.1 + 4.9 * rnd()), _q4(0.1 + 4.9 * rnd())
            sb[bp], sa[ap] = bq, aq
            bids.append((bp, bq))
            asks.append((ap, aq))
            if bp < st.bid_low:
                st.bid_low = bp
            if ap > st.ask_high:
                st.ask_high = ap
        levels = self.LEVELS
        while len(sb) < levels:
            far = st.bid_low = r10(st.bid_low - tick)
            q = sb[far] = _q4(0.1 + 4.9 * rnd())
            bids.append((far, q))
        while len(sb) > levels:
            far = st.bid_low
            del sb[far]
            st.bid_low = r10(far + tick)
            bids.append((far, 0.0))
        while len(sa) < levels:
            far = st.ask_high = r10(st.ask_high + tick)
            q = sa[far] = _q4(0.1 + 4.9 * rnd())
            asks.append((far, q))
        while len(sa) > levels:
            far = st.ask_high
            del sa[far]
            st.ask_high = r10(far - tick)
            asks.append((far, 0.0))
        st.update_id = first + len(bids) + len(asks) - 1
        return BookDiff(first, st.update_id, bids, asks, ts)

    def snapshot(self, symbol: str, depth: int = 100) -> tuple[int, list[Level], list[Level]]:
        st = self._symbols[symbol]
        bids = sorted(st.bids.items(), reverse=True)[:depth]
        asks = sorted(st.asks.items())[:depth]
        return st.update_id, bids, asks

    def best(self, symbol: str) -> tuple[tuple[float, float], tuple[float, float]]:
        st = self._symbols[symbol]
        bp = max(st.bids)
        ap = min(st.asks)
        return (bp, st.bids[bp]), (ap, st.asks[ap])
