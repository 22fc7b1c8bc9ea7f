"""What the control server answers (feedrunner.control.Backend): a runner's own state (RunnerApi), or the
merged state of a supervisor's workers (SupervisorApi), fetched from each worker's control server.

Merging, per endpoint:
- /metrics: every worker's samples with a `worker` label, families of one name under one HELP/TYPE,
  plus the supervisor's own (feedrunner_workers, feedrunner_worker_up, feedrunner_worker_restarts_total,
  feedrunner_http_rejected_total). Scraped rather than prometheus-client's multiprocess mode, which sums
  every process into one series (which worker is slow or down is lost), needs a shared mmap directory
  cleaned between runs, and cannot carry custom collectors or the gauges a runner sets at each scrape.
- /status: venues merged by name, each symbol row naming its worker; counts and memory summed; the
  rollout as the leading worker reports it; one row per worker.
- /status/latency: a venue split over workers keeps, per point, the worst p50 and p99 of any worker (an
  upper bound of the pooled quantile: a slow worker is never averaged away) and the sum of samples.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from feedrunner.filewatch import CHECK_TIMEOUT, log_rejected, recheck
from feedrunner.plan import spec_to_dict

if TYPE_CHECKING:
    from feedrunner.runner import Runner
    from feedrunner.supervisor import Supervisor, Worker

WORKER_TIMEOUT = 2.0  # seconds a worker's control server has to answer the supervisor
RELOAD_TIMEOUT = CHECK_TIMEOUT + 10.0  # a worker's reload reads and checks feeds.yaml, then applies it
STATE_RANK = {"connected": 0, "degraded": 1, "connecting": 2, "reconnecting": 3, "disconnected": 4, "failed": 5}
BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}
SINK_RANK = {"ok": 0, "connecting": 1, "retrying": 2, "failing": 3}
Answer = tuple[int, Any] | str | None  # (HTTP status, body); why it did not answer; None: not running


class RunnerApi:
    """feedrunner.control.Backend over a Runner in this process."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.server = runner.spec.server
        self.registry = runner.metrics.registry

    async def metrics(self) -> bytes:
        self.runner.refresh_gauges()  # the gauges set at each scrape
        return generate_latest(self.registry)

    async def not_ready(self) -> list[str]:
        return self.runner.not_ready()

    async def status(self) -> dict[str, Any]:
        return self.runner.status()

    async def latency(self, window: int, step: int) -> dict[str, Any]:
        health = self.runner.health
        return {venue: health.latency_series(venue, window, step) for venue in self.runner.adapters}

    async def reload(self) -> tuple[str, list[dict[str, Any]], list[str]]:
        result, changes, problems = await self.runner.reload_file()
        return result, [c.as_dict() for c in changes], [str(p) for p in problems]

    async def config(self) -> dict[str, Any]:
        return spec_to_dict(self.runner.source_spec)  # the whole file, not this shard's share of it

    async def rollout(self, action: str, full: bool) -> tuple[int, dict[str, Any]]:
        return self.runner.rollout_act(action, full)


# -- merging (pure) ------------------------------------------------------------------------------------


