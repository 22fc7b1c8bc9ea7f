"""Prometheus alerting rules from a Spec (`feedrunner alerts --prometheus`), judged as the runner judges.

Each health check, rollback trigger and rollout gate becomes one alert over what /metrics exports, so a
threshold alerts in Prometheus when the runner acts on it:

- latency and message rate are pooled over the venues in scope (Health merges their buckets); error
  rate, reconnects, uptime and staleness are read per venue and the worst venue decides, so a condition
  that fires on the worst venue is an alert per venue;
- a windowed metric is inconclusive (never fires) until the runner holds a whole window of data:
  feedrunner_health_coverage_seconds says how much it holds;
- a rollback trigger counts while the rollout can roll back, a gate while it can promote, both over the
  venues and the target transport of the current phase (feedrunner_rollout_phase, _state);
- a gate alerts when it fails, that is when it holds the promotion back.

What the exported metrics cannot say is printed as a comment with the reason, never left out. Two
readings are close rather than identical: a latency quantile (the runner reports the upper edge of the
bucket holding it, Prometheus interpolates within its histogram's buckets) and uptime (the runner samples
every second, Prometheus at each scrape).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from feedrunner import units
from feedrunner.health import INSTANT_METRICS, SLACK
from feedrunner.rollout import ACTIVE
from feedrunner.rollout import State as RolloutState
from feedrunner.spec import METRIC_KINDS, Condition, Spec

ON = "on(job, instance)"  # series of the same runner: one scrape target
OPS = {"below": "<", "above": ">", "at_most": "<=", "at_least": ">="}
NEGATED = {"below": "at_least", "above": "at_most", "at_most": "above", "at_least": "below"}
QUANTILES = {"latency_p50": 0.5, "latency_p95": 0.95, "latency_p99": 0.99}
PER_VENUE = frozenset({"error_rate", "reconnects_per_hour", "uptime", "staleness"})
SAMPLED = frozenset({"uptime", "reconnects_per_hour", "memory_growth"})  # samples: seconds sampled, one a second
PROCESS = frozenset({"memory_rss", "memory_growth"})  # of the process, whichever venues are in scope
RANGED = frozenset({*QUANTILES, "latency_avg", "message_rate", "error_rate", "reconnects_per_hour", "uptime"})
# Rollout.evaluate checks triggers in these states and gates in ACTIVE ones.
ROLLBACK_STATES = tuple(s.value for s in (*ACTIVE, RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL))
GATE_STATES = tuple(s.value for s in ACTIVE)
EVENT_WINDOW = 300.0  # seconds over which a lost trade or a dropped event keeps its alert firing

_VALUE = {
    "duration": "{{ $value | humanizeDuration }}",
    "ratio": "{{ $value | humanizePercentage }}",
    "size": "{{ $value | humanize }}B",
    "number": '{{ printf "%.3g" $value }}',
}
_WHAT = {
    "latency_p50": "p50 latency (venue timestamp to receive)",
    "latency_p95": "p95 latency (venue timestamp to receive)",
    "latency_p99": "p99 latency (venue timestamp to receive)",
    "latency_avg": "average latency (venue timestamp to receive)",
    "message_rate": "events per second",
    "error_rate": "error rate (errors / (errors + events))",
    "reconnects_per_hour": "reconnects per hour",
    "uptime": "uptime (connected and delivering)",
    "staleness": "longest symbol silence",
    "memory_rss": "resident memory",
    "memory_growth": "memory growth",
}


@dataclass(frozen=True, slots=True)
class Rule:
    alert: str
    expr: str
    severity: str
    annotations: dict[str, str]
    for_: float = 0.0
    note: str = ""  # printed as a comment above the rule

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alert": self.alert, "expr": self.expr}
        if self.for_:
            out["for"] = prom_duration(self.for_)
        out["labels"] = {"severity": self.severity}
        out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True)
class Omitted:
    """A condition with no equivalent over /metrics: printed as a comment saying why."""

    path: str
    name: str
    why: str


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    entries: tuple[Rule | Omitted, ...] = field(default_factory=tuple)

    @property
    def rules(self) -> list[Rule]:
        return [e for e in self.entries if isinstance(e, Rule)]


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a condition is judged: these venues, this transport, while `guard` has a series."""

    venues: tuple[str, ...]
    transport: str | None = None
    guard: str | None = None


