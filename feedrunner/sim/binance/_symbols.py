"""Per-symbol feed state: names, stream keys, the trade tape and the depth accumulators.

Stream keys are precomputed so the per-trade hot path only does dict lookups, never string building.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feedrunner.sim.binance._history import TradeHistory
from feedrunner.sim.market import BookDiff, SymbolState

PARTIAL_LEVELS = (5, 10, 20)
DIFF_100 = ("depth@100ms",)
DIFF_1000 = ("depth", "depth@1000ms")
CHANNELS = frozenset(
    {"trade", "aggTrade", "ticker", "miniTicker", "bookTicker", *DIFF_100, *DIFF_1000}
    | {f"depth{n}{sfx}" for n in PARTIAL_LEVELS for sfx in ("", "@100ms", "@1000ms")}
)
ALL_MARKET = frozenset({"!miniTicker@arr", "!ticker@arr"})


@dataclass(slots=True)
class DepthAcc:
    """Diffs merged over one stream interval, as Binance batches @depth updates (U..u, last qty wins)."""

    first: int | None = None
    last: int = 0
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)

    def add(self, diff: BookDiff) -> None:
        if self.first is None:
            self.first = diff.first_update_id
        self.last = diff.last_update_id
        bids, asks = self.bids, self.asks
        for p, q in diff.bids:
            bids[p] = q
        for p, q in diff.asks:
            asks[p] = q

    def merge(self, other: DepthAcc) -> None:
        if other.first is None:
            return
        if self.first is None:
            self.first = other.first
        self.last = other.last
        self.bids.update(other.bids)
        self.asks.update(other.asks)

    def clear(self) -> None:
        self.first = None
        self.bids.clear()
        self.asks.clear()


def split_symbol(unified: str) -> tuple[str, str]:
    base, sep, quote = unified.partition("/")
    if not sep or not base or not quote or "/" in quote:
        raise ValueError(f"symbol must look like 'BTC/USDT', got {unified!r}")
    return base.upper(), quote.upper()


@dataclass(slots=True, eq=False)
class SymbolFeed:
    """Everything the simulator tracks for one listed symbol."""

    unified: str
    base: str
    quote: str
    state: SymbolState
    history: TradeHistory
    rate: float
    agg_offset: int  # aggregate id = trade id - agg_offset: Binance keeps two separate id sequences
    id: str = ""
    lid: str = ""
    k_trade: str = ""
    k_agg: str = ""
    k_book: str = ""
    k_ticker: str = ""
    k_mini: str = ""
    k_diff100: tuple[str, ...] = ()
    k_diff1000: tuple[str, ...] = ()
    k_partial100: tuple[tuple[str, int], ...] = ()
    k_partial1000: tuple[tuple[str, int], ...] = ()
    carry: float = 0.0
    generated: int = 0
    depth_on: bool = False
    acc100: DepthAcc = field(default_factory=DepthAcc)
    acc1000: DepthAcc = field(default_factory=DepthAcc)
    gap_pending: bool = False
    phase100: int = 0  # slot of the 20 ms cadence grid this symbol's 100 ms streams fire on
    phase1000: int = 0
    flushes: int = 0
    send_times: dict[int, int] | None = None
    unsent: list[int] = field(default_factory=list)  # ids printed this tick, stamped once written

    def __post_init__(self) -> None:
        self.id = self.base + self.quote
        lid = self.lid = self.id.lower()
        self.k_trade, self.k_agg, self.k_book = f"{lid}@trade", f"{lid}@aggTrade", f"{lid}@bookTicker"
        self.k_ticker, self.k_mini = f"{lid}@ticker", f"{lid}@miniTicker"
        self.k_diff100 = tuple(f"{lid}@{c}" for c in DIFF_100)
        self.k_diff1000 = tuple(f"{lid}@{c}" for c in DIFF_1000)
        self.k_partial100 = tuple((f"{lid}@depth{n}@100ms", n) for n in PARTIAL_LEVELS)
        self.k_partial1000 = tuple((f"{lid}@depth{n}{sfx}", n) for n in PARTIAL_LEVELS for sfx in ("", "@1000ms"))
