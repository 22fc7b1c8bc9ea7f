"""An asyncio TCP server speaking FutuOpenD's quote protocol to the real futu-api client.

OpenD cannot run here, so this simulator stands in for it: the installed `futu.OpenQuoteContext` talks to
it unchanged and is the judge of fidelity. Prices come from the shared `MarketModel`, faults from the
shared `FaultBox`, so the same seed and the same fault script mean the same thing for every venue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from feedrunner.sim.faults import Fault, FaultBox
from feedrunner.sim.market import MarketModel, SimTrade

from . import _pb as pb
from .catalogue import DEFAULT_SECURITIES, Security, join_code, local_time, make_security, split_code
from .protocol import Frame, FrameDecoder, ProtocolError, ProtoId, SubType, encode

log = logging.getLogger(__name__)

RET_OK = 0
RET_FAILED = -1  # Common.RetType_Failed
RET_INVALID = -500  # Common.RetType_Invalid: the packet itself is bad

SERVER_VER = 1003  # reported as OpenD 10.3
SERVER_BUILD = 5808
LOGIN_USER_ID = 10_000_001
PUSH_TYPES = (SubType.QUOTE, SubType.TICKER, SubType.ORDER_BOOK)
BOOK_DEPTH = 10  # HK LV2 depth; OpenD serves at most this many levels
TICKER_CACHE = 1000  # Qot_GetTicker returns at most 1000
MAX_SNAPSHOT_CODES = 400  # OpenD's per-request limit for Qot_GetSecuritySnapshot
CATCH_UP_MAX = 1000  # trades an idle code may owe when it is next looked at
WRITE_HIGH_WATER = 8 * 1024 * 1024  # beyond this a slow reader loses pushes rather than our memory

# Market states reported by GetGlobalState: the simulated markets never close.
_TRADING_STATES = {"marketHK": 3, "marketUS": 5, "marketSH": 3, "marketSZ": 3, "marketHKFuture": 23}

MALFORMED_KINDS = ("sha1", "junk", "desync")


@dataclass(slots=True)
class _Sub:
    since: float  # time.monotonic() when subscribed, for the minimum-hold rule
    push: bool  # isRegOrUnRegPush: whether this connection gets pushes for it


@dataclass(slots=True)
class _Tape:
    """Per-security running totals in exchange units (the market model counts float lots)."""

    volume: int = 0
    turnover: float = 0.0
    last_ts_ms: int = 0
    last_advance: float = 0.0  # monotonic; idle codes catch up when polled
    tickers: deque[tuple[SimTrade, int]] = field(default_factory=lambda: deque(maxlen=TICKER_CACHE))


class _Conn(asyncio.Protocol):
    """One API connection: framing, InitConnect state and its own subscriptions."""

    def __init__(self, sim: OpenDSim) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.conn_id = 0
        self.ready = False
        self.recv_notify = False
        self.subs: dict[tuple[str, int], _Sub] = {}
        self.peer: Any = None
        self._pending: list[bytes] = []  # pushes of this loop iteration, written together by `flush`
        self._pending_bytes = 0

    # asyncio callbacks -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.peer = transport.get_extra_info("peername")
        if self.sim.faults.active(Fault.REFUSE):
            self.sim._counters["refused"] += 1
            self.reset()
            return
        self.sim._register(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            log.info("opend sim: dropping %s: %s", self.peer, exc)
            self.close()
            return
        for frame in frames:
            if self.transport is None or self.transport.is_closing():
                return
            self.sim._dispatch(self, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sim._unregister(self)

    # output ------------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()  # keep the stream in order: queued pushes first
            self.transport.write(data)

    def push(self, data: bytes) -> bool:
        """Like `send`, but a reader that cannot keep up loses pushes instead of growing our buffer.

        Pushes queued in one loop iteration go out in one write: a syscall per push would cap the
        simulator near 5k pushes/s on loopback, below what a client should be measured against.
        """
        t = self.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() + self._pending_bytes > WRITE_HIGH_WATER:
            self.sim._counters["pushes_dropped"] += 1
            return False
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.sim._counters["pushes_sent"] += 1
        return True

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0) rather than a FIN, as a crashed peer would."""
        t = self.transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()


