"""feeds.yaml -> ${ENV} interpolation -> JSON Schema -> semantic checks -> a frozen, typed Spec.

Every problem is collected (not just the first) and located by file, line, column and key path, so an
operator fixes a file in one pass. Nothing here opens a socket; ccxt is imported only to check that an
exchange id exists and has the methods the spec asks of it.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path as FsPath
from typing import Any, Literal

import jsonschema
import yaml

from feedrunner import eventloop, units
from feedrunner.yamlsource import Document, Path, Problem, format_path, load, read

Transport = Literal["websocket", "polling", "hybrid"]
Channel = Literal["trades", "ticker", "book"]
CHANNELS: tuple[Channel, ...] = ("trades", "ticker", "book")

# What each adapter can stream; the one table spec checks and adapters agree on.
ADAPTER_CHANNELS: dict[str, frozenset[str]] = {
    "ccxt": frozenset({"trades", "ticker", "book"}),
    "ib": frozenset({"trades", "ticker"}),
    "futu": frozenset({"trades", "ticker", "book"}),
}
_CCXT_WATCH = {"trades": "watchTrades", "ticker": "watchTicker", "book": "watchOrderBook"}
_CCXT_FETCH = {"trades": "fetchTrades", "ticker": "fetchTicker", "book": "fetchOrderBook"}

# The unit each health metric's threshold is written in.
METRIC_KINDS: dict[str, str] = {
    "latency_p50": "duration",
    "latency_p95": "duration",
    "latency_p99": "duration",
    "latency_avg": "duration",
    "staleness": "duration",
    "error_rate": "ratio",
    "uptime": "ratio",
    "reconnects_per_hour": "number",
    "message_rate": "number",
    "memory_rss": "size",
    "memory_growth": "size",
}
_KIND_PARSE = {"duration": units.duration, "ratio": units.ratio, "size": units.size, "number": units.number}
_KIND_EXAMPLE = {"duration": "500ms", "ratio": "1% or 0.01", "size": "100MB", "number": "5"}
OPERATORS = ("below", "above", "at_most", "at_least")
SINK_FIELDS = frozenset({"venue", "date", "kind", "symbol", "shard"})
PARQUET_FIELDS = frozenset({"venue", "date", "kind", "hour", "shard"})
BUS_FIELDS = frozenset({"venue", "kind", "symbol"})  # topic, key, subject and stream templates
BUSES = ("kafka", "nats", "redis")


# ---------------------------------------------------------------------------------------------------
# The typed spec

_COMMON_SINK_KEYS = frozenset({"type", "name", "kinds"})
_BUS_KEYS = _COMMON_SINK_KEYS | {"buffer", "batch", "timeout", "retry", "spool"}
_SINK_KEYS = {
    "jsonl": _COMMON_SINK_KEYS | {"path", "flush_interval", "max_open_files"},
    "stdout": _COMMON_SINK_KEYS,
    "parquet": _COMMON_SINK_KEYS
    | {"path", "flush_interval", "max_open_files", "partition", "compression", "row_group_rows"}
    | {"row_group_interval", "roll_interval"},
    "kafka": _BUS_KEYS
    | {"brokers", "topic", "key", "acks", "compression", "linger", "batch_bytes", "message_max_bytes"}
    | {"security_protocol", "sasl_mechanism", "username", "password", "ca_file", "cert_file", "key_file"},
    "nats": _BUS_KEYS
    | {"servers", "subject", "stream", "create_stream", "duplicate_window", "max_pending"}
    | {"username", "password", "token", "creds_file", "ca_file", "cert_file", "key_file"},
    "redis": _BUS_KEYS | {"url", "stream", "maxlen"},
}
_NATS_STREAM = re.compile(r"[A-Za-z0-9_-]{1,200}")


def _secret(value: str | None) -> Secret | None:
    return Secret(value) if value else None


def _safe_dir(label: str) -> str:
    """A sink's name as one directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "sink"


class Secret(str):
    """A string that never shows itself in repr, logs or tracebacks."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 50
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerSpec:
    failure_threshold: int = 5
    recovery_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class IbContract:
    symbol: str
    sec_type: str = "STK"
    exchange: str = "SMART"
    currency: str = "USD"
    primary_exchange: str | None = None
    last_trade_date: str | None = None


@dataclass(frozen=True, slots=True)
class Venue:
    name: str
    adapter: Literal["ccxt", "ib", "futu"]
    symbols: tuple[str, ...]
    channels: tuple[Channel, ...]
    transport: Transport
    poll_interval: float
    stale_after: Mapping[str, float]  # channel -> seconds, every subscribed channel present
    book_depth: int
    backoff: Backoff
    circuit_breaker: CircuitBreakerSpec
    enabled: bool = True
    close_timeout: float = 5.0  # seconds Adapter.stop may wait for the venue before cutting its close short
    # ccxt
    exchange: str | None = None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    credentials: Mapping[str, Secret] = field(default_factory=dict)
    rate_limit: bool | None = None
    trades_buffer: int = 1000
    # ib / futu
    host: str | None = None
    port: int | None = None
    client_id: int | None = None
    contracts: Mapping[str, IbContract] = field(default_factory=dict)  # ib: explicit contracts by key
    market_data_lines: int = 100
    market_data_type: str = "live"
    quota: int = 100
    min_subscription: float = 60.0


@dataclass(frozen=True, slots=True)
class Condition:
    metric: str
    op: Literal["below", "above", "at_most", "at_least"]
    threshold: float  # seconds, ratio, bytes or count, by METRIC_KINDS
    window: float
    min_samples: int
    name: str

    def holds(self, value: float) -> bool:
        if self.op == "below":
            return value < self.threshold
        if self.op == "above":
            return value > self.threshold
        if self.op == "at_most":
            return value <= self.threshold
        return value >= self.threshold


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    symbols: tuple[tuple[str, str], ...]  # (venue, symbol), resolved from the selector
    dwell: float | None
    approval: Literal["auto", "manual"]


@dataclass(frozen=True, slots=True)
class Recovery:
    cooldown: float = 1800.0
    restart_from: Literal["first", "failed"] = "first"
    max_attempts: int = 3


@dataclass(frozen=True, slots=True)
class Rollout:
    enabled: bool
    baseline: Transport
    target: Transport
    phases: tuple[Phase, ...]
    gates: tuple[Condition, ...]
    rollback: tuple[Condition, ...]
    recovery: Recovery


@dataclass(frozen=True, slots=True)
class Webhook:
    url: Secret
    timeout: float = 5.0
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class Health:
    interval: float = 15.0
    checks: tuple[Condition, ...] = ()
    webhook: Webhook | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2


@dataclass(frozen=True, slots=True)
class SpoolSpec:
    path: str  # directory of this sink's segments
    max_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval: float = 1.0
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a bus sink is fed: its own buffer and task, its spool, its retry pacing."""

    spool: SpoolSpec
    buffer: int = 50_000
    batch: int = 5_000
    timeout: float = 10.0
    retry: Retry = Retry()


