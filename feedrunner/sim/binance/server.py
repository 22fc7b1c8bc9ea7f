"""A local Binance spot venue: REST and websocket market data on one aiohttp port, with faults.

The real ccxt client is the judge of fidelity, so payloads, acks, errors and the order-book sync
contract (REST `lastUpdateId` vs. stream `U`/`u`) follow the official spot docs. The market keeps
trading through every fault - stalls, restarts, bans - so a client that loses data must backfill it
over REST, exactly as it would have to against the real exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from feedrunner.sim.binance._history import TradeHistory
from feedrunner.sim.binance._symbols import ALL_MARKET, CHANNELS, DepthAcc, SymbolFeed, split_symbol
from feedrunner.sim.binance._wire import JSONDecodeError, dumps, levels, loads, text_frame
from feedrunner.sim.binance.rest import RestApi, error_response, json_response
from feedrunner.sim.faults import Fault, FaultBox
from feedrunner.sim.market import MarketModel

log = logging.getLogger(__name__)

GAP_SKIP = 10  # update ids skipped per injected gap
_SLOT = 0.02  # cadence grid; 100 ms and 1000 ms streams fire on a per-symbol phase of it
_SLOTS_100, _SLOTS_1000 = 5, 50
MAX_STREAMS = 1024  # per connection, as Binance documents
_METHODS = "`SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`"
# Valid UTF-8 text that is not JSON: a truncated event and a proxy error page, what a broken hop sends.
_JUNK = (b'{"e":"trade","E":17', b"<html><body><h1>502 Bad Gateway</h1></body></html>")


@dataclass(slots=True, eq=False)
class _Conn:
    """One websocket client; `combined` selects the {"stream","data"} envelope."""

    id: int
    ws: web.WebSocketResponse
    transport: Any  # asyncio.Transport
    combined: bool
    streams: dict[str, None] = field(default_factory=dict)  # insertion-ordered for LIST_SUBSCRIPTIONS
    open: bool = True
    out: list[bytes] = field(default_factory=list)  # frames queued since the last flush
    last_pong: float = 0.0
    pings: deque[bytes] = field(default_factory=lambda: deque(maxlen=4))


class BinanceSim:
    """Binance spot market data over loopback, driven by the shared seeded market model.

    The tape is MarketModel's, so a seed gives the same
    trades here as in every other simulator.
    """

    def __init__(
        self,
        symbols: list[str],
        *,
        seed: int = 1,
        rate: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
        ping_interval: float = 20.0,
        history: int = 100_000,
        record_send_times: bool = False,
        pong_timeout: float = 60.0,
        tick: float = 0.005,
        weight_limit: int = 6000,
        max_buffer: int = 64 * 1024 * 1024,
        api_keys: set[str] | None = None,
    ) -> None:
        if not symbols:
            raise ValueError("at least one symbol is required")
        if rate < 0 or ping_interval <= 0 or tick <= 0:
            raise ValueError("rate must be >= 0, ping_interval and tick > 0")
        self.host, self.port = host, port
        self.ping_interval, self.pong_timeout = ping_interval, pong_timeout
        self.tick, self.weight_limit, self.max_buffer = tick, weight_limit, max_buffer
        self.history_size = history
        self.api_keys = api_keys  # None: any key is accepted; a set: others get -2015 (401), as Binance answers
        self.market = MarketModel(seed=seed)
        self._order_rng = random.Random(f"{seed}:interleave")  # own stream: the tape stays seed-pure
        self.faults = FaultBox()
        self.faults.on_instant(self._on_instant)
        self.feeds: list[SymbolFeed] = []
        self._by_unified: dict[str, SymbolFeed] = {}
        self._by_id: dict[str, SymbolFeed] = {}
        self._by_lid: dict[str, SymbolFeed] = {}
        self._default_rate, self._record_send_times = float(rate), record_send_times
        for unified in symbols:
            if self.add_symbol(unified) is None:
                raise ValueError(f"duplicate symbol {unified}")
        self.rest = RestApi(self)
        self._subs: dict[str, set[_Conn]] = {}
        self._conns: set[_Conn] = set()
        self._dirty: list[_Conn] = []
        self._busy: set[int] = set()  # transports with an HTTP request in progress
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._aux: set[asyncio.Task[Any]] = set()
        self._conn_seq = 0
        self._sent = 0
        self._http_requests = 0
        self._slow_drops = 0
        self._restarts = 0
        self._refusing = 0
        self._restarting = False
        self._renumber_at_restart: int | None = None
        self._stopping = False
        self._junk_i = 0

    # --- public API ---------------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def endpoints(self) -> dict[str, str]:
        return {"rest": self.rest_url, "ws": self.ws_url}

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        self._stopping = False
        await self._start_http()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._generate(), name="binance-sim-generate"),
            loop.create_task(self._cadence(), name="binance-sim-cadence"),
            loop.create_task(self._pinger(), name="binance-sim-ping"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._tasks, *self._aux]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._aux, return_exceptions=True)
        self._tasks.clear()
        self._aux.clear()
        await self._close_all(1001)
        await self._stop_http()

    async def __aenter__(self) -> BinanceSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def inject(
        self, fault: Fault | str, duration: float = 0.0, symbol: str | None = None, renumber: int | None = None
    ) -> None:
        """Apply a fault now; lasting ones hold for `duration` s, `symbol` narrows it to one market. A
        restart with `renumber` comes back numbering every symbol's trades from that id (see `renumber`)."""
        fault = Fault(fault)
        if fault is Fault.LINK_LOST:
            raise ValueError("link_lost is an Interactive Brokers fault; Binance has no equivalent")
        if renumber is not None and fault is not Fault.RESTART:
            raise ValueError("renumber applies to a restart only")
        if renumber is not None and renumber < 1:
            raise ValueError("renumber must be >= 1")
        if fault is Fault.RESTART:
            self._renumber_at_restart = renumber
        unified = self._feed(symbol).unified if symbol is not None else None
        self.faults.inject(fault, duration, unified)
        if fault is Fault.GAP:
            for f in self.feeds:
                if unified is None or f.unified == unified:
                    f.gap_pending = True
        elif fault is Fault.REFUSE:
            self._begin_refuse(duration)

    def set_rate(self, rate: float, symbol: str | None = None) -> None:
        """Trades per second for one symbol (or all); 0 pauses the tape without closing anything."""
        if rate < 0 or math.isnan(rate):
            raise ValueError("rate must be >= 0")
        for f in [self._feed(symbol)] if symbol is not None else self.feeds:
            f.rate = float(rate)

    def last_trade_id(self, symbol: str) -> int:
        return self._feed(symbol).state.trade_id

    def renumber(self, start: int) -> None:
        """Number every symbol's next trade `start`, as a venue restarted on a fresh tape does: the recent
        trades REST serves start over with it."""
        for f in self.feeds:
            f.state.trade_id, f.state.trade_count = start - 1, 0
            f.agg_offset = min(f.agg_offset, start - 1)
            f.history = TradeHistory(self.history_size)
            if f.send_times is not None:
                f.send_times.clear()

    @property
    def send_times(self) -> dict[str, dict[int, int]]:
        """trade id -> time.time_ns() when it was written to the sockets, per unified symbol (bounded by `history`)."""
        return {f.unified: f.send_times for f in self.feeds if f.send_times is not None}

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "listening": self._site is not None,
            "connections": sum(1 for c in self._conns if c.open),
            "connections_total": self._conn_seq,
            "http_requests": self._http_requests,
            "messages_sent": self._sent,
            "slow_consumer_disconnects": self._slow_drops,
            "restarts": self._restarts,
            "trades": {f.unified: f.generated for f in self.feeds},
            "last_trade_id": {f.unified: f.state.trade_id for f in self.feeds},
            "rate": {f.unified: f.rate for f in self.feeds},
            "faults_injected": {str(k): v for k, v in self.faults.injected.items()},
        }

    # --- lookups used by the REST layer -------------------------------------------------------------

    def add_symbol(self, unified: str) -> SymbolFeed | None:
        """List a new symbol (also while running: an operator added it to feeds.yaml); None if listed."""
        base, quote = split_symbol(unified)
        unified = f"{base}/{quote}"
        if unified in self._by_unified:
            return None
        st = self.market.add(unified)
        feed = SymbolFeed(
            unified, base, quote, st, TradeHistory(self.history_size), self._default_rate, agg_offset=st.trade_id
        )
        if self._record_send_times:
            feed.send_times = {}
        i = len(self.feeds)
        feed.phase100 = i % _SLOTS_100
        feed.phase1000 = feed.phase100 + _SLOTS_100 * (i // _SLOTS_100 % (_SLOTS_1000 // _SLOTS_100))
        self.feeds.append(feed)
        self._by_unified[unified], self._by_id[feed.id], self._by_lid[feed.lid] = feed, feed, feed
        return feed

    def feed_by_id(self, symbol_id: str) -> SymbolFeed | None:
        return self._by_id.get(symbol_id)

    def listed(self, feed: SymbolFeed) -> bool:
        """False while a reject_symbol fault makes the market unknown."""
        return not self.faults.active(Fault.REJECT_SYMBOL, feed.unified)

    def _feed(self, symbol: str) -> SymbolFeed:
        feed = self._by_unified.get(symbol.upper()) or self._by_id.get(symbol.upper().replace("/", ""))
        if feed is None:
            raise ValueError(f"unknown symbol {symbol!r}")
        return feed

    # --- HTTP plumbing --------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        self.rest.add_routes(app)
        for path, combined in (("/ws", False), ("/stream", True)):
            app.router.add_get(path, self._ws_raw if not combined else self._ws_combined)
            app.router.add_get(path + "/{tail:.*}", self._ws_raw if not combined else self._ws_combined)
        app.router.add_post("/_sim/faults", self._http_fault)
        app.router.add_post("/_sim/rate", self._http_rate)
        app.router.add_get("/_sim/stats", self._http_stats)
        app.router.add_get("/_sim/sent", self._http_sent)
        return app

    async def _start_http(self, listen: bool = True) -> None:
        runner = web.AppRunner(self._make_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        if listen:
            await self._listen()

    async def _listen(self) -> None:
        """Bind (again) on the same port; retry briefly in case the old socket is still going away."""
        assert self._runner is not None
        for attempt in range(50):
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            try:
                await site.start()
            except OSError:
                if self.port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.1)
                continue
            self._site = site
            if self.port == 0:
                self.port = self._runner.addresses[0][1]
            return

    async def _stop_http(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self._http_requests += 1
        busy = id(request.transport)
        self._busy.add(busy)
        try:
            if request.path.startswith("/api/"):
                resp = await self.rest.guard(request, handler)
            else:
                resp = await handler(request)
        finally:
            self._busy.discard(busy)
        if self._refusing and not isinstance(resp, web.WebSocketResponse):
            resp.force_close()  # no keep-alive reuse while new connections are being refused
        return resp

    async def _http_fault(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=loads)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            fault = Fault(str(body.get("fault")))
            duration = float(body.get("duration", 0.0) or 0.0)
            symbol = body.get("symbol")
            if symbol is not None and not isinstance(symbol, str):
                raise ValueError("symbol must be a string")
            renumber = body.get("renumber")
            self.inject(fault, duration, symbol, None if renumber is None else int(renumber))
        except (ValueError, TypeError, JSONDecodeError) as e:
            return json_response({"error": str(e), "faults": [f.value for f in Fault]}, status=400)
        return json_response({"ok": True, "fault": fault.value, "duration": duration, "symbol": symbol})

    async def _http_rate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=loads)
            self.set_rate(float(body["rate"]), body.get("symbol"))
        except (ValueError, TypeError, KeyError, JSONDecodeError) as e:
            return json_response({"error": str(e)}, status=400)
        return json_response({"ok": True, "rate": self.stats["rate"]})

    async def _http_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats)

    async def _http_sent(self, request: web.Request) -> web.Response:
        """Send times (see `send_times`), for a benchmark in another process; 404 unless recording.
        `?since=NS` leaves out trades sent before NS."""
        if not self._record_send_times:
            return json_response({"error": "send times are not recorded (record_send_times)"}, status=404)
        try:
            since = int(request.query.get("since", 0))  # ns: only trades sent from then on
        except ValueError:
            return json_response({"error": "since must be an integer (ns)"}, status=400)
        return json_response(
            {s: {str(i): t for i, t in times.items() if t >= since} for s, times in self.send_times.items()}
        )

    # --- websocket connections --------------------------------------------------------------------

    async def _ws_raw(self, request: web.Request) -> web.StreamResponse:
        return await self._ws_serve(request, combined=False)

    async def _ws_combined(self, request: web.Request) -> web.StreamResponse:
        return await self._ws_serve(request, combined=True)

    async def _ws_serve(self, request: web.Request, combined: bool) -> web.StreamResponse:
        """/ws/<stream> (raw) and /stream?streams=a/b (combined); ccxt dials <ws>/stream/<n>."""
        if self.faults.active(Fault.RATELIMIT):
            wait = max(1, math.ceil(self.faults.remaining(Fault.RATELIMIT)))
            why = "Too many connection attempts; please retry later."
            return error_response(-1003, why, 429, {"Retry-After": str(wait)})
        tail = request.match_info.get("tail", "")
        initial = [s for s in tail.split("/") if s] if not combined else []
        if combined:
            initial = [s for s in request.query.get("streams", "").split("/") if s]
        # compress=False: decline permessage-deflate so one frame serves every subscriber.
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=2.0, max_msg_size=1 << 20)
        await ws.prepare(request)
        if request.transport is None:
            return ws
        self._conn_seq += 1
        loop = asyncio.get_running_loop()
        conn = _Conn(self._conn_seq, ws, request.transport, combined, last_pong=loop.time())
        self._conns.add(conn)
        # Binance ignores a raw path that is not a stream (ccxt dials /ws/0) and just serves SUBSCRIBE.
        for name in initial:
            if self._stream_ok(name) and len(conn.streams) < MAX_STREAMS:
                self._sub(conn, name)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self._on_request(conn, msg.data)
                    self._flush_out()
                elif msg.type is WSMsgType.PING:
                    with contextlib.suppress(Exception):
                        await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    if msg.data and msg.data in conn.pings:  # unsolicited pongs don't count, per docs
                        conn.last_pong = loop.time()
                elif msg.type is WSMsgType.BINARY:
                    self._reply_error(conn, 3, "Invalid JSON: expected value at line 1 column 1", None)
                    self._flush_out()
                else:
                    break
        finally:
            self._forget(conn)
        return ws

    def _forget(self, conn: _Conn) -> None:
        conn.open = False
        self._conns.discard(conn)
        for name in list(conn.streams):
            self._unsub(conn, name)

    def _stream_ok(self, name: str) -> bool:
        if name in ALL_MARKET:
            return True
        lid, _, channel = name.partition("@")
        feed = self._by_lid.get(lid)
        return feed is not None and channel in CHANNELS and self.listed(feed)

    def _sub(self, conn: _Conn, name: str) -> None:
        conn.streams[name] = None
        self._subs.setdefault(name, set()).add(conn)
        self._refresh(name)

    def _unsub(self, conn: _Conn, name: str) -> None:
        conn.streams.pop(name, None)
        subs = self._subs.get(name)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self._subs[name]
        self._refresh(name)

    def _refresh(self, name: str) -> None:
        """Accumulate depth diffs only while someone listens; a listener arriving later starts clean."""
        feed = self._by_lid.get(name.partition("@")[0])
        if feed is None:
            return
        on1000 = any(k in self._subs for k in feed.k_diff1000)
        feed.depth_on = on1000 or any(k in self._subs for k in feed.k_diff100)
        if not on1000:
            feed.acc1000.clear()
        if not feed.depth_on:
            feed.acc100.clear()

    def _on_request(self, conn: _Conn, data: str) -> None:
        """The five control methods Binance accepts on a stream connection, with its error replies."""
        try:
            req = loads(data)
        except (JSONDecodeError, ValueError):
            self._reply_error(conn, 3, "Invalid JSON: expected value at line 1 column 1", None)
            return
        if not isinstance(req, dict):
            self._reply_error(conn, 3, "Invalid JSON: expected struct at line 1 column 1", None)
            return
        rid = req.get("id")
        if not (
            rid is None
            or (isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63)
            or (isinstance(rid, str) and len(rid) <= 36 and rid.isalnum())
        ):
            self._reply_error(conn, 2, "Invalid request: request ID must be an unsigned integer", None)
            return
        if "method" not in req:
            self._reply_error(conn, 2, "Invalid request: missing field `method`", rid)
            return
        if set(req) - {"method", "params", "id"}:
            self._reply_error(conn, 2, "Invalid request: too many parameters", rid)
            return
        method, params = req["method"], req.get("params")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self._reply_error(conn, 2, "Invalid request: invalid stream", rid)
                return
            if method == "SUBSCRIBE":
                if not all(self._stream_ok(p) for p in params):
                    self._reply_error(conn, 2, "Invalid request: invalid stream", rid)
                    return
                if len(set(conn.streams) | set(params)) > MAX_STREAMS:
                    self._reply_error(conn, 2, "Invalid request: too many streams", rid)
                    return
                for p in params:
                    self._sub(conn, p)
            else:
                for p in params:
                    self._unsub(conn, p)
            self._reply(conn, {"result": None, "id": rid})
        elif method == "LIST_SUBSCRIPTIONS":
            self._reply(conn, {"result": list(conn.streams), "id": rid})
        elif method in ("SET_PROPERTY", "GET_PROPERTY"):
            if not isinstance(params, list) or not params or not isinstance(params[0], str):
                self._reply_error(conn, 2, "Invalid request: property name must be a string", rid)
            elif params[0] != "combined":
                self._reply_error(conn, 0, "Unknown property", rid)
            elif method == "GET_PROPERTY":
                self._reply(conn, {"result": conn.combined, "id": rid})
            elif len(params) != 2 or not isinstance(params[1], bool):
                self._reply_error(conn, 1, "Invalid value type: expected Boolean", rid)
            else:
                conn.combined = params[1]
                self._reply(conn, {"result": None, "id": rid})
        else:
            shown = method if isinstance(method, str) else dumps(method).decode()
            self._reply_error(conn, 2, f"Invalid request: unknown variant `{shown}`, expected one of {_METHODS}", rid)

    def _reply(self, conn: _Conn, obj: dict[str, Any]) -> None:
        self._write(conn, text_frame(dumps(obj)))

    def _reply_error(self, conn: _Conn, code: int, msg: str, rid: Any) -> None:
        self._reply(conn, {"error": {"code": code, "msg": msg}, "id": rid})

    def _write(self, conn: _Conn, frame: bytes) -> None:
        """Queue a frame; `_flush_out` sends each connection's queue in one write."""
        if not conn.open:
            return
        if not conn.out:
            self._dirty.append(conn)
        conn.out.append(frame)
        self._sent += 1

    def _flush_out(self) -> None:
        """One syscall per connection per batch: a send per message would cap the rate near 10k/s.

        A client that lets `max_buffer` bytes pile up unread is cut off, as Binance does.
        """
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            out, conn.out = conn.out, []
            tr = conn.transport
            if not conn.open or conn.ws.closed or tr.is_closing():
                continue
            if tr.get_write_buffer_size() > self.max_buffer:
                self._slow_drops += 1
                self._abort(conn)
                continue
            tr.write(out[0] if len(out) == 1 else b"".join(out))

    def _publish(self, key: str, payload: bytes, junk: bytes | None = None) -> None:
        subs = self._subs.get(key)
        if not subs:
            return
        raw = comb = None
        for conn in tuple(subs):  # a slow consumer may be dropped mid-loop
            if conn.combined:
                if comb is None:
                    comb = text_frame(junk or b'{"stream":"%b","data":%b}' % (key.encode(), payload))
                self._write(conn, comb)
            else:
                if raw is None:
                    raw = text_frame(junk or payload)
                self._write(conn, raw)

    def _close(self, conn: _Conn, code: int, message: bytes = b"") -> None:
        """Clean close (close frame, then wait for the client's) without blocking the caller."""
        if not conn.open:
            return
        self._forget(conn)
        self._spawn(conn.ws.close(code=code, message=message, drain=False))

    def _abort(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.transport.abort()

    async def _close_all(self, code: int) -> None:
        conns = [c for c in self._conns if c.open]
        for c in conns:
            self._forget(c)
        if not conns:
            return
        closing = [c.ws.close(code=code, drain=False) for c in conns]
        with contextlib.suppress(Exception):  # a client that never answers the close frame is aborted
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 1.0)
        for c in conns:
            if not c.transport.is_closing():
                c.transport.abort()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    # --- faults -----------------------------------------------------------------------------------------

    def _matching(self, symbol: str | None) -> Iterable[_Conn]:
        if symbol is None:
            return [c for c in self._conns if c.open]
        lid = self._by_unified[symbol].lid
        return [c for c in self._conns if c.open and any(s.partition("@")[0] == lid for s in c.streams)]

    def _on_instant(self, fault: Fault, duration: float, symbol: str | None) -> None:
        if fault is Fault.DROP:
            for c in self._matching(symbol):
                self._close(c, 1000)
        elif fault is Fault.RESET:
            for c in self._matching(symbol):
                self._abort(c)
        elif fault is Fault.RESTART:
            self._spawn(self._restart(duration))

    async def _restart(self, duration: float) -> None:
        """serverShutdown, close everything, stay down `duration` s, listen again on the same port."""
        if self._restarting or self._runner is None:
            return
        self._restarting = True
        try:
            await asyncio.sleep(0.02)  # let the HTTP reply of a POST /_sim/faults restart go out first
            event = dumps({"e": "serverShutdown", "E": int(time.time() * 1000)})
            raw = text_frame(event)
            comb = text_frame(b'{"stream":"!serverShutdown","data":%b}' % event)
            for c in list(self._conns):
                self._write(c, comb if c.combined else raw)
            self._flush_out()
            await self._close_all(1001)
            await self._stop_http()
            renumber, self._renumber_at_restart = self._renumber_at_restart, None
            if renumber is not None:
                self.renumber(renumber)
            await asyncio.sleep(duration)
            if not self._stopping:
                await self._start_http(listen=not self._refusing)  # a refuse in force listens when it ends
                self._restarts += 1
        finally:
            self._restarting = False

    def _begin_refuse(self, duration: float) -> None:
        self._refusing += 1  # counted now, not when the task first runs, so it is never started twice
        self._spawn(self._refuse(duration))

    async def _refuse(self, duration: float) -> None:
        """Stop accepting (ECONNREFUSED) for `duration` s; open websockets stay, idle HTTP ones close."""
        try:
            if self._site is not None and not self._restarting:
                site, self._site = self._site, None
                await site.stop()
            # Idle keep-alive HTTP connections would let a client carry on as if nothing happened;
            # close them (requests in progress finish, then close: see _middleware).
            keep = {id(c.transport) for c in self._conns} | self._busy
            server = self._runner.server if self._runner is not None else None
            for handler in server.connections if server is not None else []:
                tr = handler.transport
                if tr is not None and id(tr) not in keep:
                    tr.close()
            await asyncio.sleep(duration)
        finally:
            self._refusing -= 1
            if not self._refusing and self._site is None and self._runner is not None and not self._stopping:
                if not self._restarting:
                    await self._listen()

    # --- the tape -------------------------------------------------------------------------------------

    def _junk(self) -> bytes:
        self._junk_i += 1
        return _JUNK[self._junk_i % len(_JUNK)]

    async def _generate(self) -> None:
        """Trades in small batches on a short timer so 20k/s per symbol needs no per-trade wakeup."""
        loop = asyncio.get_running_loop()
        last = due = loop.time()
        while True:
            # On a fixed grid: sleeping `tick` after each batch's work stretched the period by that work,
            # and the batches (and bursts at the client) grew with it.
            due = max(due + self.tick, loop.time())
            await asyncio.sleep(due - loop.time())
            now = loop.time()
            dt, last = min(now - last, 0.25), now  # after a long pause, don't burst
            now_ms = int(time.time() * 1000)
            batch: list[tuple[SymbolFeed, int]] = []
            for f in self.feeds:
                f.carry += f.rate * dt
                n = int(f.carry)
                if n > 0:
                    f.carry -= n
                    batch.append((f, n))
            try:
                self._emit_batch(batch, now_ms)
            except Exception:  # never let one bad batch kill the tape
                log.exception("binance sim: emitting a batch failed")
            self._flush_out()
            if self._record_send_times:
                self._stamp_sent()

    def _stamp_sent(self) -> None:
        """The send time of a trade is when its tick's write returned, not when it was printed."""
        now, cap = time.time_ns(), self.history_size
        for f in self.feeds:
            if f.unsent and f.send_times is not None:
                times = f.send_times
                for tid in f.unsent:
                    times[tid] = now
                    times.pop(tid - cap, None)
                f.unsent.clear()

    def _emit_batch(self, batch: list[tuple[SymbolFeed, int]], now_ms: int) -> None:
        """Interleave the symbols' prints at random points of the tick, as they arrive from Binance.

        Emitting symbol by symbol would put the same symbol first in every socket read, and ccxt's
        watch_trades_for_symbols resolves on the first message only, so the others would starve.
        """
        if len(batch) == 1:
            f, n = batch[0]
            one = self._emitter(f, now_ms)
            for _ in range(n):
                one()
        elif batch:
            emitters = [self._emitter(f, now_ms) for f, _ in batch]
            rnd = self._order_rng.random
            slots = sorted(((k + rnd()) / n, i) for i, (_, n) in enumerate(batch) for k in range(n))
            for _, i in slots:
                emitters[i]()
        for f, n in batch:
            f.generated += n

    def _emitter(self, f: SymbolFeed, now_ms: int) -> Callable[[], None]:
        """A closure that prints one trade of `f`; fault and subscriber checks are hoisted per tick."""
        faults = self.faults
        quiet = faults.active(Fault.STALL, f.unified) or not self.listed(f)
        junk = self._junk() if faults.active(Fault.MALFORMED, f.unified) else None
        trade, best, publish = self.market.trade, self.market.best, self._publish
        tape, acc, sym, sid, st = f.history, f.acc100, f.unified, f.id.encode(), f.state
        depth = f.depth_on
        subs = self._subs
        k_trade, k_agg, k_book = f.k_trade, f.k_agg, f.k_book
        want_t = not quiet and k_trade in subs
        want_a = not quiet and k_agg in subs
        want_b = not quiet and k_book in subs
        times, unsent = f.send_times, f.unsent
        off = f.agg_offset

        def one() -> None:
            t, diff = trade(sym, now_ms)
            tape.append(t)
            if depth:
                acc.add(diff)
            m = b"true" if t.buyer_is_maker else b"false"
            if want_t:
                publish(
                    k_trade,
                    b'{"e":"trade","E":%d,"s":"%b","t":%d,"p":"%.8f","q":"%.8f","T":%d,"m":%b,"M":true}'
                    % (now_ms, sid, t.id, t.price, t.qty, t.ts_ms, m),
                    junk,
                )
            if want_a:
                publish(
                    k_agg,
                    b'{"e":"aggTrade","E":%d,"s":"%b","a":%d,"p":"%.8f","q":"%.8f","f":%d,"l":%d,"T":%d,'
                    b'"m":%b,"M":true}' % (now_ms, sid, t.id - off, t.price, t.qty, t.id, t.id, t.ts_ms, m),
                    junk,
                )
            if want_b:
                (bp, bq), (ap, aq) = best(sym)
                publish(
                    k_book,
                    b'{"u":%d,"s":"%b","b":"%.8f","B":"%.8f","a":"%.8f","A":"%.8f"}'
                    % (st.update_id, sid, bp, bq, ap, aq),
                    junk,
                )
            if times is not None:
                unsent.append(t.id)

        return one

    async def _cadence(self) -> None:
        """The 100 ms / 1000 ms streams (diff and partial depth, tickers) and injected gaps.

        Each symbol has its own phase on a 20 ms grid, as Binance's per-stream timers do: were they
        all due at once, ccxt's multi-symbol watches (which resolve on the first message of a read)
        would only ever report the first symbol.
        """
        n = 0
        while True:
            await asyncio.sleep(_SLOT)
            n += 1
            now_ms = int(time.time() * 1000)
            if not self._refusing and self.faults.active(Fault.REFUSE):  # injected on FaultBox directly
                self._begin_refuse(self.faults.remaining(Fault.REFUSE))
            try:
                for f in self.feeds:
                    if n % _SLOTS_100 == f.phase100:
                        self._flush(f, now_ms, second=n % _SLOTS_1000 == f.phase1000)
                if n % _SLOTS_1000 == 0:
                    self._all_market(now_ms)
            except Exception:
                log.exception("binance sim: cadence failed")
            self._flush_out()

    def _flush(self, f: SymbolFeed, now_ms: int, second: bool) -> None:
        f.flushes += 1
        faults = self.faults
        quiet = faults.active(Fault.STALL, f.unified) or not self.listed(f)
        junk = self._junk() if faults.active(Fault.MALFORMED, f.unified) else None
        acc = f.acc100
        if acc.first is not None:
            if quiet:  # what a stalled stream never sent is gone: clients see a gap and resync
                acc.clear()
                f.acc1000.clear()
            else:
                payload = self._depth_payload(f, acc, now_ms)
                for key in f.k_diff100:
                    self._publish(key, payload, junk)
                if any(k in self._subs for k in f.k_diff1000):
                    f.acc1000.merge(acc)
                acc.clear()
        if f.gap_pending or (f.flushes % 2 == 0 and faults.active(Fault.GAP, f.unified)):
            f.gap_pending = False
            self._flush1000(f, now_ms, quiet, junk)  # no 1000 ms batch may span the hole
            f.state.update_id += GAP_SKIP
        if not quiet:
            self._partials(f, f.k_partial100, junk)
        if second:
            self._flush1000(f, now_ms, quiet, junk)
            if not quiet:
                self._partials(f, f.k_partial1000, junk)
                self._tickers(f, now_ms, junk)

    def _flush1000(self, f: SymbolFeed, now_ms: int, quiet: bool, junk: bytes | None) -> None:
        acc = f.acc1000
        if acc.first is None:
            return
        if not quiet:
            payload = self._depth_payload(f, acc, now_ms)
            for key in f.k_diff1000:
                self._publish(key, payload, junk)
        acc.clear()

    @staticmethod
    def _depth_payload(f: SymbolFeed, acc: DepthAcc, now_ms: int) -> bytes:
        return dumps(
            {
                "e": "depthUpdate",
                "E": now_ms,
                "s": f.id,
                "U": acc.first,
                "u": acc.last,
                "b": levels(sorted(acc.bids.items(), reverse=True)),
                "a": levels(sorted(acc.asks.items())),
            }
        )

    def _partials(self, f: SymbolFeed, keys: tuple[tuple[str, int], ...], junk: bytes | None) -> None:
        for key, depth in keys:
            if key in self._subs:
                last, bids, asks = self.market.snapshot(f.unified, depth)
                payload = dumps({"lastUpdateId": last, "bids": levels(bids), "asks": levels(asks)})
                self._publish(key, payload, junk)

    def _ticker_events(self, f: SymbolFeed, now_ms: int) -> tuple[dict[str, Any], dict[str, Any]]:
        t = self.rest.ticker_stats(f, now_ms)
        common = {"E": now_ms, "s": f.id, "c": t["lastPrice"], "o": t["openPrice"], "h": t["highPrice"]}
        common |= {"l": t["lowPrice"], "v": t["volume"], "q": t["quoteVolume"]}
        mini = {"e": "24hrMiniTicker", **common}
        full = {
            "e": "24hrTicker",
            **common,
            "p": t["priceChange"],
            "P": t["priceChangePercent"],
            "w": t["weightedAvgPrice"],
            "x": t["prevClosePrice"],
            "Q": t["lastQty"],
            "b": t["bidPrice"],
            "B": t["bidQty"],
            "a": t["askPrice"],
            "A": t["askQty"],
            "O": t["openTime"],
            "C": t["closeTime"],
            "F": t["firstId"],
            "L": t["lastId"],
            "n": t["count"],
        }
        return full, mini

    def _tickers(self, f: SymbolFeed, now_ms: int, junk: bytes | None) -> None:
        if f.k_ticker in self._subs or f.k_mini in self._subs:
            full, mini = self._ticker_events(f, now_ms)
            self._publish(f.k_ticker, dumps(full), junk)
            self._publish(f.k_mini, dumps(mini), junk)

    def _all_market(self, now_ms: int) -> None:
        if not any(k in self._subs for k in ALL_MARKET):
            return
        live = [f for f in self.feeds if self.listed(f) and not self.faults.active(Fault.STALL, f.unified)]
        events = [self._ticker_events(f, now_ms) for f in live]
        if events:
            self._publish("!ticker@arr", dumps([full for full, _ in events]))
            self._publish("!miniTicker@arr", dumps([mini for _, mini in events]))

    async def _pinger(self) -> None:
        """Ping every `ping_interval`; drop a client whose pongs stop for `pong_timeout` (Binance: 60 s)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            now = loop.time()
            for c in list(self._conns):
                if not c.open:
                    continue
                if now - c.last_pong > self.pong_timeout:
                    self._close(c, 1008, b"pong timeout")
                    continue
                payload = str(int(time.time() * 1000)).encode()
                c.pings.append(payload)
                with contextlib.suppress(Exception):
                    await c.ws.ping(payload)
