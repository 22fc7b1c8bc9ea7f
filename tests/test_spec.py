"""feeds.yaml contract: schema sections, semantic checks, interpolation and error locations."""

from __future__ import annotations

import re
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from feedrunner import yamlsource
from feedrunner.spec import Secret, Spec, check_file, check_text, load_spec

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
version: 1
venues:
  binance:
    adapter: ccxt
    exchange: binance
    symbols: [BTC/USDT, ETH/USDT, SOL/USDT]
"""


def check(text: str, env: dict[str, str] | None = None):
    return check_text(textwrap.dedent(text), "feeds.yaml", env or {})


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    spec, found = check(text, env)
    assert spec is None, "expected the spec to be rejected"
    assert found
    return [str(p) for p in found]


def valid(text: str, env: dict[str, str] | None = None) -> Spec:
    spec, found = check(text, env)
    assert found == [], [str(p) for p in found]
    assert spec is not None
    return spec


def with_base(extra: str) -> str:
    return MINIMAL + textwrap.dedent(extra)


# --- the shipped file ------------------------------------------------------------------------------


def test_shipped_feeds_yaml_is_valid_and_resolved():
    spec = load_spec(ROOT / "feeds.yaml", env={})
    assert spec.environment == "simulator"
    binance = spec.venue("binance")
    assert len(binance.symbols) == 12 and binance.symbols[0] == "BTC/USDT"
    assert binance.channels == ("trades", "ticker", "book")
    assert binance.backoff.base == 1.0 and binance.backoff.cap == 60.0 and binance.backoff.max_attempts == 50
    assert binance.stale_after == {"trades": 15.0, "ticker": 15.0, "book": 15.0}
    assert spec.venue("ib").contracts["AMZN"].primary_exchange == "NASDAQ"
    phases = spec.rollout.phases
    assert [p.name for p in phases] == ["canary", "top5", "major", "full"]
    assert phases[0].symbols == (("binance", "BTC/USDT"),) and phases[0].dwell == 86400.0
    assert len(phases[1].symbols) == 5 and phases[1].dwell == 3 * 86400.0
    assert phases[2].approval == "manual"
    assert len(phases[3].symbols) == 12 + 4 + 5 and phases[3].dwell is None
    gate = spec.rollout.gates[0]
    assert (gate.metric, gate.op, gate.threshold, gate.window) == ("latency_p95", "below", 0.5, 3600.0)
    assert spec.rollout.rollback[3].threshold == 100e6
    assert spec.health.webhook is None  # ${ALERT_WEBHOOK:-} with nothing set
    assert spec.server.host == "127.0.0.1" and spec.server.port == 9108


def test_minimal_spec_gets_every_default():
    spec = valid(MINIMAL)
    v = spec.venues[0]
    assert (v.transport, v.poll_interval, v.book_depth, v.channels) == (
        "websocket",
        1.0,
        20,
        ("trades", "ticker"),
    )
    assert v.circuit_breaker.failure_threshold == 5 and v.circuit_breaker.recovery_timeout == 60.0
    assert spec.rollout is None and spec.queue.size == 100_000 and spec.queue.overflow == "block"
    assert spec.sinks[0].type == "jsonl" and spec.state_url.startswith("sqlite:///")


def test_venue_overrides_defaults_key_by_key():
    spec = valid("""\
        version: 1
        defaults: {poll_interval: 2s, backoff: {base: 2s, cap: 30s}, stale_after: {default: 20s, book: 5s}}
        venues:
          binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT], channels: [trades, book],
                    backoff: {cap: 10s}}
    """)
    v = spec.venues[0]
    assert v.poll_interval == 2.0
    assert (v.backoff.base, v.backoff.cap, v.backoff.factor) == (2.0, 10.0, 2.0)
    assert v.stale_after == {"trades": 20.0, "book": 5.0}


# --- schema sections: one valid and one invalid example each ---------------------------------------

SECTIONS_VALID = [
    "environment: live",
    "defaults: {transport: hybrid, poll_interval: 500ms, stale_after: 1m, book_depth: 5}",
    "queue: {size: 10, overflow: drop_oldest}",
    "server: {listen: '127.0.0.1:0'}",
    "server: {listen: '0.0.0.0:9108', token: abcdef}",
    "state: {url: 'postgresql://u:p@db/feeds'}",
    "logging: {level: DEBUG, format: json}",
    "simulator: {seed: 7, rate: 1000}",
    "health: {interval: 5s, checks: [{metric: staleness, above: 30s}], alerts: {webhook: 'http://127.0.0.1:1/x'}}",
    "health: {alerts: {webhook: {url: 'https://h/x', timeout: 2s, max_attempts: 3}}}",
    "sinks: [{type: stdout}, {type: jsonl, path: 'out/{venue}/{kind}-{date}.jsonl', kinds: [trade]}]",
    "rollout: {phases: [{name: all, symbols: all}]}",
]

SECTIONS_INVALID = [
    ("environment: prod", "environment: must be one of simulator, live (got 'prod')"),
    ("defaults: {transport: smoke}", "defaults.transport: must be one of websocket, polling, hybrid"),
    ("defaults: {poll_interval: 1x}", "defaults.poll_interval: must be a duration like 250ms"),
    ("defaults: {poll_interval: 0s}", "defaults.poll_interval: must be greater than zero"),
    ("defaults: {backoff: {factor: 0.5}}", "defaults.backoff.factor: must be >= 1"),
    ("defaults: {backoff: {jitter: 2}}", "defaults.backoff.jitter: must be <= 1"),
    ("defaults: {circuit_breaker: {failure_threshold: 0}}", "failure_threshold: must be >= 1"),
    ("defaults: {channels: []}", "defaults.channels: needs at least 1 item(s)"),
    ("defaults: {channels: [trades, trades]}", "defaults.channels: lists the same item twice"),
    ("defaults: {stale_after: {bok: 5s}}", "defaults.stale_after: must be a duration (15s) or a mapping"),
    ("queue: {size: 0}", "queue.size: must be >= 1"),
    ("queue: {overflow: drop_newest}", "queue.overflow: must be one of block, drop_oldest"),
    ("server: {listen: 9108}", "server.listen: must be host:port"),
    ("state: {url: 'mysql://x'}", "state.url: must be an sqlite:/// or postgresql:// URL"),
    ("logging: {level: LOUD}", "logging.level: must be one of DEBUG, INFO, WARNING, ERROR"),
    ("simulator: {rate: 0}", "simulator.rate: must be > 0"),
    ("health: {interval: soon}", "health.interval: must be a duration"),
    ("health: {checks: [{metric: vibes, above: 1}]}", "health.checks[0].metric: must be one of"),
    ("health: {alerts: {webhook: 'ftp://x'}}", "health.alerts.webhook: must be an http(s) URL"),
    ("sinks: []", "sinks: needs at least 1 item(s)"),
    ("sinks: [{type: jsonl}]", "sinks[0]: missing required key 'path'"),
    ("sinks: [{type: stdout, path: x}]", "sinks[0].path: 'path' is not a setting of type stdout"),
    ("rollout: {phases: []}", "rollout.phases: needs at least 1 item(s)"),
    ("rollout: {phases: [{name: a, symbols: some}]}", "rollout.phases[0].symbols: must be 'all', a list"),
    (
        "rollout: {phases: [{name: a, symbols: all}], gates: [{metric: uptime}]}",
        "rollout.gates[0]: needs exactly one of below, above, at_most, at_least",
    ),
    (
        "rollout: {phases: [{name: a, symbols: all}], recovery: {restart_from: middle}}",
        "rollout.recovery.restart_from: must be one of first, failed",
    ),
    ("colour: blue", "colour: unknown key 'colour'"),
    ("event_loop: trio", "event_loop: must be one of auto, uvloop, asyncio"),
]


def test_event_loop_defaults_to_auto_and_uvloop_needs_it_installed(monkeypatch):
    assert valid(MINIMAL).event_loop == "auto"
    assert valid(with_base("event_loop: asyncio")).event_loop == "asyncio"
    from feedrunner import eventloop

    monkeypatch.setattr(eventloop, "uvloop_available", lambda: False)
    assert valid(with_base("event_loop: auto")).event_loop == "auto"  # auto falls back to asyncio's loop
    found = problems(with_base("event_loop: uvloop"))
    assert found == ["feeds.yaml:7:1: event_loop: uvloop is not installed here: install it, or set auto or asyncio"]


@pytest.mark.parametrize("section", SECTIONS_VALID)
def test_schema_section_valid(section):
    valid(with_base(section))


@pytest.mark.parametrize(("section", "expected"), SECTIONS_INVALID)
def test_schema_section_invalid(section, expected):
    found = problems(with_base(section))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("venue", "expected"),
    [
        ("{adapter: ccxt, symbols: [BTC/USDT]}", "venues.x: missing required key 'exchange'"),
        (
            "{adapter: ccxt, exchange: binance, symbols: [BTC/USDT], client_id: 1}",
            "venues.x.client_id: 'client_id' is not a setting of adapter ccxt",
        ),
        (
            "{adapter: ib, symbols: [AAPL], exchange: binance}",
            "venues.x.exchange: 'exchange' is not a setting of adapter ib",
        ),
        ("{adapter: futu, symbols: [AAPL]}", "venues.x.symbols[0]: futu codes are MARKET.CODE"),
        (
            "{adapter: ib, symbols: [{symbol: EUR, sec_type: CASH, currency: usd}]}",
            "venues.x.symbols[0].currency: must be a three-letter currency code",
        ),
        ("{adapter: ib, symbols: [AAPL], port: 70000}", "venues.x.port: must be <= 65535"),
        ("{adapter: kraken, symbols: [X]}", "venues.x.adapter: must be one of ccxt, ib, futu"),
        ("{adapter: ccxt, exchange: binance, symbols: []}", "venues.x.symbols: needs at least 1 item(s)"),
        ("{adapter: ccxt, exchange: binance, symbols: ['BTC USDT']}", "must be a symbol without spaces"),
        (
            "{adapter: ccxt, exchange: binance, symbols: [BTC/USDT], endpoints: {ws: 'http://x'}}",
            "venues.x.endpoints.ws: must be a ws:// or wss:// URL",
        ),
        (
            "{adapter: ccxt, exchange: binance, symbols: [BTC/USDT], trasport: polling}",
            "venues.x.trasport: unknown key 'trasport'; did you mean 'transport'?",
        ),
    ],
)
def test_venue_section_invalid(venue, expected):
    found = problems(f"version: 1\nvenues:\n  x: {venue}\n")
    assert any(expected in p for p in found), found


def test_version_must_be_1():
    assert problems(MINIMAL.replace("version: 1", "version: 2")) == ["feeds.yaml:1:1: version: must be 1 (got 2)"]


def test_venue_name_must_be_a_slug():
    found = problems("version: 1\nvenues:\n  Big Venue: {adapter: ccxt, exchange: binance, symbols: [X/Y]}\n")
    assert found == [
        "feeds.yaml:3:3: venues.Big Venue: 'Big Venue': venue names are lowercase letters, digits, "
        "'_' or '-' (at most 32)"
    ]


def test_every_problem_is_reported_at_once():
    found = problems("""\
        version: 1
        environment: prod
        queue: {size: -1}
        venues:
          x: {adapter: ccxt, exchange: binance, symbols: [A/B], colour: red}
    """)
    assert len(found) == 3


# --- semantic checks -------------------------------------------------------------------------------


def test_duplicate_symbol_is_located():
    found = problems("""\
        version: 1
        venues:
          binance:
            adapter: ccxt
            exchange: binance
            symbols:
              - BTC/USDT
              - ETH/USDT
              - BTC/USDT
    """)
    assert found == ["feeds.yaml:9:9: venues.binance.symbols[2]: duplicate symbol 'BTC/USDT' (also at symbols[0])"]


def test_backoff_base_above_cap_points_at_cap():
    found = problems(
        with_base("""\
        defaults:
          backoff:
            base: 10s
            cap: 5s
    """)
    )
    assert found == ["feeds.yaml:10:5: defaults.backoff.cap: cap (5s) must be >= base (10s)"]


def test_backoff_checked_after_inheritance():
    found = problems("""\
        version: 1
        defaults: {backoff: {base: 2s}}
        venues:
          a: {adapter: ccxt, exchange: binance, symbols: [X/Y], backoff: {cap: 1s}}
    """)
    assert found == ["feeds.yaml:4:67: venues.a.backoff.cap: cap (1s) must be >= base (2s)"]


def test_unsupported_channel_for_adapter():
    found = problems("version: 1\nvenues:\n  ib: {adapter: ib, symbols: [AAPL], channels: [ticker, book]}\n")
    assert found == [
        "feeds.yaml:3:57: venues.ib.channels[1]: channel 'book' is not supported by adapter ib "
        "(supported: ticker, trades)"
    ]


def test_unknown_ccxt_exchange_suggests_the_closest():
    found = problems(MINIMAL.replace("exchange: binance", "exchange: binanse"))
    assert found == [
        "feeds.yaml:5:5: venues.binance.exchange: 'binanse' is not an exchange of the installed ccxt; "
        "did you mean 'binance'?"
    ]


def test_ccxt_exchange_without_websocket_is_rejected_for_streaming():
    import ccxt.pro

    rest_only = sorted(set(__import__("ccxt").exchanges) - set(ccxt.pro.exchanges))[0]
    text = f"version: 1\nvenues:\n  v: {{adapter: ccxt, exchange: {rest_only}, symbols: [A/B]}}\n"
    assert any("no websocket (ccxt.pro) support" in p for p in problems(text))
    valid(text.replace("symbols:", "transport: polling, symbols:"))


def test_polling_stale_after_must_exceed_poll_interval():
    found = problems(with_base("defaults: {transport: polling, poll_interval: 5s, stale_after: 5s}"))
    assert any("stale_after for trades (5s) must be longer than poll_interval (5s)" in p for p in found)


def test_ib_market_data_lines_enforced():
    syms = ", ".join(f"S{i}" for i in range(6))
    found = problems(f"version: 1\nvenues:\n  ib: {{adapter: ib, symbols: [{syms}], market_data_lines: 10}}\n")
    assert any(
        "needs 12 market-data lines (6 symbols, channels trades, ticker) but market_data_lines is 10" in p
        for p in found
    )
    valid("version: 1\nvenues:\n  ib: {adapter: ib, symbols: [EUR.USD, GBP.USD, AAPL], market_data_lines: 4}\n")


def test_futu_quota_enforced():
    found = problems(
        "version: 1\nvenues:\n  f: {adapter: futu, symbols: [HK.00700, US.AAPL], "
        "channels: [ticker, trades, book], quota: 5}\n"
    )
    assert any("needs 6 subscriptions" in p for p in found)


ROLLOUT = """\
version: 1
venues:
  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT, ETH/USDT, SOL/USDT]}
  ib: {adapter: ib, symbols: [AAPL]}