class _Families:
    """A collector yielding parsed families as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


def merge_metrics(workers: Mapping[str, str], own: str = "") -> bytes:
    """Prometheus text of every worker (`worker` label -> its exposition) and of the supervisor itself
    (`own`, unlabelled), as one exposition. A worker whose text does not parse is left out."""
    families: dict[str, Metric] = {}

    def add(parsed: list[Metric], worker: str | None) -> None:
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.samples.append(s if worker is None else s._replace(labels={**s.labels, "worker": worker}))

    add(list(text_string_to_metric_families(own)), None)
    for worker, text in workers.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as exc:
            logger.warning("worker {}: /metrics unreadable ({}): left out of this scrape", worker, exc)
            continue
        add(parsed, worker)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


def _worse(rank: Mapping[str, int], a: Any, b: Any) -> bool:
    return rank.get(str(b), len(rank)) > rank.get(str(a), len(rank))


def _merge_venue(merged: dict[str, Any], v: dict[str, Any], worker: int) -> None:
    merged["symbols"].update({sym: {**row, "worker": worker} for sym, row in v.get("symbols", {}).items()})
    merged["workers"].append(worker)
    merged["rate_per_s"] = round(merged.get("rate_per_s", 0.0) + v.get("rate_per_s", 0.0), 1)
    merged["quarantined"] = {**merged.get("quarantined", {}), **v.get("quarantined", {})}
    merged["open_symbol_breakers"] = sorted(
        {*merged.get("open_symbol_breakers", []), *v.get("open_symbol_breakers", [])}
    )
    if _worse(STATE_RANK, merged.get("state"), v.get("state")):
        merged.update(state=v.get("state"), reason=v.get("reason"), since=v.get("since"))
    if _worse(BREAKER_RANK, merged.get("breaker"), v.get("breaker")):
        merged["breaker"] = v.get("breaker")


def _merge_sink(merged: dict[str, Any], k: dict[str, Any]) -> None:
    """Counts summed, the worst state with its error, failing paths together, the earliest failure."""
    if _worse(SINK_RANK, merged.get("state"), k.get("state")):
        for key in ("state", "last_error", "where"):
            if key in k:
                merged[key] = k[key]
    for key, value in k.items():
        if key == "since":
            merged[key] = min((t for t in (merged.get(key), value) if t is not None), default=None)
        elif key == "failing_paths":
            merged[key] = [*merged.get(key, []), *value]
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "attempts":
            merged[key] = merged.get(key, 0) + value


def merge_status(statuses: Mapping[int, dict[str, Any]], missing: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The workers' /status as one (by worker index); `missing`: why a worker gave none."""
    missing = missing or {}
    venues: dict[str, dict[str, Any]] = {}
    sinks: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"skipped": {}, "queue_depth": 0, "events_written": 0, "rss_mb": 0.0, "rss_growth_mb": 0.0}
    not_ready: list[str] = []
    alerts: set[str] = set()
    for i in sorted({*statuses, *missing}):
        if i not in statuses:
            not_ready.append(f"worker {i}: {missing[i]}")
            continue
        s = statuses[i]
        for name, v in s.get("venues", {}).items():
            if name in venues:
                _merge_venue(venues[name], v, i)
            else:
                venues[name] = {**v, "symbols": {}, "workers": [], "rate_per_s": 0.0}
                _merge_venue(venues[name], v, i)
        for name, k in s.get("sinks", {}).items():
            if name in sinks:
                _merge_sink(sinks[name], k)
            else:
                sinks[name] = dict(k)
        out["skipped"].update(s.get("skipped", {}))
        for key in ("queue_depth", "events_written", "rss_mb", "rss_growth_mb"):
            out[key] += s.get(key) or 0
        not_ready += [f"worker {i}: {p}" for p in s.get("not_ready", [])]
        alerts |= {f"worker {i}: {a}" for a in s.get("alerts", [])}
    out["rss_mb"], out["rss_growth_mb"] = round(out["rss_mb"], 1), round(out["rss_growth_mb"], 1)
    ordered = sorted(statuses.items())
    leading = [s for _, s in ordered if s.get("leader") is True]
    source = next(iter(leading), None) or next((s for _, s in ordered if s.get("rollout")), None)
    evaluations = [s["next_evaluation"] for _, s in ordered if s.get("next_evaluation")]
    out.update(
        venues=venues,
        sinks=sinks,
        ready=not not_ready,
        not_ready=not_ready,
        alerts=sorted(alerts),
        rollout=source.get("rollout") if source else None,
        next_evaluation=source.get("next_evaluation") if source and source.get("next_evaluation") else None,
        leader=bool(leading),
    )
    if out["next_evaluation"] is None and evaluations:
        out["next_evaluation"] = min(evaluations)
    if source is not None and "cluster" in source:
        out["cluster"] = source["cluster"]
    return out


