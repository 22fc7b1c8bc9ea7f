"""Whatever bytes or YAML arrive, the loader returns a Spec or a list of problems: never an exception."""

from __future__ import annotations

import copy
from pathlib import Path

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


SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[1] / "feeds.yaml").read_text())
SHIPPED["rollout"]["phases"][0]["symbols"] = ["binance:BTC/USDTT"]  # one semantic problem, planted
PLANTED = (
    "rollout.phases[0].symbols[0]: 'BTC/USDTT' is not a symbol of venue 'binance'; did you mean 'binance:BTC/USDT'?"
)
NEEDED = [("rollout",), ("defaults",), ("venues", "binance")]  # what the planted check depends on


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


SHIPPED_PATHS = _paths(SHIPPED)[1:]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SHIPPED_PATHS), documents), min_size=1, max_size=3))
def test_shipped_file_with_parts_replaced(edits):
    """Whatever else is wrong, the semantic checks still run on the parts that passed the schema."""
    doc = copy.deepcopy(SHIPPED)
    for path, value in edits:
        parent = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced an ancestor
    result = check_text(yaml.safe_dump(doc), "fuzz.yaml", {})
    assert_outcome(result)
    if not any(path[: len(n)] == n or n[: len(path)] == path for path, _ in edits for n in NEEDED):
        assert PLANTED in [f"{p.path}: {p.message}" for p in result[1]]


def _nested(kinds: list[bool], leaf: object) -> object:
    for is_list in reversed(kinds):
        leaf = [leaf] if is_list else {"k": leaf}
    return leaf


@FUZZ
@given(
    (st.integers(60, 68) | st.integers(1, 80)).flatmap(lambda n: st.lists(st.booleans(), min_size=n, max_size=n)),
    st.sampled_from([False, None, True]),
    st.sampled_from([2, 4]),
    st.sampled_from([20, 80]),
    scalars,
)
def test_nesting_limit_in_any_layout(kinds, flow, indent, width, leaf):
    """However a writer lays the document out, more than 64 open collections is refused and 64 is not."""
    doc = {"venues": _nested(kinds, leaf)}
    text = yaml.safe_dump(doc, default_flow_style=flow, indent=indent, width=width)
    _, problems = check_text(text, "fuzz.yaml", {})
    deep = [p for p in problems if p.message == "nesting deeper than 64 levels"]
    assert (len(deep) == 1) == (1 + len(kinds) > 64), text
    if deep:
        assert len(problems) == 1
        opened = [e for e in yaml.parse(text) if isinstance(e, yaml.CollectionStartEvent)]
        mark = opened[64].start_mark  # the parser's own position of the 65th collection
        assert (deep[0].line, deep[0].column) == (mark.line + 1, mark.column + 1), text