rollout:
"""


def test_phase_symbol_must_exist_in_its_venue():
    found = problems(ROLLOUT + "  phases:\n    - {name: a, symbols: [binance:BTC/USDTT, ibb:AAPL]}\n")
    assert found == [
        "feeds.yaml:7:27: rollout.phases[0].symbols[0]: 'BTC/USDTT' is not a symbol of venue 'binance'; "
        "did you mean 'binance:BTC/USDT'?",
        "feeds.yaml:7:46: rollout.phases[0].symbols[1]: no venue named 'ibb'; did you mean 'ib'?",
    ]


def test_phases_only_grow():
    found = problems(
        ROLLOUT
        + "  phases:\n"
        + "    - {name: a, symbols: [binance:BTC/USDT, ib:AAPL], dwell: 1h}\n"
        + "    - {name: b, symbols: {venue: binance, first: 2}}\n"
    )
    assert found == [
        "feeds.yaml:8:17: rollout.phases[1].symbols: phases only grow: this phase drops 1 symbol(s) "
        "of the previous one (ib:AAPL)"
    ]


def test_first_n_cannot_exceed_the_venue():
    found = problems(ROLLOUT + "  phases: [{name: a, symbols: {venue: binance, first: 4}}]\n")
    assert any("asks for the first 4 symbols but venue 'binance' lists 3" in p for p in found)


def test_dwell_required_on_all_but_the_last_phase_and_names_unique():
    found = problems(ROLLOUT + "  phases: [{name: a, symbols: all}, {name: a, symbols: all}]\n")
    assert any("missing required key 'dwell'" in p for p in found)
    assert any("duplicate phase name 'a'" in p for p in found)


def test_gate_window_must_fit_the_dwell():
    found = problems(
        ROLLOUT
        + "  phases: [{name: a, symbols: [binance:BTC/USDT], dwell: 30m}, {name: b, symbols: all}]\n"
        + "  gates: [{metric: error_rate, below: 1%, window: 1h}]\n"
    )
    assert any("window (1h) is longer than the dwell of phase 'a' (30m)" in p for p in found)


@pytest.mark.parametrize(
    ("gate", "expected"),
    [
        ("{metric: latency_p95, below: 5%}", "latency_p95 is compared with a duration like 500ms (got '5%')"),
        ("{metric: error_rate, below: 5ms}", "error_rate is compared with a ratio"),
        ("{metric: uptime, at_least: 150%}", "uptime is a ratio between 0% and 100%"),
        ("{metric: memory_growth, above: lots}", "memory_growth is compared with a size like 100MB"),
    ],
)
def test_threshold_units_match_the_metric(gate, expected):
    found = problems(ROLLOUT + f"  phases: [{{name: a, symbols: all}}]\n  rollback: [{gate}]\n")
    assert any(expected in p for p in found), found


def test_baseline_and_target_must_differ():
    found = problems(ROLLOUT + "  baseline: polling\n  target: polling\n  phases: [{name: a, symbols: all}]\n")
    assert any("target must differ from baseline (polling)" in p for p in found)


def test_non_loopback_server_needs_a_token():
    found = problems(with_base("server: {listen: '0.0.0.0:9108'}"))
    assert any("requires server.token" in p for p in found)
    valid(with_base("server: {listen: '[::1]:9108'}"))


def test_sink_path_placeholders_are_checked():
    found = problems(with_base("sinks: [{type: jsonl, path: 'x/{venu}.jsonl'}]"))
    assert any("unknown placeholder(s) {venu}" in p for p in found)


# --- interpolation ---------------------------------------------------------------------------------


def test_env_interpolation_types_and_defaults():
    spec = valid(
        """\
        version: 1
        venues:
          ib:
            adapter: ib
            host: ${IB_HOST:-127.0.0.1}
            port: ${IB_PORT}
            client_id: "${IB_CLIENT:-7}"
            symbols: [AAPL]
          binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT],
                    credentials: {api_key: "${KEY}", secret: "${SECRET}"}}
        server: {listen: "127.0.0.1:${PORT:-9200}", token: "${TOKEN:-}"}
        sinks: [{type: jsonl, path: "$$5/{venue}.jsonl"}]
        """,
        env={"IB_PORT": "4002", "KEY": "12345", "SECRET": "s3cr3t-value"},
    )
    ib = spec.venue("ib")
    assert (ib.host, ib.port, ib.client_id) == ("127.0.0.1", 4002, 7)
    creds = spec.venue("binance").credentials
    assert isinstance(creds["api_key"], Secret) and creds["api_key"].reveal() == "12345"  # schema wants a string
    assert "s3cr3t" not in repr(spec)
    assert spec.server.port == 9200 and spec.server.token is None
    assert spec.sinks[0].path == "$5/{venue}.jsonl"


def test_unset_variable_is_named_and_checks_continue():
    found = problems(with_base("server: {token: '${FEED_TOKEN}'}\nqueue: {size: 0}\n"))
    assert found == [
        "feeds.yaml:7:17: server.token: environment variable FEED_TOKEN is not set "
        "(write ${FEED_TOKEN:-default} to make it optional)",
        "feeds.yaml:8:9: queue.size: must be >= 1 (got 0)",
    ]


def test_secret_never_appears_in_any_message():
    secret = "hunter2-very-secret"
    text = with_base("queue: {size: '${SIZE}'}\nlogging: {level: '${LEVEL}'}\n")
    found = problems(text, env={"SIZE": secret, "LEVEL": secret})
    assert len(found) == 2
    assert all(secret not in p for p in found)
    assert any("got the value of ${LEVEL}" in p for p in found)


def test_bad_references_are_reported():
    found = problems(with_base("state: {url: 'sqlite:///${'}\nlogging: {level: '${1X}'}\n"))
    assert any("unterminated '${'" in p for p in found)
    assert any("bad variable reference '${1X}'" in p for p in found)


# --- YAML-level problems ---------------------------------------------------------------------------


def test_yaml_syntax_error_has_its_line():
    found = problems("version: 1\nvenues:\n  a: [unclosed\n  b: 2\n")
    assert len(found) == 1 and found[0].startswith("feeds.yaml:4:") and "YAML syntax error" in found[0]


def test_duplicate_keys_are_errors():
    found = problems(MINIMAL + "version: 1\n")
    assert found == ["feeds.yaml:7:1: version: duplicate key 'version' (first at line 1)"]


def test_merge_keys_work_and_explicit_keys_win():
    spec = valid("""\
        version: 1
        venues:
          a: &base {adapter: ccxt, exchange: binance, symbols: [BTC/USDT], poll_interval: 3s}
          b:
            <<: *base
            poll_interval: 2s
    """)
    assert spec.venue("b").poll_interval == 2.0 and spec.venue("b").symbols == ("BTC/USDT",)


def test_alias_bomb_is_refused_before_it_is_built():
    """A billion laughs composes to a few dozen shared nodes; it is measured there, never expanded."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    tracemalloc.start()
    started = time.perf_counter()
    try:
        found = problems(bomb)
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Line 6 is `f`, the first anchor that expands past the bound (a million values).
    assert found == ["feeds.yaml:6:4: the document expands through aliases to more than 500000 values (an alias bomb?)"]
    assert peak < 5 * 2**20, f"checking the bomb allocated {peak / 2**20:.0f} MiB at its peak"
    assert took < 1.0


