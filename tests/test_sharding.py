"""Rendezvous hashing of the feeds over shards, each shard's share of a spec, and how the leader combines
the shards' health readings (pure logic: no processes)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feedrunner.coordination import combine
from feedrunner.health import Reading
from feedrunner.sharding import assignment, own_share, owner, parse_shard
from feedrunner.spec import Shard, check_text

FEEDS = """\
version: 1
venues:
  binance: {{adapter: ccxt, exchange: binance, symbols: [{symbols}]}}
  ib: {{adapter: ib, symbols: [AAPL, MSFT, SPY]}}
  futu: {{adapter: futu, symbols: [HK.00700, HK.09988]}}
sinks: [{{type: jsonl, path: "out/{{shard}}/{{venue}}.jsonl"}}]
"""


def spec_of(n: int = 200):
    spec, problems = check_text(FEEDS.format(symbols=", ".join(f"S{i}/USDT" for i in range(n))), "feeds.yaml", {})
    assert spec is not None, problems
    return spec


@given(st.lists(st.text(min_size=1, max_size=12), min_size=50, max_size=200, unique=True), st.integers(1, 8))
def test_adding_a_shard_moves_only_what_lands_on_it(units, count):
    before = {u: owner(u, count) for u in units}
    after = {u: owner(u, count + 1) for u in units}
    moved = [u for u in units if before[u] != after[u]]
    assert all(after[u] == count for u in moved)  # nothing moves between the old shards
    assert all(0 <= s < count for s in before.values())


def test_shares_are_balanced_and_every_symbol_has_exactly_one_shard():
    spec = spec_of(1000)
    for count in (2, 3, 5):
        shares = [own_share(spec, Shard(i, count)) for i in range(count)]
        seen = Counter((v.name, s) for share in shares for v in share.venues for s in v.symbols)
        assert set(seen) == {(v.name, s) for v in spec.venues for s in v.symbols} and set(seen.values()) == {1}
        sizes = [sum(len(v.symbols) for v in share.venues if v.name == "binance") for share in shares]
        assert max(sizes) < 1.25 * 1000 / count, sizes
        assert Counter(assignment(spec, count).values()) == Counter(
            {i: sum(len(v.symbols) for v in share.venues) for i, share in enumerate(shares)}
        )


def test_single_session_venues_stay_whole_and_sink_paths_name_the_shard():
    spec = spec_of(20)
    shares = [own_share(spec, Shard(i, 4)) for i in range(4)]
    for name, size in (("ib", 3), ("futu", 2)):
        holders = [s for s in shares if any(v.name == name for v in s.venues)]
        assert len(holders) == 1 and len(holders[0].venue(name).symbols) == size
    assert [s.sinks[0].path for s in shares] == [f"out/{i}/{{venue}}.jsonl" for i in range(4)]
    assert shares[2].shard == Shard(2, 4) and shares[2].rollout == spec.rollout
    assert own_share(spec, Shard(0, 1)).venues == spec.venues  # unsharded: everything


def test_adding_a_symbol_moves_no_other_symbol():
    small, large = spec_of(100), spec_of(101)
    a, b = assignment(small, 3), assignment(large, 3)
    assert {k: b[k] for k in a} == a


@pytest.mark.parametrize(
    "text, error",
    [("0/3", None), ("2/3", None), ("3/3", "below"), ("a/3", "INDEX/COUNT"), ("1", "INDEX/COUNT"), ("0/0", "below")],
)
def test_shard_flag(text, error):
    if error is None:
        assert parse_shard(text) == Shard(int(text[0]), 3)
    else:
        with pytest.raises(ValueError, match=error):
            parse_shard(text)


def test_readings_combine_worst_case_and_rates_add():
    a, b, idle = Reading(0.2, 50, 60.0), Reading(0.9, 10, 30.0), Reading(None, 0, math.inf)
    assert combine("latency_p99", [a, b, idle]) == Reading(0.9, 60, 30.0)
    assert combine("error_rate", [a, idle]) == Reading(0.2, 50, 60.0)
    assert combine("uptime", [a, b]) == Reading(0.2, 60, 30.0)  # the least up shard
    assert combine("message_rate", [a, b]) == Reading(pytest.approx(1.1), 60, 30.0)
    assert combine("latency_p50", [idle]).value is None  # no shard has data: inconclusive
    assert combine("latency_p50", []).value is None


def test_each_shard_spools_apart():
    import dataclasses

    from feedrunner.spec import Delivery, Sink, SpoolSpec

    bus = [Sink("kafka", delivery=Delivery(SpoolSpec(p))) for p in ("var/spool/kafka", "spool/{shard}/k")]
    spec = dataclasses.replace(spec_of(4), sinks=tuple(bus))
    paths = [[s.delivery.spool.path for s in own_share(spec, Shard(i, 2)).sinks] for i in range(2)]
    assert paths == [["var/spool/kafka/shard-0", "spool/0/k"], ["var/spool/kafka/shard-1", "spool/1/k"]]
    assert own_share(spec, Shard(0, 1)).sinks[0].delivery.spool.path == "var/spool/kafka"  # unsharded: as written
