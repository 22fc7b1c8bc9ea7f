"""The HTTP server: the status page at /, /metrics /healthz /readyz /status /status/latency /config,
POST /rollout/{action} and POST /reload.

What it serves comes from a Backend (a runner's, or a supervisor's merging its workers'), so the same
guards stand in front of either: the server knows requests, never what answers them.

Binds where server.listen says (loopback by default). Every request passes, in order:
- Host: it must name the listen address (127.0.0.1, localhost and [::1] are equivalent on loopback) or
  an entry of server.allowed_hosts, else 421; a page on another site that rebinds its DNS name to us
  (DNS rebinding) is refused. The probes answer any Host, since Kubernetes probes send the pod IP, which
  no config can list; to a Host not allowed they answer with the status code alone, so a rebinding page
  learns nothing of the reasons (sink paths, venue errors).
- Origin: present and not this server's own origin (http[s]://<Host>): 403, so no other site's page
  drives it (CSRF).
- the bearer token, when one is set (not on the probes): `Authorization: Bearer <token>`, the scheme in
  any case, compared as bytes in constant time; anything else 401.
- anything but GET and HEAD (every call that changes state) needs a non-empty `X-Feedrunner` header
  (the CLI and the page send `X-Feedrunner: 1`), which no HTML form or simple cross-site request can
  send: 403 without it. With no token, it must also come through a loopback Host: a page reached through
  a proxy under another name (server.allowed_hosts) is read-only, since anyone who can reach the proxy
  could otherwise steer.
The page and its two assets need no token (they hold no data: the page asks for the token and sends it
with each call); they forbid framing (no clickjacking of the steering buttons) and load nothing foreign.
Connections are bounded too: server.max_connections at once (one more gets 503 and is closed) and
server.header_timeout to send a complete request head (408 and closed), so slow clients cannot hold it.
Every refusal is one log line and a count in feedrunner_http_rejected_total{reason}; aiohttp's own
reports (unparseable requests) and handler errors come through here as one line too, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from feedrunner import page
from feedrunner.plan import FINGERPRINT_BUDGET, fingerprint
from feedrunner.spec import Server

SHUTDOWN_TIMEOUT = 2.0  # seconds requests in progress get at stop (aiohttp's 60 would outlast the deadline)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PAGE_PATHS = frozenset({"/", *page.ASSETS})  # need the Host check, not the token
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_HEADER = "X-Feedrunner"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
MAX_BODY = 64 * 1024  # the largest body any endpoint reads (a list of secrets to fingerprint)
MAX_FINGERPRINTS = 64  # per request
LATENCY_WINDOW_MAX = 3600  # seconds of latency series /status/latency returns at most
LATENCY_POINTS_MAX = 720  # points per series


class Backend(Protocol):
    """What the control server answers with. `server` and `registry` are read once, at construction."""

    server: Server
    registry: CollectorRegistry  # where the server counts its refusals (feedrunner_http_rejected_total)

    async def metrics(self) -> bytes:
        """The Prometheus text exposition."""
        ...

    async def not_ready(self) -> list[str]:
        """Why /readyz answers 503; empty when ready."""
        ...

    async def status(self) -> dict[str, Any]: ...

    async def latency(self, window: int, step: int) -> dict[str, Any]:
        """Per venue, per transport: [start second, p50, p99, samples] per step of the last window."""
        ...

    async def reload(self) -> tuple[str, list[dict[str, Any]], list[str]]:
        """(result: applied | unchanged | invalid, changes, problems) of reloading feeds.yaml."""
        ...

    async def config(self) -> dict[str, Any]:
        """The running spec as JSON data, secrets fingerprinted (feedrunner.plan.spec_to_dict)."""
        ...

    async def rollout(self, action: str, full: bool) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of a rollout action."""
        ...


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str, indent=1), status=status, content_type="application/json", headers=headers
    )


def _authority(text: str) -> tuple[str, int | None] | None:
    """`host[:port]` (IPv6 in brackets) -> (lowercased host, port or None); None when malformed."""
    text = text.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text.partition("]")
        name += bracket
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
    if not name or (port_text is not None and not (port_text.isdigit() and int(port_text) <= 65535)):
        return None
    return name, int(port_text) if port_text is not None else None


def _is_local(host: str) -> bool:
    """Loopback, or every address (which includes loopback)."""
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _one_line(text: str, limit: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit].encode("ascii", "backslashreplace").decode()


