"""deploy/grafana/feedrunner.json: importable as it stands, and every query names what a real runner exports.

A dashboard whose query names a metric or label the runner never exports shows "No data" forever without
any error, so the live test scrapes a real `feedrunner run` and checks every expression against it.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runproc import Run

from feedrunner.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "feedrunner.json"
UNITS = {"s", "ops", "bytes", "short"}
BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__all"}

METRIC = re.compile(r"\b(feedrunner_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"label_values\(\s*(feedrunner_\w+)\s*,\s*(\w+)\s*\)")

FEEDS = """\
version: 1
environment: simulator
simulator: {seed: 4, rate: 20}
defaults: {poll_interval: 300ms}
venues:
  binance: {adapter: ccxt, exchange: binance, channels: [trades], symbols: [A/USDT, B/USDT]}
rollout:
  phases:
    - {name: one, symbols: [binance:A/USDT], dwell: 1h}
    - {name: all, symbols: all}
health: {interval: 250ms}
sinks: [{type: jsonl, path: "out/{venue}.jsonl"}]
server: {listen: "127.0.0.1:0"}
state: {url: "sqlite:///state/feedrunner.db"}
logging: {format: json}
"""

# Families a simulator run with a rollout and a JSONL sink must give series, so the live check is not vacuous.
LIVE = {
    "feedrunner_messages_received",
    "feedrunner_latency_seconds",
    "feedrunner_connection_up",
    "feedrunner_connection_state",
    "feedrunner_circuit_state",
    "feedrunner_symbols",
    "feedrunner_queue_depth",
    "feedrunner_rollout_phase",
    "feedrunner_rollout_state",
    "feedrunner_sink_events_written",
    "feedrunner_sink_up",
    "feedrunner_http_rejected",
    "feedrunner_config_reloads",
}


# -- reading the dashboard -------------------------------------------------------------------------------------


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those nested in collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict[str, Any]) -> list[str]:
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def labels_used(expr: str) -> dict[str, set[str]]:
    """Metric name -> labels the expression needs on it: its own matchers, plus every grouping label of the
    expression (each grouping here applies to all the metrics in its expression)."""
    grouping = {lbl.strip() for g in GROUPING.findall(expr) for lbl in g.split(",") if lbl.strip()}
    used: dict[str, set[str]] = {}
    for name, braces in METRIC.findall(expr):
        used.setdefault(name, set()).update(grouping, MATCHER.findall(braces or ""))
    return used


# -- structure ---------------------------------------------------------------------------------------------------


def test_dashboard_is_importable_grafana_json():
    dash = load()
    assert dash["schemaVersion"] == 39
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    venue = variables["venue"]
    assert venue["type"] == "query" and venue["multi"] and venue["includeAll"]
    assert variable_queries({"templating": {"list": [venue]}}) == ["label_values(feedrunner_connection_up, venue)"]
    assert variable_queries({"templating": {"list": [variables["sink"]]}}) == ["label_values(feedrunner_sink_up, sink)"]
    for p in all_panels(dash):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]


def test_panels_have_unique_ids_and_tile_without_overlap():
    taken: dict[tuple[int, int], str] = {}
    ids = [p["id"] for p in all_panels(load())]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in load()["panels"]:  # nested (collapsed) panels are laid out when expanded: top level only here
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the 24 columns"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]


def test_every_panel_queries_with_a_unit():
    panels = [p for p in all_panels(load()) if p["type"] != "row"]
    assert len(panels) >= 30
    for p in panels:
        assert p["fieldConfig"]["defaults"]["unit"] in UNITS, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_every_variable_used_is_defined():
    dash = load()
    defined = {v["name"] for v in dash["templating"]["list"]} | BUILTIN_VARS
    texts = exprs(dash) + [json.dumps(p.get("datasource")) for p in all_panels(dash)]
    used = {a or b or c for text in texts for a, b, c in VARIABLE.findall(text)}
    assert {"venue", "sink", "datasource", "__rate_interval"} <= used
    assert used <= defined, used - defined


def test_dashboard_covers_the_runners_concerns():
    text = "\n".join(exprs(load()))
    for name in (
        "feedrunner_messages_received_total",
        "feedrunner_latency_seconds_bucket",
        "feedrunner_connection_up",
        "feedrunner_connection_state",
        "feedrunner_reconnects_total",
        "feedrunner_stalls_total",
        "feedrunner_circuit_state",
        "feedrunner_trades_backfilled_total",
        "feedrunner_trades_lost_total",
        "feedrunner_trades_dropped_duplicate_total",
        "feedrunner_queue_depth",
        "feedrunner_events_dropped_total",
        "feedrunner_rollout_phase",
        "feedrunner_rollout_state",
        "feedrunner_sink_up",
        "feedrunner_sink_events_written_total",
        "feedrunner_sink_events_spooled_total",
        "feedrunner_sink_events_replayed_total",
        "feedrunner_sink_events_dropped_total",
        "feedrunner_sink_spool_bytes",
        "feedrunner_sink_delivery_seconds_bucket",
        "feedrunner_http_rejected_total",
        "feedrunner_config_reloads_total",
    ):
        assert name in text, name
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text


def test_expression_parsing():
    used = labels_used('sum by (le, venue) (rate(feedrunner_latency_seconds_bucket{venue=~"$venue"}[5m]))')
    assert used == {"feedrunner_latency_seconds_bucket": {"le", "venue"}}
    assert labels_used('feedrunner_a{x="1", y!~"2"} / on (z) feedrunner_b') == {
        "feedrunner_a": {"x", "y", "z"},
        "feedrunner_b": {"z"},
    }


# -- against a real runner ------------------------------------------------------------------------------------


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def flowing(fams: dict[str, Any]) -> bool:
    """Trades received, timed and written: every series the run can give exists."""

    def total(family: str, sample: str) -> float:
        f = fams.get(family)
        return sum(s.value for s in f.samples if s.name == sample) if f else 0.0

    return (
        total("feedrunner_messages_received", "feedrunner_messages_received_total") > 0
        and total("feedrunner_latency_seconds", "feedrunner_latency_seconds_count") > 0
        and total("feedrunner_sink_events_written", "feedrunner_sink_events_written_total") > 0
    )


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Families scraped from `feedrunner run` on the simulator once trades flow, after one refused request
    and one reload, so the control server's and the reload's counters have series too."""
    cwd = tmp_path_factory.mktemp("grafana")
    (cwd / "feeds.yaml").write_text(FEEDS)
    run = Run(cwd)
    try:
        url = run.url
        assert http(url + "/reload", "POST")[0] == 403  # no X-Feedrunner header: refused as csrf
        assert http(url + "/reload", "POST", {"X-Feedrunner": "1"})[0] == 200
        fams: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, text = http(url + "/metrics")
            assert status == 200
            fams = families(text)
            if flowing(fams):
                break
            time.sleep(0.3)
        assert flowing(fams), "no trades flowed: " + run.text()[-2000:]
        yield fams
    finally:
        run.stop()