class _RequestError(Exception):
    """A request OpenD answers with retType -1 and this retMsg."""

    def __init__(self, msg: str, ret_type: int = RET_FAILED) -> None:
        super().__init__(msg)
        self.msg = msg
        self.ret_type = ret_type


class OpenDSim:
    """A local FutuOpenD for the quote API: subscriptions, quota, polling, pushes and faults."""

    def __init__(
        self,
        *,
        seed: int = 1,
        rate: float = 5.0,
        host: str = "127.0.0.1",
        port: int = 0,
        codes: list[str] | None = None,
        quota: int = 100,
        min_sub_seconds: float = 60.0,
        keepalive_interval: int = 10,
    ) -> None:
        self.host = host
        self.port = port
        self.quota = quota
        self.min_sub_seconds = min_sub_seconds
        self.keepalive_interval = keepalive_interval
        self._malformed_kind = "sha1"
        self.faults = FaultBox()
        self.market = MarketModel(seed=seed)
        self._rate = float(rate)
        self._securities: dict[str, Security] = {}
        self._tapes: dict[str, _Tape] = {}
        for sec in DEFAULT_SECURITIES:
            self.add_security(sec)
        for code in codes or ():
            if code not in self._securities:
                self.add_security(make_security(code))
        self._conns: set[_Conn] = set()
        self._pushers: dict[tuple[str, int], set[_Conn]] = {}  # (code, subtype) -> connections pushed to
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump_task: asyncio.Task[None] | None = None
        self._next_conn_id = 1
        self._push_serial = 0
        self._stopping = False
        self._restart_gen = 0
        self._renumber_at_restart: int | None = None
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "connections_total",
                "requests",
                "keepalives",
                "pushes_sent",
                "pushes_dropped",
                "malformed_sent",
                "refused",
                "restarts",
            ),
            0,
        )
        self._pushes_by_proto: dict[int, int] = {}
        self.faults.on_instant(self._on_instant_fault)

    # catalogue ---------------------------------------------------------------------------------------
    def add_security(self, security: Security) -> None:
        split_code(security.code)  # validates the market prefix
        self._securities[security.code] = security
        self.market.add(security.code, security.price)
        self._tapes.setdefault(security.code, _Tape())

    @property
    def codes(self) -> list[str]:
        return list(self._securities)

    def security(self, code: str) -> Security:
        return self._securities[code]

    # lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await self._listen()
        self._pump_task = self._loop.create_task(self._pump(), name="opend-sim-pump")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._pump_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pump_task = None
        self._tasks.clear()
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.close()
        if server is not None:  # from 3.12 this also waits for the connections closed above
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        await asyncio.sleep(0)  # let connection_lost run

    async def __aenter__(self) -> OpenDSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        # After a restart the port must be the same one clients were given; a lingering TIME_WAIT
        # is fine with SO_REUSEADDR, but give the kernel a moment if the bind still races.
        for attempt in range(20):
            try:
                server = await loop.create_server(
                    lambda: _Conn(self), self.host, self.port, reuse_address=True, backlog=128
                )
                break
            except OSError:
                if self.port == 0 or attempt == 19:
                    raise
                await asyncio.sleep(0.05)
        self.port = server.sockets[0].getsockname()[1]
        return server

    # public knobs ------------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Trades per second per subscribed code; each trade yields one push per subscribed type."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._rate = float(rate)

    @property
    def malformed_kind(self) -> str:
        """What a MALFORMED fault sends instead of each push; one of MALFORMED_KINDS.

        "sha1": the right frame with a wrong digest (futu-api drops it silently);
        "junk": a well-framed packet with an unknown proto id and random body (dropped, logged);
        "desync": a header whose body length is absurd, so the client loses the framing: it hears
        nothing for 33 s, drops the link, and (futu-api keeps its receive buffer across reconnects)
        never recovers unless its `_recv_buf` is cleared in `on_disconnect`.
        """
        return self._malformed_kind

    @malformed_kind.setter
    def malformed_kind(self, kind: str) -> None:
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"malformed_kind must be one of {MALFORMED_KINDS}")
        self._malformed_kind = kind

    def inject(
        self, fault: Fault | str, duration: float = 0.0, symbol: str | None = None, renumber: int | None = None
    ) -> None:
        """`faults.inject`: instant faults hit live connections now, lasting ones hold for `duration`. A
        restart with `renumber` comes back numbering every code's prints from that sequence (`renumber`)."""
        fault = Fault(fault)
        if renumber is not None and (fault is not Fault.RESTART or renumber < 1):
            raise ValueError("renumber applies to a restart only, and must be >= 1")
        if fault is Fault.RESTART:
            self._renumber_at_restart = renumber
        self.faults.inject(fault, duration, symbol)

    def renumber(self, start: int) -> None:
        """Sequence every code's next print `start`, as an OpenD restarted on a fresh tape does; the ticker
        history it serves starts over with it."""
        for code in self._securities:
            self.market.state(code).trade_id = start - 1
            self._tapes[code].tickers.clear()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self._conns),
            "subscriptions": sum(len(c.subs) for c in self._conns),
            **self._counters,
            "pushes_by_proto": dict(self._pushes_by_proto),
        }

    def subscriptions(self) -> dict[int, list[tuple[str, str]]]:
        """Per connection id, its (code, SubType name) pairs: lets tests see a client resubscribe."""
        conns = sorted((c for c in self._conns if c.ready), key=lambda c: c.conn_id)
        return {c.conn_id: sorted((code, SubType(st).name) for code, st in c.subs) for c in conns}

    def send_gtw_event(self, event_type: int, desc: str) -> int:
        """Push Notify(GtwEvent) to connections that asked for notifications; returns how many."""
        msg = pb.Notify.Response()
        msg.retType = RET_OK
        msg.s2c.type = pb.Notify.NotifyType_GtwEvent
        msg.s2c.event.eventType = event_type
        msg.s2c.event.desc = desc
        return self._notify_all(msg)

    # faults ------------------------------------------------------------------------------------------
    def _on_instant_fault(self, fault: Fault, duration: float, symbol: str | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._apply_instant(fault, duration)
        else:  # injected from another thread: act inside our loop
            loop.call_soon_threadsafe(self._apply_instant, fault, duration)

    def _apply_instant(self, fault: Fault, duration: float) -> None:
        if fault is Fault.DROP:
            for conn in list(self._conns):
                conn.close()
        elif fault is Fault.RESET:
            for conn in list(self._conns):
                conn.reset()
        elif fault is Fault.RESTART:
            self._spawn(self._restart(duration))
        elif fault is Fault.LINK_LOST:
            # OpenD's own link to Futu's servers: clients stay connected but are told quotes are down.
            self._notify_conn_status(qot_logined=False)
            self._spawn(self._link_back(duration))

    async def _restart(self, duration: float) -> None:
        self._counters["restarts"] += 1
        self._restart_gen += 1
        gen = self._restart_gen
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.close()
        renumber, self._renumber_at_restart = self._renumber_at_restart, None
        if renumber is not None:
            self.renumber(renumber)
        await asyncio.sleep(duration)
        if not self._stopping and gen == self._restart_gen and self._server is None:
            self._server = await self._listen()  # a later restart, if any, decides when to come back

    async def _link_back(self, duration: float) -> None:
        await asyncio.sleep(duration)
        self._notify_conn_status(qot_logined=True)

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rejected(self, code: str) -> bool:
        return self.faults.active(Fault.REJECT_SYMBOL, code)

    def _qot_down(self) -> bool:
        return self.faults.active(Fault.LINK_LOST)

    # connection registry -----------------------------------------------------------------------------
    def _register(self, conn: _Conn) -> None:
        conn.conn_id = (int(time.time()) << 20) + self._next_conn_id  # unique across restarts, like OpenD's
        self._next_conn_id += 1
        self._conns.add(conn)
        self._counters["connections_total"] += 1

    def _unregister(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for key in list(conn.subs):
            self._set_push(conn, key, False)
        conn.subs.clear()

    def _set_push(self, conn: _Conn, key: tuple[str, int], on: bool) -> None:
        if on:
            self._pushers.setdefault(key, set()).add(conn)
        else:
            conns = self._pushers.get(key)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._pushers[key]

    # request dispatch --------------------------------------------------------------------------------
    def _dispatch(self, conn: _Conn, frame: Frame) -> None:
        self._counters["requests"] += 1
        handler = self._handlers.get(frame.proto_id)
        resp: Any
        follow_up: list[tuple[str, int]] = []
        try:
            if frame.fmt != 0:
                raise _RequestError("Only protobuf format is supported by the simulator", RET_INVALID)
            if not frame.sha_ok:
                raise _RequestError(f"proto_id:{frame.proto_id} check sha error!", RET_INVALID)
            if handler is None:
                raise _RequestError(f"Unknown protocol ID: {frame.proto_id}")
            module, method = handler
            if not conn.ready and frame.proto_id != ProtoId.INIT_CONNECT:
                raise _RequestError("Please send InitConnect first")
            req = module.Request()
            try:
                req.ParseFromString(frame.body)
            except Exception as exc:
                raise _RequestError(f"Failed to parse request: {exc}", RET_INVALID) from None
            resp = module.Response()
            follow_up = method(self, conn, req.c2s, resp.s2c) or []
            resp.s2c.SetInParent()  # present even when empty, as OpenD sends it
            resp.retType = RET_OK
        except _RequestError as err:
            # Every Response starts retType/retMsg/errCode as fields 1-3, so any module's will do.
            module = handler[0] if handler is not None else pb.KeepAlive
            resp = module.Response()
            resp.retType = err.ret_type
            resp.retMsg = err.msg
            resp.errCode = 0
        conn.send(encode(frame.proto_id, frame.serial, resp.SerializeToString()))
        for code, st in follow_up:  # first pushes go after the reply, as OpenD's do
            self._first_push(conn, code, st)

    def _lookup(self, market: int, symbol: str) -> Security:
        code = join_code(market, symbol)
        sec = self._securities.get(code)
        if sec is None or self._rejected(code):
            raise _RequestError(f"Unknown stock {code}")
        return sec

    def _check_ratelimit(self) -> None:
        if self.faults.active(Fault.RATELIMIT):
            raise _RequestError("Request too frequent, please try again later")

    def _h_init_connect(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        if c2s.HasField("packetEncAlgo") and c2s.packetEncAlgo != pb.Common.PacketEncAlgo_None:
            raise _RequestError("The simulator does not support encrypted connections")
        conn.ready = True
        conn.recv_notify = c2s.recvNotify
        s2c.serverVer = SERVER_VER
        s2c.loginUserID = LOGIN_USER_ID
        s2c.connID = conn.conn_id
        s2c.connAESKey = secrets.token_hex(8).upper()  # required field even when not encrypting
        s2c.aesCBCiv = secrets.token_hex(8).upper()
        s2c.keepAliveInterval = self.keepalive_interval
        s2c.userAttribution = 1

    def _h_global_state(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        for name, state in _TRADING_STATES.items():
            setattr(s2c, name, state)
        s2c.marketUSFuture = 23
        s2c.qotLogined = not self._qot_down()
        s2c.trdLogined = True
        s2c.serverVer = SERVER_VER
        s2c.serverBuildNo = SERVER_BUILD
        s2c.time = int(time.time())
        s2c.localTime = time.time()
        s2c.programStatus.type = pb.Common.ProgramStatusType_Ready
        s2c.connID = conn.conn_id

    def _h_keep_alive(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        self._counters["keepalives"] += 1
        s2c.time = int(time.time())

    def _h_sub(self, conn: _Conn, c2s: Any, s2c: Any) -> list[tuple[str, int]]:
        self._check_ratelimit()
        now = time.monotonic()
        if c2s.isUnsubAll:
            self._check_hold(conn, list(conn.subs), now)
            for key in list(conn.subs):
                self._set_push(conn, key, False)
            conn.subs.clear()
            return []
        subtypes = list(dict.fromkeys(c2s.subTypeList))
        for st in subtypes:
            if st not in SubType._value2member_map_:
                raise _RequestError(f"Unknown subscription type {st}")
        if not subtypes or not len(c2s.securityList):
            raise _RequestError("The security list or the subscription type list is empty")
        codes = list(dict.fromkeys(self._lookup(s.market, s.code).code for s in c2s.securityList))
        keys = [(code, st) for code in codes for st in subtypes]
        if not c2s.isSubOrUnSub:
            present = [k for k in keys if k in conn.subs]
            self._check_hold(conn, present, now)
            for key in present:
                self._set_push(conn, key, False)
                del conn.subs[key]
            return []
        new = [k for k in keys if k not in conn.subs]
        used = len(conn.subs)
        if used + len(new) > self.quota:
            raise _RequestError(
                f"Insufficient subscription quota: {used} used, {len(new)} more requested, quota {self.quota}"
            )
        push = c2s.isRegOrUnRegPush if c2s.HasField("isRegOrUnRegPush") else None
        for code in codes:
            self._catch_up(code)  # the market moved on while nobody watched: show the gap
        for key in keys:
            sub = conn.subs.get(key)
            if sub is None:
                sub = conn.subs[key] = _Sub(since=now, push=False)
            if push is not None:
                sub.push = push
            self._set_push(conn, key, sub.push)
        first = c2s.isFirstPush if c2s.HasField("isFirstPush") else True
        return [k for k in keys if first and conn.subs[k].push]

    def _check_hold(self, conn: _Conn, keys: list[tuple[str, int]], now: float) -> None:
        young = [k for k in keys if now - conn.subs[k].since < self.min_sub_seconds]
        if young:
            code, st = young[0]
            age = now - conn.subs[(code, st)].since
            raise _RequestError(
                f"Unsubscribe failed: a subscription must be held for at least {self.min_sub_seconds:g} "
                f"seconds before it can be cancelled ({code} {SubType(st).name} subscribed {age:.1f}s ago)"
            )

    def _h_reg_push(self, conn: _Conn, c2s: Any, s2c: Any) -> list[tuple[str, int]]:
        codes = [self._lookup(s.market, s.code).code for s in c2s.securityList]
        follow: list[tuple[str, int]] = []
        for code in codes:
            self._catch_up(code)
            for st in c2s.subTypeList:
                sub = conn.subs.get((code, st))
                if sub is None:
                    continue  # OpenD ignores registration for what is not subscribed
                sub.push = c2s.isRegOrUnReg
                self._set_push(conn, (code, st), sub.push)
                if sub.push and (c2s.isFirstPush if c2s.HasField("isFirstPush") else True):
                    follow.append((code, st))
        return follow

    def _h_get_sub_info(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        for other in sorted(self._conns, key=lambda c: c.conn_id):
            if not other.ready or (other is not conn and not c2s.isReqAllConn):
                continue
            info = s2c.connSubInfoList.add()
            info.usedQuota = len(other.subs)
            info.isOwnConnData = other is conn
            by_type: dict[int, list[str]] = {}
            for code, st in other.subs:
                by_type.setdefault(st, []).append(code)
            for st, codes in sorted(by_type.items()):
                item = info.subInfoList.add()
                item.subType = st
                for code in codes:
                    sec = self._securities[code]
                    s = item.securityList.add()
                    s.market, s.code = sec.market, sec.symbol
        s2c.totalUsedQuota = sum(len(c.subs) for c in self._conns)
        s2c.remainQuota = max(0, self.quota - len(conn.subs))

    def _require_sub(self, conn: _Conn, sec: Security, st: SubType) -> None:
        if (sec.code, st) not in conn.subs:
            raise _RequestError(f"Please subscribe to {st.name} of {sec.code} first")

    def _h_get_basic_qot(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        self._check_ratelimit()
        secs = [self._lookup(s.market, s.code) for s in c2s.securityList]
        for sec in secs:
            self._require_sub(conn, sec, SubType.QUOTE)
        for sec in secs:
            self._catch_up(sec.code)
            self._fill_basic(s2c.basicQotList.add(), sec)

    def _h_get_snapshot(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        self._check_ratelimit()
        if len(c2s.securityList) > MAX_SNAPSHOT_CODES:
            raise _RequestError(f"Too many securities: at most {MAX_SNAPSHOT_CODES} per request")
        for s in c2s.securityList:
            sec = self._lookup(s.market, s.code)
            self._catch_up(sec.code)
            self._fill_snapshot(s2c.snapshotList.add(), sec)

    def _h_get_order_book(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        self._check_ratelimit()
        sec = self._lookup(c2s.security.market, c2s.security.code)
        self._require_sub(conn, sec, SubType.ORDER_BOOK)
        self._catch_up(sec.code)
        self._fill_book(s2c, sec, max(0, min(c2s.num, BOOK_DEPTH)))

    def _h_get_ticker(self, conn: _Conn, c2s: Any, s2c: Any) -> None:
        self._check_ratelimit()
        sec = self._lookup(c2s.security.market, c2s.security.code)
        self._require_sub(conn, sec, SubType.TICKER)
        self._catch_up(sec.code)
        s2c.security.market, s2c.security.code = sec.market, sec.symbol
        s2c.name = sec.name
        tape = self._tapes[sec.code]
        n = max(0, min(c2s.maxRetNum, TICKER_CACHE))
        for trade, volume in list(tape.tickers)[-n:] if n else []:
            self._fill_ticker(s2c.tickerList.add(), sec, trade, volume, push_type=3)

    _handlers: dict[int, tuple[Any, Any]] = {
        ProtoId.INIT_CONNECT: (pb.InitConnect, _h_init_connect),
        ProtoId.GET_GLOBAL_STATE: (pb.GetGlobalState, _h_global_state),
        ProtoId.KEEP_ALIVE: (pb.KeepAlive, _h_keep_alive),
        ProtoId.QOT_SUB: (pb.QotSub, _h_sub),
        ProtoId.QOT_REG_QOT_PUSH: (pb.QotRegQotPush, _h_reg_push),
        ProtoId.QOT_GET_SUB_INFO: (pb.QotGetSubInfo, _h_get_sub_info),
        ProtoId.QOT_GET_BASIC_QOT: (pb.QotGetBasicQot, _h_get_basic_qot),
        ProtoId.QOT_GET_SECURITY_SNAPSHOT: (pb.QotGetSecuritySnapshot, _h_get_snapshot),
        ProtoId.QOT_GET_ORDER_BOOK: (pb.QotGetOrderBook, _h_get_order_book),
        ProtoId.QOT_GET_TICKER: (pb.QotGetTicker, _h_get_ticker),
    }

    # message bodies ----------------------------------------------------------------------------------
    def _lots(self, sec: Security, qty: float) -> int:
        """The model's float quantity as whole board lots, in shares."""
        return max(1, round(qty * 10)) * sec.lot_size

    def _last_price(self, code: str) -> float:
        st = self.market.state(code)
        return st.last.price if st.last is not None else st.mid

    def _ts_ms(self, code: str) -> int:
        return self._tapes[code].last_ts_ms or int(time.time() * 1000)

    def _fill_basic(self, q: Any, sec: Security) -> None:
        st = self.market.state(sec.code)
        tape = self._tapes[sec.code]
        ts = self._ts_ms(sec.code)
        q.security.market, q.security.code = sec.market, sec.symbol
        q.name = sec.name
        q.isSuspended = False
        q.listTime = sec.list_time
        q.priceSpread = st.tick
        q.updateTime = local_time(sec.prefix, ts)
        q.updateTimestamp = ts / 1000
        q.highPrice = st.high
        q.openPrice = st.open
        q.lowPrice = st.low
        q.curPrice = self._last_price(sec.code)
        q.lastClosePrice = sec.price
        q.volume = tape.volume
        q.turnover = round(tape.turnover, 3)
        q.turnoverRate = 0.0
        q.amplitude = round((st.high - st.low) / sec.price * 100, 3)
        q.secStatus = 1  # SecurityStatus_Normal

    def _fill_snapshot(self, snap: Any, sec: Security) -> None:
        st = self.market.state(sec.code)
        tape = self._tapes[sec.code]
        ts = self._ts_ms(sec.code)
        (bp, bq), (ap, aq) = self.market.best(sec.code)
        b = snap.basic
        b.security.market, b.security.code = sec.market, sec.symbol
        b.name = sec.name
        b.type = sec.sec_type
        b.isSuspend = False
        b.listTime = sec.list_time
        b.lotSize = sec.lot_size
        b.priceSpread = st.tick
        b.updateTime = local_time(sec.prefix, ts)
        b.updateTimestamp = ts / 1000
        b.highPrice = st.high
        b.openPrice = st.open
        b.lowPrice = st.low
        b.lastClosePrice = sec.price
        b.curPrice = self._last_price(sec.code)
        b.volume = tape.volume
        b.turnover = round(tape.turnover, 3)
        b.turnoverRate = 0.0
        b.bidPrice, b.askPrice = bp, ap
        b.bidVol, b.askVol = self._lots(sec, bq), self._lots(sec, aq)
        b.amplitude = round((st.high - st.low) / sec.price * 100, 3)
        b.avgPrice = round(tape.turnover / tape.volume, 3) if tape.volume else b.curPrice
        b.secStatus = 1

    def _fill_book(self, s2c: Any, sec: Security, depth: int) -> None:
        _, bids, asks = self.market.snapshot(sec.code, depth)
        ts_ms = self._ts_ms(sec.code)
        stamp = local_time(sec.prefix, ts_ms, millis=True)
        s2c.security.market, s2c.security.code = sec.market, sec.symbol
        s2c.name = sec.name
        for side, levels in ((s2c.orderBookBidList, bids), (s2c.orderBookAskList, asks)):
            for price, qty in levels:
                level = side.add()
                level.price = price
                level.volume = self._lots(sec, qty)
                level.orederCount = max(1, round(qty * 2))  # sic: futu's field name
        s2c.svrRecvTimeBid = stamp
        s2c.svrRecvTimeAsk = stamp
        s2c.svrRecvTimeBidTimestamp = ts_ms / 1000  # OpenD sends both forms; clients prefer the number
        s2c.svrRecvTimeAskTimestamp = ts_ms / 1000

    def _fill_ticker(self, t: Any, sec: Security, trade: SimTrade, volume: int, push_type: int = 1) -> None:
        t.time = local_time(sec.prefix, trade.ts_ms, millis=True)
        t.sequence = trade.id
        t.dir = 2 if trade.buyer_is_maker else 1  # seller-initiated prints are "Ask" (内盘)
        t.price = trade.price
        t.volume = volume
        t.turnover = round(trade.price * volume, 3)
        t.recvTime = time.time()
        t.type = 1  # TickerType_Automatch
        t.pushDataType = push_type  # 1 realtime, 3 cache (first push of what was already there)
        t.timestamp = trade.ts_ms / 1000

    # market advance and pushes ---------------------------------------------------------------------
    def _advance(self, code: str) -> tuple[SimTrade, int]:
        trade, _diff = self.market.trade(code)
        sec = self._securities[code]
        tape = self._tapes[code]
        volume = self._lots(sec, trade.qty)
        tape.volume += volume
        tape.turnover += trade.price * volume
        tape.last_ts_ms = trade.ts_ms
        tape.last_advance = time.monotonic()
        tape.tickers.append((trade, volume))
        return trade, volume

    def _catch_up(self, code: str) -> None:
        """Codes nobody streams stand still between polls; move them on by the time that passed."""
        if any((code, st) in self._pushers for st in PUSH_TYPES) or self._rate <= 0:
            return
        tape = self._tapes[code]
        now = time.monotonic()
        if tape.last_advance == 0.0:
            tape.last_advance = now
            return
        n = min(int((now - tape.last_advance) * self._rate), CATCH_UP_MAX)
        for _ in range(n):
            self._advance(code)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        carry: dict[str, float] = {}
        while True:
            rate = self._rate
            await asyncio.sleep(0.05 if rate <= 0 else min(0.05, max(0.001, 1.0 / rate)))
            now = loop.time()
            dt, last = now - last, now
            if rate <= 0:
                continue
            codes = {code for (code, st) in self._pushers if st in PUSH_TYPES}
            burst = max(1, int(rate * 0.25))  # after a long pause, catch up at most a quarter second
            for code in codes:
                if self._rejected(code):
                    carry.pop(code, None)
                    continue
                due = carry.get(code, 0.0) + dt * rate
                n = int(due)
                carry[code] = due - n
                for _ in range(min(n, burst)):
                    self._tick(code)

    def _tick(self, code: str) -> None:
        trade, volume = self._advance(code)
        if self.faults.active(Fault.STALL, code) or self._qot_down():
            return  # the market trades on; this OpenD just stops telling anyone
        if self.faults.active(Fault.GAP, code):
            trade, volume = self._advance(code)  # the print before this one is never pushed
        sec = self._securities[code]
        for st in PUSH_TYPES:
            conns = self._pushers.get((code, st))
            if conns:
                self._broadcast(conns, code, self._push_frame(st, sec, [(trade, volume)]))

    def _push_frame(
        self, st: int, sec: Security, tickers: list[tuple[SimTrade, int]], push_type: int = 1
    ) -> tuple[int, bytes]:
        if st == SubType.TICKER:
            msg = pb.QotUpdateTicker.Response()
            msg.s2c.security.market, msg.s2c.security.code = sec.market, sec.symbol
            msg.s2c.name = sec.name
            for trade, volume in tickers:
                self._fill_ticker(msg.s2c.tickerList.add(), sec, trade, volume, push_type)
            proto = ProtoId.QOT_UPDATE_TICKER
        elif st == SubType.ORDER_BOOK:
            msg = pb.QotUpdateOrderBook.Response()
            self._fill_book(msg.s2c, sec, BOOK_DEPTH)
            proto = ProtoId.QOT_UPDATE_ORDER_BOOK
        else:
            msg = pb.QotUpdateBasicQot.Response()
            self._fill_basic(msg.s2c.basicQotList.add(), sec)
            proto = ProtoId.QOT_UPDATE_BASIC_QOT
        msg.retType = RET_OK
        return proto, msg.SerializeToString()

    def _broadcast(self, conns: set[_Conn], code: str, frame: tuple[int, bytes]) -> None:
        proto, body = frame
        self._push_serial += 1
        if self.faults.active(Fault.MALFORMED, code):
            data = self._malformed(proto, body)
            self._counters["malformed_sent"] += len(conns)
        else:
            data = encode(proto, self._push_serial, body)
        for conn in list(conns):
            if conn.push(data):
                self._pushes_by_proto[int(proto)] = self._pushes_by_proto.get(int(proto), 0) + 1

    def _malformed(self, proto: int, body: bytes) -> bytes:
        if self.malformed_kind == "junk":
            # A well-framed packet whose header and body are nonsense: unknown proto id, random body.
            junk = secrets.token_bytes(max(8, len(body) // 4))
            return encode(0xFFFF, self._push_serial, junk, fmt=7)
        if self.malformed_kind == "desync":
            # A header promising far more body than will ever come: the client buffers everything after
            # it as that body, so no later frame is parsed until it gives up on the connection.
            frame = encode(proto, self._push_serial, body)
            return frame[:12] + struct.pack("<I", 0x7FFFFFFF) + frame[16:]
        return encode(proto, self._push_serial, body, sha1=b"\xde\xad" * 10)

    def _first_push(self, conn: _Conn, code: str, st: int) -> None:
        if st not in PUSH_TYPES or self.faults.active(Fault.STALL, code) or self._qot_down():
            return
        sec = self._securities[code]
        tickers: list[tuple[SimTrade, int]] = []
        if st == SubType.TICKER:
            tape = self._tapes[code]
            if not tape.tickers:
                return
            tickers = [tape.tickers[-1]]
        self._broadcast({conn}, code, self._push_frame(st, sec, tickers, push_type=3))

    def _notify_all(self, msg: Any) -> int:
        self._push_serial += 1
        data = encode(ProtoId.NOTIFY, self._push_serial, msg.SerializeToString())
        targets = [c for c in self._conns if c.ready and c.recv_notify]
        for conn in targets:
            conn.send(data)
        return len(targets)

    def _notify_conn_status(self, *, qot_logined: bool) -> None:
        msg = pb.Notify.Response()
        msg.retType = RET_OK
        msg.s2c.type = pb.Notify.NotifyType_ConnStatus
        msg.s2c.connectStatus.qotLogined = qot_logined
        msg.s2c.connectStatus.trdLogined = True
        self._notify_all(msg)


def venue_snippet(host: str, port: int, symbols: list[str] | None = None, quota: int = 100) -> str:
    """The feeds.yaml fragment that points the Futu adapter at this simulator."""
    codes = ", ".join(symbols or ["HK.00700", "HK.09988", "US.AAPL", "US.TSLA"])
    return (
        f"# feedrunner FutuOpenD simulator on {host}:{port}\n"
        "venues:\n"
        "  futu:\n"
        "    adapter: futu\n"
        f"    host: {host}\n"
        f"    port: {port}\n"
        f"    symbols: [{codes}]\n"
        f"    quota: {quota}\n"
    )


async def run_standalone(host: str, port: int, seed: int, rate: float) -> None:
    """Serve until cancelled, after printing the venue snippet a feeds.yaml needs to reach us."""
    async with OpenDSim(seed=seed, rate=rate, host=host, port=port) as sim:
        print(venue_snippet(sim.host, sim.port, quota=sim.quota), flush=True)
        print(f"# seed {seed}, {rate:g} trades/s per subscribed code; codes: {', '.join(sim.codes)}", flush=True)
        await asyncio.Event().wait()
