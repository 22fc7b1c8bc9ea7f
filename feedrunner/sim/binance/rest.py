"""Binance spot REST market-data endpoints (/api/v3/...), shaped as the official docs describe.

Only public market data is served: that is all a feed runner needs, and every field ccxt parses is
present so precision, limits, tickers, trades and books come out of ccxt as they would from Binance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from feedrunner.sim.binance._symbols import SymbolFeed
from feedrunner.sim.binance._wire import dumps, levels, loads, num
from feedrunner.sim.faults import Fault
from feedrunner.sim.market import SimTrade

if TYPE_CHECKING:
    from feedrunner.sim.binance.server import BinanceSim

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WEIGHT_LIMIT = 6000  # REQUEST_WEIGHT per minute, as exchangeInfo advertises
_BAN_AFTER = 3  # 429s served during a ratelimit fault before further calls get 418 (auto-ban)


class ApiError(Exception):
    """A Binance error body {"code": ..., "msg": ...} with its HTTP status."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code, self.msg, self.status = code, msg, status


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json", headers=headers)


def error_response(code: int, msg: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"code": code, "msg": msg}, status, headers)


def _int_param(q: Any, name: str, default: int | None) -> int | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(
            -1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."
        ) from None


def _limit(q: Any, default: int, maximum: int) -> int:
    limit = _int_param(q, "limit", default)
    assert limit is not None
    if limit <= 0:
        raise ApiError(-1100, "Illegal characters found in parameter 'limit'; legal range is '^[0-9]{1,20}$'.")
    return min(limit, maximum)