def exposed(fams: dict[str, Any]) -> dict[str, set[str] | None]:
    """Sample name -> the labels its series carry, or None when the family is declared with no series yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    out: dict[str, set[str] | None] = {}
    for f in fams.values():
        for suffix in suffixes.get(f.type, ("",)):
            out[f.name + suffix] = None
        for s in f.samples:
            labels = out.get(s.name) or set()
            out[s.name] = labels | set(s.labels)
    return out


def declared_labels() -> dict[str, set[str]]:
    """Sample name -> label names, from the definitions in feedrunner/metrics.py (the registry's own map of
    collectors to the sample names they expose; the public API gives no label names before a series exists)."""
    out: dict[str, set[str]] = {}
    for collector, names in Metrics().registry._collector_to_names.items():
        labels = set(getattr(collector, "_labelnames", ()))
        for name in names:
            out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return out


def test_the_run_gives_series_for_the_core_families(scrape):
    assert {name for name, f in scrape.items() if f.samples} >= LIVE


def test_every_metric_and_label_the_dashboard_queries_is_exported(scrape):
    live = exposed(scrape)
    declared = declared_labels()
    dash = load()
    needed: dict[str, set[str]] = {}
    for expr in exprs(dash):
        for name, labels in labels_used(expr).items():
            needed.setdefault(name, set()).update(labels)
    for query in variable_queries(dash):
        for name, label in LABEL_VALUES.findall(query):
            needed.setdefault(name, set()).add(label)
    assert len(needed) >= 30
    for name, labels in sorted(needed.items()):
        assert name in live, f"{name} is not exported"
        have = live[name]
        if have is None:
            # Declared but no series yet: the bus sink's series (spool, buffer, replay, delivery latency)
            # appear only once a bus sink exists, and the rare-event counters (lost trades, stalls, ...) once
            # one happens. Their labels come from the definition in feedrunner/metrics.py instead.
            assert name in declared, f"{name} has no series and no definition in feedrunner/metrics.py"
            have = declared[name]
        assert labels <= have, f"{name} has no label {labels - have}"