def test_millions_of_values_are_refused_before_the_parser_builds_them(monkeypatch):
    """Composing is what costs (half a minute and near 1 GiB for an 8 MiB list): count first."""

    def parser_called(*args, **kwargs):
        raise AssertionError("the YAML parser was called")

    monkeypatch.setattr(yamlsource.yaml, "compose", parser_called)
    text = "a: [" + "1, " * 600_000 + "1]\n"  # the root's key, the list, then one entry per comma
    assert [str(p) for p in yamlsource.load(text, "f.yaml", {})[1]] == [
        "f.yaml:1:1500000: the document has more than 500000 values"  # comma 499,999, at 4 + 3 * 499,998 + 1
    ]


def test_alias_cycle_is_refused():
    assert problems("a: &a [*a]\n") == ["feeds.yaml:1:4: an alias refers to a collection that contains it"]


DEEP = [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "feeds.yaml:1:67"),  # the 65th collection, past the root mapping
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n", "feeds.yaml:1:256"),
    ('{"a": ' + "[" * 2000 + "]" * 2000 + "}\n", "feeds.yaml:1:70"),
    ("- " * 5000 + "x\n", "feeds.yaml:1:129"),
    ("".join(" " * i + "k:\n" for i in range(2000)) + " " * 2000 + "v\n", "feeds.yaml:65:65"),
    ("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n", "feeds.yaml:1:4"),
]


