"""The fast parse of Binance `@trade` frames gives the Trade ccxt.pro's own parse gives, frame for frame."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from feedrunner.adapters import binance_frames
from feedrunner.adapters.ccxt import to_trade
from feedrunner.lazyccxt import ccxt

MARKET = {
    "id": "BTCUSDT", "symbol": "BTC/USDT", "base": "BTC", "quote": "USDT", "baseId": "BTC", "quoteId": "USDT",
    "settle": None, "type": "spot", "spot": True, "margin": False, "swap": False, "future": False, "option": False,
    "contract": False, "linear": None, "inverse": None, "contractSize": None, "expiry": None, "strike": None,
    "optionType": None, "active": True, "precision": {"amount": 1e-8, "price": 1e-8}, "limits": {}, "info": {},
}  # fmt: skip


@pytest.fixture(scope="module")
def exchange():
    ex = ccxt.pro.binance({})
    ex.set_markets([MARKET])
    return ex


decimals = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("99999999"), places=8).map(
    lambda d: f"{d:.8f}"
)
frames = st.fixed_dictionaries(
    {
        "e": st.just("trade"),
        "E": st.integers(1_500_000_000_000, 2_500_000_000_000),
        "s": st.just("BTCUSDT"),
        "t": st.integers(0, 2**53),
        "p": decimals,
        "q": decimals,
        "T": st.integers(1_500_000_000_000, 2_500_000_000_000),
        "m": st.booleans(),
        "M": st.just(True),
    }
)


@settings(max_examples=300, deadline=None)
@given(frame=frames)
@example(frame={"e": "trade", "E": 1, "s": "BTCUSDT", "t": 7, "p": "0.00000001", "q": "1e-8", "T": 2, "m": True})
@example(frame={"e": "trade", "s": "BTCUSDT", "t": 7, "p": "100", "q": "0", "T": 2, "m": False, "b": 1, "a": 2})
def test_fast_parse_normalises_to_the_same_trade_as_ccxt(exchange, frame):
    market = exchange.market("BTC/USDT")
    ours = binance_frames.parse(frame, market)
    assert ours is not None
    theirs = ccxt.pro.binance.parse_ws_trade(exchange, dict(frame), market)
    assert to_trade("binance", ours, 1, "websocket") == to_trade("binance", theirs, 1, "websocket")
    assert binance_frames.event("binance", frame, market, 1) == to_trade("binance", theirs, 1, "websocket")
    assert {k: ours[k] for k in ("timestamp", "symbol", "id", "side", "price", "amount")} == {
        k: theirs[k] for k in ("timestamp", "symbol", "id", "side", "price", "amount")
    }


@pytest.mark.parametrize(
    "change",
    [
        {"x": "TRADE"},  # a user trade (executionReport): ccxt's parse
        {"e": "aggTrade"},
        {"X": "MARKET"},  # a field this parse does not know
        {"p": 1.5},  # a number where Binance sends a string
        {"q": "NaN"},
        {"t": "7"},
    ],
)
def test_any_other_shape_goes_to_ccxts_parse(exchange, change):
    frame = {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 7, "p": "1.5", "q": "2", "T": 2, "m": True, "M": True}
    market = exchange.market("BTC/USDT")
    for parse in (binance_frames.parse, lambda f, m: binance_frames.event("binance", f, m, 1)):
        assert parse({**frame, **change}, market) is None
        assert parse(frame, None) is None  # no market resolved
        assert parse(frame, {**market, "type": "swap"}) is None


def test_installed_on_the_instance_and_falls_back(exchange):
    ex = ccxt.pro.binance({})
    ex.set_markets([MARKET])
    binance_frames.install(ex)
    market = ex.market("BTC/USDT")
    fast = ex.parse_ws_trade({"e": "trade", "s": "BTCUSDT", "t": 9, "p": "2", "q": "3", "T": 5, "m": False}, market)
    assert fast["datetime"] is None and fast["id"] == "9"  # ours
    slow = ex.parse_ws_trade({"e": "aggTrade", "s": "BTCUSDT", "a": 9, "p": "2", "q": "3", "T": 5, "m": False}, market)
    assert slow["datetime"] == "1970-01-01T00:00:00.005Z"  # ccxt's, for a shape we do not take