# -- formatting ---------------------------------------------------------------------------------------


def prom_duration(seconds: float) -> str:
    """A Prometheus duration (no fractions): 1.5s is 1500ms."""
    ms = max(1, round(seconds * 1000))
    for unit, scale in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % scale == 0:
            return f"{ms // scale}{unit}"
    return f"{ms}ms"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _show(kind: str, x: float) -> str:
    """A threshold in the spec's notation."""
    if kind == "duration":
        return units.fmt_duration(x)
    if kind == "ratio":
        return f"{x * 100:g}%"
    if kind == "size":
        for unit, scale in (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10), ("KB", 1000)):
            if x >= scale and (x / scale).is_integer():
                return f"{int(x / scale)}{unit}"
        return f"{x:g}B"
    return f"{x:g}"


def _literal(text: str) -> str:
    """A user-given name as template text: braces cannot open a template action."""
    text = " ".join(text.split())
    return re.sub(r"\{\{|\}\}", lambda m: '{{ "' + m.group() + '" }}', text)


def _camel(metric: str) -> str:
    return "".join(part.capitalize() for part in metric.split("_"))


def _match(venues: Sequence[str], transport: str | None = None) -> str:
    parts = [f'venue="{venues[0]}"' if len(venues) == 1 else f'venue=~"{"|".join(venues)}"']
    if transport:
        parts.append(f'transport="{transport}"')
    return "{" + ",".join(parts) + "}"


# -- one condition --------------------------------------------------------------------------------------


def _counts(window: float, scope: Scope) -> tuple[str, str]:
    """Per venue over the window: (errors, events), each zero for a running venue that has none yet."""
    r, v = prom_duration(window), _match(scope.venues)
    zero = f"feedrunner_connection_up{v} * 0"  # one series per running venue, from its start
    errors = f"(sum without (kind) (increase(feedrunner_errors_total{v}[{r}])) or {zero})"
    events = f"(sum without (transport, kind) (increase(feedrunner_messages_received_total{v}[{r}])) or {zero})"
    return errors, events


def _value(metric: str, window: float, scope: Scope) -> str:
    """The metric as Health computes it, over what /metrics exports."""
    r, v, vt = prom_duration(window), _match(scope.venues), _match(scope.venues, scope.transport)
    if metric in QUANTILES:
        return (
            f"histogram_quantile({QUANTILES[metric]}, "
            f"sum without (venue, transport) (rate(feedrunner_latency_seconds_bucket{vt}[{r}])))"
        )
    if metric == "latency_avg":
        return (
            f"sum without (venue, transport) (rate(feedrunner_latency_seconds_sum{vt}[{r}]))"
            f" / sum without (venue, transport) (rate(feedrunner_latency_seconds_count{vt}[{r}]))"
        )
    if metric == "message_rate":  # no event at all is a rate of 0, as in Health.rate
        return (
            f"(sum without (venue, transport, kind) (rate(feedrunner_messages_received_total{vt}[{r}]))"
            " or feedrunner_health_coverage_seconds * 0)"
        )
    if metric == "error_rate":
        errors, events = _counts(window, scope)
        return f"{errors} / ({errors} + {events})"
    if metric == "reconnects_per_hour":
        return f"(increase(feedrunner_reconnects_total{v}[{r}]) or feedrunner_connection_up{v} * 0)" + (
            "" if window == 3600 else f" * 3600 / {_num(max(window, 1.0))}"
        )
    if metric == "uptime":
        return f"avg_over_time(feedrunner_venue_up{v}[{r}])"
    if metric == "staleness":
        return f"feedrunner_staleness_seconds{v}"
    if metric == "memory_rss":
        return "feedrunner_memory_rss_bytes"
    if metric == "memory_growth":
        return f"feedrunner_memory_rss_bytes - feedrunner_memory_rss_bytes offset {r}"
    raise ValueError(f"no expression for metric {metric}")