@pytest.mark.parametrize(("source", "where"), DEEP, ids=["flow", "flow-map", "json", "dashes", "indent", "alias"])
def test_deep_nesting_is_refused_by_our_limit(source, where):
    assert problems(source) == [f"{where}: nesting deeper than 64 levels"]


def test_deep_nesting_is_refused_before_the_parser_runs(monkeypatch):
    """Our limit holds whatever the installed PyYAML or libyaml does: they never see such a file."""

    def parser_called(*args, **kwargs):
        raise AssertionError("the YAML parser was called")

    monkeypatch.setattr(yamlsource.yaml, "compose", parser_called)
    for source, where in DEEP[:-1]:  # the alias case needs the composed graph to be measured
        assert [str(p) for p in yamlsource.load(source, "feeds.yaml", {})[1]] == [
            f"{where}: nesting deeper than 64 levels"
        ]


def test_nesting_limit_is_64_levels_and_counts_only_collections():
    def found(text: str) -> list[str]:
        return [str(p) for p in yamlsource.load(text, "f.yaml", {})[1]]

    assert found("a: " + "[" * 63 + "]" * 63 + "\n") == []  # the root mapping and 63 lists: 64
    assert found("a: " + "[" * 64 + "]" * 64 + "\n") == ["f.yaml:1:67: nesting deeper than 64 levels"]
    brackets = "[{" * 100
    for text in (
        f'a: "{brackets}"\n',  # in quoted scalars,
        f"a: '{brackets}'\n",
        f"a: x{brackets}\n",  # plain ones,
        f"a: |\n  {brackets}\n" + "".join(" " * (i + 2) + "- x\n" for i in range(100)),  # block scalars,
        f"a: 1  # {brackets}\n",  # comments,
        f"a: first line\n  {brackets} continues it\n",  # multi-line plain scalars
    ):
        doc, found = yamlsource.load(text, "f.yaml", {})
        assert found == [] and isinstance(doc.data, dict), text


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (b"", "the file is empty"),
        (b"\xff\xfe\x00junk\x00\x81", "not UTF-8 text"),
        (b"- a\n- b\n", "the top level must be a mapping"),
        (b"a: 1\n---\nb: 2\n", "YAML syntax error"),
        (
            b"a: !!python/object:os.system {}\n",
            "unsupported YAML tag tag:yaml.org,2002:python/object:os.system",
        ),
        (b"a: !!binary aGk=\n", "unsupported YAML tag"),
        (
            b"version: 1\nvenues: {a: {adapter: ccxt, exchange: binance, symbols: [X/Y]}}\n\x00",
            "feeds.yaml:3:1: YAML syntax error: character '\\x00' is not allowed",
        ),
    ],
)
def test_junk_input_gives_a_problem_not_a_traceback(source, expected):
    spec, found = check_text(source, "feeds.yaml", {})
    assert spec is None
    assert any(expected in str(p) for p in found), found


