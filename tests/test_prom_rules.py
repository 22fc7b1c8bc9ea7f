"""`feedrunner alerts --prometheus`: rules promtool accepts, thresholds that fire where the runner's do, and
expressions over metrics a real runner exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from runproc import Run
from servers import unavailable

from feedrunner import promrules
from feedrunner.spec import check_file, check_text

REPO = Path(__file__).resolve().parent.parent

# Two venues (each with its own simulator), a canary phase on one of them, and a condition for every metric.
SPEC = """\
version: 1
environment: simulator
simulator: {seed: 3, rate: 20}
defaults: {poll_interval: 300ms, channels: [trades, ticker]}
venues:
  spot: {adapter: ccxt, exchange: binance, symbols: [A/USDT, B/USDT]}
  perp: {adapter: ccxt, exchange: binance, symbols: [C/USDT]}
rollout:
  phases:
    - {name: canary, symbols: [spot:A/USDT], dwell: 1h}
    - {name: all, symbols: all}
  gates:
    - {metric: uptime, at_least: 90%, window: 10m}
    - {metric: latency_p99, below: 500ms, window: 5m, min_samples: 100}
  rollback:
    - {metric: error_rate, above: 25%, window: 5m}
    - {metric: latency_p99, above: 1s, window: 5m}
    - {metric: staleness, above: 1m}
    - {metric: memory_growth, above: 100MB, window: 10m}
    - {metric: message_rate, below: 1, window: 30s}
    - {metric: memory_rss, above: 2GiB, min_samples: 5}
health:
  interval: 250ms
  checks:
    - {metric: staleness, above: 30s, window: 1m}
    - {metric: memory_rss, above: 1GiB}
    - {metric: error_rate, below: 50%, window: 5m}
    - {metric: reconnects_per_hour, above: 12, window: 10m}
    - {metric: latency_avg, above: 250ms, window: 5m}
    - {metric: latency_p50, above: 100ms, window: 5m, name: "median {{slow}} }}"}
    - {metric: uptime, below: 99%, window: 10m}
    - {metric: message_rate, above: 1000, window: 1m}