def merge_latency(parts: Iterable[Mapping[str, Mapping[str, list[list[float]]]]]) -> dict[str, Any]:
    """Per venue and transport, points by start second: the worst p50 and p99, the samples summed."""
    merged: dict[str, dict[str, dict[float, list[float]]]] = {}
    for venues in parts:
        for venue, transports in venues.items():
            for transport, points in transports.items():
                into = merged.setdefault(venue, {}).setdefault(transport, {})
                for t, p50, p99, n in points:
                    have = into.get(t)
                    into[t] = (
                        [t, p50, p99, n] if have is None else [t, max(have[1], p50), max(have[2], p99), have[3] + n]
                    )
    return {v: {tr: [pts[t] for t in sorted(pts)] for tr, pts in ts.items()} for v, ts in merged.items()}


def merge_reload(answers: Mapping[int, Answer]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Each change once, with the workers that made it; "applied" if any worker applied the file."""
    changes: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    results: set[str] = set()
    for i, answer in sorted(answers.items()):
        if answer is None:
            problems.append(f"worker {i}: not running (it reads feeds.yaml when it starts)")
            continue
        if isinstance(answer, str) or not isinstance(answer[1], dict):
            results.add("invalid")
            problems.append(f"worker {i}: {answer if isinstance(answer, str) else 'an answer that is not JSON'}")
            continue
        body = answer[1]
        results.add(str(body.get("result", "invalid")))
        problems += [f"worker {i}: {p}" for p in body.get("problems", [])]
        for change in body.get("changes", []):
            key = json.dumps(change, sort_keys=True, default=str)
            changes.setdefault(key, {**change, "workers": []})["workers"].append(i)
    result = "applied" if "applied" in results else "invalid" if "invalid" in results else "unchanged"
    return result, list(changes.values()), problems


# -- the supervisor's backend ------------------------------------------------------------------------------


class SupervisorApi:
    """feedrunner.control.Backend over a supervisor's workers, each asked at its loopback control port with
    the deployment's token (never logged)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.server = supervisor.spec.server
        self.registry = supervisor.registry
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, w: Worker, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Host": f"127.0.0.1:{w.port}"}
        if method != "GET":
            headers["X-Feedrunner"] = "1"
        if self.server.token is not None:
            headers["Authorization"] = f"Bearer {self.server.token.reveal()}"
        url = f"http://127.0.0.1:{w.port}{path}"
        async with self._session.request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp.status, await resp.read()

    async def _ask(self, w: Worker, method: str, path: str, timeout: float, raw: bool) -> Answer:
        if not w.up:
            return None
        try:
            status, body = await self._call(w, method, path, timeout)
            return status, (body.decode() if raw else json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"its control server did not answer ({type(exc).__name__})"

    async def _each(
        self, path: str, method: str = "GET", timeout: float = WORKER_TIMEOUT, raw: bool = False
    ) -> dict[int, Answer]:
        """Every worker asked at once: index -> its answer."""
        workers = list(self.sup.workers)
        answers = await asyncio.gather(*(self._ask(w, method, path, timeout, raw) for w in workers))
        return {w.index: a for w, a in zip(workers, answers, strict=True)}

    def _absent(self, w: Worker, answer: Answer) -> str:
        if answer is None:
            return "starting" if w.running else "not running"
        if isinstance(answer, str):
            return answer
        return f"answered {answer[0]}"

    async def metrics(self) -> bytes:
        answers = await self._each("/metrics", raw=True)
        texts = {str(i): a[1] for i, a in answers.items() if isinstance(a, tuple) and a[0] == 200}
        return merge_metrics(texts, generate_latest(self.registry).decode())

    async def not_ready(self) -> list[str]:
        answers = await self._each("/readyz")
        problems = ["stopping"] if self.sup.stopping else []
        for w in self.sup.workers:
            a = answers[w.index]
            if isinstance(a, tuple) and a[0] == 200:
                continue
            said = a[1].get("problems") if isinstance(a, tuple) and isinstance(a[1], dict) else None
            problems += [f"worker {w.index}: {p}" for p in said or [self._absent(w, a)]]
        return problems

    async def _statuses(self) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        answers = await self._each("/status")
        statuses = {
            i: a[1] for i, a in answers.items() if isinstance(a, tuple) and a[0] == 200 and isinstance(a[1], dict)
        }
        missing = {w.index: self._absent(w, answers[w.index]) for w in self.sup.workers if w.index not in statuses}
        return statuses, missing

    async def status(self) -> dict[str, Any]:
        statuses, missing = await self._statuses()
        out = merge_status(statuses, missing)
        if self.sup.stopping:
            out["not_ready"].insert(0, "stopping")
            out["ready"] = False
        shard = self.sup.spec.shard
        out["shard"] = {"index": shard.index, "count": shard.count}
        out["workers"] = [
            {
                "index": w.index,
                "shard": w.shard,
                "pid": w.pid if w.running else None,
                "up": w.up,
                "restarts": w.restarts,
                "ready": bool(statuses.get(w.index, {}).get("ready")),
                "leader": statuses.get(w.index, {}).get("leader") is True,
                "port": w.port if w.up else None,
                "rss_mb": statuses.get(w.index, {}).get("rss_mb"),
            }
            for w in self.sup.workers
        ]
        return out

    async def latency(self, window: int, step: int) -> dict[str, Any]:
        answers = await self._each(f"/status/latency?window={window}&step={step}")
        return merge_latency(a[1].get("venues", {}) for a in answers.values() if isinstance(a, tuple) and a[0] == 200)

    async def reload(self) -> tuple[str, list[dict[str, Any]], list[str]]:
        """The file is checked here first: an invalid one reaches no worker."""
        spec, problems = await recheck(self.sup.file)
        if spec is None:
            log_rejected(problems, "every worker keeps its config")
            return "invalid", [], [str(p) for p in problems]
        answers = await self._each("/reload", "POST", RELOAD_TIMEOUT)
        self.sup.adopt(spec)
        result, changes, trouble = merge_reload(answers)
        logger.info("reload over HTTP: {} ({} change(s) over {} worker(s))", result, len(changes), len(answers))
        return result, changes, trouble

    async def config(self) -> dict[str, Any]:
        return spec_to_dict(self.sup.spec)

    async def rollout(self, action: str, full: bool) -> tuple[int, dict[str, Any]]:
        """Forwarded to the worker leading the rollout: only its controller acts."""
        rollout = self.sup.spec.rollout
        if rollout is None or not rollout.enabled:
            return 404, {"error": "no rollout in feeds.yaml"}
        statuses, _ = await self._statuses()
        leader = next((i for i, s in sorted(statuses.items()) if s.get("leader") is True), None)
        if leader is None:
            return 503, {
                "error": "no worker on this host leads the rollout right now: a standby takes over within "
                "coordination.lease; with several hosts, steer the host whose worker leads"
            }
        w = self.sup.workers[leader]
        path = f"/rollout/{quote(action, safe='')}" + ("?full=1" if full else "")
        answer = await self._ask(w, "POST", path, WORKER_TIMEOUT, raw=False)
        if not isinstance(answer, tuple) or not isinstance(answer[1], dict):
            return 502, {"error": f"worker {leader} (the leader): {self._absent(w, answer)}"}
        logger.info("rollout {}{} forwarded to worker {} (the leader)", action, " --full" if full else "", leader)
        return answer


__all__ = ["RunnerApi", "SupervisorApi", "merge_latency", "merge_metrics", "merge_reload", "merge_status"]
