"""The control server against hostile clients: secrets in /config, Host/Origin/CSRF, auth, slow clients.

A real ControlServer on 127.0.0.1:0 and real sockets, over the RunnerApi a runner gives it; the runner
behind that is the small set of calls the API makes (spec, metrics, status, readiness, rollout actions),
so each test starts in milliseconds and drives the server with exactly the bytes a browser, a scanner or
a slow client sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from feedrunner.cli import main
from feedrunner.control import ControlServer
from feedrunner.controlapi import RunnerApi
from feedrunner.health import Health, Series
from feedrunner.metrics import Metrics
from feedrunner.spec import check_text

BASE = """\
version: 1
environment: live
venues:
  binance:
    adapter: ccxt
    exchange: binance
    symbols: [BTC/USDT]
    endpoints: {endpoints}
server: {server}
state: {state}
"""
PG_STATE = '{url: "postgresql://feeder:${PGPASSWORD}@db.internal/feeds"}'


class Rollout:
    """Records the actions it was asked for."""

    def __init__(self) -> None:
        self.acted: list[tuple[str, bool]] = []


class Runner:
    def __init__(self, spec: Any) -> None:
        self.spec = self.source_spec = spec
        self.metrics = Metrics()
        self.rollout = Rollout()
        self.fail_status = False
        self.health = Health()
        self.adapters: dict[str, Any] = {}

    def refresh_gauges(self) -> None:
        pass

    def not_ready(self) -> list[str]:
        return []

    def rollout_act(self, action: str, full: bool = False) -> tuple[int, dict[str, Any]]:
        self.rollout.acted.append((action, full))
        return 200, {"acted": len(self.rollout.acted)}

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status broke")
        return {"ok": True}

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("feedrunner_http_rejected_total", {"reason": reason}) or 0.0


def spec_of(server: str = '{listen: "127.0.0.1:0"}', state: str = "{}", endpoints: str = "{}", env=None) -> Any:
    text = BASE.format(server=server, state=state, endpoints=endpoints)
    spec, problems = check_text(text, "feeds.yaml", env or {})
    assert spec is not None, [str(p) for p in problems]
    return spec


@asynccontextmanager
async def serving(spec: Any) -> AsyncIterator[tuple[ControlServer, Runner]]:
    runner = Runner(spec)
    control = ControlServer(RunnerApi(runner))  # type: ignore[arg-type]
    await control.start()
    try:
        yield control, runner
    finally:
        await control.stop()


async def answer(port: int, head: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes), return (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    head_block, _, body = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in head_block.split(b"\r\n") if b": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def exchange(port: int, head: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    status, _, body = await answer(port, head, timeout)
    return status, body


def request(port: int, method: str = "GET", path: str = "/status", host: str | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if method == "POST":
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- /config and fingerprints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "endpoints", "env", "hidden", "shown"),
    [
        (PG_STATE, "{}", {"PGPASSWORD": "pg-pass-9"}, "pg-pass-9", None),
        ('{url: "sqlite:///file:state.db?mode=rwc&password=lit3ral-pw"}', "{}", {}, "lit3ral-pw", "password=***"),
        ("{}", '{rest: "https://feeder:lit3ral-pw@api.example/v3"}', {}, "lit3ral-pw", "https://feeder:***@api.ex"),
        ("{}", '{rest: "https://${API_HOST}/v3"}', {"API_HOST": "private.gw.example"}, "private.gw.example", None),
    ],
)
async def test_config_shows_no_interpolated_value_and_no_url_password(state, endpoints, env, hidden, shown):
    async with serving(spec_of(state=state, endpoints=endpoints, env=env)) as (control, _):
        status, body = await exchange(control.port, request(control.port, path="/config"))
    assert status == 200
    assert hidden.encode() not in body
    config = json.loads(body)
    if shown is not None:
        assert shown in json.dumps(config)
    else:  # the interpolated value shows as a fingerprint only
        assert "secret:" in json.dumps([config["state_url"], config["venues"]["binance"]["endpoints"]])


def test_url_passwords_are_masked_wherever_they_are():
    from feedrunner.plan import mask_url

    assert mask_url("postgresql://u:p/a@h:5432/db") == "postgresql://u:***@h:5432/db"  # SQLAlchemy's reading
    assert mask_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert mask_url("https://h/hook?x=1&Token=abc&y=2") == "https://h/hook?x=1&Token=***&y=2"
    assert mask_url("http://127.0.0.1:8901") == "http://127.0.0.1:8901"
    assert mask_url("not a url: a:b@c") == "not a url: a:b@c"


async def test_fingerprints_are_keyed_per_process_and_plan_asks_the_runner(tmp_path, monkeypatch, capsys):
    server = '{listen: "127.0.0.1:0", token: "${FEEDRUNNER_TOKEN}"}'
    state = PG_STATE
    env = {"FEEDRUNNER_TOKEN": "tok-1234", "PGPASSWORD": "pg-pass-9"}
    async with serving(spec_of(server=server, state=state, env=env)) as (control, _):
        auth = {"Authorization": "Bearer tok-1234"}
        status, body = await exchange(control.port, request(control.port, path="/config", **auth))
        assert status == 200
        shown = json.loads(body)["server"]["token"]
        assert shown.startswith("secret:")
        assert hashlib.sha256(b"tok-1234").hexdigest()[:12] not in shown  # not an unkeyed hash: not guessable
        code = "from feedrunner.plan import fingerprint; print(fingerprint('tok-1234'))"
        other = await asyncio.to_thread(subprocess.check_output, [sys.executable, "-c", code], text=True)
        assert other.strip() != shown  # another process, another key

        feeds = tmp_path / "feeds.yaml"
        feeds.write_text(BASE.format(server=server, state=state, endpoints="{}"))
        url = f"http://127.0.0.1:{control.port}"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert await asyncio.to_thread(main, ["plan", str(feeds), "--url", url]) == 0  # the same secrets match
        # A rotated token in the file; plan authenticates with the running one (FEEDRUNNER_TOKEN).
        feeds.write_text(BASE.format(server=server.replace("FEEDRUNNER", "NEW"), state=state, endpoints="{}"))
        monkeypatch.setenv("NEW_TOKEN", "tok-rotated")
        assert await asyncio.to_thread(main, ["plan", str(feeds), "--url", url, "--json"]) == 2
    changes = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [c["target"] for c in changes] == ["server"]  # the token changed, the state password did not


async def test_fingerprints_need_the_same_checks_as_any_post_and_are_budgeted():
    async with serving(spec_of()) as (control, runner):
        port = control.port

        def ask(n: int, **headers: str) -> bytes:
            body = json.dumps({"values": [f"guess-{i}" for i in range(n)]}).encode()
            head = request(port, "POST", "/config/fingerprints", **headers).replace(
                b"Content-Length: 0", b"Content-Type: application/json\r\nContent-Length: %d" % len(body)
            )
            return head + body

        assert (await exchange(port, ask(1)))[0] == 403  # no X-Feedrunner
        status, body = await exchange(port, ask(64, X_Feedrunner="1"))
        assert status == 200 and len(json.loads(body)["fingerprints"]) == 64
        assert (await exchange(port, ask(65, X_Feedrunner="1")))[0] == 400  # too many at once
        for _ in range(3):
            assert (await exchange(port, ask(64, X_Feedrunner="1")))[0] == 200
        assert (await exchange(port, ask(1, X_Feedrunner="1")))[0] == 429  # 256 a minute, then no more
        assert runner.rejected("rate_limited") == 1 and runner.rejected("csrf") == 1


# --- Host, Origin, CSRF ---------------------------------------------------------------------------------


async def test_only_hosts_naming_the_server_are_answered_and_probes_answer_any():
    async with serving(spec_of(server='{listen: "127.0.0.1:0", allowed_hosts: [feeds.internal]}')) as (control, r):
        port = control.port
        for host, want in [
            (f"127.0.0.1:{port}", 200),
            (f"localhost:{port}", 200),
            (f"[::1]:{port}", 200),
            ("feeds.internal", 200),
            (f"feeds.internal:{port}", 200),
            (f"attacker.example:{port}", 421),  # a rebinding page's own name
            (f"127.0.0.1:{port + 1}", 421),
            ("127.0.0.1", 421),  # port 80
        ]:
            assert (await exchange(port, request(port, path="/config", host=host)))[0] == want, host
        assert (await exchange(port, request(port, path="/healthz", host="10.1.2.3:9108")))[0] == 200  # kubelet
        status, body = await exchange(port, request(port, path="/readyz", host="10.1.2.3:9108"))
        assert (status, body) == (200, b"")  # the status for the kubelet, no reasons for a rebinding page
        status, body = await exchange(port, request(port, path="/readyz"))
        assert status == 200 and b"ready" in body
        assert r.rejected("host") == 3


async def test_cross_site_pages_cannot_drive_the_rollout_or_read_config():
    async with serving(spec_of()) as (control, runner):
        port = control.port
        own = f"http://127.0.0.1:{port}"
        promote = "/rollout/promote?full=1"
        # A form post from any page: a simple request, no custom header.
        assert (await exchange(port, request(port, "POST", promote, Origin="https://evil.example")))[0] == 403
        assert (await exchange(port, request(port, "POST", promote)))[0] == 403
        assert (await exchange(port, request(port, "POST", "/reload")))[0] == 403
        # The custom header does not help a foreign or a null origin.
        for origin in ("https://evil.example", "null", f"http://localhost:{port}", f"{own}.evil.example"):
            head = request(port, "POST", promote, Origin=origin, X_Feedrunner="1")
            assert (await exchange(port, head))[0] == 403, origin
        assert (await exchange(port, request(port, path="/config", Origin="https://evil.example")))[0] == 403
        assert runner.rollout.acted == []
        # The CLI's request, and the server's own page.
        assert (await exchange(port, request(port, "POST", promote, X_Feedrunner="1")))[0] == 200
        assert (await exchange(port, request(port, "POST", promote, Origin=own, X_Feedrunner="1")))[0] == 200
        assert runner.rollout.acted == [("promote", True), ("promote", True)]
        assert runner.rejected("csrf") == 2 and runner.rejected("origin") == 6


# --- auth and malformed requests --------------------------------------------------------------------------


async def test_bearer_token_checks_never_fail_open_or_crash(lines, caplog):
    caplog.set_level(logging.DEBUG)
    spec = spec_of(server='{listen: "127.0.0.1:0", token: "${T}"}', env={"T": "s3cret-token"})
    async with serving(spec) as (control, runner):
        port = control.port

        async def status_with(authorization: bytes) -> int:
            head = request(port).replace(b"Connection: close", b"Connection: close\r\nAuthorization: " + authorization)
            return (await exchange(port, head))[0]

        assert await status_with(b"Bearer s3cret-token") == 200
        assert await status_with(b"bearer s3cret-token") == 200
        assert await status_with(b"BEARER   s3cret-token ") == 200
        assert await status_with(b"s3cret-token") == 401  # a bare token: no scheme
        assert await status_with(b"Basic s3cret-token") == 401
        assert await status_with(b"Bearer \xff\xfe\xfd") == 401  # not UTF-8
        assert await status_with(b"Bearer s3cret-token\xc3\xa9") == 401
        assert await status_with(b"Bearer") == 401
        assert runner.rejected("auth") == 5
    refused = [r for r in lines if r["extra"].get("reason") == "auth"]
    assert len(refused) == 5 and all("s3cret" not in r["message"] for r in refused)
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


async def test_malformed_requests_and_handler_errors_are_one_line_each(lines, caplog):
    caplog.set_level(logging.DEBUG)
    async with serving(spec_of()) as (control, runner):
        port = control.port
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        bad = [
            b"GET /status HTTP/1.1\r\n" + host + b"X-Bad: \x01\r\n\r\n",  # a control byte in a header
            b"G\x01T /status HTTP/1.1\r\n" + host + b"\r\n",  # not a method
            b"GET /status HTTP/1.1\r\n" + host + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",  # oversized header
            request(port, "DELETE", "/status", X_Feedrunner="1"),  # a method no route has
        ]
        for head in bad:
            status, _ = await exchange(port, head)
            assert 400 <= status < 500
        runner.fail_status = True
        status, body = await exchange(port, request(port))
        assert status == 500 and "error" in json.loads(body)
        assert runner.rejected("malformed") == 4 and runner.rejected("error") == 1
    ours = [r for r in lines if r["extra"].get("reason") in ("malformed", "error")]
    assert [r["extra"]["reason"] for r in ours] == ["malformed"] * 4 + ["error"]
    assert all("\n" not in r["message"] and r["exception"] is None for r in ours)
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


# --- slow clients and the connection cap ------------------------------------------------------------------


async def test_slow_request_heads_are_closed_and_connections_are_capped():
    cap, timeout = 6, 0.6
    spec = spec_of(server=f'{{listen: "127.0.0.1:0", header_timeout: {int(timeout * 1000)}ms, max_connections: {cap}}}')
    async with serving(spec) as (control, runner):
        port = control.port
        partial = f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        slow = []
        for _ in range(cap - 1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(partial)
            slow.append((reader, writer))
        opened = time.monotonic()

        async def trickle() -> None:  # a header line now and then: data does not extend the deadline
            for i in range(20):
                for _, w in slow:
                    if not w.is_closing():
                        w.write(f"X-{i}: y\r\n".encode())
                await asyncio.sleep(timeout / 6)

        trickling = asyncio.create_task(trickle())
        await asyncio.sleep(0.05)
        assert (await exchange(port, request(port)))[0] == 200  # the last free connection still works
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(partial)
        slow.append((reader, writer))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        status, _ = await exchange(port, request(port), timeout=1)  # one beyond the cap
        refused_in = time.monotonic() - start
        assert status == 503 and refused_in < timeout  # at once, not after a header timeout

        answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 3 * timeout) for r, _ in slow))
        closed_after = time.monotonic() - opened
        trickling.cancel()
        for _, w in slow:
            w.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
        assert timeout <= closed_after < 3 * timeout
        await asyncio.sleep(0.05)
        assert (await exchange(port, request(port)))[0] == 200  # capacity is back
        assert runner.rejected("header_timeout") == cap and runner.rejected("connection_cap") == 1


async def test_a_kept_alive_connection_gets_the_same_deadline_for_its_next_head():
    spec = spec_of(server='{listen: "127.0.0.1:0", header_timeout: 400ms}')
    async with serving(spec) as (control, _):
        port = control.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"}"), 2)
        assert first.startswith(b"HTTP/1.1 200")
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())  # never finished
        start = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 2)
        assert time.monotonic() - start < 1.0 and b"200" not in rest
        writer.close()


# --- the settings -------------------------------------------------------------------------------------


def test_server_limits_are_settings_with_checked_values():
    spec = spec_of(
        server='{listen: "127.0.0.1:0", header_timeout: 2s, max_connections: 8, allowed_hosts: ["Feeds.Internal", "*"],'
        " token: t0k3n-value}"
    )
    s = spec.server
    assert (s.header_timeout, s.max_connections, s.allowed_hosts) == (2.0, 8, ("feeds.internal", "*"))
    assert (spec_of().server.header_timeout, spec_of().server.max_connections) == (10.0, 64)
    for server, where in [
        ("{header_timeout: 0s}", "server.header_timeout: must be greater than zero"),
        ("{max_connections: 0}", "server.max_connections: must be >= 1"),
        ('{allowed_hosts: ["bad host"]}', "server.allowed_hosts[0]: must be a host name"),
        ('{allowed_hosts: ["h:70000"]}', "server.allowed_hosts[0]: port 70000 is out of range"),
        ('{allowed_hosts: ["*"]}', "server.allowed_hosts[0]: '*' answers any Host"),
    ]:
        _, problems = check_text(BASE.format(server=server, state="{}", endpoints="{}"), "feeds.yaml", {})
        assert any(where in str(p) for p in problems), (server, [str(p) for p in problems])


def test_a_default_written_in_the_file_is_no_secret_and_a_value_from_the_environment_is(tmp_path):
    from feedrunner.plan import spec_to_dict
    from feedrunner.spec import check_text

    text = (
        "version: 1\nvenues: {binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT]}}\n"
        'state: {url: "${STATE_URL:-sqlite:///var/state.db}"}\n'
    )
    spec, problems = check_text(text, "f.yaml", {})
    assert spec is not None, problems
    assert spec_to_dict(spec)["state_url"] == "sqlite:///var/state.db"
    spec, _ = check_text(text, "f.yaml", {"STATE_URL": "sqlite:///other.db"})
    assert spec is not None
    assert "other.db" not in str(spec_to_dict(spec)["state_url"])


# --- the status page --------------------------------------------------------------------------------------


async def test_the_page_needs_no_token_holds_no_data_and_forbids_framing():
    server = '{listen: "127.0.0.1:0", token: "${FEEDRUNNER_TOKEN}"}'
    async with serving(spec_of(server=server, env={"FEEDRUNNER_TOKEN": "tok-1234"})) as (control, _):
        port = control.port
        status, headers, body = await answer(port, request(port, path="/"))
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b'data-steer="1" data-token="1"' in body  # steering is for whoever has the token
        assert b"tok-1234" not in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        for path, kind in [("/page.js", "application/javascript"), ("/page.css", "text/css")]:
            status, headers, body = await answer(port, request(port, path=path))
            assert status == 200 and headers["content-type"].startswith(kind) and body
        assert (await exchange(port, request(port, path="/status")))[0] == 401  # the data needs the token
        assert (await exchange(port, request(port, path="/", host="attacker.example")))[0] == 421


async def test_without_a_token_the_page_steers_through_loopback_only():
    async with serving(spec_of(server='{listen: "127.0.0.1:0", allowed_hosts: [feeds.internal]}')) as (control, r):
        port = control.port
        _, _, body = await answer(port, request(port, path="/", host="feeds.internal"))
        assert b'data-steer="0" data-token="0"' in body
        proxied = request(port, "POST", "/rollout/promote", "feeds.internal", X_Feedrunner="1")
        status, body = await exchange(port, proxied)
        assert status == 403 and b"server.token" in body
        assert r.rejected("read_only") == 1 and r.rollout.acted == []
        assert (await exchange(port, request(port, path="/status", host="feeds.internal")))[0] == 200  # reads are fine
        _, _, body = await answer(port, request(port, path="/"))
        assert b'data-steer="1"' in body
        assert (await exchange(port, request(port, "POST", "/rollout/promote", X_Feedrunner="1")))[0] == 200
        assert r.rollout.acted == [("promote", False)]


async def test_a_token_lets_a_proxied_page_steer():
    server = '{listen: "127.0.0.1:0", allowed_hosts: [feeds.internal], token: "${FEEDRUNNER_TOKEN}"}'
    async with serving(spec_of(server=server, env={"FEEDRUNNER_TOKEN": "tok-1234"})) as (control, r):
        port = control.port
        _, _, body = await answer(port, request(port, path="/", host="feeds.internal"))
        assert b'data-steer="1"' in body
        auth = {"Authorization": "Bearer tok-1234"}
        head = request(port, "POST", "/rollout/pause", "feeds.internal", X_Feedrunner="1", **auth)
        assert (await exchange(port, head))[0] == 200 and r.rollout.acted == [("pause", False)]


async def test_latency_series_are_bounded_and_per_transport():
    async with serving(spec_of()) as (control, r):
        port = control.port
        now = time.time()
        r.adapters = {"binance": None}
        ws = r.health.series[("binance", "websocket")] = Series(r.health.keep)
        for i in range(20):  # ten seconds at 1 ms, then ten at 40 ms
            ws.add(now - 19 + i, 0.001 if i < 10 else 0.04)
        for query in ["window=0", "window=3601", "step=0", "window=3600&step=1", "window=a", "step=1.5"]:
            assert (await exchange(port, request(port, path=f"/status/latency?{query}")))[0] == 400, query
        status, body = await exchange(port, request(port, path="/status/latency?window=60&step=10"))
    assert status == 200
    data = json.loads(body)
    assert (data["window"], data["step"]) == (60, 10)
    points = data["venues"]["binance"]["websocket"]
    assert sum(p[3] for p in points) == 20
    assert [p[0] for p in points] == sorted(p[0] for p in points) and all(p[0] % 10 == 0 for p in points)
    assert points[0][1] == 0.001 and points[-1][2] == 0.05  # p50 of the fast seconds, p99 of the slow (upper edge)