def test_files(tmp_path):
    assert [str(p) for p in check_file(tmp_path / "nope.yaml")[1]] == [f"{tmp_path / 'nope.yaml'}: no such file"]
    assert [str(p) for p in check_file(tmp_path)[1]] == [
        f"{tmp_path}: not a regular file (it is a directory); give the path of a feeds.yaml file"
    ]
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (50 * 1024 * 1024) + b"\n")
    spec, found = check_file(big)
    assert spec is None
    assert [str(p) for p in found] == [f"{big}: file is 50.0 MiB (52,428,803 bytes); a spec may be at most 8 MiB"]


def test_oversized_text_gives_its_size():
    text = "# " + "x" * (9 * 1024 * 1024) + "\n"
    assert problems(text) == ["feeds.yaml: file is 9.0 MiB (9,437,187 bytes); a spec may be at most 8 MiB"]
    assert [str(p) for p in check_text(text.encode(), "feeds.yaml", {})[1]] == problems(text)
    wide = "# " + "\u00e9" * (4 * 1024 * 1024 + 1) + "\n"  # fewer characters than the limit, more bytes
    assert problems(wide) == ["feeds.yaml: file is 8.0 MiB (8,388,613 bytes); a spec may be at most 8 MiB"]


def test_locations_point_at_keys_and_items():
    text = textwrap.dedent("""\
        version: 1
        venues:
          binance:
            adapter: ccxt
            exchange: binance
            symbols: [BTC/USDT]
            backoff:
              base: 1s
              cap: 60s
              factor: 0
    """)
    _, found = check_text(text, "f.yaml", {})
    assert [(p.line, p.column, p.path) for p in found] == [(10, 7, "venues.binance.backoff.factor")]