sinks: [{type: jsonl, path: "out/{venue}.jsonl"}]
server: {listen: "127.0.0.1:0"}
state: {url: "sqlite:///state/feedrunner.db"}
logging: {format: json}
"""

# Counters born at their first count: declared on /metrics from the start, with samples once one happens.
COUNTED_FROM_FIRST = {
    "feedrunner_errors_total",
    "feedrunner_reconnects_total",
    "feedrunner_trades_lost_total",
    "feedrunner_sink_events_dropped_total",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not installed (Debian package prometheus)")
    return path


def alerts_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feedrunner.cli", "alerts", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("FEEDRUNNER_")},
    )


def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "feeds.yaml"
    path.write_text(SPEC)
    return path


def promtool_run(promtool: str, *args: str, cwd: Path) -> None:
    p = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr


def spec_paths(spec_text: str) -> list[str]:
    spec, problems = check_text(spec_text)
    assert spec is not None, problems
    paths = [f"health.checks[{i}]" for i in range(len(spec.health.checks))]
    assert spec.rollout is not None
    paths += [f"rollout.rollback[{i}]" for i in range(len(spec.rollout.rollback))]
    return paths + [f"rollout.gates[{i}]" for i in range(len(spec.rollout.gates))]


# -- the rule file --------------------------------------------------------------------------------------


def test_shipped_feeds_give_rules_promtool_accepts(promtool, tmp_path):
    p = alerts_cli("--prometheus", "feeds.yaml")
    assert p.returncode == 0, p.stderr
    (tmp_path / "rules.yaml").write_text(p.stdout)
    promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    rules = [r for g in yaml.safe_load(p.stdout)["groups"] for r in g["rules"]]
    from_spec = sorted(r["annotations"]["spec_path"] for r in rules if "[" in r["annotations"]["spec_path"])
    assert from_spec == sorted(spec_paths((REPO / "feeds.yaml").read_text()))  # one alert per condition
    names = {r["alert"] for r in rules}
    for fixed in ("FeedrunnerTradesLost", "FeedrunnerSinkDown", "FeedrunnerSinkDropping", "FeedrunnerBreakerOpen"):
        assert fixed in names
    assert "FeedrunnerRolloutRolledBack" in names and "FeedrunnerVenueFailed" in names


def test_every_condition_is_a_rule_or_a_comment_saying_why(promtool, tmp_path):
    p = alerts_cli("--prometheus", str(spec_file(tmp_path)))
    assert p.returncode == 0, p.stderr
    (tmp_path / "rules.yaml").write_text(p.stdout)
    promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)  # a name's braces stay text
    rules = [r for g in yaml.safe_load(p.stdout)["groups"] for r in g["rules"]]
    by_path = {r["annotations"]["spec_path"]: r for r in rules}
    expected = spec_paths(SPEC)
    assert [path for path in expected if path not in by_path] == ["rollout.rollback[2]", "rollout.rollback[5]"]
    comments = {n: line.strip() for line in p.stdout.splitlines() for n in (2, 5) if f"rollout.rollback[{n}]" in line}
    assert comments[2].startswith("#") and "staleness per venue only" in comments[2]
    assert comments[5].startswith("#") and "min_samples 5 is never met" in comments[5]
    assert len(rules) == len(expected) - 2 + 6  # and the runner's own: venue, breaker, trades, sink x2, rollout
    assert "# rollout.rollback[4]: a 30s window needs a scrape interval of 15s or less" in p.stdout
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
    check = by_path["health.checks[0]"]["annotations"]
    assert check["summary"] == "staleness above 30s on {{ $labels.venue }}"
    assert "1GiB" in by_path["health.checks[1]"]["annotations"]["summary"]
    assert "latency_p50 above 100ms" in by_path["health.checks[5]"]["annotations"]["summary"]


def test_an_invalid_file_is_reported_as_validate_reports_it(tmp_path):
    bad = tmp_path / "feeds.yaml"
    bad.write_text(
        SPEC.replace("above: 25%", "above: 25ms").replace("adapter: ccxt, exchange", "adapter: cxt, exchange")
    )
    p = alerts_cli("--prometheus", str(bad))
    assert p.returncode == 78 and p.stdout == ""
    v = subprocess.run(
        [sys.executable, "-m", "feedrunner.cli", "validate", "--quiet", str(bad)], capture_output=True, text=True
    )
    problems = v.stdout.splitlines()
    assert len(problems) >= 2 and re.match(r".*feeds\.yaml:\d+:\d+: ", problems[0])
    assert p.stderr.splitlines()[: len(problems)] == problems
    assert alerts_cli(str(bad)).returncode == 64  # the format is not optional
    assert alerts_cli("--prometheus", str(tmp_path / "missing.yaml")).returncode == 78


def test_durations_are_prometheus_durations():
    assert [promrules.prom_duration(s) for s in (0.25, 1.5, 30, 90, 300, 3600, 86400, 604800)] == [
        "250ms",
        "1500ms",
        "30s",
        "90s",
        "5m",
        "1h",
        "1d",
        "1w",
    ]


# -- thresholds: promtool test rules ---------------------------------------------------------------------


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}" if inner else name, "values": values}


def counter(*legs: tuple[float, int]) -> str:
    """A counter's value every interval: `(rate, intervals)` legs, one after the other, from 0."""
    values, total = ["0"], 0.0
    for rate, n in legs:
        for _ in range(n):
            total += rate
            values.append(f"{total:g}")
    return " ".join(values)