class _AiohttpLog(logging.Handler):
    """aiohttp reports a request it cannot parse (bad header bytes, an oversized line, a bad method) to
    its logger, with a traceback: it becomes one line of ours instead."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__(logging.DEBUG)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        peer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "-"
        detail = _one_line(str(getattr(exc, "message", "") or exc or record.getMessage()))
        reason = "malformed" if isinstance(exc, HttpProcessingError) else "error"
        self.server.reject(reason, peer, f"{type(exc).__name__ if exc else record.getMessage()}: {detail}")


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a deadline for its first request head (aiohttp's
    keepalive_timeout, set to the same value, bounds the heads of the requests after it)."""

    def __init__(self, server: ControlServer, inner: asyncio.Protocol) -> None:
        self.server, self.inner = server, inner
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.tail = b""
        # Armed here, not in connection_made: a connection that never gets there is still released.
        self.deadline: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            server.spec.header_timeout, self._expire
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "-"
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:
            seen = self.tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # the head is complete
                self.deadline.cancel()
                self.deadline = None
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.server.released(self)
        self.inner.connection_lost(exc)

    def _expire(self) -> None:
        self.deadline = None
        if self.transport is None:  # accepted but never connected
            self.server.released(self)
            return
        if self.transport.is_closing():
            return
        self.server.reject(
            "header_timeout", self.peer, f"no complete request head within {self.server.spec.header_timeout:g}s"
        )
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()


