"""An asyncio TCP server speaking the TWS API, so the real ib_async client can be tested without TWS.

TWS / IB Gateway cannot run in CI, yet the IB adapter's correctness rests on how ib_async reacts to
TWS's replies, error codes and disconnects. This server answers the handshake, startup sync and
market-data requests byte-for-byte as ib_async 2.1 parses them at server version 176, streams ticks
from the shared seeded `MarketModel`, and injects TWS's failure modes through the shared `FaultBox`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from types import TracebackType
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from feedrunner.sim.faults import Fault, FaultBox
from feedrunner.sim.market import MarketModel

from .contracts import DEFAULT_CONTRACTS, Catalogue, ContractQuery, ContractSpec
from .wire import API_SIGN, ERRORS, LEN, MAX_FRAME, TICK_BY_TICK_TYPES, In, Out, frame, tick_frame

log = logging.getLogger("feedrunner.sim.tws")

# Heads of the hot-path frames: "<msgId>\0<version>\0"; the reqId and the rest follow.
_PRICE = f"{Out.TICK_PRICE}\x006\x00"
_SIZE = f"{Out.TICK_SIZE}\x006\x00"
_STRING = f"{Out.TICK_STRING}\x006\x00"
_GENERIC = f"{Out.TICK_GENERIC}\x006\x00"
_TBT = f"{Out.TICK_BY_TICK}\x00"
_REQ_PARAMS = f"{Out.TICK_REQ_PARAMS}\x00"
_MD_TYPE = f"{Out.MARKET_DATA_TYPE}\x001\x00"
_MKT = 0  # _Sub.kind for reqMktData; 1..4 are the tick-by-tick types
_HISTORY_MAX = 1000  # ticks per reqHistoricalTicks, as at IB

_ACCOUNT_VALUES = (
    ("AccountType", "INDIVIDUAL", ""),
    ("NetLiquidation", "1000000.00", "USD"),
    ("TotalCashValue", "1000000.00", "USD"),
    ("SettledCash", "1000000.00", "USD"),
    ("CashBalance", "1000000.00", "USD"),
    ("BuyingPower", "4000000.00", "USD"),
    ("AvailableFunds", "1000000.00", "USD"),
    ("ExcessLiquidity", "1000000.00", "USD"),
    ("EquityWithLoanValue", "1000000.00", "USD"),
    ("GrossPositionValue", "0.00", "USD"),
    ("InitMarginReq", "0.00", "USD"),
    ("MaintMarginReq", "0.00", "USD"),
    ("Currency", "USD", "USD"),
)


@dataclass(slots=True, eq=False)
class _Sub:
    session: _Session
    req_id: int
    spec: ContractSpec
    kind: int  # _MKT or a tick-by-tick type (1 Last, 2 AllLast, 3 BidAsk, 4 MidPoint)
    generic: frozenset[str] = frozenset()
    ignore_size: bool = False
    primed: bool = False


@dataclass(slots=True)
class _Tape:
    """What TWS derives per contract from the prints: quote in IB sizes, volume, VWAP, session range."""

    spec: ContractSpec
    bid: float = 0.0
    bid_size: int = 0
    ask: float = 0.0
    ask_size: int = 0
    last: float = 0.0
    last_size: int = 0
    last_ms: int = 0
    volume: int = 0
    notional: float = 0.0
    count: int = 0
    open: float = 0.0
    high: float = 0.0
    low: float = 0.0
    close: float = 0.0

    @property
    def vwap(self) -> float:
        return self.notional / self.volume if self.volume else 0.0


class _Session(asyncio.Protocol):
    """One API socket: framing, handshake state and the client's subscriptions."""

    def __init__(self, sim: TwsSim) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaken = False
        self.version = 0
        self.client_id: int | None = None
        self.closed = False
        self.write_paused = False
        self.md_type = 1
        self.next_id = 1
        self.mkt: dict[int, _Sub] = {}
        self.tbt: dict[int, _Sub] = {}
        self.forgotten: set[int] = set()  # reqIds the server dropped or refused; cancelling them is quiet
        self.out: list[bytes] = []

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        # Conflate rather than buffer without bound when the client reads slower than we tick.
        transport.set_write_buffer_limits(high=1 << 20)
        self.sim._accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sim._forget(self)
        self.sim._lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.handshaken:
            if bytes(buf[:4]) != API_SIGN[: min(4, len(buf))]:
                self.close()
                return
            if len(buf) < 8:
                return
            n = LEN.unpack_from(buf, 4)[0]
            if n > 4096:
                self.close()
                return
            if len(buf) < 8 + n:
                return
            text = bytes(buf[8 : 8 + n]).decode(errors="replace")
            del buf[: 8 + n]
            self.handshaken = True
            if not self.sim._handshake(self, text):
                return
        while len(buf) >= 4 and not self.closed:
            n = LEN.unpack_from(buf)[0]
            if n > MAX_FRAME:
                self.close()
                return
            if len(buf) < 4 + n:
                break
            fields = bytes(buf[4 : 4 + n]).decode(errors="replace").split("\0")
            del buf[: 4 + n]
            if fields and fields[-1] == "":
                fields.pop()
            self.sim._dispatch(self, fields)

    # output

    def send(self, *fields: object) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(frame(*fields))
        self.sim._messages_sent += 1

    def write_frames(self, frames: list[bytes]) -> None:
        if self.closed or self.transport is None or not frames:
            return
        self.transport.write(b"".join(frames))
        self.sim._messages_sent += len(frames)

    def error(self, req_id: int, code: int, text: str | None = None) -> None:
        self.send(Out.ERR_MSG, 2, req_id, code, text if text is not None else ERRORS[code], "")
        self.sim._errors_sent += 1

    def close(self) -> None:
        """Clean close (FIN after the pending bytes), as TWS does on logout or a rejected client id."""
        if self.closed:
            return
        self.closed = True
        self.sim._forget(self)
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0 makes close() send RST instead of FIN."""
        if self.transport is None:
            return
        self.closed = True
        self.sim._forget(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class TwsSim:
    """A TWS stand-in: `async with TwsSim() as sim:` then connect ib_async to 127.0.0.1:`sim.port`."""

    # Symbol-steps per pump iteration before yielding: a market-model print costs ~60 us, so 200 keeps
    # the loop (request handling, socket reads of an in-process client) responsive to ~15 ms.
    BATCH = 200

    def __init__(
        self,
        *,
        seed: int = 1,
        rate: float = 5.0,
        host: str = "127.0.0.1",
        port: int = 0,
        contracts: list[dict[str, Any]] | None = None,
        max_lines: int = 100,
        max_tick_by_tick: int = 100,
        server_version: int = 176,
        accounts: tuple[str, ...] = ("DU123456",),
        keep_trading: float = 300.0,
        history: int = 20_000,
    ) -> None:
        if not accounts:
            raise ValueError("ib_async waits for a non-empty managedAccounts before it is ready")
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if not 164 <= server_version <= 178:
            # Replies use the >= 164 layouts (no contractData version field); ib_async speaks <= 178.
            raise ValueError("server_version must be within 164..178")
        self.host = host
        self.port = port
        self.max_lines = max_lines
        # IB sizes tick-by-tick like market depth (3 by default), far below market-data lines.
        self.max_tick_by_tick = max_tick_by_tick
        self.server_version = server_version
        self.accounts = tuple(accounts)
        # A market does not stop trading when a client disconnects: contracts keep printing for
        # `keep_trading` seconds after their last subscriber left, into a tape of `history` prints per
        # contract that reqHistoricalTicks serves, so a client can backfill what an outage cost it.
        self.keep_trading = keep_trading
        self._prints: dict[str, deque[tuple[int, float, int]]] = {}
        self._history = history
        self.market = MarketModel(seed)
        by_con_id = {int(d["conId"]): d for d in (*DEFAULT_CONTRACTS, *(contracts or ()))}  # extras override
        specs: list[ContractSpec] = []
        for d in by_con_id.values():
            spec = ContractSpec.from_dict(d)
            tick = self.market.add(spec.key, spec.price).tick
            # The model walks on its own price grid (0.001 for a $190 stock); advertising a coarser
            # minTick would make every quote look off-tick to a client that checks.
            specs.append(replace(spec, min_tick=tick) if tick < spec.min_tick else spec)
        self.catalogue = Catalogue(specs)
        self.faults = FaultBox()
        self.faults.on_instant(self._on_instant)
        self._rate = float(rate)
        self._tapes: dict[str, _Tape] = {spec.key: self._open_tape(spec) for spec in self.catalogue}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._running = False
        self._sessions: set[_Session] = set()  # accepted and not yet closed by either side
        self._live: set[_Session] = set()  # transports not yet through connection_lost
        self._by_client_id: dict[int, _Session] = {}
        self._by_key: dict[str, dict[_Sub, None]] = {}
        self._unprimed: dict[_Sub, None] = {}
        self._lines = 0
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._reopen_task: asyncio.Task[None] | None = None
        self._reopen_handle: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._reopen_at = 0.0
        self._t0 = 0.0
        self._steps = 0
        self._link_down = False
        self._link_timer: asyncio.TimerHandle | None = None
        self._next_link_data_lost = True
        self._farm_down = False
        self._farm_timer: asyncio.TimerHandle | None = None
        self._warm: dict[str, float] = {}  # key -> loop time until which it trades with no subscriber
        self._paused_keys: set[str] = set()  # subscribed keys whose data is held back right now
        self._denied: dict[str, int] = {}  # key -> error code answering its market-data requests
        self._hmds_down_until = 0.0  # loop time until which historical requests fail (162)
        self._history_silent: dict[str, float] = {}  # key -> loop time until which its requests go unanswered

        self._connections = 0
        self._messages_sent = 0
        self._errors_sent = 0
        self._ticks_sent = 0
        self._ticks_dropped = 0
        self._requests = 0
        self._unhandled = 0
        self._history_requests = 0

        self._handlers: dict[int, Callable[[_Session, list[str]], None]] = {
            In.START_API: self._start_api,
            In.REQ_MKT_DATA: self._req_mkt_data,
            In.CANCEL_MKT_DATA: self._cancel_mkt_data,
            In.REQ_TICK_BY_TICK_DATA: self._req_tick_by_tick,
            In.CANCEL_TICK_BY_TICK_DATA: self._cancel_tick_by_tick,
            In.REQ_CONTRACT_DATA: self._req_contract_details,
            In.REQ_MARKET_DATA_TYPE: self._req_market_data_type,
            In.REQ_POSITIONS: lambda s, f: s.send(Out.POSITION_END, 1),
            In.REQ_OPEN_ORDERS: lambda s, f: s.send(Out.OPEN_ORDER_END, 1),
            In.REQ_ALL_OPEN_ORDERS: lambda s, f: s.send(Out.OPEN_ORDER_END, 1),
            In.REQ_COMPLETED_ORDERS: lambda s, f: s.send(Out.COMPLETED_ORDERS_END),
            In.REQ_EXECUTIONS: lambda s, f: s.send(Out.EXECUTION_DATA_END, 1, int(f[2])),
            In.REQ_ACCT_DATA: self._req_account_updates,
            In.REQ_ACCOUNT_UPDATES_MULTI: self._req_account_updates_multi,
            In.REQ_ACCOUNT_SUMMARY: self._req_account_summary,
            In.REQ_IDS: lambda s, f: s.send(Out.NEXT_VALID_ID, 1, s.next_id),
            In.REQ_MANAGED_ACCTS: lambda s, f: s.send(Out.MANAGED_ACCTS, 1, ",".join(self.accounts)),
            In.REQ_CURRENT_TIME: lambda s, f: s.send(Out.CURRENT_TIME, 1, int(time.time())),
            In.REQ_MATCHING_SYMBOLS: self._req_matching_symbols,
            In.REQ_HISTORICAL_TICKS: self._req_historical_ticks,
            In.PLACE_ORDER: lambda s, f: s.error(int(f[1]), 201),
            In.REQ_HISTORICAL_DATA: lambda s, f: s.error(int(f[1]), 162),
            In.REQ_AUTO_OPEN_ORDERS: lambda s, f: None,
            In.CANCEL_ACCOUNT_SUMMARY: lambda s, f: None,
            In.CANCEL_POSITIONS: lambda s, f: None,
            In.CANCEL_ACCOUNT_UPDATES_MULTI: lambda s, f: None,
        }

    # lifecycle

    async def start(self) -> None:
        if self._running:
            raise RuntimeError("TwsSim already started")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        await self._listen()
        self._running = True
        self._pump_task = asyncio.create_task(self._pump(), name=f"tws-sim-pump:{self.port}")

    async def stop(self) -> None:
        self._running = False
        for handle in (self._link_timer, self._farm_timer, self._reopen_handle):
            if handle is not None:
                handle.cancel()
        self._link_timer = self._farm_timer = self._reopen_handle = None
        tasks = [t for t in (self._pump_task, self._reopen_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pump_task = self._reopen_task = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for s in list(self._sessions):
            s.close()
        if server is not None:
            # On Python 3.12+ wait_closed() also waits for the connections just closed above.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        # connection_lost arrives a loop turn later; wait a bounded moment so no socket outlives stop().
        if self._live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)

    async def __aenter__(self) -> TwsSim:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                self._server = await loop.create_server(
                    lambda: _Session(self), self.host, self.port, reuse_address=True
                )
                break
            except OSError:
                # Re-listening on a fixed port right after a restart can race the kernel; retry briefly.
                if self.port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.05)
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("TWS sim listening on %s:%d", self.host, self.port)

    def _block_listen(self, duration: float) -> None:
        """Stop accepting (new connects get ECONNREFUSED) and listen again on the same port later."""
        loop = self._require_loop()
        self._reopen_at = max(self._reopen_at, loop.time() + duration)
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._reopen_handle is not None:
            self._reopen_handle.cancel()
        self._reopen_handle = loop.call_at(self._reopen_at, self._reopen_due)

    def _reopen_due(self) -> None:
        self._reopen_handle = None
        if self._running and self._server is None and self._loop is not None:
            self._reopen_task = self._loop.create_task(self._relisten(), name=f"tws-sim-reopen:{self.port}")

    async def _relisten(self) -> None:
        try:
            await self._listen()
        except OSError:
            log.exception("TWS sim could not listen again on %s:%d", self.host, self.port)
            return
        loop = asyncio.get_running_loop()
        if self._server is not None and (loop.time() < self._reopen_at or not self._running):
            # A refuse/restart arrived while we were binding: honour it (its timer reopens later).
            self._server.close()
            self._server = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self._running:
            raise RuntimeError("start the simulator before injecting faults")
        return self._loop

    # public control

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Market steps per second per subscribed contract; each step is one print and a quote change."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._rate = float(rate)
        self._reset_clock()
        self._wake.set()

    def inject(self, fault: Fault | str, duration: float = 0.0, symbol: str | None = None) -> None:
        """Inject a shared fault; `symbol` is a contract key such as "AAPL" or "EUR.USD"."""
        fault = Fault(fault)
        if fault is Fault.REFUSE:
            self._block_listen(duration)
        self.faults.inject(fault, duration, symbol)

    def link_lost(self, duration: float, data_lost: bool = True) -> None:
        """1100 now, then 1101 (subscriptions dropped: resubscribe) or 1102 (kept) after `duration`."""
        self._next_link_data_lost = data_lost
        self.faults.inject(Fault.LINK_LOST, duration)

    def farm_lost(self, duration: float) -> None:
        """2103 now, 2104 after `duration`, no ticks between; FaultBox has no farm fault, so it lives here."""
        loop = self._require_loop()
        if self._farm_timer is not None:
            self._farm_timer.cancel()
        if not self._farm_down:
            self._farm_down = True
            self._broadcast_error(2103)
        self._farm_timer = loop.call_later(duration, self._farm_restored)

    def deny_market_data(self, symbol: str, code: int = 354) -> None:
        """Answer market-data requests for `symbol` with `code` (354 not subscribed, 10197 competing session)."""
        if code not in ERRORS:
            raise ValueError(f"no TWS text for error {code}")
        self._denied[symbol] = code

    def allow_market_data(self, symbol: str) -> None:
        self._denied.pop(symbol, None)

    def history_unavailable(self, duration: float) -> None:
        """Historical requests fail with 162 for `duration` seconds, as when the HMDS farm is down."""
        self._hmds_down_until = self._require_loop().time() + duration

    def history_unanswered(self, symbol: str, duration: float) -> None:
        """Historical requests for one contract get no answer at all for `duration` seconds (a request
        HMDS lost): only the client's own timeout ends them."""
        self._history_silent[symbol] = self._require_loop().time() + duration

    def prints(self, symbol: str) -> list[tuple[int, float, int]]:
        """Every print of a contract still on the tape: (epoch ms, price, size), oldest first."""
        return list(self._prints.get(symbol, ()))

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for tests and the bench: clients are API-started sockets, lines count reqMktData only."""
        return {
            "connections": self._connections,
            "clients": sum(1 for s in self._sessions if s.client_id is not None),
            "sockets": len(self._sessions),
            "active_lines": self._lines,
            "tick_by_tick": sum(len(s.tbt) for s in self._sessions),
            "messages_sent": self._messages_sent,
            "errors_sent": self._errors_sent,
            "ticks_sent": self._ticks_sent,
            "ticks_dropped": self._ticks_dropped,
            "requests": self._requests,
            "unhandled": self._unhandled,
            "listening": self._server is not None,
            "link_down": self._link_down,
            "farm_down": self._farm_down,
            "history_requests": self._history_requests,
            "trading": len(self._by_key) + len(self._warm),
        }

    # faults

    def _on_instant(self, fault: Fault, duration: float, symbol: str | None) -> None:
        self._require_loop()
        if fault is Fault.DROP:
            for s in list(self._sessions):
                s.close()
        elif fault is Fault.RESET:
            for s in list(self._sessions):
                s.reset()
        elif fault is Fault.RESTART:
            self._block_listen(duration)
            for s in list(self._sessions):
                s.close()
        elif fault is Fault.LINK_LOST:
            data_lost, self._next_link_data_lost = self._next_link_data_lost, True
            self._lose_link(duration, data_lost)

    def _lose_link(self, duration: float, data_lost: bool) -> None:
        loop = self._require_loop()
        if self._link_timer is not None:
            self._link_timer.cancel()
        if not self._link_down:
            self._link_down = True
            self._broadcast_error(1100)
        self._link_timer = loop.call_later(duration, self._restore_link, data_lost)

    def _restore_link(self, data_lost: bool) -> None:
        self._link_timer = None
        self._link_down = False
        for s in list(self._sessions):
            if s.client_id is None:
                continue
            if data_lost:
                for sub in (*s.mkt.values(), *s.tbt.values()):
                    self._remove_sub(sub)
                    s.forgotten.add(sub.req_id)
            s.error(-1, 1101 if data_lost else 1102)

    def _farm_restored(self) -> None:
        self._farm_timer = None
        self._farm_down = False
        self._broadcast_error(2104)

    def _broadcast_error(self, code: int) -> None:
        for s in list(self._sessions):
            if s.client_id is not None:
                s.error(-1, code)

    def _paused(self, key: str) -> bool:
        if self._link_down or self._farm_down:
            return True
        return self.faults.active(Fault.STALL, key) or self.faults.active(Fault.REJECT_SYMBOL, key)

    # sessions

    def _accepted(self, s: _Session) -> None:
        self._connections += 1
        self._live.add(s)
        self._idle.clear()
        if self.faults.active(Fault.REFUSE):
            # Injected straight into the FaultBox, so the listener is still up: refuse with an RST.
            s.reset()
            return
        self._sessions.add(s)

    def _lost(self, s: _Session) -> None:
        self._live.discard(s)
        if not self._live:
            self._idle.set()

    def _forget(self, s: _Session) -> None:
        self._sessions.discard(s)
        if s.client_id is not None and self._by_client_id.get(s.client_id) is s:
            del self._by_client_id[s.client_id]
        for sub in (*s.mkt.values(), *s.tbt.values()):
            self._remove_sub(sub)
        s.out.clear()

    def _handshake(self, s: _Session, text: str) -> bool:
        m = re.match(r"v(\d+)(?:\.\.(\d+))?", text.strip())
        if not m:
            s.close()
            return False
        low, high = int(m[1]), int(m[2] or m[1])
        version = min(self.server_version, high)
        if version < low:
            s.close()  # TWS hangs up on a client whose range it cannot speak
            return False
        s.version = version
        now = datetime.now(UTC).strftime("%Y%m%d %H:%M:%S")
        s.send(version, f"{now} UTC")
        return True

    def _dispatch(self, s: _Session, fields: list[str]) -> None:
        self._requests += 1
        try:
            msg_id = int(fields[0])
        except (ValueError, IndexError):
            s.error(-1, 320)
            return
        if s.client_id is None and msg_id != In.START_API:
            return  # TWS ignores requests before startApi
        handler = self._handlers.get(msg_id)
        if handler is None:
            self._unhandled += 1
            log.debug("TWS sim: unhandled message %s", fields[:3])
            return
        try:
            handler(s, fields)
        except (ValueError, IndexError):
            log.warning("TWS sim: malformed request %s", fields[:20])
            s.error(-1, 320)

    def _start_api(self, s: _Session, f: list[str]) -> None:
        if s.client_id is not None:
            return
        client_id = int(f[2])
        if client_id in self._by_client_id:
            s.error(-1, 326)
            s.close()
            return
        s.client_id = client_id
        self._by_client_id[client_id] = s
        s.send(Out.MANAGED_ACCTS, 1, ",".join(self.accounts))
        s.send(Out.NEXT_VALID_ID, 1, s.next_id)
        s.error(-1, 2103 if self._farm_down else 2104)
        s.error(-1, 2106)
        s.error(-1, 2158)
        if self._link_down:
            s.error(-1, 1100)

    # account: just enough for IB.connectAsync's startup sync and ib_async's 1102 re-request to finish

    def _accounts_for(self, name: str) -> tuple[str, ...]:
        return (name,) if name and name.upper() != "ALL" else self.accounts

    def _req_account_updates(self, s: _Session, f: list[str]) -> None:
        if f[2] != "1":  # unsubscribe
            return
        account = f[3] if len(f) > 3 and f[3] else self.accounts[0]
        for tag, value, currency in _ACCOUNT_VALUES:
            s.send(Out.ACCT_VALUE, 2, tag, value, currency, account)
        s.send(Out.ACCT_UPDATE_TIME, 1, datetime.now(UTC).strftime("%H:%M"))
        s.send(Out.ACCT_DOWNLOAD_END, 1, account)

    def _req_account_updates_multi(self, s: _Session, f: list[str]) -> None:
        req_id, model_code = int(f[2]), f[4]
        for account in self._accounts_for(f[3]):
            for tag, value, currency in _ACCOUNT_VALUES:
                s.send(Out.ACCOUNT_UPDATE_MULTI, 1, req_id, account, model_code, tag, value, currency)
        s.send(Out.ACCOUNT_UPDATE_MULTI_END, 1, req_id)

    def _req_account_summary(self, s: _Session, f: list[str]) -> None:
        req_id, tags = int(f[2]), set(f[4].split(","))
        for account in self.accounts:
            for tag, value, currency in _ACCOUNT_VALUES:
                if tag in tags:
                    s.send(Out.ACCOUNT_SUMMARY, 1, req_id, account, tag, value, currency)
        s.send(Out.ACCOUNT_SUMMARY_END, 1, req_id)

    # contracts

    def _resolve(self, q: ContractQuery) -> ContractSpec | None:
        specs = self.catalogue.match(q)
        if len(specs) != 1 or self.faults.active(Fault.REJECT_SYMBOL, specs[0].key):
            return None
        return specs[0]

    def _req_contract_details(self, s: _Session, f: list[str]) -> None:
        req_id = int(f[2])
        q = ContractQuery.parse(f, 3)
        specs = [x for x in self.catalogue.match(q) if not self.faults.active(Fault.REJECT_SYMBOL, x.key)]
        if not specs:
            s.error(req_id, 200)
            return
        for spec in specs:
            s.send(*_contract_data(req_id, spec, q.exchange.upper() or spec.exchange))
        s.send(Out.CONTRACT_DATA_END, 1, req_id)

    def _req_matching_symbols(self, s: _Session, f: list[str]) -> None:
        req_id, pattern = int(f[1]), f[2]
        hits = self.catalogue.search(pattern) if pattern else []
        fields: list[object] = [Out.SYMBOL_SAMPLES, req_id, len(hits)]
        for x in hits:
            fields += [x.con_id, x.symbol, x.sec_type, x.primary_exchange, x.currency, 0, x.long_name, ""]
        s.send(*fields)

    # market data

    def _req_mkt_data(self, s: _Session, f: list[str]) -> None:
        req_id = int(f[2])
        q = ContractQuery.parse(f, 3)
        i = 15
        if q.sec_type.upper() == "BAG":
            i += 1 + 4 * int(f[i])
        if f[i] == "1":  # delta-neutral contract follows
            i += 3
        i += 1
        generic = frozenset(g.strip() for g in f[i].split(",") if g.strip())
        snapshot = f[i + 1] == "1"
        spec = self._resolve(q)
        if spec is None:
            s.forgotten.add(req_id)
            s.error(req_id, 200)
            return
        if spec.key in self._denied:
            s.forgotten.add(req_id)
            s.error(req_id, self._denied[spec.key])
            return
        if snapshot:
            self._snapshot(s, req_id, spec, generic)
            return
        if req_id in s.mkt or req_id in s.tbt:
            s.error(req_id, 322)
            return
        if self._lines >= self.max_lines:
            s.forgotten.add(req_id)
            s.error(req_id, 101)
            return
        s.forgotten.discard(req_id)
        self._add_sub(_Sub(s, req_id, spec, _MKT, generic))

    def _cancel_mkt_data(self, s: _Session, f: list[str]) -> None:
        req_id = int(f[2])
        sub = s.mkt.get(req_id)
        if sub is not None:
            self._remove_sub(sub)
        elif req_id in s.forgotten:
            s.forgotten.discard(req_id)
        else:
            s.error(req_id, 300, f"{ERRORS[300]}{req_id}")

    def _req_tick_by_tick(self, s: _Session, f: list[str]) -> None:
        req_id = int(f[1])
        q = ContractQuery.parse(f, 2)
        kind = TICK_BY_TICK_TYPES.get(f[14])
        ignore_size = len(f) > 16 and f[16] == "1"
        if kind is None:
            s.error(req_id, 321)
            return
        spec = self._resolve(q)
        if spec is None:
            s.forgotten.add(req_id)
            s.error(req_id, 200)
            return
        if spec.key in self._denied:
            s.forgotten.add(req_id)
            s.error(req_id, self._denied[spec.key])
            return
        if req_id in s.mkt or req_id in s.tbt:
            s.error(req_id, 322)
            return
        if sum(len(x.tbt) for x in self._sessions) >= self.max_tick_by_tick:
            s.forgotten.add(req_id)
            s.error(req_id, 10190)
            return
        s.forgotten.discard(req_id)
        self._add_sub(_Sub(s, req_id, spec, kind, ignore_size=ignore_size))

    def _cancel_tick_by_tick(self, s: _Session, f: list[str]) -> None:
        req_id = int(f[1])
        sub = s.tbt.get(req_id)
        if sub is not None:
            self._remove_sub(sub)
        else:
            s.forgotten.discard(req_id)

    def _req_historical_ticks(self, s: _Session, f: list[str]) -> None:
        """reqHistoricalTicks (96) -> historicalTicksLast (98), TRADES only, from the contract's tape.

        Like IB: exactly one of start and end; at most 1000 ticks, but always whole seconds (the last
        second from a start, the first second before an end), so paging on second boundaries is exact.
        """
        self._history_requests += 1
        req_id = int(f[1])
        q = ContractQuery.parse(f, 2)
        start, end, count, what = f[15].strip(), f[16].strip(), int(f[17] or 0), f[18].strip().upper()
        spec = self._resolve(q)
        if spec is None:
            s.error(req_id, 200)
            return
        if self._loop is not None and self._loop.time() < self._hmds_down_until:
            s.error(req_id, 162, "Historical Market Data Service error message:HMDS server disconnect occurred")
            return
        if self._loop is not None and self._loop.time() < self._history_silent.get(spec.key, 0.0):
            return
        if what != "TRADES":
            s.error(req_id, 162, f"{ERRORS[162]} (the simulator keeps TRADES only, not {what or 'nothing'})")
            return
        # HMDS refuses bad parameters with 162, which ends the request (ib_async treats 321 as a warning).
        if bool(start) == bool(end):
            s.error(req_id, 162, "Historical Market Data Service error message:exactly one of start and end")
            return
        try:
            edge_ms = int(_parse_ib_time(start or end).timestamp() * 1000)
        except ValueError as exc:
            s.error(req_id, 162, f"Historical Market Data Service error message:{exc}")
            return
        count = min(max(count, 1), _HISTORY_MAX)
        self._touch(spec.key)
        tape = self._prints.get(spec.key, deque())
        if start:
            i = bisect.bisect_left(tape, edge_ms, key=lambda p: p[0])
            j = min(len(tape), i + count)
            while j < len(tape) and tape[j][0] // 1000 == tape[j - 1][0] // 1000:
                j += 1
        else:
            j = bisect.bisect_right(tape, edge_ms + 999, key=lambda p: p[0])
            i = max(0, j - count)
            while i > 0 and tape[i - 1][0] // 1000 == tape[i][0] // 1000:
                i -= 1
        ticks = [tape[k] for k in range(i, j)] if tape else []
        exchange = spec.primary_exchange or spec.exchange
        fields: list[object] = [Out.HISTORICAL_TICKS_LAST, req_id, len(ticks)]
        for ms, price, size in ticks:
            fields += [ms // 1000, 0, price, size, exchange, ""]
        fields.append(1)  # done
        s.send(*fields)

    def _req_market_data_type(self, s: _Session, f: list[str]) -> None:
        # The sim only has live data; like TWS it reports the type per subscription, echoing the request.
        s.md_type = int(f[2])
        for req_id in s.mkt:
            s.send(Out.MARKET_DATA_TYPE, 1, req_id, s.md_type)

    def _add_sub(self, sub: _Sub) -> None:
        s = sub.session
        self._warm.pop(sub.spec.key, None)
        self._by_key.setdefault(sub.spec.key, {})[sub] = None
        if sub.kind == _MKT:
            s.mkt[sub.req_id] = sub
            self._lines += 1
        else:
            s.tbt[sub.req_id] = sub
        if self._paused(sub.spec.key):
            self._unprimed[sub] = None  # the pump primes it once data flows again
        else:
            s.write_frames(self._prime(sub))
        self._wake.set()

    def _remove_sub(self, sub: _Sub) -> None:
        key = sub.spec.key
        subs = self._by_key.get(key)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._by_key[key]
                self._paused_keys.discard(key)
                if self.keep_trading > 0 and self._loop is not None:
                    self._warm[key] = self._loop.time() + self.keep_trading
        self._unprimed.pop(sub, None)
        table = sub.session.mkt if sub.kind == _MKT else sub.session.tbt
        if table.get(sub.req_id) is sub:
            del table[sub.req_id]
            if sub.kind == _MKT:
                self._lines -= 1

    def _touch(self, key: str) -> None:
        """A contract someone asks about trades on, subscribed or not (a polling client never subscribes)."""
        if key not in self._by_key and self.keep_trading > 0 and self._loop is not None:
            if key not in self._warm:
                self._wake.set()
            self._warm[key] = self._loop.time() + self.keep_trading

    def _snapshot(self, s: _Session, req_id: int, spec: ContractSpec, generic: frozenset[str]) -> None:
        # A snapshot of a paused contract still ends (TWS gives up after ~11 s); it just carries no prices.
        self._touch(spec.key)
        frames = self._prelude(req_id, spec, s.md_type)
        if not self._paused(spec.key):
            frames += [tick_frame(h, req_id, r) for h, r in self._state(self._tapes[spec.key], generic)]
        frames.append(frame(Out.TICK_SNAPSHOT_END, 1, req_id))
        s.write_frames(frames)

    @staticmethod
    def _prelude(req_id: int, spec: ContractSpec, md_type: int) -> list[bytes]:
        return [
            tick_frame(_REQ_PARAMS, req_id, f"{spec.min_tick}\x009c0001\x003\x00"),
            tick_frame(_MD_TYPE, req_id, f"{md_type}\x00"),
        ]

    def _prime(self, sub: _Sub) -> list[bytes]:
        """What TWS sends when a subscription starts: parameters, then the current picture."""
        sub.primed = True
        tape = self._tapes[sub.spec.key]
        rid = sub.req_id
        if sub.kind == _MKT:
            frames = self._prelude(rid, sub.spec, sub.session.md_type)
            frames += [tick_frame(h, rid, r) for h, r in self._state(tape, sub.generic)]
        elif sub.kind == 3:
            frames = [tick_frame(_TBT, rid, _bid_ask(tape, int(time.time())))]
        elif sub.kind == 4:
            frames = [tick_frame(_TBT, rid, f"4\x00{int(time.time())}\x00{_mid(tape)}\x00")]
        else:
            frames = []
        self._ticks_sent += len(frames)
        return frames

    @staticmethod
    def _state(t: _Tape, generic: frozenset[str]) -> list[tuple[str, str]]:
        out = [
            (_PRICE, f"1\x00{t.bid}\x00{t.bid_size}\x000\x00"),
            (_PRICE, f"2\x00{t.ask}\x00{t.ask_size}\x000\x00"),
        ]
        if not t.spec.is_cash and t.last_ms:
            out += [
                (_PRICE, f"4\x00{t.last}\x00{t.last_size}\x000\x00"),
                (_STRING, f"45\x00{t.last_ms // 1000}\x00"),
                (_SIZE, f"8\x00{t.volume}\x00"),
            ]
        out += [
            (_PRICE, f"6\x00{t.high}\x000\x000\x00"),
            (_PRICE, f"7\x00{t.low}\x000\x000\x00"),
            (_PRICE, f"9\x00{t.close}\x000\x000\x00"),
            (_PRICE, f"14\x00{t.open}\x000\x000\x00"),
        ]
        if not t.spec.is_cash:
            if "233" in generic and t.last_ms:
                out.append((_STRING, _rt_volume(t)))
            if "236" in generic:
                out += [(_GENERIC, "46\x003.0\x00"), (_SIZE, "89\x0050000000\x00")]
            if "293" in generic:
                out.append((_GENERIC, f"54\x00{t.count}\x00"))
        return out

    def _open_tape(self, spec: ContractSpec) -> _Tape:
        st = self.market.add(spec.key, spec.price)
        t = _Tape(spec, open=st.open, close=st.open, high=st.open, low=st.open)
        self._advance(t, int(time.time() * 1000))  # a first print, so snapshots have a last price
        return t

    def _advance(self, t: _Tape, now_ms: int) -> None:
        spec = t.spec
        trade, _ = self.market.trade(spec.key, now_ms)
        (bp, bq), (ap, aq) = self.market.best(spec.key)
        lot = spec.lot
        t.bid, t.bid_size, t.ask, t.ask_size = bp, max(1, round(bq * lot)), ap, max(1, round(aq * lot))
        if spec.is_cash:  # IDEALPRO has no prints; the range follows the midpoint
            mid = _mid(t)
            t.high, t.low = max(t.high, mid), min(t.low, mid)
            return
        size = max(1, round(trade.qty * lot))
        t.last, t.last_size, t.last_ms = trade.price, size, now_ms
        tape = self._prints.get(spec.key)
        if tape is None:
            tape = self._prints[spec.key] = deque(maxlen=self._history)
        tape.append((now_ms, trade.price, size))
        t.volume += size
        t.notional += trade.price * size
        t.count += 1
        t.high, t.low = max(t.high, trade.price), min(t.low, trade.price)

    # the pump

    def _reset_clock(self) -> None:
        self._t0 = self._loop.time() if self._loop is not None else 0.0
        self._steps = 0

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        self._reset_clock()
        while True:
            if self._warm:
                now = loop.time()
                for key in [k for k, until in self._warm.items() if until <= now]:
                    del self._warm[key]
            if not self._by_key and not self._warm:
                self._wake.clear()
                await self._wake.wait()
                self._reset_clock()
            self._wake.clear()
            if self._unprimed:
                self._prime_pending()
            due = 0
            if self._rate > 0:
                due = int((loop.time() - self._t0) * self._rate) - self._steps
            if due > 0:
                budget = max(1, self.BATCH // max(1, len(self._by_key) + len(self._warm)))
                if due > budget:  # behind: skip the backlog, as TWS conflates, rather than burst
                    self._steps += due - budget
                    due = budget
                now_ms = int(time.time() * 1000)
                for _ in range(due):
                    self._step(now_ms)
                self._steps += due
            self._flush()
            if due > 0:
                await asyncio.sleep(0)
                continue
            wait = 0.05
            if self._rate > 0:
                wait = min(wait, (self._steps + 1) / self._rate - (loop.time() - self._t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))

    def _prime_pending(self) -> None:
        for sub in list(self._unprimed):
            if not self._paused(sub.spec.key):
                del self._unprimed[sub]
                sub.session.out += self._prime(sub)

    def _flush(self) -> None:
        for s in self._sessions:
            if s.out:
                s.write_frames(s.out)
                s.out = []

    def _step(self, now_ms: int) -> None:
        tapes = self._tapes
        for key, subs in self._by_key.items():
            if self._paused(key):
                # The market goes on while TWS holds data back: those prints reach history only.
                self._paused_keys.add(key)
                self._advance(tapes[key], now_ms)
                continue
            if key in self._paused_keys:
                self._paused_keys.discard(key)
                self._reprime(tapes[key], subs)
            self._emit(tapes[key], subs, now_ms)
        for key in self._warm:
            self._advance(tapes[key], now_ms)

    def _reprime(self, t: _Tape, subs: dict[_Sub, None]) -> None:
        """Data flows again after a pause: TWS refreshes the whole quote, not only what moves next."""
        for sub in subs:
            if sub.kind == _MKT and sub.primed and not sub.session.closed:
                frames = [tick_frame(h, sub.req_id, r) for h, r in self._state(t, sub.generic)]
                sub.session.out += frames
                self._ticks_sent += len(frames)

    def _emit(self, t: _Tape, subs: dict[_Sub, None], now_ms: int) -> None:
        """Advance one contract by one print and fan the changes out to its subscribers."""
        old_bid, old_bid_size, old_ask, old_ask_size, old_mid = t.bid, t.bid_size, t.ask, t.ask_size, _mid(t)
        old_high, old_low = t.high, t.low
        self._advance(t, now_ms)
        bid_moved, ask_moved = t.bid != old_bid, t.ask != old_ask
        sizes_moved = t.bid_size != old_bid_size or t.ask_size != old_ask_size
        cash = t.spec.is_cash

        mkt: list[tuple[str, str]] = []
        if bid_moved:
            mkt.append((_PRICE, f"1\x00{t.bid}\x00{t.bid_size}\x000\x00"))
        elif t.bid_size != old_bid_size:
            mkt.append((_SIZE, f"0\x00{t.bid_size}\x00"))
        if ask_moved:
            mkt.append((_PRICE, f"2\x00{t.ask}\x00{t.ask_size}\x000\x00"))
        elif t.ask_size != old_ask_size:
            mkt.append((_SIZE, f"3\x00{t.ask_size}\x00"))
        if not cash:
            mkt += [
                (_PRICE, f"4\x00{t.last}\x00{t.last_size}\x000\x00"),
                (_STRING, f"45\x00{now_ms // 1000}\x00"),
                (_SIZE, f"8\x00{t.volume}\x00"),
            ]
        if t.high != old_high:
            mkt.append((_PRICE, f"6\x00{t.high}\x000\x000\x00"))
        if t.low != old_low:
            mkt.append((_PRICE, f"7\x00{t.low}\x000\x000\x00"))
        rt_volume = None if cash else (_STRING, _rt_volume(t))
        trade_count = None if cash else (_GENERIC, f"54\x00{t.count}\x00")

        secs = now_ms // 1000
        last_rest = f"{secs}\x00{t.last}\x00{t.last_size}\x000\x00{t.spec.primary_exchange}\x00\x00"
        bid_ask = _bid_ask(t, secs)
        mid = _mid(t)
        malformed = self.faults.active(Fault.MALFORMED, t.spec.key)

        sent = dropped = 0
        for sub in subs:
            s = sub.session
            if not sub.primed or s.closed:
                continue
            if s.write_paused:
                dropped += 1
                continue
            rid, kind, out = sub.req_id, sub.kind, s.out
            if malformed:  # a tickPrice one field short: ib_async's decoder logs and skips it
                out.append(tick_frame(_PRICE, rid, "1\x00garbage\x00\x00"))
                sent += 1
            elif kind == _MKT:
                for head, rest in mkt:
                    out.append(tick_frame(head, rid, rest))
                sent += len(mkt)
                if rt_volume is not None and "233" in sub.generic:
                    out.append(tick_frame(rt_volume[0], rid, rt_volume[1]))
                    sent += 1
                if trade_count is not None and "293" in sub.generic:
                    out.append(tick_frame(trade_count[0], rid, trade_count[1]))
                    sent += 1
            elif kind <= 2:
                if not cash:
                    out.append(tick_frame(_TBT, rid, f"{kind}\x00{last_rest}"))
                    sent += 1
            elif kind == 3:
                if bid_moved or ask_moved or (sizes_moved and not sub.ignore_size):
                    out.append(tick_frame(_TBT, rid, bid_ask))
                    sent += 1
            elif mid != old_mid:
                out.append(tick_frame(_TBT, rid, f"4\x00{secs}\x00{mid}\x00"))
                sent += 1
        self._ticks_sent += sent
        self._ticks_dropped += dropped


def _parse_ib_time(text: str) -> datetime:
    """TWS date-times: "20240102 15:04:05 UTC", "20240102-15:04:05" (UTC) or with a zone such as US/Eastern.

    A bare "20240102 15:04:05" means TWS's login time zone; the simulator's is UTC.
    """
    m = re.fullmatch(r"(\d{8})[ -](\d{2}:\d{2}:\d{2})(?: +(\S+))?", text.strip())
    if not m:
        raise ValueError(f"unparsable date-time {text!r}")
    zone: tzinfo = UTC
    if m[3] and m[3].upper() not in ("UTC", "GMT"):
        try:
            zone = ZoneInfo(m[3])
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {m[3]!r}") from exc
    return datetime.strptime(f"{m[1]} {m[2]}", "%Y%m%d %H:%M:%S").replace(tzinfo=zone)


def _mid(t: _Tape) -> float:
    return round((t.bid + t.ask) / 2, 10)


def _bid_ask(t: _Tape, secs: int) -> str:
    return f"3\x00{secs}\x00{t.bid}\x00{t.ask}\x00{t.bid_size}\x00{t.ask_size}\x000\x00"


def _rt_volume(t: _Tape) -> str:
    return f"48\x00{t.last};{t.last_size};{t.last_ms};{t.volume};{t.vwap:.8f};true\x00"


def _contract_data(req_id: int, c: ContractSpec, exchange: str) -> list[object]:
    """contractData (10) in the server-version >= 164 layout ib_async's decoder unpacks."""
    today = datetime.now(UTC).date()
    days = [(today + timedelta(days=i)).strftime("%Y%m%d") for i in range(-1, 3)]
    if c.is_cash:
        trading = ";".join(f"{a}:1715-{b}:1700" for a, b in itertools.pairwise(days))
        liquid = trading
    else:
        trading = ";".join(f"{d}:0400-{d}:2000" for d in days[1:])
        liquid = ";".join(f"{d}:0930-{d}:1600" for d in days[1:])
    n_rules = len(c.valid_exchanges.split(","))
    rules = ",".join(["239" if c.is_cash else "26"] * n_rules)
    return [
        Out.CONTRACT_DATA,
        req_id,
        c.symbol,
        c.sec_type,
        "",  # lastTradeDateOrContractMonth
        "0",  # strike
        "",  # right
        exchange,
        c.currency,
        c.local_symbol,
        c.local_symbol if c.is_cash else c.trading_class,  # marketName
        c.trading_class,
        c.con_id,
        c.min_tick,
        "",  # multiplier
        c.order_types(),
        c.valid_exchanges,
        1,  # priceMagnifier
        0,  # underConId
        c.long_name,
        c.primary_exchange,
        "",  # contractMonth
        c.industry,
        c.category,
        "",  # subcategory
        c.time_zone,
        trading,
        liquid,
        "",  # evRule
        "",  # evMultiplier
        0,  # secIdList count
        1 if c.is_cash else 4,  # aggGroup
        "",  # underSymbol
        "",  # underSecType
        rules,
        "",  # realExpirationDate
        "" if c.is_cash else ("ETF" if c.industry == "Funds" else "COMMON"),
        "1" if c.is_cash else "0.0001",  # minSize
        "1" if c.is_cash else "0.0001",  # sizeIncrement
        "1" if c.is_cash else "100",  # suggestedSizeIncrement
    ]


def venue_snippet(host: str, port: int, client_id: int = 1) -> str:
    """The feeds.yaml fragment that points the IB adapter at this simulator."""
    return (
        f"# feedrunner TWS simulator on {host}:{port}\n"
        "venues:\n"
        "  ib:\n"
        "    kind: ib\n"
        f"    host: {host}\n"
        f"    port: {port}\n"
        f"    client_id: {client_id}\n"
    )


async def run_standalone(host: str, port: int, seed: int, rate: float) -> None:
    """Serve until cancelled (Ctrl-C); prints where to point feeds.yaml first."""
    async with TwsSim(seed=seed, rate=rate, host=host, port=port) as sim:
        print(venue_snippet(sim.host, sim.port), flush=True)
        await asyncio.Event().wait()