def fires(alert: str, at: str, *labelsets: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": ls} for ls in labelsets]}


def rollout(phase: str, states: dict[str, str]) -> list[dict[str, str]]:
    return [series("feedrunner_rollout_phase", phase)] + [
        series("feedrunner_rollout_state", v, state=s) for s, v in states.items()
    ]


def venues_up() -> list[dict[str, str]]:
    return [series("feedrunner_connection_up", "1x40", venue=v) for v in ("spot", "perp")]


def latency(venue: str, transport: str, buckets: dict[str, str]) -> list[dict[str, str]]:
    out = [
        series("feedrunner_latency_seconds_bucket", v, venue=venue, transport=transport, le=le)
        for le, v in buckets.items()
    ]
    return [*out, series("feedrunner_latency_seconds_count", buckets["+Inf"], venue=venue, transport=transport)]


CHECKS = {
    "interval": "1m",
    "input_series": [
        series("feedrunner_staleness_seconds", "0 30 31 29", venue="spot"),
        series("feedrunner_staleness_seconds", "0 10 10 10", venue="perp"),
        series("feedrunner_memory_rss_bytes", "1073741824 1073741825"),
        series("feedrunner_health_coverage_seconds", "0+60x40"),
        *venues_up(),
        # error rate 20% (spot) and 40% (perp) until 10m, then perp at 50%: no longer below 50% on every venue
        series("feedrunner_errors_total", "0+1x40", venue="spot", kind="network"),
        series("feedrunner_messages_received_total", "0+4x40", venue="spot", transport="websocket", kind="trade"),
        series("feedrunner_errors_total", counter((2, 10), (3, 30)), venue="perp", kind="network"),
        series("feedrunner_messages_received_total", "0+3x40", venue="perp", transport="polling", kind="trade"),
    ],
    "alert_rule_test": [
        fires("FeedrunnerCheckStaleness", "1m"),  # at the threshold: `above` is strict, as in the runner
        fires("FeedrunnerCheckStaleness", "2m", {"severity": "warning", "venue": "spot"}),
        fires("FeedrunnerCheckStaleness", "3m"),
        fires("FeedrunnerCheckMemoryRss", "0m"),
        fires("FeedrunnerCheckMemoryRss", "1m", {"severity": "warning"}),
        fires("FeedrunnerCheckErrorRate", "4m"),  # a 5m window with 4m of data: inconclusive
        fires("FeedrunnerCheckErrorRate", "9m", {"severity": "warning"}),  # every venue below 50%
        fires("FeedrunnerCheckErrorRate", "16m"),  # perp at 50%
    ],
}

TRIGGERS_IN_THE_CANARY = {  # phase 1 covers venue spot only: perp's errors are not the rollout's
    "interval": "1m",
    "input_series": [
        *rollout("1x40", {"progressing": "1x40"}),
        series("feedrunner_health_coverage_seconds", "0+60x40"),
        *venues_up(),
        series("feedrunner_errors_total", "0+1x40", venue="spot", kind="network"),
        series("feedrunner_messages_received_total", "0+3x40", venue="spot", transport="websocket", kind="trade"),
        series("feedrunner_errors_total", "0+1x40", venue="perp", kind="network"),
        series("feedrunner_messages_received_total", "0+1x40", venue="perp", transport="polling", kind="trade"),
    ],
    "alert_rule_test": [fires("FeedrunnerRollbackTriggerErrorRate", t) for t in ("5m", "10m", "20m")],
}

TRIGGERS_IN_FULL = {
    "interval": "1m",
    "input_series": [
        *rollout("2x60", {"progressing": "1x29 0x30", "paused": "0x60", "rolled_back": "0x29 1x30"}),
        series("feedrunner_health_coverage_seconds", "0+20x60"),  # the 5m window is covered from 15m
        *venues_up(),
        # spot exactly at 25% (not above), perp at 33%
        series("feedrunner_errors_total", "0+1x60", venue="spot", kind="network"),
        series("feedrunner_messages_received_total", "0+3x60", venue="spot", transport="websocket", kind="trade"),
        series("feedrunner_errors_total", "0+1x60", venue="perp", kind="network"),
        series("feedrunner_messages_received_total", "0+2x60", venue="perp", transport="websocket", kind="trade"),
        # websocket p99 just under 1s until 20m, then 5% of trades between 1s and 2.5s
        *latency(
            "spot",
            "websocket",
            {
                "0.5": "0x60",
                "1.0": counter((100, 60)),
                "2.5": counter((100, 20), (105, 40)),
                "+Inf": counter((100, 20), (105, 40)),
            },
        ),
        # polling is far slower, and is not the rollout's target
        *latency("spot", "polling", {"1.0": "0x60", "+Inf": counter((50, 60))}),
    ],
    "alert_rule_test": [
        fires("FeedrunnerRollbackTriggerErrorRate", "12m"),  # 4m of data for a 5m window
        fires("FeedrunnerRollbackTriggerErrorRate", "15m", {"severity": "critical", "venue": "perp"}),
        fires("FeedrunnerRollbackTriggerErrorRate", "30m"),  # rolled back: triggers no longer count
        fires("FeedrunnerRolloutRolledBack", "28m"),
        fires("FeedrunnerRolloutRolledBack", "30m", {"severity": "warning", "state": "rolled_back"}),
        fires("FeedrunnerRollbackTriggerLatencyP99", "19m"),
        fires("FeedrunnerRollbackTriggerLatencyP99", "25m", {"severity": "critical"}),
    ],
}

GATES = {
    "interval": "1m",
    "input_series": [
        *rollout("2x40", {"progressing": "1x24 0x15", "paused": "0x24 1x15"}),
        series("feedrunner_health_coverage_seconds", "0+60x40"),
        *venues_up(),
        # one minute down in ten holds 90%; two do not (the gate asks at least 90%)
        series("feedrunner_venue_up", "1x10 0 1x28", venue="spot"),
        series("feedrunner_venue_up", "1x10 0 0 1x27", venue="perp"),
        # p99 near 1s throughout; 99 latency samples per 5m until 10m (under min_samples 100), then 100
        *latency(
            "spot",
            "websocket",
            {"0.5": "0x40", "1.0": counter((19.8, 10), (20, 30)), "+Inf": counter((19.8, 10), (20, 30))},
        ),
    ],
    "alert_rule_test": [
        fires("FeedrunnerRolloutGateUptime", "10m"),
        fires("FeedrunnerRolloutGateUptime", "13m", {"severity": "info", "venue": "perp"}),
        fires("FeedrunnerRolloutGateLatencyP99", "9m"),
        fires("FeedrunnerRolloutGateLatencyP99", "16m", {"severity": "info"}),
        fires("FeedrunnerRolloutGateLatencyP99", "26m"),  # paused: gates are not judged
    ],
}

RUNNER = {
    "interval": "1m",
    "input_series": [
        series("feedrunner_sink_up", "1 0 0 1", sink="jsonl"),
        series("feedrunner_trades_lost_total", "_ _ _ 3x8 5x10", venue="spot"),  # born with its first 3 trades
        series("feedrunner_circuit_state", "0 2 1", venue="spot", scope="venue"),
        series("feedrunner_connection_state", "0 1", venue="perp", state="failed"),
        series("feedrunner_sink_events_dropped_total", "0 0 7x10", sink="kafka", reason="spool_full"),
    ],
    "alert_rule_test": [
        fires("FeedrunnerSinkDown", "1m"),  # for: one health.interval
        fires("FeedrunnerSinkDown", "2m", {"severity": "critical", "sink": "jsonl"}),
        fires("FeedrunnerSinkDown", "3m"),
        fires("FeedrunnerTradesLost", "3m", {"severity": "critical", "venue": "spot"}),
        fires("FeedrunnerTradesLost", "10m"),
        fires("FeedrunnerTradesLost", "12m", {"severity": "critical", "venue": "spot"}),
        fires("FeedrunnerBreakerOpen", "1m", {"severity": "warning", "venue": "spot", "scope": "venue"}),
        fires("FeedrunnerBreakerOpen", "2m"),
        fires("FeedrunnerVenueFailed", "1m", {"severity": "critical", "venue": "perp", "state": "failed"}),
        fires("FeedrunnerSinkDropping", "1m"),
        fires("FeedrunnerSinkDropping", "2m", {"severity": "critical", "sink": "kafka", "reason": "spool_full"}),
        fires("FeedrunnerSinkDropping", "9m"),
    ],
}


def test_alerts_fire_at_the_runners_thresholds(promtool, tmp_path):
    p = alerts_cli("--prometheus", str(spec_file(tmp_path)))
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    for group in doc["groups"]:  # thresholds here; what the annotations say is the next test's
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = [CHECKS, TRIGGERS_IN_THE_CANARY, TRIGGERS_IN_FULL, GATES, RUNNER]
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    promtool_run(promtool, "test", "rules", "test.yaml", cwd=tmp_path)


def test_annotations_name_the_threshold_and_the_spec_path(promtool, tmp_path):
    p = alerts_cli("--prometheus", str(spec_file(tmp_path)))
    (tmp_path / "rules.yaml").write_text(p.stdout)
    case = {
        "interval": "1m",
        "input_series": [series("feedrunner_staleness_seconds", "31", venue="spot")],
        "alert_rule_test": [
            {
                "eval_time": "0m",
                "alertname": "FeedrunnerCheckStaleness",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "venue": "spot"},
                        "exp_annotations": {
                            "summary": "staleness above 30s on spot",
                            "description": "longest symbol silence of venue spot is 31s; staleness above 30s is the "
                            "threshold. The runner raises this health check while it holds.",
                            "spec_path": "health.checks[0]",
                        },
                    }
                ],
            }
        ],
    }
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [case]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    promtool_run(promtool, "test", "rules", "test.yaml", cwd=tmp_path)