class RestApi:
    """Route handlers over the simulator's state; weights follow the Binance docs."""

    def __init__(self, sim: BinanceSim) -> None:
        self.sim = sim
        self._minute = 0
        self._used = 0
        self._strikes = 0  # 429s served during the current ratelimit fault
        self.routes: dict[str, tuple[Handler, Callable[[Any], int]]] = {
            "/api/v3/ping": (self.ping, lambda q: 1),
            "/api/v3/time": (self.server_time, lambda q: 1),
            "/api/v3/exchangeInfo": (self.exchange_info, lambda q: 20),
            "/api/v3/depth": (self.depth, self._depth_weight),
            "/api/v3/trades": (self.trades, lambda q: 25),
            "/api/v3/historicalTrades": (self.historical_trades, lambda q: 25),
            "/api/v3/aggTrades": (self.agg_trades, lambda q: 4),
            "/api/v3/ticker/24hr": (self.ticker_24hr, self._ticker_weight),
            "/api/v3/ticker/bookTicker": (self.book_ticker, lambda q: 2 if "symbol" in q else 4),
            "/api/v3/ticker/price": (self.price_ticker, lambda q: 2 if "symbol" in q else 4),
        }

    def add_routes(self, app: web.Application) -> None:
        for path, (handler, _) in self.routes.items():
            app.router.add_get(path, handler)

    # --- limits -----------------------------------------------------------------------------------

    @staticmethod
    def _depth_weight(q: Any) -> int:
        try:
            limit = int(q.get("limit", 100))
        except ValueError:
            limit = 100
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250

    @staticmethod
    def _ticker_weight(q: Any) -> int:
        if "symbol" in q:
            return 2
        if "symbols" in q:
            n = q["symbols"].count(",") + 1
            return 2 if n <= 20 else 40 if n <= 100 else 80
        return 80

    def used_weight(self) -> int:
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._used = minute, 0
        return self._used

    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Rate limits (natural and injected), weight accounting and Binance error bodies for /api/."""
        route = self.routes.get(request.path)
        q = request.query
        feed = self.sim.feed_by_id(q.get("symbol", ""))
        faults = self.sim.faults
        if faults.active(Fault.RATELIMIT, feed.unified if feed else None):
            wait = max(1, math.ceil(faults.remaining(Fault.RATELIMIT, feed.unified if feed else None)))
            self._strikes += 1
            headers = {"Retry-After": str(wait), "X-MBX-USED-WEIGHT-1M": str(self.used_weight())}
            if self._strikes > _BAN_AFTER:
                until = int(time.time() * 1000) + wait * 1000
                msg = f"Way too much request weight used; IP banned until {until}. "
                msg += "Please use WebSocket Streams for live updates to avoid bans."
                return error_response(-1003, msg, 418, headers)
            return error_response(-1003, self._too_much_msg(), 429, headers)
        self._strikes = 0
        key = request.headers.get("X-MBX-APIKEY")
        if key is not None and self.sim.api_keys is not None and key not in self.sim.api_keys:
            return error_response(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        weight = route[1](q) if route else 1
        used = self.used_weight()
        if used + weight > self.sim.weight_limit:
            headers = {"Retry-After": str(60 - int(time.time()) % 60), "X-MBX-USED-WEIGHT-1M": str(used)}
            return error_response(-1003, self._too_much_msg(), 429, headers)
        self._used = used + weight
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = error_response(e.code, e.msg, e.status)
        resp.headers["X-MBX-USED-WEIGHT-1M"] = str(self._used)
        return resp

    def _too_much_msg(self) -> str:
        return (
            f"Too much request weight used; current limit is {self.sim.weight_limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
        )

    # --- symbol parameters ------------------------------------------------------------------------

    def _one(self, q: Any, required: bool = True) -> SymbolFeed | None:
        sid = q.get("symbol")
        if sid is None or sid == "":
            if required:
                raise ApiError(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
            return None
        feed = self.sim.feed_by_id(sid)
        if feed is None or not self.sim.listed(feed):
            raise ApiError(-1121, "Invalid symbol.")
        return feed

    def _many(self, q: Any) -> list[SymbolFeed] | None:
        """`symbol` or `symbols` (a JSON array); None means all listed symbols."""
        if "symbol" in q and "symbols" in q:
            raise ApiError(-1128, "Combination of optional parameters invalid.")
        one = self._one(q, required=False)
        if one is not None:
            return [one]
        raw = q.get("symbols")
        if raw is None:
            return None
        try:
            ids = loads(raw)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError
        except ValueError:
            raise ApiError(
                -1100,
                "Illegal characters found in parameter 'symbols'; legal range is "
                '\'^\\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\\]$\'.',
            ) from None
        feeds = []
        for sid in ids:
            feed = self.sim.feed_by_id(sid)
            if feed is None or not self.sim.listed(feed):
                raise ApiError(-1121, "Invalid symbol.")
            feeds.append(feed)
        return feeds

    def _listed(self) -> list[SymbolFeed]:
        return [f for f in self.sim.feeds if self.sim.listed(f)]

    # --- endpoints --------------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        return json_response({})

    async def server_time(self, request: web.Request) -> web.Response:
        return json_response({"serverTime": int(time.time() * 1000)})

    async def exchange_info(self, request: web.Request) -> web.Response:
        feeds = self._many(request.query)
        if feeds is None:
            feeds = self._listed()
        return json_response(
            {
                "timezone": "UTC",
                "serverTime": int(time.time() * 1000),
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.sim.weight_limit,
                    },
                    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
                ],
                "exchangeFilters": [],
                "symbols": [self._symbol_info(f) for f in feeds],
            }
        )

    @staticmethod
    def _symbol_info(f: SymbolFeed) -> dict[str, Any]:
        tick = f.state.tick
        return {
            "symbol": f.id,
            "status": "TRADING",
            "baseAsset": f.base,
            "baseAssetPrecision": 8,
            "quoteAsset": f.quote,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "baseCommissionPrecision": 8,
            "quoteCommissionPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
            "icebergAllowed": True,
            "ocoAllowed": True,
            "otoAllowed": True,
            "quoteOrderQtyMarketAllowed": True,
            "allowTrailingStop": True,
            "cancelReplaceAllowed": True,
            "amendAllowed": True,
            "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "filters": [
                {
                    "filterType": "PRICE_FILTER",
                    "minPrice": num(tick),
                    "maxPrice": num(1_000_000.0),
                    "tickSize": num(tick),
                },
                {
                    "filterType": "LOT_SIZE",
                    "minQty": num(0.0001),
                    "maxQty": num(9000.0),
                    "stepSize": num(0.0001),
                },
                {"filterType": "ICEBERG_PARTS", "limit": 10},
                {
                    "filterType": "MARKET_LOT_SIZE",
                    "minQty": num(0.0),
                    "maxQty": num(100.0),
                    "stepSize": num(0.0),
                },
                {
                    "filterType": "NOTIONAL",
                    "minNotional": num(5.0),
                    "applyMinToMarket": True,
                    "maxNotional": num(9_000_000.0),
                    "applyMaxToMarket": False,
                    "avgPriceMins": 5,
                },
                {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            ],
            "permissions": [],
            "permissionSets": [["SPOT"]],
            "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
            "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
        }

    async def depth(self, request: web.Request) -> web.Response:
        feed = self._one(request.query)
        assert feed is not None
        limit = _limit(request.query, 100, 5000)
        last, bids, asks = self.sim.market.snapshot(feed.unified, limit)
        return json_response({"lastUpdateId": last, "bids": levels(bids), "asks": levels(asks)})

    @staticmethod
    def _plain_trade(t: SimTrade) -> dict[str, Any]:
        return {
            "id": t.id,
            "price": num(t.price),
            "qty": num(t.qty),
            "quoteQty": num(t.price * t.qty),
            "time": t.ts_ms,
            "isBuyerMaker": t.buyer_is_maker,
            "isBestMatch": True,
        }

    async def trades(self, request: web.Request) -> web.Response:
        feed = self._one(request.query)
        assert feed is not None
        limit = _limit(request.query, 500, 1000)
        return json_response([self._plain_trade(t) for t in feed.history.recent(limit)])

    async def historical_trades(self, request: web.Request) -> web.Response:
        """Trade ids (the @trade stream's `t`); Binance made this endpoint keyless (security NONE)."""
        q = request.query
        feed = self._one(q)
        assert feed is not None
        limit = _limit(q, 500, 1000)
        from_id = _int_param(q, "fromId", None)
        tape = feed.history
        picked = tape.recent(limit) if from_id is None else tape.from_id(from_id, limit)
        return json_response([self._plain_trade(t) for t in picked])

    async def agg_trades(self, request: web.Request) -> web.Response:
        """Aggregate ids (the @aggTrade stream's `a`); ccxt's fetch_trades uses this endpoint by default."""
        q = request.query
        feed = self._one(q)
        assert feed is not None
        limit = _limit(q, 500, 1000)
        from_agg = _int_param(q, "fromId", None)
        start = _int_param(q, "startTime", None)
        end = _int_param(q, "endTime", None)
        if start is not None and end is not None and not 0 <= end - start <= 3_600_000:
            raise ApiError(-1127, "More than 1 hours between startTime and endTime.")
        tape, off = feed.history, feed.agg_offset
        if from_agg is not None:
            picked = tape.from_id(from_agg + off, limit)
            if end is not None:
                picked = [t for t in picked if t.ts_ms <= end]
        elif start is not None:
            first = tape.first_id_at_or_after(start)
            last = tape.last_id if end is None else tape.last_id_at_or_before(end)
            picked = tape.from_id(first, min(limit, last - first + 1)) if last >= first else []
        elif end is not None:
            last = tape.last_id_at_or_before(end)
            first = max(tape.first_id, last - limit + 1)
            picked = tape.from_id(first, last - first + 1) if last >= first else []
        else:
            picked = tape.recent(limit)
        return json_response(
            [
                {
                    "a": t.id - off,
                    "p": num(t.price),
                    "q": num(t.qty),
                    "f": t.id,
                    "l": t.id,
                    "T": t.ts_ms,
                    "m": t.buyer_is_maker,
                    "M": True,
                }
                for t in picked
            ]
        )

    def ticker_stats(self, f: SymbolFeed, now_ms: int) -> dict[str, Any]:
        """The FULL 24hr ticker; the sim's "24h window" is the whole run."""
        st = f.state
        last = st.last
        last_px = last.price if last else st.mid
        (bp, bq), (ap, aq) = self.sim.market.best(f.unified)
        change = last_px - st.open
        return {
            "symbol": f.id,
            "priceChange": num(change),
            "priceChangePercent": f"{(change / st.open * 100 if st.open else 0.0):.3f}",
            "weightedAvgPrice": num(st.quote_volume / st.volume if st.volume else last_px),
            "prevClosePrice": num(st.open),
            "lastPrice": num(last_px),
            "lastQty": num(last.qty if last else 0.0),
            "bidPrice": num(bp),
            "bidQty": num(bq),
            "askPrice": num(ap),
            "askQty": num(aq),
            "openPrice": num(st.open),
            "highPrice": num(st.high),
            "lowPrice": num(st.low),
            "volume": num(st.volume),
            "quoteVolume": num(st.quote_volume),
            "openTime": now_ms - 86_400_000,
            "closeTime": now_ms,
            "firstId": st.trade_id - st.trade_count + 1 if st.trade_count else -1,
            "lastId": st.trade_id if st.trade_count else -1,
            "count": st.trade_count,
        }

    async def ticker_24hr(self, request: web.Request) -> web.Response:
        q = request.query
        feeds = self._many(q)
        now = int(time.time() * 1000)
        mini = q.get("type", "FULL").upper() == "MINI"
        keep: tuple[str, ...] = ("bidPrice", "bidQty", "askPrice", "askQty", "priceChange")
        keep += ("priceChangePercent", "weightedAvgPrice", "prevClosePrice", "lastQty")

        def one(f: SymbolFeed) -> dict[str, Any]:
            t = self.ticker_stats(f, now)
            return {k: v for k, v in t.items() if k not in keep} if mini else t

        if "symbol" in q and feeds:
            return json_response(one(feeds[0]))
        return json_response([one(f) for f in (feeds if feeds is not None else self._listed())])

    def _book(self, f: SymbolFeed) -> dict[str, Any]:
        (bp, bq), (ap, aq) = self.sim.market.best(f.unified)
        return {
            "symbol": f.id,
            "bidPrice": num(bp),
            "bidQty": num(bq),
            "askPrice": num(ap),
            "askQty": num(aq),
        }

    async def book_ticker(self, request: web.Request) -> web.Response:
        q = request.query
        feeds = self._many(q)
        if "symbol" in q and feeds:
            return json_response(self._book(feeds[0]))
        return json_response([self._book(f) for f in (feeds if feeds is not None else self._listed())])

    async def price_ticker(self, request: web.Request) -> web.Response:
        q = request.query
        feeds = self._many(q)

        def one(f: SymbolFeed) -> dict[str, Any]:
            last = f.state.last
            return {"symbol": f.id, "price": num(last.price if last else f.state.mid)}

        if "symbol" in q and feeds:
            return json_response(one(feeds[0]))
        return json_response([one(f) for f in (feeds if feeds is not None else self._listed())])
