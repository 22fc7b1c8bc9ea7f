"""The simulator's security master: which contracts exist and how a request's fields pick one.

TWS resolves a partially specified contract (symbol + secType + exchange + currency, or just a conId)
against its database; ib_async's qualifyContracts depends on getting exactly one match back, so the
matching rules here mirror TWS for the two asset classes a market-data feed needs: stocks and FX.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_US_STOCK_EXCHANGES = (
    "SMART,AMEX,NYSE,CBOE,PHLX,ISE,CHX,ARCA,ISLAND,DRCTEDGE,BEX,BATS,EDGEA,BYX,IEX,EDGX,FOXRIVER,"
    "PEARL,NYSENAT,LTSE,MEMX,IBEOS,OVERNIGHT,TPLUS0,PSX,NASDAQ"
)
_CASH_ORDER_TYPES = "ACTIVETIM,AD,ADJUST,ALERT,ALGO,ALLOC,AVGCOST,BASKET,COND,DAY,GTC,GTD,IOC,LMT,MKT,STP,STPLMT,TRAIL"
_STK_ORDER_TYPES = _CASH_ORDER_TYPES + ",DARKPOLL,LIT,MOC,MOO,MTL,REL,VWAP"
_ALIASES = {"ISLAND": "NASDAQ"}  # IB reports NASDAQ listings under either name


@dataclass(frozen=True, slots=True)
class ContractSpec:
    """One tradable contract; `key` names it in the market model and in symbol-scoped faults."""

    symbol: str
    sec_type: str
    con_id: int
    currency: str = "USD"
    exchange: str = "SMART"
    primary_exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    long_name: str = ""
    min_tick: float = 0.01
    price: float | None = None
    valid_exchanges: str = ""
    industry: str = ""
    category: str = ""
    time_zone: str = "US/Eastern"

    @property
    def key(self) -> str:
        return self.local_symbol

    @property
    def is_cash(self) -> bool:
        return self.sec_type == "CASH"

    @property
    def lot(self) -> int:
        """IB units per market-model quantity: the model trades small floats, IB quotes shares or units."""
        return 1_000_000 if self.is_cash else 100

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContractSpec:
        """Build from IB-style camelCase keys (symbol, secType, conId, ...), filling TWS's usual defaults."""
        sec_type = str(d.get("secType", "STK")).upper()
        symbol = str(d["symbol"]).upper()
        currency = str(d.get("currency", "USD")).upper()
        if sec_type == "CASH":
            local = str(d.get("localSymbol") or f"{symbol}.{currency}")
            return cls(
                symbol=symbol,
                sec_type="CASH",
                con_id=int(d["conId"]),
                currency=currency,
                exchange=str(d.get("exchange", "IDEALPRO")),
                primary_exchange=str(d.get("primaryExchange", "")),
                local_symbol=local,
                trading_class=str(d.get("tradingClass") or local),
                long_name=str(d.get("longName") or local),
                min_tick=float(d.get("minTick", 0.005 if currency == "JPY" else 0.00005)),
                price=None if d.get("price") is None else float(d["price"]),
                valid_exchanges=str(d.get("validExchanges", "IDEALPRO")),
                industry=str(d.get("industry", "")),
                category=str(d.get("category", "")),
                time_zone=str(d.get("timeZoneId", "US/Eastern")),
            )
        primary = str(d.get("primaryExchange", "NASDAQ")).upper()
        return cls(
            symbol=symbol,
            sec_type=sec_type,
            con_id=int(d["conId"]),
            currency=currency,
            exchange=str(d.get("exchange", "SMART")),
            primary_exchange=primary,
            local_symbol=str(d.get("localSymbol") or symbol),
            trading_class=str(d.get("tradingClass") or ("NMS" if primary == "NASDAQ" else symbol)),
            long_name=str(d.get("longName") or symbol),
            min_tick=float(d.get("minTick", 0.01)),
            price=None if d.get("price") is None else float(d["price"]),
            valid_exchanges=str(d.get("validExchanges", _US_STOCK_EXCHANGES)),
            industry=str(d.get("industry", "")),
            category=str(d.get("category", "")),
            time_zone=str(d.get("timeZoneId", "US/Eastern")),
        )

    def order_types(self) -> str:
        return _CASH_ORDER_TYPES if self.is_cash else _STK_ORDER_TYPES


def _stk(symbol: str, con_id: int, primary: str, price: float, name: str, industry: str) -> dict[str, Any]:
    return {
        "symbol": symbol,
        "secType": "STK",
        "conId": con_id,
        "primaryExchange": primary,
        "price": price,
        "longName": name,
        "industry": industry,
    }


def _fx(pair: str, con_id: int, price: float, name: str) -> dict[str, Any]:
    base, quote = pair.split(".")
    return {
        "symbol": base,
        "currency": quote,
        "secType": "CASH",
        "conId": con_id,
        "price": price,
        "longName": name,
    }


