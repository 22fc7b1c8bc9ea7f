"""The status page in a real browser (Debian's chromium through playwright) against `feedrunner run` on the
Binance simulator: it loads with no console errors (the CSP would report anything it blocks), shows every
venue and symbol, turns a stalled symbol red, steers the rollout, and stays usable at 1,000 symbols."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runproc import Run
from servers import unavailable

CHROMIUM = os.environ.get("FEEDRUNNER_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000

FEEDS = """\
version: 1
environment: simulator
simulator: {{seed: 4, rate: 10}}
defaults: {{poll_interval: 300ms, stale_after: 2s}}
venues:
  binance: {{adapter: ccxt, exchange: binance, channels: [trades], symbols: [{symbols}]}}
{rollout}
health: {{interval: 250ms}}
sinks: [{{type: jsonl, path: "out/{{venue}}.jsonl"}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "sqlite:///state/feedrunner.db"}}
logging: {{format: json}}
"""
ROLLOUT = """\
rollout:
  phases:
    - {name: one, symbols: ["binance:A/USDT"], dwell: 1h}
    - {name: two, symbols: {venue: binance, first: 2}, dwell: 1h}
    - {name: all, symbols: all}
  gates: [{metric: latency_p95, below: 500ms, window: 5s}]
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (make install)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def runner(cwd: Path, symbols: list[str], rollout: str = "") -> Run:
    (cwd / "feeds.yaml").write_text(FEEDS.format(symbols=", ".join(symbols), rollout=rollout))
    return Run(cwd)


def open_page(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    return context, page, errors


def row_of(page: Any, symbol: str) -> Any:
    return page.locator("#symbols tbody tr", has=page.locator("td", has_text=re.compile(f"^{re.escape(symbol)}$")))


def simulator_port(run: Run) -> int:
    m = re.search(r"venue binance: simulator on 127\.0\.0\.1:(\d+)", (run.cwd / "run.log").read_text())
    assert m, "the runner did not log its simulator"
    return int(m.group(1))


def inject(port: int, **fault: Any) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/_sim/faults",
        data=json.dumps(fault).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def test_the_page_shows_the_runner_marks_a_stall_and_steers_the_rollout(browser, tmp_path):
    from playwright.sync_api import expect

    run = runner(tmp_path, ["A/USDT", "B/USDT", "C/USDT", "D/USDT"], ROLLOUT)
    context = None
    try:
        run.wait(lambda r: (r["state"], r["phase"]) == ("progressing", "one"), 20, "phase one")
        context, page, errors = open_page(browser, run.url)
        expect(page.locator("#ready")).to_have_text("ready", timeout=WAIT_MS)
        venue = page.locator("#venues tbody tr")
        expect(venue).to_have_count(1)
        expect(venue.locator("td").nth(0)).to_have_text("binance")
        expect(venue.locator("td").nth(2)).to_have_text("connected")
        expect(page.locator("#symbols tbody tr")).to_have_count(4)
        for symbol in ["A/USDT", "B/USDT", "C/USDT", "D/USDT"]:
            expect(row_of(page, symbol)).to_have_count(1)
        expect(row_of(page, "A/USDT").locator("td").nth(2)).to_have_text("websocket")
        expect(row_of(page, "B/USDT").locator("td").nth(2)).to_have_text("polling")
        expect(page.locator("#phases li")).to_have_text(["one", "two", "all"])
        expect(page.locator("#phases li.current")).to_have_text("one")
        expect(page.locator("#sinks tbody tr")).to_have_count(1)
        gate = page.locator("#gates tbody tr").first
        expect(gate.locator("td").nth(0)).to_contain_text("latency_p95", timeout=WAIT_MS)
        expect(gate.locator("td").nth(1)).to_have_text(re.compile("^(pass|inconclusive)$"))
        chart = page.locator('.chart[data-venue="binance"]')
        expect(chart.locator("polyline.websocket")).to_have_count(2, timeout=WAIT_MS)  # p50 and p99
        expect(chart.locator("polyline.polling")).to_have_count(2, timeout=WAIT_MS)
        expect(row_of(page, "A/USDT")).not_to_have_class(re.compile("bad"))

        inject(simulator_port(run), fault="stall", duration=30, symbol="A/USDT")
        stalled = row_of(page, "A/USDT")
        expect(stalled).to_have_class(re.compile("bad"), timeout=WAIT_MS)  # silent past stale_after: red
        expect(stalled.locator("td").nth(6)).to_have_text("silent")
        expect(row_of(page, "B/USDT")).not_to_have_class(re.compile("bad"))  # its neighbours still trade
        page.locator("#problems-only").check()
        expect(page.locator("#symbols tbody tr")).to_have_count(1)
        page.locator("#problems-only").uncheck()

        page.locator('#actions button[data-action="promote"]').click()
        expect(page.locator("#action-result")).to_have_text("promote: done")
        expect(page.locator("#phases li.current")).to_have_text("two")
        assert (run.rollout()["state"], run.rollout()["phase"]) == ("progressing", "two")
        assert errors == []
        page.locator('#actions button[data-action="resume"]').click()  # does not apply while progressing
        expect(page.locator("#action-result")).to_have_text(re.compile(r"^resume refused: .+"))
        expect(page.locator("#action-result")).to_have_class("bad")
        page.once("dialog", lambda d: d.accept())  # abort asks first
        page.locator('#actions button[data-action="abort"]').click()
        expect(page.locator("#rollout-state")).to_have_text(re.compile("^aborted"), timeout=WAIT_MS)
        assert len(errors) == 1 and "409" in errors[0]  # the browser's own line for the refused resume
    finally:
        if context is not None:
            context.close()
        assert run.stop() == 0


def test_a_thousand_symbols_page_filter_and_sort_without_locking_the_browser(browser, tmp_path):
    from playwright.sync_api import expect

    symbols = [f"X{i:04d}/USDT" for i in range(1000)]
    run = runner(tmp_path, symbols)
    context = None
    try:
        context, page, errors = open_page(browser, run.url)
        expect(page.locator("#symbols tbody tr")).to_have_count(100, timeout=WAIT_MS)  # a page, not 1,000 rows
        expect(page.locator("#symbol-count")).to_have_text(re.compile(r"^\(1000 of 1000 shown"))
        expect(page.locator("#page-of")).to_have_text("page 1 of 10")
        expect(page.locator("#symbols tbody tr").first.locator("td").nth(1)).to_have_text("X0000/USDT")
        page.locator("#next").click()
        expect(page.locator("#symbols tbody tr").first.locator("td").nth(1)).to_have_text("X0100/USDT")
        page.locator('#symbols th[data-sort="symbol"]').click()  # sorted by venue, then symbol; now descending
        page.locator('#symbols th[data-sort="symbol"]').click()
        expect(page.locator("#page-of")).to_have_text("page 2 of 10")
        page.locator("#filter").fill("X09")
        expect(page.locator("#symbols tbody tr")).to_have_count(100)  # X0900..X0999
        expect(page.locator("#page-of")).to_have_text("page 1 of 1")
        expect(page.locator("#symbols tbody tr").first.locator("td").nth(1)).to_have_text("X0999/USDT")
        page.locator("#filter").fill("X0123/")
        expect(page.locator("#symbols tbody tr")).to_have_count(1)
        # Responsive while it polls 1,000 symbols every 2 s: a script round trip stays short.
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            page.evaluate("1")
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.3)
        assert worst < 1.0, f"the page blocked its main thread for {worst:.2f}s"
        assert errors == []
    finally:
        if context is not None:
            context.close()
        assert run.stop() == 0