def _samples(metric: str, window: float, scope: Scope) -> str:
    """What Health counts as the samples behind a reading (min_samples)."""
    r, vt = prom_duration(window), _match(scope.venues, scope.transport)
    if metric.startswith("latency_"):
        return f"sum without (venue, transport) (increase(feedrunner_latency_seconds_count{vt}[{r}]))"
    if metric == "message_rate":
        return f"sum without (venue, transport, kind) (increase(feedrunner_messages_received_total{vt}[{r}]))"
    errors, events = _counts(window, scope)
    return f"({errors} + {events})"


def _per_venue_alert(metric: str, op: str) -> bool:
    """Health takes the worst venue (highest, or lowest uptime). A condition firing toward worse holds on
    the worst venue exactly when it holds on some venue: one alert per venue. Otherwise it must hold on
    the worst venue, so on all of them: one alert over the worst."""
    return metric in PER_VENUE and (op in ("above", "at_least")) == (metric != "uptime")


class Inexpressible(Exception):
    """The condition has no equivalent over /metrics; the message says why."""


def expression(cond: Condition, op: str, scopes: Sequence[Scope], judged: bool) -> str:
    """The PromQL that is non-empty exactly when `cond` with operator `op` would fire.

    `judged`: a rollout condition, for which min_samples counts (health checks ignore it)."""
    metric = cond.metric
    per_venue = _per_venue_alert(metric, op)
    parts = []
    for scope in scopes:
        value = _value(metric, cond.window, scope)
        if metric in PER_VENUE and not per_venue:
            value = f"{'min' if metric == 'uptime' else 'max'} without (venue) ({value})"
        expr = f"{value} {OPS[op]} {_num(cond.threshold)}"
        cover = cond.window - SLACK if metric not in INSTANT_METRICS else 0.0
        if judged and cond.min_samples > 1:
            if metric == "memory_rss":
                raise Inexpressible(f"memory_rss is one reading, so min_samples {cond.min_samples} is never met")
            if metric in SAMPLED:
                if cond.min_samples > cond.window + 1:
                    raise Inexpressible(
                        f"min_samples {cond.min_samples} exceeds the one-a-second samples a "
                        f"{units.fmt_duration(cond.window)} window holds: the runner never concludes it",
                    )
                cover = max(cover, float(cond.min_samples))
            elif metric in PER_VENUE and not per_venue:
                raise Inexpressible("min_samples is judged on the worst venue's own samples")
            else:
                expr += f"\nand {_samples(metric, cond.window, scope)} >= {cond.min_samples}"
        if cover > 0:
            expr += f"\nand {ON} feedrunner_health_coverage_seconds >= {_num(cover)}"
        if scope.guard:
            expr = f"(\n  {expr.replace(chr(10), chr(10) + '  ')}\n)\nand {ON} ({scope.guard})"
        parts.append(expr)
    if not parts:
        raise Inexpressible("no enabled venue is in scope")
    return "\nor\n".join(parts)


def _rule(cond: Condition, path: str, origin: str, scopes: Sequence[Scope], name: str) -> Rule | Omitted:
    kind = METRIC_KINDS[cond.metric]
    fires = NEGATED[cond.op] if origin == "gate" else cond.op
    judged = origin != "check"
    transport = scopes[0].transport if scopes else None
    if cond.metric == "staleness" and judged:
        return Omitted(
            path,
            cond.name,
            "a rollout judges staleness over the current phase's symbols on the target transport; "
            "/metrics has staleness per venue only (symbols are never labels)",
        )
    try:
        expr = expression(cond, fires, scopes, judged)
    except Inexpressible as exc:
        return Omitted(path, cond.name, str(exc))
    per_venue = _per_venue_alert(cond.metric, fires)
    where = " on {{ $labels.venue }}" if per_venue else ""
    threshold = f"{cond.metric} {cond.op.replace('_', ' ')} {_show(kind, cond.threshold)}"
    label = _literal(cond.name)
    if not cond.name.startswith(f"{cond.metric} {cond.op.replace('_', ' ')} "):
        label += f" ({threshold})"
    what = _WHAT[cond.metric] + (f" on {transport}" if transport and cond.metric in RANGED - PER_VENUE else "")
    if cond.metric in PER_VENUE:
        what += " of venue {{ $labels.venue }}" if per_venue else " of the worst venue"
    window = "" if cond.metric in INSTANT_METRICS else f" over {units.fmt_duration(cond.window)}"
    summary, consequence, severity = {
        "check": (f"{label}{where}", "The runner raises this health check while it holds.", "warning"),
        "trigger": (
            f"rollback trigger {label}{where}",
            "The runner rolls the rollout back to the baseline transport at once.",
            "critical",
        ),
        "gate": (
            f"rollout gate {label} fails{where}",
            "The rollout is not promoted until every gate holds over its window.",
            "info",
        ),
    }[origin]
    annotations = {
        "summary": summary,
        "description": f"{what}{window} is {_VALUE[kind]}; {threshold} is the threshold. {consequence}",
        "spec_path": path,
    }
    note = ""
    if cond.metric in RANGED and cond.window < 60:
        note = (
            f"{path}: a {units.fmt_duration(cond.window)} window needs a scrape interval of "
            f"{units.fmt_duration(cond.window / 2)} or less (a rate needs two samples inside it)"
        )
    return Rule(name, expr, severity, annotations, note=note)


