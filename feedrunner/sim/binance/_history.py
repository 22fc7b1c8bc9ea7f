"""A bounded tape of recent trades, addressable by trade id in O(1).

Backfill asks for "everything from id N", so the tape is a ring buffer indexed by `id % capacity`;
the market model guarantees contiguous ids, which is what makes that indexing valid. The ring is kept in
typed arrays, not as objects: 100,000 trade objects per symbol made every full garbage collection of the
simulator's process pause for tens of milliseconds, which came out as bursts in the feed.
"""

from __future__ import annotations

from array import array

from feedrunner.sim.market import SimTrade


class TradeHistory:
    """The last `capacity` trades of one symbol."""

    __slots__ = ("_maker", "_price", "_qty", "_ts", "capacity", "first_id", "last_id")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("history capacity must be >= 1")
        self.capacity = capacity
        self._price = array("d", bytes(8 * capacity))
        self._qty = array("d", bytes(8 * capacity))
        self._ts = array("q", bytes(8 * capacity))
        self._maker = array("b", bytes(capacity))
        self.first_id = 0
        self.last_id = -1  # empty while last_id < first_id

    def __len__(self) -> int:
        return max(0, self.last_id - self.first_id + 1)

    def append(self, trade: SimTrade) -> None:
        if self.last_id < self.first_id:
            self.first_id = trade.id
        elif trade.id != self.last_id + 1:
            raise ValueError(f"trade id {trade.id} does not follow {self.last_id}")
        i = trade.id % self.capacity
        self._price[i], self._qty[i], self._ts[i], self._maker[i] = (
            trade.price,
            trade.qty,
            trade.ts_ms,
            trade.buyer_is_maker,
        )
        self.last_id = trade.id
        if self.last_id - self.first_id >= self.capacity:
            self.first_id = self.last_id - self.capacity + 1

    def _at(self, trade_id: int) -> SimTrade:
        assert self.first_id <= trade_id <= self.last_id
        i = trade_id % self.capacity
        return SimTrade(trade_id, self._price[i], self._qty[i], bool(self._maker[i]), self._ts[i])

    def from_id(self, start: int, limit: int) -> list[SimTrade]:
        """Up to `limit` trades from `start` on; ids older than the tape start at its oldest trade."""
        start = max(start, self.first_id)
        stop = min(self.last_id, start + limit - 1)
        return [self._at(i) for i in range(start, stop + 1)]

    def recent(self, limit: int) -> list[SimTrade]:
        return self.from_id(max(self.first_id, self.last_id - limit + 1), limit)

    def first_id_at_or_after(self, ts_ms: int) -> int:
        """Smallest retained id with time >= ts_ms (last_id + 1 when none); trade times never decrease."""
        lo, hi = self.first_id, self.last_id + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._ts[mid % self.capacity] < ts_ms:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def last_id_at_or_before(self, ts_ms: int) -> int:
        """Largest retained id with time <= ts_ms (first_id - 1 when none)."""
        return self.first_id_at_or_after(ts_ms + 1) - 1