def test_with_a_token_the_page_asks_for_it_once_and_steers_with_it(browser, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("FEEDRUNNER_TOKEN", "tok-page-1")  # the CLI sends it too
    (tmp_path / "feeds.yaml").write_text(
        FEEDS.format(symbols="A/USDT, B/USDT", rollout=ROLLOUT).replace(
            'server: {listen: "127.0.0.1:0"}', 'server: {listen: "127.0.0.1:0", token: "${FEEDRUNNER_TOKEN}"}'
        )
    )
    run = Run(tmp_path)
    context = None
    try:
        context, page, errors = open_page(browser, run.url)
        expect(page.locator("#token-form")).to_be_visible()
        assert "tok-page-1" not in page.content()
        page.locator("#token").fill("wrong")
        page.locator("#token-form button").click()
        expect(page.locator("#problem")).to_have_text("the bearer token was refused")
        page.locator("#token").fill("tok-page-1")
        page.locator("#token-form button").click()
        expect(page.locator("#symbols tbody tr")).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator("#token-form")).to_be_hidden()
        page.reload()  # the tab keeps it: no second prompt
        expect(page.locator("#symbols tbody tr")).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator("#token-form")).to_be_hidden()
        expect(page.locator("#phases li.current")).to_have_text("one", timeout=WAIT_MS)
        page.locator('#actions button[data-action="pause"]').click()
        expect(page.locator("#action-result")).to_have_text("pause: done")
        assert run.rollout()["state"] == "paused"
        assert all("401" in e for e in errors)  # only the browser's lines for the refused calls
    finally:
        if context is not None:
            context.close()
        assert run.stop() == 0
