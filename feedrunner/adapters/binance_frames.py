"""Binance spot `@trade` frames parsed to the fields the ccxt adapter reads, at a fraction of ccxt's cost.

ccxt.pro's parse of one such frame (parse_ws_trade -> parse_trade -> safe_trade: Precise arithmetic for
the cost, an ISO date, fee structures) takes ~10 µs, the largest single cost per trade at high rates,
and the adapter reads six of its fields. Only frames of exactly the public trade shape take this path;
anything else (user trades, futures, a field Binance adds) goes to ccxt's own parse. Everything around
it stays ccxt's: the connection, subscriptions, the trade cache and the futures that wake the watch
loops. tests/test_binance_frames.py holds both parses to the same normalised Trade on the same frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from feedrunner.events import Trade

REQUIRED = frozenset("estpqTm")
ALLOWED = REQUIRED | frozenset("EMba")  # event time, "ignore", buyer/seller order ids (older streams)


def install(exchange: Any, arrived: Callable[[str], None] | None = None) -> bool:
    """Route the instance's public spot trade frames through `parse`, and tell `arrived` the symbol of
    every trade parsed (feedrunner.adapters.arrivals); False, and nothing done, where numbers are not
    floats."""
    if getattr(exchange, "number", float) is not float:
        return False
    ccxt_parse = exchange.parse_ws_trade

    def parse_ws_trade(trade: dict[str, Any], market: dict[str, Any] | None = None) -> dict[str, Any]:
        fast = parse(trade, market)
        out = fast if fast is not None else ccxt_parse(trade, market)
        if arrived is not None and out.get("symbol"):
            arrived(out["symbol"])
        return out

    exchange.parse_ws_trade = parse_ws_trade
    return True


def event(venue: str, trade: dict[str, Any], market: dict[str, Any] | None, received: int) -> Trade | None:
    """The normalised Trade of a public spot trade frame, straight from the frame (what the ccxt adapter's
    to_trade makes of ccxt's parse); None for a frame of any other shape."""
    keys = trade.keys()
    if (
        market is None
        or market.get("type") != "spot"
        or trade.get("e") != "trade"
        or not REQUIRED <= keys
        or not keys <= ALLOWED
    ):
        return None
    tid, ts, price, amount, maker = trade["t"], trade["T"], trade["p"], trade["q"], trade["m"]
    if not (
        type(tid) is int and type(ts) is int and type(price) is str and type(amount) is str and type(maker) is bool
    ):
        return None
    try:
        p, q = float(price), float(amount)
    except ValueError:
        return None
    if not (math.isfinite(p) and math.isfinite(q)):
        return None
    side = "sell" if maker else "buy"  # the buyer made the market: the taker sold
    return Trade(venue, market["symbol"], ts * 1_000_000, received, "websocket", str(tid), p, q, side)


def parse(trade: dict[str, Any], market: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trade as ccxt gives it, minus what nothing reads here (datetime, cost, fee); None if the frame
    is not exactly a public spot trade."""
    e = event("", trade, market, 0)
    if e is None:
        return None
    return {
        "info": trade,
        "timestamp": trade["T"],
        "datetime": None,
        "symbol": e.symbol,
        "id": e.id,
        "order": None,
        "type": None,
        "side": e.side,
        "takerOrMaker": None,
        "price": e.price,
        "amount": e.amount,
        "cost": None,
        "fee": None,
        "fees": [],
    }