def test_yaml_loader_roundtrip_of_shipped_file_matches_pyyaml():
    from feedrunner.yamlsource import load

    text = (ROOT / "feeds.yaml").read_text()
    doc, found = load(text, "feeds.yaml", {"ALERT_WEBHOOK": "x"})
    assert found == []
    defaults = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: "x" if m[1] == "ALERT_WEBHOOK" else m[2], text)
    assert doc.data == yaml.safe_load(defaults)


# --- schema problems do not hide the semantic checks that can still run -------------------------------

TWO_VENUES = """\
version: 1
venues:
  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT, ETH/USDT, SOL/USDT]}
  ib: {adapter: ib, symbols: [AAPL]}
"""


def test_schema_and_semantic_problems_are_reported_together():
    rollout = "rollout:\n  phases: [{name: a, symbols: [binance:BTC/USDTT]}]\n"
    found = problems(TWO_VENUES + "sinks: [{type: jsonl}]\n" + rollout)
    assert found == [
        "feeds.yaml:5:9: sinks[0]: missing required key 'path'",
        "feeds.yaml:7:32: rollout.phases[0].symbols[0]: 'BTC/USDTT' is not a symbol of venue 'binance'; "
        "did you mean 'binance:BTC/USDT'?",
    ]


def test_a_refused_venue_is_not_reported_again_where_it_is_used():
    text = TWO_VENUES.replace("{adapter: ccxt,", "{adapter: ccxt, transport: smoke,")
    found = problems(text + "rollout:\n  phases: [{name: a, symbols: [binance:BTC/USDT, ibb:AAPL]}]\n")
    assert found == [
        "feeds.yaml:3:28: venues.binance.transport: must be one of websocket, polling, hybrid (got 'smoke')",
        "feeds.yaml:6:50: rollout.phases[0].symbols[1]: no venue named 'ibb'; did you mean 'ib'?",
    ]
    found = problems("version: 1\nrollout:\n  phases: [{name: a, symbols: [binance:X]}, {name: b, symbols: all}]\n")
    assert found == [
        "feeds.yaml:1:1: missing required key 'venues'",
        "feeds.yaml:3:12: rollout.phases[0]: missing required key 'dwell' (every phase but the last needs one)",
    ]


