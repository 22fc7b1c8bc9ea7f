"""MarketModel with the same tape, fast enough for 20k trades/s on one symbol.

`MarketModel.trade` spends most of its ~35 us in `round(x, n)` (16 calls, each a decimal
conversion). This subclass returns bit-identical trades and diffs - the same seed still gives the same
tape as every other simulator, which tests/sim/test_binance_sim.py checks against the original - by
memoising the price rounding (prices live on a tick grid, so they repeat) and rounding quantities with
an exact integer short-cut that falls back to `round` near a tie. If market.py changes, the
equivalence test fails and this copy must follow.
"""

from __future__ import annotations

import math
import time

from feedrunner.sim.market import BookDiff, MarketModel, SimTrade, SymbolState

_CACHE_MAX = 1 << 20


def _q4(x: float) -> float:
    """round(x, 4) for 0 <= x < 1e5: exact unless x*1e4 sits within 1e-7 of a tie, then defer to round."""
    y = x * 10000.0
    frac = y - math.floor(y)
    if abs(frac - 0.5) < 1e-7:
        return round(x, 4)
    return round(y) / 10000.0


class FastMarket(MarketModel):
    """Drop-in MarketModel; only the arithmetic of `trade` is sped up, never its results."""

    def __init__(self, seed: int = 1, symbols: list[str] | tuple[str, ...] = ()) -> None:
        self._r10: dict[float, float] = {}
        super().__init__(seed, symbols)

    def _round10(self, x: float) -> float:
        r = self._r10.get(x)
        if r is None:
            r = round(x, 10)
            if len(self._r10) < _CACHE_MAX:
                self._r10[x] = r
        return r

    def trade(self, symbol: str, now_ms: int | None = None) -> tuple[SimTrade, BookDiff]:
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
        r10, rnd = self._round10, st.rng.random
        first = st.update_id + 1
        bids: list[tuple[float, float]] = []
        asks: list[tuple[float, float]] = []
        mid, tick = st.mid, st.tick
        if st.bids.pop(mid, None) is not None:
            bids.append((mid, 0.0))
        if st.asks.pop(mid, None) is not None:
            asks.append((mid, 0.0))
        for i in range(1, 4):
            bp, ap = r10(mid - i * tick), r10(mid + i * tick)
            bq, aq = _q4(0.1 + (5.0 - 0.1) * rnd()), _q4(0.1 + (5.0 - 0.1) * rnd())
            st.bids[bp], st.asks[ap] = bq, aq
            bids.append((bp, bq))
            asks.append((ap, aq))
        levels = self.LEVELS
        for side, out, sign in ((st.bids, bids, -1), (st.asks, asks, 1)):
            while len(side) < levels:
                far = r10((min(side) - tick) if sign < 0 else (max(side) + tick))
                side[far] = _q4(0.1 + (5.0 - 0.1) * rnd())
                out.append((far, side[far]))
            while len(side) > levels:
                far = min(side) if sign < 0 else max(side)
                del side[far]
                out.append((far, 0.0))
        st.update_id = first + len(bids) + len(asks) - 1
        return BookDiff(first, st.update_id, bids, asks, ts)
