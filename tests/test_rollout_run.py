"""Rollouts run for real: the runner, the Binance simulator, the scheduler, the sinks and the HTTP server."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from feedrunner.rollout import State
from feedrunner.runner import Runner
from feedrunner.spec import check_text

SYMBOLS = ["A/USDT", "B/USDT", "C/USDT", "D/USDT"]


def spec_text(tmp: Path, rollout: str, extra: str = "") -> str:
    return f"""\
version: 1
environment: simulator
simulator: {{seed: 2, rate: 20}}
defaults: {{poll_interval: 200ms, stale_after: {{default: 5s, trades: 2s}},
           circuit_breaker: {{failure_threshold: 50, recovery_timeout: 1s}},
           backoff: {{base: 100ms, cap: 500ms, jitter: 0}}}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [{", ".join(SYMBOLS)}]}}
rollout:
{rollout}
health: {{interval: 250ms{extra}}}
sinks: [{{type: jsonl, path: "{tmp}/out/{{symbol}}.jsonl", flush_interval: 100ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///{tmp}/state.db"}}
"""


PHASES = """\
  phases:
    - {name: one, symbols: [binance:A/USDT], dwell: 2s}
    - {name: two, symbols: {venue: binance, first: 2}, dwell: 2s}
    - {name: three, symbols: {venue: binance, first: 3}, dwell: 2s}
    - {name: all, symbols: all}
  gates: [{metric: latency_p95, below: 1s, window: 1s}, {metric: error_rate, below: 50%, window: 1s}]
"""


@pytest.fixture
async def start_runner() -> AsyncIterator[Any]:
    runners: list[Runner] = []

    async def start(text: str) -> Runner:
        spec, problems = check_text(text, "feeds.yaml", {})
        assert spec is not None, [str(p) for p in problems]
        runner = Runner(spec)
        runners.append(runner)
        await runner.start()
        return runner

    yield start
    for r in runners:
        await r.stop()


def first_ws(tmp: Path, symbol: str) -> float | None:
    """When the JSONL first shows `symbol` streamed over websocket (its receive time)."""
    path = tmp / "out" / f"{symbol.replace('/', '-')}.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["transport"] == "websocket":
            return rec["ts_received"] / 1e9
    return None


def transports(tmp: Path, symbol: str) -> list[str]:
    path = tmp / "out" / f"{symbol.replace('/', '-')}.jsonl"
    return [json.loads(line)["transport"] for line in path.read_text().splitlines()] if path.exists() else []


async def test_four_phase_rollout_moves_symbols_from_polling_to_websocket_in_order(tmp_path, start_runner):
    runner = await start_runner(spec_text(tmp_path, PHASES))
    await wait_until(lambda: runner.rollout.state is State.COMPLETED, 30, "the rollout to complete")
    await asyncio.sleep(1.0)
    runner.pipeline._flush()
    starts = [first_ws(tmp_path, s) for s in SYMBOLS]
    assert all(starts), starts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Each later phase starts about one dwell (2 s) after the previous one, never before it.
    assert all(1.7 <= g <= 6 for g in gaps), gaps
    for symbol in SYMBOLS[1:]:
        seen = transports(tmp_path, symbol)
        assert seen[0] == "polling" and seen[-1] == "websocket"  # polling until its phase, then streaming
    history = [h["to_state"] + ":" + str(h["phase"]) for h in runner.rollout.store.history()]
    assert history == ["progressing:one", "progressing:two", "progressing:three", "progressing:all", "completed:all"]


async def test_fault_storm_rolls_back_then_recovers_after_cooldown(tmp_path, start_runner):
    rollout = (
        PHASES.replace("dwell: 2s", "dwell: 30s")
        + """\
  rollback: [{metric: reconnects_per_hour, above: 1000, window: 2s}]
  recovery: {cooldown: 2s, restart_from: failed}
"""
    )
    runner = await start_runner(spec_text(tmp_path, rollout))
    await wait_until(lambda: first_ws(tmp_path, "A/USDT") is not None, 10, "canary streaming")
    sim = runner.sims[0]
    for _ in range(3):
        sim.inject("drop")
        await asyncio.sleep(0.3)
    await wait_until(lambda: runner.rollout.state is State.ROLLED_BACK, 10, "a rollback")
    await wait_until(
        lambda: runner.adapters["binance"].status()["symbols"]["A/USDT"] == "polling", 5, "the canary back on polling"
    )
    switched = time.time()
    await asyncio.sleep(1.0)
    runner.pipeline._flush()
    records = [json.loads(x) for x in (tmp_path / "out" / "A-USDT.jsonl").read_text().splitlines()]
    after = [r["transport"] for r in records if r["ts_received"] / 1e9 > switched + 0.2]  # earlier: in flight
    assert after and set(after) == {"polling"}
    await wait_until(lambda: runner.rollout.state is State.RECOVERING, 10, "recovery after the cooldown")
    await wait_until(
        lambda: runner.adapters["binance"].status()["symbols"]["A/USDT"] == "websocket", 5, "the canary streaming again"
    )
    reasons = [h["reason"] for h in runner.rollout.store.history()]
    assert any(r.startswith("rollback: reconnects_per_hour above 1000") for r in reasons)


async def test_a_silent_symbol_holds_the_rollout_as_inconclusive(tmp_path, start_runner):
    runner = await start_runner(spec_text(tmp_path, PHASES))
    runner.sims[0].inject("stall", duration=60, symbol="B/USDT")
    await wait_until(lambda: runner.rollout.phase_name == "two", 10, "phase two")
    await asyncio.sleep(4)  # twice the dwell
    assert runner.rollout.phase_name == "two" and runner.rollout.state is State.PROGRESSING
    assert "no data on websocket" in runner.rollout.reason and "binance:B/USDT" in runner.rollout.reason


async def test_metrics_parse_and_readyz_follows_delivery(tmp_path, start_runner):
    runner = await start_runner(spec_text(tmp_path, PHASES))
    base = f"http://127.0.0.1:{runner.control.port}"
    await wait_until(lambda: not runner.not_ready(), 10, "ready")

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, body = await asyncio.to_thread(get, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "feedrunner_messages_received",
        "feedrunner_latency_seconds",
        "feedrunner_connection_up",
        "feedrunner_reconnects",
        "feedrunner_trades_lost",
        "feedrunner_circuit_state",
        "feedrunner_rollout_phase",
        "feedrunner_rollout_state",
    ):
        assert name in families, name
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
    assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
    runner.sims[0].inject("stall", duration=30)
    await wait_until(lambda: runner.not_ready(), 10, "not ready")
    status, body = await asyncio.to_thread(get, "/readyz")
    assert status == 503 and "binance" in json.loads(body)["problems"][0]


async def test_alerts_reach_the_webhook_once_and_resolve(tmp_path, start_runner):
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner_ = web.AppRunner(app)
    await runner_.setup()
    site = web.TCPSite(runner_, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        extra = (
            ", checks: [{metric: staleness, above: 1500ms, window: 1s, name: 'feed silent'}], "
            f"alerts: {{webhook: 'http://127.0.0.1:{port}/hook'}}"
        )
        runner = await start_runner(spec_text(tmp_path, PHASES, extra))
        await asyncio.sleep(1.5)
        assert received == []
        runner.sims[0].inject("stall", duration=3)
        await wait_until(lambda: any(r["status"] == "resolved" for r in received), 20, "the alert to resolve")
        await asyncio.sleep(1.0)
        firing = [r for r in received if r["status"] == "firing" and r["alert"] == "feed silent"]
        resolved = [r for r in received if r["status"] == "resolved" and r["alert"] == "feed silent"]
        assert len(firing) == 1 and len(resolved) == 1  # once while it lasted, once when it cleared
        assert firing[0]["metric"] == "staleness" and firing[0]["value"] > 1.5
    finally:
        await runner_.cleanup()


async def test_a_configured_token_guards_everything_but_the_probes(tmp_path, start_runner):
    text = spec_text(tmp_path, PHASES).replace(
        'server: {listen: "127.0.0.1:0"}', 'server: {listen: "127.0.0.1:0", token: "${TOKEN}"}'
    )
    spec, problems = check_text(text, "feeds.yaml", {"TOKEN": "s3cret-token"})
    assert spec is not None, problems
    runner = Runner(spec)
    await runner.start()
    base = f"http://127.0.0.1:{runner.control.port}"

    def call(path: str, token: str | None = None, method: str = "GET") -> int:
        req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert await asyncio.to_thread(call, "/status") == 401
        assert await asyncio.to_thread(call, "/metrics", "wrong") == 401
        assert await asyncio.to_thread(call, "/rollout/pause", None, "POST") == 401
        assert await asyncio.to_thread(call, "/status", "s3cret-token") == 200
        assert await asyncio.to_thread(call, "/healthz") == 200
    finally:
        await runner.stop()