# -- a real runner exports what the rules read -------------------------------------------------------------


def scrape(url: str) -> tuple[dict[str, str], dict[str, list[tuple[dict[str, str], float]]]]:
    """(declared name -> type, sample name -> [(labels, value)]) of one /metrics answer."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    declared: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        names = {
            "counter": [family.name + "_total"],
            "histogram": [family.name + s for s in ("_bucket", "_count", "_sum")],
        }.get(family.type, [family.name])
        declared.update(dict.fromkeys(names, family.type))
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return declared, samples


def used_names(spec_text: str | None = None, path: Path | None = None) -> set[str]:
    spec, problems = check_text(spec_text) if spec_text is not None else check_file(path or "")
    assert spec is not None, problems
    return {
        n for g in promrules.rules(spec)["groups"] for r in g["rules"] for n in re.findall(r"feedrunner_\w+", r["expr"])
    }


def test_every_metric_the_rules_read_is_exported_by_a_running_runner(tmp_path):
    (tmp_path / "feeds.yaml").write_text(SPEC)
    run = Run(tmp_path)
    try:
        url = run.url
        deadline = time.monotonic() + 30
        while True:  # until both venues deliver and the health windows have started
            declared, samples = scrape(url)
            up = {ls["venue"]: v for ls, v in samples.get("feedrunner_venue_up", [])}
            coverage = samples.get("feedrunner_health_coverage_seconds", [({}, 0.0)])[0][1]
            if up == {"spot": 1.0, "perp": 1.0} and coverage > 0 and "feedrunner_latency_seconds_bucket" in samples:
                break
            assert time.monotonic() < deadline + 30, f"venues not up: {up}, coverage {coverage}"
            time.sleep(0.2)
        names = used_names(SPEC) | used_names(path=REPO / "feeds.yaml")
        assert {
            "feedrunner_staleness_seconds",
            "feedrunner_memory_rss_bytes",
            "feedrunner_latency_seconds_bucket",
        } <= names
        assert sorted(names - set(declared)) == []
        assert sorted(names - set(samples) - COUNTED_FROM_FIRST) == []
        staleness = {ls["venue"]: v for ls, v in samples["feedrunner_staleness_seconds"]}
        assert set(staleness) == {"spot", "perp"} and all(0 <= v < 15 for v in staleness.values())
        assert samples["feedrunner_memory_rss_bytes"][0][1] > 10e6
        before = coverage
        time.sleep(1.1)
        _, samples = scrape(url)  # the gauges are refreshed by the scrape itself
        assert samples["feedrunner_health_coverage_seconds"][0][1] > before
    finally:
        code = run.stop()
    assert code == 0, run.text()[-2000:]