@dataclass(frozen=True, slots=True)
class KafkaSpec:
    brokers: tuple[str, ...]
    topic: str = "md.{venue}.{kind}"
    key: str = "{venue}:{symbol}"
    acks: Literal["all", "1"] = "all"
    compression: str = "zstd"
    linger: float = 0.005
    batch_bytes: int = 1 << 20
    message_max_bytes: int = 1_000_000
    security_protocol: str = "plaintext"
    sasl_mechanism: str | None = None
    username: Secret | None = None
    password: Secret | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class NatsSpec:
    servers: tuple[Secret, ...]
    subject: str = "md.{venue}.{kind}.{symbol}"
    stream: str = "MD"
    create_stream: bool = True
    duplicate_window: float = 120.0
    max_pending: int = 2000
    username: Secret | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class RedisSpec:
    url: Secret
    stream: str = "md:{venue}:{kind}"
    maxlen: int = 1_000_000


@dataclass(frozen=True, slots=True)
class ParquetSpec:
    path: str = "data/parquet/{venue}/{kind}/{date}"
    partition: Literal["day", "hour"] = "day"
    compression: str = "zstd"
    row_group_rows: int = 100_000
    row_group_interval: float = 60.0
    roll_interval: float = 600.0


@dataclass(frozen=True, slots=True)
class Sink:
    type: Literal["jsonl", "stdout", "parquet", "kafka", "nats", "redis"]
    path: str | None = None
    flush_interval: float = 1.0
    max_open_files: int = 64
    kinds: tuple[str, ...] = ("trade", "ticker", "book")
    name: str = ""  # metrics, status, logs and the spool directory; unique (default: type, or type:path)
    delivery: Delivery | None = None  # buses only
    kafka: KafkaSpec | None = None
    nats: NatsSpec | None = None
    redis: RedisSpec | None = None
    parquet: ParquetSpec | None = None

    @property
    def label(self) -> str:
        return self.name or self.type + (f":{self.path}" if self.path else "")


@dataclass(frozen=True, slots=True)
class QueueSpec:
    size: int = 100_000
    overflow: Literal["block", "drop_oldest"] = "block"


@dataclass(frozen=True, slots=True)
class Server:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108
    token: Secret | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host values answered besides the listen address; "*" any
    header_timeout: float = 10.0  # seconds a connection may take to send a complete request head
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's share of the deployment: index of count (1 of 1 when not sharded)."""

    index: int = 0
    count: int = 1


@dataclass(frozen=True, slots=True)
class Coordination:
    lease: float = 10.0  # seconds the rollout may go without a leader
    poll: float = 1.0  # seconds between reads of the leader's desired state (and heartbeats)


@dataclass(frozen=True, slots=True)
class Spec:
    source: str
    version: int
    environment: Literal["simulator", "live"]
    venues: tuple[Venue, ...]
    rollout: Rollout | None
    health: Health
    sinks: tuple[Sink, ...]
    queue: QueueSpec
    server: Server
    state_url: str
    log_level: str
    log_format: Literal["text", "json"]
    sim_seed: int
    sim_rate: float
    shutdown_deadline: float = 20.0
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    workers: int = 1
    shard: Shard = Shard()
    coordination: Coordination = Coordination()

    def venue(self, name: str) -> Venue:
        for v in self.venues:
            if v.name == name:
                return v
        raise KeyError(name)