def test_venues_inheriting_a_refused_default_are_not_checked_the_others_are():
    found = problems("""\
        version: 1
        defaults: {poll_interval: 1x, backoff: {cap: never}}
        venues:
          inherits: {adapter: ib, symbols: [AAPL], channels: [ticker, book]}
          overrides: {adapter: ib, symbols: [AAPL], channels: [ticker, book], poll_interval: 1s, backoff: {cap: 1m}}
    """)
    assert found == [
        "feeds.yaml:2:12: defaults.poll_interval: must be a duration like 250ms, 30s, 5m, 2h or 1d (got '1x')",
        "feeds.yaml:2:41: defaults.backoff.cap: must be a duration like 250ms, 30s, 5m, 2h or 1d (got 'never')",
        "feeds.yaml:5:64: venues.overrides.channels[1]: channel 'book' is not supported by adapter ib "
        "(supported: ticker, trades)",
    ]


def test_a_refused_phase_or_gate_leaves_the_others_checked():
    found = problems(
        TWO_VENUES
        + "rollout:\n  phases:\n    - {name: a, symbols: [binance:BTC/USDT], dwell: 1h}\n"
        + "    - {name: b, symbols: some, dwell: 1h}\n    - {name: c, symbols: [binance:ETH/USDT]}\n"
        + "  gates: [{metric: uptime}, {metric: error_rate, below: 1%, window: 2h}]\n"
    )
    assert found == [
        "feeds.yaml:8:17: rollout.phases[1].symbols: must be 'all', a list of venue:SYMBOL, or "
        "{venue: NAME, first: N} (got 'some')",
        "feeds.yaml:10:11: rollout.gates[0]: needs exactly one of below, above, at_most, at_least "
        '(got {"metric": "uptime"})',
        "feeds.yaml:10:61: rollout.gates[1].window: window (2h) is longer than the dwell of phase 'a' (1h): "
        "the gate could never fill its window",
    ]