class _Refused(asyncio.Protocol):
    """A connection beyond server.max_connections: answered 503 and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = b'{"error": "too many connections"}'
        transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.close()


class ControlServer:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.spec = backend.server
        self._app_runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._refused = 0  # connections refused since the cap was last reached
        self._own: set[tuple[str, int]] = set()
        self._fingerprinted: list[tuple[float, int]] = []  # (when, how many) over the last minute
        self.port = 0
        self.rejected = Counter(
            "feedrunner_http_rejected_total",
            "Control server requests and connections refused, by reason.",
            ["reason"],
            registry=backend.registry,
        )
        self._aiohttp_log = logging.Logger("feedrunner.control.aiohttp", logging.DEBUG)
        self._aiohttp_log.propagate = False
        self._aiohttp_log.addHandler(_AiohttpLog(self))

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY, logger=self._aiohttp_log)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/", self._page)
        for asset in page.ASSETS:
            app.router.add_get(asset, self._asset)
        app.router.add_get("/status", self._status)
        app.router.add_get("/status/latency", self._latency)
        app.router.add_post("/rollout/{action}", self._rollout)
        app.router.add_post("/reload", self._reload)
        app.router.add_get("/config", self._config)
        app.router.add_post("/config/fingerprints", self._fingerprints)
        timeout = self.spec.header_timeout
        self._app_runner = web.AppRunner(
            app,
            access_log=None,
            logger=self._aiohttp_log,
            keepalive_timeout=timeout,
            lingering_time=timeout,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await self._app_runner.setup()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._accept, self.spec.host, self.spec.port, reuse_address=True)
        sockets = self._listener.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.spec.port
        host = self.spec.host.lower()
        names = {f"[{host}]" if ":" in host else host}
        if _is_local(host):
            names |= set(LOOPBACK_NAMES)
        self._own = {(n, self.port) for n in names}
        logger.info("control server on http://{}:{}", self.spec.host, self.port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._app_runner is not None:
            await self._app_runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()

    # -- connections ---------------------------------------------------------------------------------

    def _accept(self) -> asyncio.Protocol:
        assert self._app_runner is not None and self._app_runner.server is not None
        if len(self._connections) >= self.spec.max_connections:
            if not self._refused:
                logger.warning("control server: {} connections open (the cap): refusing more", len(self._connections))
            self._refused += 1
            self.rejected.labels("connection_cap").inc()
            return _Refused()
        conn = _Connection(self, self._app_runner.server())
        self._connections.add(conn)
        return conn

    def released(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if self._refused and len(self._connections) < self.spec.max_connections:
            logger.warning("control server: accepting again; {} connection(s) refused at the cap", self._refused)
            self._refused = 0

    def reject(self, reason: str, peer: str, detail: str) -> None:
        """One line and one count per refused request or connection."""
        self.rejected.labels(reason).inc()
        logger.bind(reason=reason, peer=peer).warning("control server: refused {} from {}: {}", reason, peer, detail)

    # -- requests ------------------------------------------------------------------------------------

    def _host_allowed(self, host: tuple[str, int | None]) -> bool:
        name, port = host
        if (name, port or 80) in self._own:
            return True
        for entry in self.spec.allowed_hosts:
            if entry == "*":
                return True
            wanted = _authority(entry)
            if wanted is not None and wanted[0] == name and wanted[1] in (None, port or 80):
                return True
        return False

    def _refusal(self, request: web.Request) -> tuple[str, int, str] | None:
        """(reason, status, message) when the request is refused, else None."""
        hosts = request.headers.getall("Host", [])
        host = _authority(hosts[0]) if len(hosts) == 1 else None
        if request.path not in OPEN_PATHS and not self._named(request):
            return "host", 421, "this server does not answer for that Host"
        origin = request.headers.get("Origin")
        if origin is not None:
            scheme, sep, rest = origin.partition("://")
            theirs = _authority(rest) if sep and scheme.lower() in ("http", "https") else None
            default = 443 if scheme.lower() == "https" else 80
            same = (
                theirs is not None
                and host is not None
                and theirs[0] == host[0]
                and (theirs[1] or default) == (host[1] or default)
            )
            if not same:
                return "origin", 403, "cross-origin requests are refused"
        token = self.spec.token
        if token is not None and request.path not in OPEN_PATHS | PAGE_PATHS:
            scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
            given = credentials.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
            # compare_digest always runs, so a bare token or another scheme costs the same as a wrong one.
            if not hmac.compare_digest(given, token.reveal().encode("utf-8", "surrogateescape")):
                return "auth", 401, "missing or wrong bearer token"
        if request.method not in SAFE_METHODS:
            if not request.headers.get(CSRF_HEADER):
                return "csrf", 403, f"a {request.method} needs the header {CSRF_HEADER}: 1"
            if not self.steerable(request):
                return "read_only", 403, "steering through a proxied Host needs server.token"
        return None

    def steerable(self, request: web.Request) -> bool:
        """May this request change state? With a token, whoever has it; without, only through loopback."""
        host = _authority(request.headers.get("Host", ""))
        return self.spec.token is not None or (host is not None and host[0] in LOOPBACK_NAMES)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.remote or "-"
        refusal = self._refusal(request)
        if refusal is not None:
            reason, status, message = refusal
            self.reject(reason, peer, f"{request.method} {request.path}: {message}")
            return _json({"error": message}, status)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status in (400, 405, 413):  # unreadable body, unknown method, oversized body
                self.reject("malformed", peer, f"{request.method} {request.path}: {exc.status} {exc.reason}")
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _json({"error": exc.reason}, exc.status, headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.rejected.labels("error").inc()
            what = f"{type(exc).__name__}: {_one_line(str(exc))}"
            logger.bind(reason="error", peer=peer).error(
                "control server: {} {} failed: {}", request.method, request.path, what
            )
            return _json({"error": "internal error; see the log"}, 500)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.backend.metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = await self.backend.not_ready()
        status = 200 if not problems else 503
        if not self._named(request):
            return web.Response(status=status)
        return _json({"ready": not problems, "problems": problems}, status)

    def _named(self, request: web.Request) -> bool:
        """Does the request's Host name this server (what every path but the probes requires)?"""
        hosts = request.headers.getall("Host", [])
        host = _authority(hosts[0]) if len(hosts) == 1 else None
        return host is not None and self._host_allowed(host)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(await self.backend.status())

    async def _latency(self, request: web.Request) -> web.Response:
        """Latency p50/p99 per venue and transport over a recent window, for the page's charts."""
        try:
            window = int(request.query.get("window", "300"))
            step = int(request.query.get("step", "5"))
        except ValueError:
            raise web.HTTPBadRequest(reason="window and step are whole seconds") from None
        if not (1 <= window <= LATENCY_WINDOW_MAX and 1 <= step and window / step <= LATENCY_POINTS_MAX):
            raise web.HTTPBadRequest(
                reason=f"window is 1-{LATENCY_WINDOW_MAX}s and at most {LATENCY_POINTS_MAX} steps of it"
            )
        series = await self.backend.latency(window, step)
        return _json({"window": window, "step": step, "now": time.time(), "venues": series})

    async def _page(self, request: web.Request) -> web.Response:
        html = page.render(steer=self.steerable(request), token=self.spec.token is not None)
        return web.Response(text=html, content_type="text/html", headers=page.HEADERS)

    async def _asset(self, request: web.Request) -> web.Response:
        body, content_type = page.asset(request.path)
        return web.Response(body=body, content_type=content_type, headers=page.HEADERS)

    async def _reload(self, request: web.Request) -> web.Response:
        result, changes, problems = await self.backend.reload()
        body = {"result": result, "changes": changes, "problems": problems}
        return _json(body, 422 if result == "invalid" else 200)

    async def _config(self, request: web.Request) -> web.Response:
        return _json(await self.backend.config())

    async def _fingerprints(self, request: web.Request) -> web.Response:
        """This process's fingerprints of the values given: how `plan` compares a file's secrets."""
        try:
            body = await asyncio.wait_for(request.json(), self.spec.header_timeout)
        except (TimeoutError, ValueError):
            raise web.HTTPBadRequest(reason='the body must be JSON: {"values": ["..."]}') from None
        values = body.get("values") if isinstance(body, dict) else None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise web.HTTPBadRequest(reason='the body must be JSON: {"values": ["..."]}')
        if len(values) > MAX_FINGERPRINTS:
            raise web.HTTPBadRequest(reason=f"at most {MAX_FINGERPRINTS} values per request")
        now = time.monotonic()
        self._fingerprinted = [(t, n) for t, n in self._fingerprinted if now - t < 60]
        if sum(n for _, n in self._fingerprinted) + len(values) > FINGERPRINT_BUDGET:
            self.reject("rate_limited", request.remote or "-", f"more than {FINGERPRINT_BUDGET} fingerprints a minute")
            return _json({"error": f"at most {FINGERPRINT_BUDGET} fingerprints a minute"}, 429, {"Retry-After": "60"})
        self._fingerprinted.append((now, len(values)))
        return _json({"fingerprints": [fingerprint(v) for v in values]})

    async def _rollout(self, request: web.Request) -> web.Response:
        full = request.query.get("full", "") in ("1", "true", "yes")
        status, body = await self.backend.rollout(request.match_info["action"], full)
        return _json(body, status)