DEFAULT_CONTRACTS: tuple[dict[str, Any], ...] = (
    _stk("AAPL", 265598, "NASDAQ", 190.0, "APPLE INC", "Technology"),
    _stk("MSFT", 272093, "NASDAQ", 420.0, "MICROSOFT CORP", "Technology"),
    _stk("AMZN", 3691937, "NASDAQ", 180.0, "AMAZON.COM INC", "Communications"),
    _stk("GOOGL", 208813719, "NASDAQ", 170.0, "ALPHABET INC-CL A", "Communications"),
    _stk("NVDA", 4815747, "NASDAQ", 120.0, "NVIDIA CORP", "Technology"),
    _stk("TSLA", 76792991, "NASDAQ", 250.0, "TESLA INC", "Consumer, Cyclical"),
    _stk("META", 107113386, "NASDAQ", 500.0, "META PLATFORMS INC-CLASS A", "Communications"),
    _stk("AMD", 4391, "NASDAQ", 160.0, "ADVANCED MICRO DEVICES", "Technology"),
    _stk("NFLX", 15124833, "NASDAQ", 650.0, "NETFLIX INC", "Communications"),
    _stk("INTC", 270639, "NASDAQ", 30.0, "INTEL CORP", "Technology"),
    _stk("QQQ", 320227571, "NASDAQ", 480.0, "INVESCO QQQ TRUST SERIES 1", "Funds"),
    _stk("SPY", 756733, "ARCA", 550.0, "SPDR S&P 500 ETF TRUST", "Funds"),
    _stk("IBM", 8314, "NYSE", 190.0, "INTL BUSINESS MACHINES CORP", "Technology"),
    _stk("JPM", 1520593, "NYSE", 200.0, "JPMORGAN CHASE & CO", "Financial"),
    _stk("KO", 8894, "NYSE", 62.0, "COCA-COLA CO/THE", "Consumer, Non-cyclical"),
    _stk("XOM", 13977, "NYSE", 115.0, "EXXON MOBIL CORP", "Energy"),
    _fx("EUR.USD", 12087792, 1.08, "European Monetary Union Euro"),
    _fx("GBP.USD", 12087797, 1.27, "British pound"),
    _fx("USD.JPY", 15016059, 150.0, "US dollar"),
    _fx("AUD.USD", 14433401, 0.66, "Australian dollar"),
    _fx("USD.CHF", 12087820, 0.90, "US dollar"),
    _fx("USD.CAD", 15016062, 1.36, "US dollar"),
)


@dataclass(frozen=True, slots=True)
class ContractQuery:
    """The 12 contract fields ib_async puts on the wire for every contract-bearing request."""

    con_id: int
    symbol: str
    sec_type: str
    last_trade: str
    strike: str
    right: str
    multiplier: str
    exchange: str
    primary_exchange: str
    currency: str
    local_symbol: str
    trading_class: str

    @classmethod
    def parse(cls, fields: list[str], at: int) -> ContractQuery:
        f = fields[at : at + 12]
        if len(f) < 12:
            raise ValueError("truncated contract")
        return cls(int(f[0] or 0), *(s.strip() for s in f[1:]))


class Catalogue:
    """Contracts by conId, with TWS-like matching of partially specified requests."""

    def __init__(self, specs: Iterable[ContractSpec]) -> None:
        self._by_con_id: dict[int, ContractSpec] = {}
        for spec in specs:
            self._by_con_id[spec.con_id] = spec  # later entries (constructor extensions) win

    def __iter__(self) -> Iterator[ContractSpec]:
        return iter(self._by_con_id.values())

    def __len__(self) -> int:
        return len(self._by_con_id)

    def match(self, q: ContractQuery) -> list[ContractSpec]:
        if q.con_id:
            spec = self._by_con_id.get(q.con_id)
            return [spec] if spec and self._compatible(spec, q, by_con_id=True) else []
        if not q.symbol and not q.local_symbol:
            return []
        return [s for s in self._by_con_id.values() if self._compatible(s, q, by_con_id=False)]

    def search(self, pattern: str, limit: int = 16) -> list[ContractSpec]:
        p = pattern.upper()
        hits = [s for s in self._by_con_id.values() if s.symbol.startswith(p) or p in s.long_name.upper()]
        return hits[:limit]

    @staticmethod
    def _compatible(s: ContractSpec, q: ContractQuery, by_con_id: bool) -> bool:
        if not by_con_id:
            if q.symbol and q.symbol.upper() != s.symbol:
                return False
            if q.local_symbol and q.local_symbol.upper() != s.local_symbol.upper():
                return False
            if q.currency and q.currency.upper() != s.currency:
                return False
            if q.trading_class and q.trading_class.upper() != s.trading_class.upper():
                return False
        if q.sec_type and q.sec_type.upper() != s.sec_type:
            return False
        if q.exchange and q.exchange.upper() not in s.valid_exchanges.split(","):
            return False
        if q.primary_exchange and s.primary_exchange:
            want = _ALIASES.get(q.primary_exchange.upper(), q.primary_exchange.upper())
            if want != _ALIASES.get(s.primary_exchange, s.primary_exchange):
                return False
        # Stocks and FX have no expiry, strike or right; a request naming one is for another contract.
        return not (q.last_trade or q.right or (q.strike and float(q.strike or 0) != 0.0))