class SpecError(Exception):
    """Raised by load_spec; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------------------------------------------
# Entry points


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("feedrunner").joinpath("feeds.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(schema())


def check_file(path: str | FsPath, env: Mapping[str, str] | None = None) -> tuple[Spec | None, list[Problem]]:
    """Read and check one file; returns the Spec or every problem, never raises for bad input.

    Never blocks: a FIFO, a device or a directory is refused before it is opened, and the read is
    bounded in size and time (yamlsource.read), so a reload cannot hang on what replaced feeds.yaml.
    """
    name = str(path)
    raw, problems = read(name)
    if raw is None:
        return None, problems
    return check_text(raw, name, env)


def check_text(
    source: str | bytes, file: str = "feeds.yaml", env: Mapping[str, str] | None = None
) -> tuple[Spec | None, list[Problem]]:
    doc, problems = load(source, file, env)
    if doc.data is None:
        return None, problems or [Problem(file, 1, 1, "", "the document is empty (null)")]
    if not isinstance(doc.data, dict):
        return None, [doc.problem((), "the top level must be a mapping of keys (version, venues, ...)")]
    # No problem stops the checks: interpolation, duplicate-key and schema problems mark their paths
    # (doc.broken) and the semantic checks run on every other part, so an operator sees everything at once.
    problems += _schema_problems(doc)
    builder = _SpecBuilder(doc)
    spec = builder.build()
    problems += builder.problems
    if problems or spec is None:
        return None, _sorted(problems)
    return spec, []


def load_spec(path: str | FsPath, env: Mapping[str, str] | None = None) -> Spec:
    spec, problems = check_file(path, env)
    if spec is None:
        raise SpecError(problems)
    return spec


def _sorted(problems: list[Problem]) -> list[Problem]:
    unique = dict.fromkeys(problems)
    return sorted(unique, key=lambda p: (p.line, p.column, p.path, p.message))


# ---------------------------------------------------------------------------------------------------
# Schema errors, in words an operator acts on

_TYPE_NAMES = {
    "string": "a string",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "empty",
}


def _yaml_type(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


def _schema_problems(doc: Document) -> list[Problem]:
    _coerce_interpolated(doc)
    problems = _foreign_keys(doc)
    refused: list[Path] = []
    for error in _validator().iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if any(path[: len(b)] == b for b in doc.broken):
            continue  # already reported where it broke (an unset variable, a duplicate key)
        problems.extend(_translate(doc, error))
        refused += _refused_paths(error)
    doc.broken.update(refused)
    return problems


def _refused_paths(error: jsonschema.ValidationError) -> list[Path]:
    """What a schema error refuses: the value at its path, or the keys a mapping misses or must not have."""
    path: Path = tuple(error.absolute_path)
    inst = error.instance
    if error.validator == "required" and isinstance(inst, dict):
        return [(*path, k) for k in error.validator_value if k not in inst]
    if error.validator == "additionalProperties" and isinstance(inst, dict):
        return [(*path, k) for k in inst if k not in error.schema.get("properties", {})]
    if "propertyNames" in error.schema_path:
        return [(*path, str(inst))]
    return [path]


def _coerce_interpolated(doc: Document) -> None:
    """Give ${VAR} values the type the schema wants there: port: "${IB_PORT}" is a number."""
    if not doc.interpolated:
        return
    for error in _validator().iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if error.validator != "type" or path not in doc.interpolated or not isinstance(error.instance, str):
            continue
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        try:
            value = yaml.safe_load(error.instance)
        except yaml.YAMLError:
            continue
        for t in wanted:
            if t == "boolean":
                fits = isinstance(value, bool)
            else:
                fits = isinstance(value, int | float) and not isinstance(value, bool)
                fits = fits and (t == "number" or isinstance(value, int))
            if fits:
                parent = _at(doc.data, path[:-1])
                if isinstance(parent, dict | list):
                    parent[path[-1]] = value  # type: ignore[index]
                break


@functools.cache
def _forbidden(definition: str, discriminator: str) -> dict[str, frozenset[str]]:
    """Keys a schema definition forbids (`key: false`) per value of its discriminator, e.g. adapter."""
    out: dict[str, frozenset[str]] = {}
    for rule in schema()["$defs"][definition].get("allOf", []):
        value = rule["if"]["properties"][discriminator]["const"]
        banned = {k for k, sub in rule["then"].get("properties", {}).items() if sub is False}
        out[value] = out.get(value, frozenset()) | banned
    return out


def _foreign_keys(doc: Document) -> list[Problem]:
    data: dict[str, Any] = doc.data  # type: ignore[assignment]
    blocks: list[tuple[Path, Any, str, str]] = []
    if isinstance(data.get("venues"), dict):
        blocks += [(("venues", name), v, "venue", "adapter") for name, v in data["venues"].items()]
    if isinstance(data.get("sinks"), list):
        blocks += [(("sinks", i), s, "sink", "type") for i, s in enumerate(data["sinks"])]
    problems = []
    for path, block, definition, disc in blocks:
        if not isinstance(block, dict) or not isinstance(block.get(disc), str):
            continue
        for key in sorted(_forbidden(definition, disc).get(block[disc], frozenset()) & block.keys()):
            problems.append(doc.problem((*path, key), f"'{key}' is not a setting of {disc} {block[disc]}"))
            doc.broken.add((*path, key))
    return problems


def _show(doc: Document, path: Path, value: object) -> str:
    """The offending value for a message, unless it came from the environment."""
    if tuple(path) in doc.interpolated:
        return f"the value of ${{{doc.interpolated[tuple(path)]}}}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _translate(doc: Document, error: jsonschema.ValidationError) -> list[Problem]:
    path: Path = tuple(error.absolute_path)
    v, sch, inst = error.validator, error.schema, error.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        known = list(sch.get("properties", {}))
        extra = [k for k in inst if k not in sch.get("properties", {})]
        out = []
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            out.append(doc.problem((*path, key), f"unknown key '{key}'{hint}"))
        return out
    if v == "required":
        missing = [k for k in error.validator_value if isinstance(inst, dict) and k not in inst]
        return [doc.problem(path, f"missing required key '{k}'") for k in missing]
    if "propertyNames" in error.schema_path:  # reported at the mapping; point at the offending key
        hint = sch.get("x-hint", "is not a valid name")
        return [doc.problem((*path, str(inst)), f"'{inst}': {hint}")]
    if sch is False:  # jsonschema loses the key of `key: false`; _foreign_keys reports these instead
        return []
    if v in ("anyOf", "oneOf"):
        inner = [c for c in error.context or [] if len(c.absolute_path) > len(path)]
        if inner:  # the value has the right shape but something inside it is wrong: say what
            return _translate(doc, jsonschema.exceptions.best_match(inner))
        if sch.get("x-hint"):
            if v == "oneOf" and isinstance(inst, dict) and sum(k in inst for k in OPERATORS) > 1:
                return [doc.problem(path, "give only one of below, above, at_most, at_least")]
            return [doc.problem(path, f"{sch['x-hint']} (got {_show(doc, path, inst)})")]
        best = jsonschema.exceptions.best_match(error.context or [])
        return _translate(doc, best) if best is not None else [doc.problem(path, error.message)]
    if v == "enum":
        choices = ", ".join(str(c) for c in error.validator_value)
        return [doc.problem(path, f"must be one of {choices} (got {_show(doc, path, inst)})")]
    if v == "const":
        return [doc.problem(path, f"must be {error.validator_value!r} (got {_show(doc, path, inst)})")]
    if v == "type":
        want = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = " or ".join(_TYPE_NAMES.get(t, t) for t in want)
        if "pattern" in sch:
            words = sch.get("x-hint", words).removeprefix("must be ")
        return [doc.problem(path, f"must be {words} (got {_yaml_type(inst)})")]
    if v == "pattern":
        hint = sch.get("x-hint", f"must match {error.validator_value}")
        return [doc.problem(path, f"{hint} (got {_show(doc, path, inst)})")]
    if v == "not":
        return [doc.problem(path, "must be greater than zero")]
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return [doc.problem(path, f"must be {sign} {error.validator_value} (got {_show(doc, path, inst)})")]
    if v == "minItems":
        return [doc.problem(path, f"needs at least {error.validator_value} item(s)")]
    if v == "maxItems":
        return [doc.problem(path, f"allows at most {error.validator_value} items")]
    if v == "uniqueItems":
        return [doc.problem(path, "lists the same item twice")]
    if v == "minProperties":
        return [doc.problem(path, f"needs at least {error.validator_value} entry")]
    if v in ("minLength", "maxLength"):
        return [
            doc.problem(
                path,
                "must not be empty" if v == "minLength" else f"must be at most {error.validator_value} characters",
            )
        ]
    return [doc.problem(path, doc.scrub(error.message))]


def _at(data: object, path: Path) -> object:
    for part in path:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# ---------------------------------------------------------------------------------------------------
# Semantic checks and the typed build (on every part that passed the schema; quiet() says which)

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class _SpecBuilder:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.d: dict[str, Any] = doc.data  # type: ignore[assignment]
        self.problems: list[Problem] = []
        self.venues_known = True  # false when `venues` itself is refused: references to venues stay quiet
        self.withheld: set[str] = set()  # venues refused by the schema: references to them stay quiet
        self.sink_names: set[str] = set()
        _mark_secrets(self.d, doc.from_env)

    def err(self, path: Path, message: str) -> None:
        self.problems.append(self.doc.problem(path, message))

    def quiet(self, path: Path, inside: bool = True) -> bool:
        """Whether `path` (or, with inside, anything under it) was refused earlier: checks skip it
        rather than report what follows from a problem already reported."""
        return any(path[: len(b)] == b or (inside and b[: len(path)] == path) for b in self.doc.broken)

    def items(self, path: Path, value: object) -> list[tuple[int, Any]]:
        """The list items at `path` that no earlier problem touches, with their indexes."""
        return [(i, v) for i, v in enumerate(value) if not self.quiet((*path, i))] if isinstance(value, list) else []

    def build(self) -> Spec | None:
        """Semantic checks on every part that passed the schema; the Spec only if nothing at all failed."""
        d = self.d
        defaults = d.get("defaults", {})
        raw_venues = d.get("venues")
        self.venues_known = isinstance(raw_venues, dict) and not self.quiet(("venues",), inside=False)
        venues = tuple(
            self._venue(name, raw, defaults)
            for name, raw in (raw_venues.items() if self.venues_known else ())
            if not self.quiet(("venues", name)) and not self._inherits_refused(raw)
        )
        self.withheld = set(raw_venues) - {v.name for v in venues} if self.venues_known else set()
        self._check_ccxt(venues)
        rollout = self._rollout(d["rollout"], venues) if self._rollout_checkable() else None
        health = self._health(d["health"]) if isinstance(d.get("health"), dict) else Health()
        sharded = d.get("workers", 1) != 1 or isinstance(d.get("shard"), dict)
        default_sinks = [{"type": "jsonl", "path": "data/{venue}/{date}" + ("-{shard}" if sharded else "") + ".jsonl"}]
        sinks = tuple(self._sink(i, s) for i, s in self.items(("sinks",), d.get("sinks", default_sinks)))
        server = self._server(d.get("server", {})) if not self.quiet(("server",)) else Server()
        if d.get("event_loop") == "uvloop" and not eventloop.uvloop_available():
            self.err(("event_loop",), "uvloop is not installed here: install it, or set auto or asyncio")
        shard = self._shard(d.get("shard")) if not self.quiet(("shard",)) else Shard()
        workers = self._workers(d.get("workers", 1), sinks) if not self.quiet(("workers",)) else 1
        if self.problems or self.doc.broken:
            return None
        q = d.get("queue", {})
        coord = d.get("coordination", {})
        log = d.get("logging", {})
        sim = d.get("simulator", {})
        return Spec(
            source=self.doc.file,
            version=d["version"],
            environment=d.get("environment", "simulator"),
            venues=venues,
            rollout=rollout,
            health=health,
            sinks=sinks,
            queue=QueueSpec(q.get("size", 100_000), q.get("overflow", "block")),
            server=server,
            state_url=d.get("state", {}).get("url", "sqlite:///var/feedrunner.db"),
            log_level=log.get("level", "INFO"),
            log_format=log.get("format", "text"),
            sim_seed=sim.get("seed", 1),
            sim_rate=float(sim.get("rate", 5)),
            shutdown_deadline=units.duration(d.get("shutdown", {}).get("deadline", "20s")),
            event_loop=d.get("event_loop", "auto"),
            workers=workers,
            shard=shard,
            coordination=Coordination(
                units.duration(coord.get("lease", "10s")), units.duration(coord.get("poll", "1s"))
            ),
        )

    def _shard(self, raw: dict[str, Any] | None) -> Shard:
        if raw is None:
            return Shard()
        if raw["index"] >= raw["count"]:
            self.err(("shard", "index"), f"index {raw['index']} is not below count {raw['count']} (indexes start at 0)")
        return Shard(raw["index"], raw["count"])

    def _workers(self, raw: int | str, sinks: tuple[Sink, ...]) -> int:
        workers = workers_wanted(raw)  # the schema let only a number >= 1 or auto through
        if workers > 1:
            for i, sink in enumerate(sinks):
                problem = shared_file(sink)
                if problem and not self.quiet(("sinks", i)):
                    self.err(("sinks", i, *problem[0]), problem[1])
        return workers

    # -- venues ----------------------------------------------------------------------------------

    def _setting(self, name: str, raw: dict[str, Any], defaults: dict[str, Any], fallback: Any) -> tuple[Any, Path]:
        """A venue setting with inheritance, and the path where its value was written."""
        vname = raw["__name__"]
        if name in raw:
            return raw[name], ("venues", vname, name)
        if name in defaults:
            return defaults[name], ("defaults", name)
        return fallback, ("venues", vname)

    def _inherits_refused(self, raw: dict[str, Any]) -> bool:
        """Whether a venue takes a setting from a part of `defaults` that was refused (backoff and
        circuit_breaker are merged key by key, every other setting is taken whole)."""
        for b in self.doc.broken:
            if b[:1] != ("defaults",):
                continue
            if len(b) == 1 or b[1] not in raw:
                return True
            if b[1] in ("backoff", "circuit_breaker"):
                own = raw[b[1]]
                if len(b) == 2 or not isinstance(own, dict) or b[2] not in own:
                    return True
        return False

    def _venue(self, name: str, raw: dict[str, Any], defaults: dict[str, Any]) -> Venue:
        raw = {**raw, "__name__": name}
        vpath: Path = ("venues", name)
        adapter = raw["adapter"]
        transport, _ = self._setting("transport", raw, defaults, "websocket")
        channels, cpath = self._setting("channels", raw, defaults, ["trades", "ticker"])
        poll, _ = self._setting("poll_interval", raw, defaults, "1s")
        stale_raw, spath = self._setting("stale_after", raw, defaults, "15s")
        depth, _ = self._setting("book_depth", raw, defaults, 20)
        close_timeout, _ = self._setting("close_timeout", raw, defaults, "5s")
        backoff = self._backoff(raw, defaults)
        cb_raw = {**defaults.get("circuit_breaker", {}), **raw.get("circuit_breaker", {})}
        breaker = CircuitBreakerSpec(
            cb_raw.get("failure_threshold", 5), units.duration(cb_raw.get("recovery_timeout", "60s"))
        )
        poll_s = units.duration(poll)

        supported = ADAPTER_CHANNELS[adapter]
        for i, ch in enumerate(channels):
            if ch not in supported:
                self.err(
                    (*cpath, i),
                    f"channel '{ch}' is not supported by adapter {adapter} (supported: {', '.join(sorted(supported))})",
                )
        if isinstance(stale_raw, dict):
            fallback = units.duration(stale_raw.get("default", "15s"))
            stale = {ch: units.duration(stale_raw[ch]) if ch in stale_raw else fallback for ch in channels}
        else:
            stale = dict.fromkeys(channels, units.duration(stale_raw))
        if transport in ("polling", "hybrid"):
            for ch, s in stale.items():
                if s <= poll_s:
                    self.err(
                        spath,
                        f"stale_after for {ch} ({units.fmt_duration(s)}) must be longer than "
                        f"poll_interval ({units.fmt_duration(poll_s)}): polled symbols would look stale",
                    )

        symbols: list[str] = []
        contracts: dict[str, IbContract] = {}
        first_at: dict[str, int] = {}
        for i, item in enumerate(raw["symbols"]):
            if isinstance(item, dict):
                if adapter != "ib":
                    self.err(
                        (*vpath, "symbols", i),
                        f"contract mappings are only for adapter ib; adapter {adapter} takes symbol strings",
                    )
                    continue
                c = IbContract(
                    item["symbol"],
                    item.get("sec_type", "STK"),
                    item.get("exchange", "SMART"),
                    item.get("currency", "USD"),
                    item.get("primary_exchange"),
                    item.get("last_trade_date"),
                )
                key = c.symbol + (f"-{c.last_trade_date}" if c.last_trade_date else "")
                contracts[key] = c
            else:
                key = item
            if key in first_at:
                self.err((*vpath, "symbols", i), f"duplicate symbol '{key}' (also at symbols[{first_at[key]}])")
                continue
            first_at[key] = i
            symbols.append(key)

        if adapter == "ib":
            # A ticker line per symbol, plus a tick-by-tick line per symbol that prints trades (FX does not).
            fx = sum(1 for s in symbols if _is_ib_fx(s, contracts.get(s)))
            lines = len(symbols) * ("ticker" in channels) + (len(symbols) - fx) * ("trades" in channels)
            limit = raw.get("market_data_lines", 100)
            if lines > limit:
                self.err(
                    (*vpath, "symbols"),
                    f"needs {lines} market-data lines ({len(symbols)} symbols, channels "
                    f"{', '.join(channels)}) but market_data_lines is {limit}",
                )
        if adapter == "futu":
            subs = len(symbols) * len(channels)
            quota = raw.get("quota", 100)
            if subs > quota:
                self.err(
                    (*vpath, "symbols"),
                    f"needs {subs} subscriptions ({len(symbols)} symbols x "
                    f"{len(channels)} channels) but the quota is {quota}",
                )
        creds = {k: Secret(v) for k, v in raw.get("credentials", {}).items() if v}
        return Venue(
            name=name,
            adapter=adapter,
            symbols=tuple(symbols),
            channels=tuple(channels),
            transport=transport,
            poll_interval=poll_s,
            stale_after=stale,
            book_depth=depth,
            backoff=backoff,
            circuit_breaker=breaker,
            enabled=raw.get("enabled", True),
            close_timeout=units.duration(close_timeout),
            exchange=raw.get("exchange"),
            endpoints=dict(raw.get("endpoints", {})),
            credentials=creds,
            rate_limit=raw.get("rate_limit"),
            trades_buffer=raw.get("trades_buffer", 1000),
            host=raw.get("host"),
            port=raw.get("port"),
            client_id=raw.get("client_id"),
            contracts=contracts,
            market_data_lines=raw.get("market_data_lines", 100),
            market_data_type=raw.get("market_data_type", "live"),
            quota=raw.get("quota", 100),
            min_subscription=units.duration(raw.get("min_subscription", "1m")),
        )

    def _backoff(self, raw: dict[str, Any], defaults: dict[str, Any]) -> Backoff:
        mine, inherited = raw.get("backoff", {}), defaults.get("backoff", {})
        merged = {**inherited, **mine}
        b = Backoff(
            base=units.duration(merged.get("base", "1s")),
            cap=units.duration(merged.get("cap", "60s")),
            factor=float(merged.get("factor", 2)),
            jitter=float(merged.get("jitter", 0.2)),
            max_attempts=int(merged.get("max_attempts", 50)),
            reset_after=units.duration(merged.get("reset_after", "60s")),
        )
        if b.base > b.cap:
            # Point at the block that wrote the conflicting value: the venue's own, else the defaults.
            block, written = (
                (("venues", raw["__name__"], "backoff"), mine)
                if ("cap" in mine or "base" in mine)
                else (("defaults", "backoff"), inherited)
            )
            key = "cap" if "cap" in written else "base"
            self.err(
                (*block, key),
                f"cap ({units.fmt_duration(b.cap)}) must be >= base ({units.fmt_duration(b.base)})",
            )
        return b

    def _check_ccxt(self, venues: tuple[Venue, ...]) -> None:
        ccxt_venues = [v for v in venues if v.adapter == "ccxt" and v.enabled]
        if not ccxt_venues:
            return
        rollout = (self.d.get("rollout") or {}) if self._rollout_checkable() else {}
        rollout_on = bool(rollout) and rollout.get("enabled", True)
        transports_of_rollout = (
            {rollout.get("baseline", "polling"), rollout.get("target", "websocket")} if rollout_on else set()
        )
        for v in ccxt_venues:
            path: Path = ("venues", v.name, "exchange")
            info = ccxt_capabilities(v.exchange or "")
            if info is None:
                close = difflib.get_close_matches(v.exchange or "", ccxt_exchange_ids(), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.err(path, f"'{v.exchange}' is not an exchange of the installed ccxt{hint}")
                continue
            pro, has_ws, has_rest = info
            wanted = {v.transport} | transports_of_rollout
            if wanted & {"websocket", "hybrid"}:
                if not pro:
                    self.err(
                        path,
                        f"ccxt has no websocket (ccxt.pro) support for '{v.exchange}': use transport: polling",
                    )
                else:
                    missing = [ch for ch in v.channels if not has_ws.get(_CCXT_WATCH[ch])]
                    if missing:
                        self.err(
                            path,
                            f"ccxt.pro {v.exchange} cannot stream {', '.join(missing)} "
                            f"({', '.join(_CCXT_WATCH[c] for c in missing)} unsupported)",
                        )
            if wanted & {"polling", "hybrid"}:
                missing = [ch for ch in v.channels if not has_rest.get(_CCXT_FETCH[ch])]
                if missing:
                    self.err(path, f"ccxt {v.exchange} cannot poll {', '.join(missing)}")

    # -- rollout ---------------------------------------------------------------------------------

    def _rollout_checkable(self) -> bool:
        """A rollout whose transports and phase list passed the schema (single phases may not have)."""
        keys = ("baseline", "target", "enabled", "phases")
        return "rollout" in self.d and not any(self.quiet(("rollout", k), inside=False) for k in keys)

    def _rollout(self, r: dict[str, Any], venues: tuple[Venue, ...]) -> Rollout:
        by_name = {v.name: v for v in venues}
        everything = [(v.name, s) for v in venues if v.enabled for s in v.symbols]
        baseline, target = r.get("baseline", "polling"), r.get("target", "websocket")
        if baseline == target:
            self.err(("rollout", "target"), f"target must differ from baseline ({baseline})")
        phases: list[Phase] = []
        names: dict[str, int] = {}
        previous: set[tuple[str, str]] = set()
        for i, p in enumerate(r["phases"]):
            ppath: Path = ("rollout", "phases", i)
            if self.quiet(ppath):
                previous = set()  # growth is checked again from the next phase that passed the schema
                continue
            if p["name"] in names:
                self.err((*ppath, "name"), f"duplicate phase name '{p['name']}' (also phases[{names[p['name']]}])")
            names.setdefault(p["name"], i)
            chosen = self._select(p["symbols"], (*ppath, "symbols"), by_name, everything)
            missing = previous - set(chosen)
            if missing:
                sample = ", ".join(f"{v}:{s}" for v, s in sorted(missing)[:3])
                self.err(
                    (*ppath, "symbols"),
                    f"phases only grow: this phase drops {len(missing)} symbol(s) of the previous one ({sample})",
                )
            previous |= set(chosen)
            last = i == len(r["phases"]) - 1
            if "dwell" not in p and not last:
                self.err(ppath, "missing required key 'dwell' (every phase but the last needs one)")
            dwell = units.duration(p["dwell"]) if "dwell" in p else None
            phases.append(Phase(p["name"], tuple(chosen), dwell, p.get("approval", "auto")))
        gates = [
            (i, self._condition(c, ("rollout", "gates", i)))
            for i, c in self.items(("rollout", "gates"), r.get("gates", []))
        ]
        for i, g in gates:
            for ph in phases:
                if ph.dwell is not None and g.window > ph.dwell:
                    self.err(
                        ("rollout", "gates", i, "window"),
                        f"window ({units.fmt_duration(g.window)}) is longer than the dwell of phase "
                        f"'{ph.name}' ({units.fmt_duration(ph.dwell)}): the gate could never fill its window",
                    )
                    break
        rollback = tuple(
            self._condition(c, ("rollout", "rollback", i))
            for i, c in self.items(("rollout", "rollback"), r.get("rollback", []))
        )
        rec = r.get("recovery", {})
        recovery = (
            Recovery()
            if self.quiet(("rollout", "recovery"))
            else Recovery(
                units.duration(rec.get("cooldown", "30m")),
                rec.get("restart_from", "first"),
                rec.get("max_attempts", 3),
            )
        )
        return Rollout(
            r.get("enabled", True), baseline, target, tuple(phases), tuple(g for _, g in gates), rollback, recovery
        )

    def _select(
        self, sel: Any, path: Path, by_name: dict[str, Venue], everything: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        if sel == "all":
            return list(everything)
        if isinstance(sel, dict):
            venue = by_name.get(sel["venue"])
            if venue is None:
                self._unknown_venue((*path, "venue"), sel["venue"], by_name)
                return []
            n = sel.get("first", len(venue.symbols))
            if n > len(venue.symbols):
                self.err(
                    (*path, "first"),
                    f"asks for the first {n} symbols but venue '{venue.name}' lists {len(venue.symbols)}",
                )
            return [(venue.name, s) for s in venue.symbols[:n]]
        chosen = []
        for i, ref in enumerate(sel):
            vname, _, symbol = ref.partition(":")
            venue = by_name.get(vname)
            if venue is None:
                self._unknown_venue((*path, i), vname, by_name)
            elif symbol not in venue.symbols:
                close = difflib.get_close_matches(symbol, venue.symbols, n=1)
                hint = f"; did you mean '{vname}:{close[0]}'?" if close else ""
                self.err((*path, i), f"'{symbol}' is not a symbol of venue '{vname}'{hint}")
            elif not venue.enabled:
                self.err((*path, i), f"venue '{vname}' is disabled")
            else:
                chosen.append((vname, symbol))
        return chosen

    def _unknown_venue(self, path: Path, name: str, by_name: dict[str, Venue]) -> None:
        if not self.venues_known or name in self.withheld:
            return  # the venue exists but was refused: its problems are reported where they are
        close = difflib.get_close_matches(name, list(by_name), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (venues: {', '.join(by_name)})"
        self.err(path, f"no venue named '{name}'{hint}")

    def _condition(self, c: dict[str, Any], path: Path) -> Condition:
        metric = c["metric"]
        op = next(o for o in OPERATORS if o in c)
        kind = METRIC_KINDS[metric]
        threshold = 0.0
        try:
            threshold = _KIND_PARSE[kind](c[op])
        except (ValueError, TypeError):
            self.err(
                (*path, op),
                f"{metric} is compared with a {kind} like {_KIND_EXAMPLE[kind]} "
                f"(got {_show(self.doc, (*path, op), c[op])})",
            )
        if kind == "ratio" and not 0 <= threshold <= 1:
            self.err((*path, op), f"{metric} is a ratio between 0% and 100%")
        window = units.duration(c.get("window", "5m"))
        name = c.get("name") or f"{metric} {op.replace('_', ' ')} {c[op]}"
        return Condition(metric, op, threshold, window, c.get("min_samples", 1), name)

    # -- the rest --------------------------------------------------------------------------------

    def _health(self, h: dict[str, Any]) -> Health:
        checks = tuple(
            self._condition(c, ("health", "checks", i))
            for i, c in self.items(("health", "checks"), h.get("checks", []))
        )
        if self.quiet(("health",)):
            return Health(checks=checks)  # no Spec is built; the checks above are what could still be checked
        hook = h.get("alerts", {}).get("webhook")
        webhook = None
        if isinstance(hook, str) and hook:
            webhook = Webhook(Secret(hook))
        elif isinstance(hook, dict) and hook["url"]:
            webhook = Webhook(
                Secret(hook["url"]), units.duration(hook.get("timeout", "5s")), hook.get("max_attempts", 5)
            )
        return Health(units.duration(h.get("interval", "15s")), checks, webhook)

    def _template(self, path: Path, text: str, allowed: frozenset[str]) -> None:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as exc:
            self.err(path, f"bad template: {exc}")
            return
        unknown = fields - allowed
        if unknown:
            self.err(
                path,
                f"unknown placeholder(s) {', '.join('{' + f + '}' for f in sorted(unknown))}"
                f"; use {', '.join('{' + f + '}' for f in sorted(allowed))}",
            )

    def _sink(self, i: int, s: dict[str, Any]) -> Sink:
        kind = s["type"]
        at = ("sinks", i)
        allowed = _SINK_KEYS[kind]
        for key in s:
            if key not in allowed:
                self.err((*at, key), f"not a setting of {kind} sinks (they take {', '.join(sorted(allowed))})")
        path = s.get("path")
        if path is not None:
            self._template((*at, "path"), path, PARQUET_FIELDS if kind == "parquet" else SINK_FIELDS)
        for key in ("topic", "key", "subject") + (("stream",) if kind == "redis" else ()):
            if key in s:
                self._template((*at, key), s[key], BUS_FIELDS)
        name = s.get("name", "")
        label = name or kind + (f":{path}" if path else "")
        if label in self.sink_names:
            self.err(
                (*at, "name") if name else (*at, "type"), f"another sink is also named {label!r}: give each a name"
            )
        self.sink_names.add(label)
        dur = units.duration
        delivery = kafka = nats = red = parquet = None
        if kind in BUSES:
            sp, r = s.get("spool", {}), s.get("retry", {})
            retry = Retry(
                dur(r.get("base", "500ms")),
                dur(r.get("cap", "30s")),
                float(r.get("factor", 2)),
                float(r.get("jitter", 0.2)),
            )
            if retry.base > retry.cap:
                self.err((*at, "retry", "cap"), "cap must be >= base")
            spool = SpoolSpec(
                sp.get("path") or str(self._spool_root() / _safe_dir(label)),
                max_bytes := int(units.size(sp.get("max_bytes", "1GiB"))),
                # Unset, a segment is an eighth of the bound (at most 64MiB): a full spool drops in steps.
                int(units.size(sp["segment_bytes"]))
                if "segment_bytes" in sp
                else max(4096, min(64 << 20, max_bytes // 8)),
                sp.get("fsync", "interval"),
                dur(sp.get("fsync_interval", "1s")),
                sp.get("overflow", "drop_oldest"),
            )
            if spool.segment_bytes > spool.max_bytes:
                self.err((*at, "spool", "segment_bytes"), "must be <= max_bytes")
            elif spool.segment_bytes < 4096:
                self.err((*at, "spool", "segment_bytes"), "must be at least 4KiB")
            delivery = Delivery(
                spool, s.get("buffer", 50_000), s.get("batch", 5_000), dur(s.get("timeout", "10s")), retry
            )
            if delivery.batch > delivery.buffer:
                self.err((*at, "batch"), f"must be <= buffer ({delivery.buffer})")
        if kind == "kafka":
            kafka = KafkaSpec(
                tuple(s["brokers"]),
                s.get("topic", "md.{venue}.{kind}"),
                s.get("key", "{venue}:{symbol}"),
                s.get("acks", "all"),
                s.get("compression", "zstd"),
                dur(s.get("linger", "5ms")),
                int(units.size(s.get("batch_bytes", "1MiB"))),
                int(units.size(s.get("message_max_bytes", "1MB"))),
                s.get("security_protocol", "plaintext"),
                s.get("sasl_mechanism"),
                _secret(s.get("username")),
                _secret(s.get("password")),
                s.get("ca_file"),
                s.get("cert_file"),
                s.get("key_file"),
            )
            if kafka.security_protocol.startswith("sasl") and not (kafka.sasl_mechanism and kafka.username):
                self.err((*at, "security_protocol"), "SASL needs sasl_mechanism, username and password")
        elif kind == "nats":
            nats = NatsSpec(
                tuple(Secret(u) for u in s["servers"]),
                s.get("subject", "md.{venue}.{kind}.{symbol}"),
                s.get("stream", "MD"),
                s.get("create_stream", True),
                dur(s.get("duplicate_window", "2m")),
                s.get("max_pending", 2000),
                _secret(s.get("username")),
                _secret(s.get("password")),
                _secret(s.get("token")),
                s.get("creds_file"),
                s.get("ca_file"),
                s.get("cert_file"),
                s.get("key_file"),
            )
            if not _NATS_STREAM.fullmatch(nats.stream):
                self.err((*at, "stream"), "a JetStream stream name: letters, digits, '-' and '_'")
        elif kind == "redis":
            red = RedisSpec(Secret(s["url"]), s.get("stream", "md:{venue}:{kind}"), s.get("maxlen", 1_000_000))
            if not str(red.url).startswith(("redis://", "rediss://", "unix://")):
                self.err((*at, "url"), "must be a redis://, rediss:// or unix:// URL")
        elif kind == "parquet":
            parquet = ParquetSpec(
                path or "data/parquet/{venue}/{kind}/{date}",
                s.get("partition", "day"),
                s.get("compression", "zstd"),
                s.get("row_group_rows", 100_000),
                dur(s.get("row_group_interval", "1m")),
                dur(s.get("roll_interval", "10m")),
            )
        return Sink(
            kind,
            path,
            dur(s.get("flush_interval", "1s")),
            s.get("max_open_files", 64),
            tuple(s.get("kinds", ("trade", "ticker", "book"))),
            name,
            delivery,
            kafka,
            nats,
            red,
            parquet,
        )

    def _spool_root(self) -> FsPath:
        """spool/ beside the SQLite state file, else var/spool."""
        url = self.d.get("state", {}).get("url", "sqlite:///var/feedrunner.db")
        if isinstance(url, str) and url.startswith("sqlite:///") and ":memory:" not in url:
            db = url.removeprefix("sqlite:///").split("?", 1)[0].removeprefix("file:")
            return FsPath(db).parent / "spool"
        return FsPath("var/spool")

    def _server(self, s: dict[str, Any]) -> Server:
        listen = s.get("listen", "127.0.0.1:9108")
        host, _, port_text = listen.rpartition(":")
        port = int(port_text)
        if port > 65535:
            self.err(("server", "listen"), f"port {port} is out of range (0-65535)")
        token = Secret(s["token"]) if s.get("token") else None
        if s.get("enabled", True) and not _is_loopback(host) and token is None:
            self.err(
                ("server", "listen"),
                f"listening on {host} (not loopback) requires server.token, e.g. token: ${{FEEDRUNNER_TOKEN}}",
            )
        allowed = tuple(h.lower() for h in s.get("allowed_hosts", ()))
        if "*" in allowed and token is None:
            self.err(
                ("server", "allowed_hosts", allowed.index("*")),
                "'*' answers any Host, which lets a rebinding web page in: it requires server.token",
            )
        for i, entry in enumerate(allowed):
            _, colon, entry_port = entry.rpartition(":")
            if colon and "]" not in entry_port and int(entry_port) > 65535:
                self.err(("server", "allowed_hosts", i), f"port {entry_port} is out of range (0-65535)")
        timeout = units.duration(s.get("header_timeout", "10s"))
        return Server(
            s.get("enabled", True), host.strip("[]"), port, token, allowed, timeout, s.get("max_connections", 64)
        )


def _mark_secrets(data: object, from_env: Iterable[Path]) -> None:
    """Every string that took a value from the environment through ${VAR} becomes a Secret wherever it
    lands (a state URL, an endpoint, a host), so /config shows its fingerprint only. A ${VAR:-default}
    whose default was used was written in the file and stays plain; numbers and booleans coerced from
    one stay as they are."""
    for path in from_env:
        parent = _at(data, path[:-1])
        if isinstance(parent, dict) and isinstance(parent.get(path[-1]), str):
            parent[path[-1]] = Secret(parent[path[-1]])
        elif isinstance(parent, list) and isinstance(path[-1], int) and isinstance(parent[path[-1]], str):
            parent[path[-1]] = Secret(parent[path[-1]])


def _is_ib_fx(symbol: str, contract: IbContract | None) -> bool:
    if contract is not None:
        return contract.sec_type == "CASH"
    return re.fullmatch(r"[A-Z]{3}\.[A-Z]{3}", symbol) is not None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------
# ccxt facts, looked up once per process


@functools.cache
def ccxt_exchange_ids() -> tuple[str, ...]:
    from feedrunner.lazyccxt import ccxt

    return tuple(ccxt.exchanges)


@functools.cache
def ccxt_capabilities(exchange: str) -> tuple[bool, dict[str, Any], dict[str, Any]] | None:
    """(has ccxt.pro, ccxt.pro `has`, REST `has`) for an exchange id, or None if ccxt lacks it."""
    if exchange not in ccxt_exchange_ids():
        return None
    from feedrunner.lazyccxt import ccxt

    # The async class has the same REST `has` as the sync one, and the runner loads it anyway.
    rest = dict(getattr(ccxt.async_support, exchange)().has)
    if exchange in ccxt.pro.exchanges:
        return True, dict(getattr(ccxt.pro, exchange)().has), rest
    return False, {}, rest


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def workers_wanted(raw: int | str, name: str = "workers") -> int:
    """`workers` as feeds.yaml or --workers gives it: a whole number >= 1, or auto (the cores)."""
    if raw == "auto":
        return available_cores()
    if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
        if int(raw) >= 1:
            return int(raw)
    raise ValueError(f"{name} takes a whole number >= 1 or auto (got {raw!r})")


def shared_file(sink: Sink) -> tuple[tuple[str, ...], str] | None:
    """(key path, message) when workers on one host would write the same files through this sink."""
    if sink.type == "jsonl" and "{shard}" not in (sink.path or ""):
        return ("path",), "several workers would write the same files: put {shard} in the path"
    if sink.type == "parquet" and sink.parquet is not None and "{shard}" not in sink.parquet.path:
        return ("parquet", "path"), "several workers would write the same files: put {shard} in the path"
    return None


def describe(spec: Spec) -> str:
    """A readable plan of what `run` would do; never prints a secret."""
    lines = [f"{spec.source}: valid ({spec.environment})"]
    for v in spec.venues:
        state = "" if v.enabled else "  [disabled]"
        where = v.exchange if v.adapter == "ccxt" else f"{v.host or '127.0.0.1'}:{v.port or '-'}"
        lines.append(
            f"  venue {v.name}: {v.adapter} {where}, {len(v.symbols)} symbols, "
            f"channels {','.join(v.channels)}, transport {v.transport}{state}"
        )
        shown = ", ".join(v.symbols[:12]) + (f", ... (+{len(v.symbols) - 12})" if len(v.symbols) > 12 else "")
        lines.append(f"    {shown}")
    if spec.rollout and spec.rollout.enabled:
        r = spec.rollout
        lines.append(f"  rollout: {r.baseline} -> {r.target}, {len(r.phases)} phases")
        for p in r.phases:
            dwell = units.fmt_duration(p.dwell) if p.dwell is not None else "until done"
            approval = ", manual approval" if p.approval == "manual" else ""
            lines.append(f"    {p.name}: {len(p.symbols)} symbols, dwell {dwell}{approval}")
        lines.append(f"    gates: {'; '.join(g.name for g in r.gates) or 'none'}")
        lines.append(f"    rollback: {'; '.join(g.name for g in r.rollback) or 'none'}")
    sinks = ", ".join(s.type + (f" {s.path}" if s.path else "") for s in spec.sinks)
    lines.append(f"  sinks: {sinks}; queue {spec.queue.size} ({spec.queue.overflow})")
    lines.append(f"  server: {spec.server.host}:{spec.server.port}" if spec.server.enabled else "  server: off")
    return "\n".join(lines)


__all__ = [
    "Problem",
    "Secret",
    "Spec",
    "SpecError",
    "Venue",
    "check_file",
    "check_text",
    "describe",
    "format_path",
    "load_spec",
    "schema",
]
