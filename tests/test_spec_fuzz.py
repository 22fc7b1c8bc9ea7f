"""Whatever bytes or YAML arrive, the loader returns a Spec or a list of problems: never an exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedrunner.spec import Spec, check_text
from feedrunner.yamlsource import Problem

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_outcome(result: tuple[Spec | None, list[Problem]]) -> None:
    spec, problems = result
    if spec is None:
        assert problems and all(isinstance(p, Problem) and str(p) for p in problems)
    else:
        assert problems == [] and isinstance(spec, Spec)


keys = st.sampled_from(
    [
        "version",
        "venues",
        "adapter",
        "exchange",
        "symbols",
        "channels",
        "rollout",
        "phases",
        "name",
        "dwell",
        "defaults",
        "backoff",
        "base",
        "cap",
        "queue",
        "size",
        "server",
        "listen",
        "sinks",
        "type",
        "path",
        "binance",
        "ib",
        "futu",
        "transport",
        "gates",
        "metric",
        "below",
        "window",
        "health",
        "x",
    ]
) | st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=True)
    | st.sampled_from(
        [
            "ccxt",
            "ib",
            "futu",
            "binance",
            "BTC/USDT",
            "1s",
            "0s",
            "5%",
            "all",
            "websocket",
            "polling",
            "${X}",
            "${X:-1}",
            "${",
            "$$",
            "127.0.0.1:1",
            "jsonl",
            "latency_p95",
        ]
    )
    | st.text(max_size=12)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=40,
)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data):
    assert_outcome(check_text(data, "fuzz.yaml", {}))


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text(text):
    assert_outcome(check_text(text, "fuzz.yaml", {}))


@FUZZ
@given(documents)
def test_arbitrary_yaml_documents(doc):
    assert_outcome(check_text(yaml.safe_dump(doc), "fuzz.yaml", {"X": "7"}))


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "version": st.just(1) | scalars,
            "venues": st.dictionaries(st.sampled_from(["binance", "ib", "futu", "Bad"]), documents, max_size=3),
        },
        optional={"rollout": documents, "defaults": documents, "queue": documents, "server": documents},
    )
)
def test_spec_shaped_documents(doc):
    assert_outcome(check_text(yaml.safe_dump(doc), "fuzz.yaml", {}))