def _names(prefix: str, conds: Sequence[Condition]) -> list[str]:
    bases = [prefix + _camel(c.metric) for c in conds]
    return [b if bases.count(b) == 1 else f"{b}{i}" for i, b in enumerate(bases)]


# -- scopes ---------------------------------------------------------------------------------------------


def _running(spec: Spec) -> tuple[str, ...]:
    return tuple(v.name for v in spec.venues if v.enabled)


def _rollout_scopes(spec: Spec, states: Sequence[str], by_venue: bool = True) -> list[Scope]:
    """One scope per run of phases with the same venues: a phase's conditions read the venues of its
    symbols (phases only grow, so the venues in play only grow). `by_venue` False: one scope for every
    phase, for what the venues do not change (the process's memory)."""
    assert spec.rollout is not None
    order = _running(spec)
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    seen: set[str] = set()
    for i, phase in enumerate(spec.rollout.phases, start=1):  # feedrunner_rollout_phase is 1-based
        seen |= {v for v, _ in phase.symbols}
        venues = tuple(v for v in order if v in seen)
        if runs and runs[-1][2] == venues:
            runs[-1] = (runs[-1][0], i, venues)
        else:
            runs.append((i, i, venues))
    runs = [r for r in runs if r[2]]
    if not by_venue and runs:
        runs = [(runs[0][0], runs[-1][1], order)]
    state = f'feedrunner_rollout_state{{state=~"{"|".join(states)}"}} == 1'
    scopes = []
    for first, last, venues in runs:
        phase = f"== {first}" if first == last else f">= {first} <= {last}"
        scopes.append(Scope(venues, spec.rollout.target, f"feedrunner_rollout_phase {phase} and {ON} {state}"))
    return scopes


# -- the rule file ----------------------------------------------------------------------------------------


def _grew(metric: str, window: str) -> str:
    """A counter that grew within the window, including a series born with its first count."""
    return f"increase({metric}[{window}]) > 0\nor\n({metric} unless {metric} offset {window}) > 0"


def _runner_rules(spec: Spec) -> list[Rule | Omitted]:
    interval = spec.health.interval
    window = prom_duration(max(EVENT_WINDOW, 2 * interval))
    out: list[Rule | Omitted] = [
        Rule(
            "FeedrunnerVenueFailed",
            'feedrunner_connection_state{state="failed"} == 1',
            "critical",
            {
                "summary": "venue {{ $labels.venue }} failed",
                "description": "The venue gave up (credentials refused, or backoff max_attempts used up) and "
                "waits for an operator.",
                "spec_path": "venues.{{ $labels.venue }}.backoff",
            },
        ),
        Rule(
            "FeedrunnerBreakerOpen",
            "feedrunner_circuit_state == 2",
            "warning",
            {
                "summary": "circuit breaker open on venue {{ $labels.venue }} ({{ $labels.scope }})",
                "description": "Its symbols continue over polling until a websocket probe after recovery_timeout "
                "keeps delivering.",
                "spec_path": "venues.{{ $labels.venue }}.circuit_breaker",
            },
        ),
        Rule(
            "FeedrunnerTradesLost",
            _grew("feedrunner_trades_lost_total", window),
            "critical",
            {
                "summary": "trades lost on venue {{ $labels.venue }}",
                "description": f"Missed trades that no backfill recovered within the last {window}; "
                "the runner logs each with its symbol.",
                "spec_path": "venues.{{ $labels.venue }}",
            },
        ),
        Rule(
            "FeedrunnerSinkDown",
            "feedrunner_sink_up == 0",
            "critical",
            {
                "summary": "sink {{ $labels.sink }} cannot write",
                "description": "A file of the sink cannot be written, or its bus does not acknowledge (a bus "
                "spools meanwhile); /readyz answers 503 with the reason.",
                "spec_path": "sinks",
            },
            for_=interval,
        ),
        Rule(
            "FeedrunnerSinkDropping",
            _grew("feedrunner_sink_events_dropped_total", window),
            "critical",
            {
                "summary": "sink {{ $labels.sink }} dropping events ({{ $labels.reason }})",
                "description": f"Events dropped within the last {window}: spool full (spool.max_bytes and "
                "spool.overflow), spool unwritable, or a torn record.",
                "spec_path": "sinks",
            },
        ),
    ]
    if spec.rollout is not None and spec.rollout.enabled:
        out.append(
            Rule(
                "FeedrunnerRolloutRolledBack",
                'feedrunner_rollout_state{state="rolled_back"} == 1',
                "warning",
                {
                    "summary": "rollout rolled back",
                    "description": "A rollback trigger fired: every symbol is back on the baseline transport; "
                    "`feedrunner rollout status` says which and when recovery starts.",
                    "spec_path": "rollout.rollback",
                },
            )
        )
    else:
        out.append(Omitted("rollout", "rollout rolled back", "the spec has no enabled rollout"))
    return out


def groups(spec: Spec) -> list[Group]:
    """Every alert the spec implies, in file order: health checks, rollback triggers, gates, the runner's own."""
    venues = _running(spec)
    checks = spec.health.checks
    scope = [Scope(venues)] if venues else []
    out = [
        Group(
            "feedrunner.health",
            tuple(
                _rule(c, f"health.checks[{i}]", "check", scope, name)
                for i, (c, name) in enumerate(zip(checks, _names("FeedrunnerCheck", checks), strict=True))
            ),
        )
    ]
    r = spec.rollout
    if r is not None and r.enabled:
        entries = []
        for origin, conds, states, prefix, key in (
            ("trigger", r.rollback, ROLLBACK_STATES, "FeedrunnerRollbackTrigger", "rollback"),
            ("gate", r.gates, GATE_STATES, "FeedrunnerRolloutGate", "gates"),
        ):
            for i, (c, name) in enumerate(zip(conds, _names(prefix, conds), strict=True)):
                scopes = _rollout_scopes(spec, states, by_venue=c.metric not in PROCESS)
                entries.append(_rule(c, f"rollout.{key}[{i}]", origin, scopes, name))
        out.append(Group("feedrunner.rollout", tuple(entries)))
    out.append(Group("feedrunner.runner", tuple(_runner_rules(spec))))
    return out


def rules(spec: Spec) -> dict[str, Any]:
    """The rule file as data: {"groups": [...]} (what promtool reads)."""
    return {"groups": [{"name": g.name, "rules": [r.as_dict() for r in g.rules]} for g in groups(spec)]}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {' '.join(text.split())}"]


def render(spec: Spec) -> str:
    """The rule file as text, with a comment for every condition that has no rule and why."""
    lines = [
        f"# Prometheus alerting rules for {spec.source}, from `feedrunner alerts --prometheus`.",
        "# Each condition is judged as the runner judges it; regenerate them when the file changes.",
        "groups:",
    ]
    for g in groups(spec):
        lines.append(f"  - name: {g.name}")
        lines.append("    rules:" if g.rules else "    rules: []")
        if not g.entries:
            lines += _comment("nothing configured here", "      ")
        for e in g.entries:
            if isinstance(e, Omitted):
                lines += _comment(f"{e.path} ({e.name}): no rule: {e.why}", "      ")
                continue
            if e.note:
                lines += _comment(e.note, "      ")
            text = yaml.dump([e.as_dict()], Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)
            lines += ["      " + line for line in text.splitlines()]
    return "\n".join(lines) + "\n"
