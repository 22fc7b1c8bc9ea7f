"""`feedrunner status` and `feedrunner rollout ...`: talk to a running runner's control server."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

EX_OK, EX_UNAVAILABLE, EX_CONFIG, EX_CONFLICT = 0, 69, 78, 75


def _target(args: argparse.Namespace) -> tuple[str, str | None] | None:
    token = os.environ.get("FEEDRUNNER_TOKEN")
    if args.url:
        return args.url.rstrip("/"), token
    from feedrunner.spec import check_file

    spec, problems = check_file(args.file)
    if spec is None:
        for p in problems:
            print(p, file=sys.stderr)
        return None
    host = "127.0.0.1" if spec.server.host in ("0.0.0.0", "::") else spec.server.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{spec.server.port}", token or (spec.server.token.reveal() if spec.server.token else None)


def _call(url: str, token: str | None, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """One request as the control server wants it: X-Feedrunner on every call (the server requires it on
    every state-changing one), the bearer token when there is one."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, method=method, data=data, headers={"X-Feedrunner": "1"})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text or b"{}")
        except ValueError:
            return exc.code, {"error": f"{exc.code} {exc.reason}"}


def _fingerprints(base: str, token: str | None, values: list[str]) -> tuple[int, Any]:
    """The running runner's fingerprints of `values` as {value: fingerprint}, or the error it answered."""
    out: dict[str, str] = {}
    for i in range(0, len(values), 64):  # the server's limit per request
        chunk = values[i : i + 64]
        code, body = _call(f"{base}/config/fingerprints", token, "POST", {"values": chunk})
        if code != 200:
            return code, body
        out.update(zip(chunk, body["fingerprints"], strict=True))
    return 200, out


def command(args: argparse.Namespace) -> int:
    target = _target(args)
    if target is None:
        return EX_CONFIG
    base, token = target
    try:
        if args.command == "status":
            code, body = _call(f"{base}/status", token)
        elif args.action == "status":
            code, body = _call(f"{base}/status", token)
            body = body.get("rollout") if code == 200 else body
        else:
            suffix = "?full=1" if args.full else ""
            code, body = _call(f"{base}/rollout/{args.action}{suffix}", token, "POST")
    except (urllib.error.URLError, OSError) as exc:
        print(f"feedrunner: no runner answers at {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(body, indent=2))
    elif code >= 400:
        print(f"feedrunner: {body.get('error', code)}", file=sys.stderr)
    elif args.command == "status":
        print(render_status(body))
    else:
        print(render_rollout(body))
    return EX_OK if code < 400 else (EX_CONFLICT if code == 409 else EX_UNAVAILABLE)


def render_rollout(r: dict[str, Any] | None) -> str:
    if not r:
        return "rollout: none configured"
    phases = " > ".join(f"[{p}]" if p == r["phase"] else p for p in r["phases"])
    dwell = f" of {r['dwell_seconds']:g}s" if r.get("dwell_seconds") else ""
    lines = [
        f"rollout: {r['state']}  phase {r['phase'] or '-'} ({r['phase_index'] + 1}/{len(r['phases'])}), "
        f"{r['in_phase_seconds']:g}s in phase{dwell}; {r['symbols_on_target']} symbols on {r['target']}",
        f"  phases: {phases}",
        f"  why:    {r['reason']}",
    ]
    for g in r.get("gates", []):
        lines.append(f"  gate    {g['outcome']:<12} {g['detail']}")
    for h in r.get("history", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(h["at"]))
        lines.append(f"  {when} {h['from_state']} -> {h['to_state']} ({h['phase']}): {h['reason']}")
    return "\n".join(lines)


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"ready: {'yes' if s['ready'] else 'NO: ' + '; '.join(s['not_ready'])}   queue {s['queue_depth']}   "
        f"written {s['events_written']}   rss {s['rss_mb']} MB (+{s['rss_growth_mb']})"
    ]
    if s.get("alerts"):
        lines.append(f"alerts: {', '.join(s['alerts'])}")
    lines += _render_workers(s.get("workers"))
    lines += _render_shards(s.get("cluster"))
    for name, v in s["venues"].items():
        lines.append(
            f"{name}  {v['adapter']}  {v['state']}  breaker {v['breaker']}  {v['rate_per_s']} ev/s"
            + (f"  ({v['reason']})" if v["state"] != "connected" and v.get("reason") else "")
        )
        by_worker = any("worker" in row for row in v["symbols"].values())
        lines.append(
            f"  {'symbol':<14} {'transport':<10} {'events':>8} {'latency':>10} {'silent':>8}"
            + (f" {'worker':>6}" if by_worker else "")
        )
        for sym, row in v["symbols"].items():
            silent = "-" if row["silent_seconds"] is None else f"{row['silent_seconds']:g}s"
            lines.append(
                f"  {sym:<14} {row['transport'] or 'quarantined':<10} {row['events']:>8} "
                f"{row['latency_ms']:>8.1f}ms {silent:>8}" + (f" {row.get('worker', '-'):>6}" if by_worker else "")
            )
    for name, why in s.get("skipped", {}).items():
        lines.append(f"{name}  skipped: {why}")
    for name, k in s.get("sinks", {}).items():
        if "spool_events" in k:  # a bus
            line = (
                f"sink {name}  {k['state']}  delivered {k['events_written']}  spool {k['spool_events']} events "
                f"({k['spool_bytes']} bytes)  replayed {k['events_replayed']}  dropped {k['events_dropped']}"
            )
            if k["state"] != "ok" and k["last_error"]:
                line += f"\n  {k['where']}: {k['last_error']}"
            lines.append(line)
            continue
        line = f"sink {name}  {k['state']}  written {k['events_written']}  failed {k['events_failed_total']}"
        if k["state"] == "failing":
            since = time.strftime("%H:%M:%S", time.localtime(k["since"]))
            shown = k["failing_paths"]
            paths = ", ".join(shown) + (" ..." if k["failing_path_count"] > len(shown) else "")
            line += (
                f"\n  FAILING since {since} on {k['failing_path_count']} path(s): {paths}"
                f"\n  {k['events_failed']} events failed in this episode; last error: {k['last_error']}"
            )
        lines.append(line)
    lines.append(render_rollout(s.get("rollout")))
    if s.get("next_evaluation"):
        lines.append(f"next evaluation in {max(0.0, s['next_evaluation'] - time.time()):.0f}s")
    return "\n".join(lines)


def _render_workers(workers: list[dict[str, Any]] | None) -> list[str]:
    """A supervisor's workers, one line each."""
    if not workers:
        return []
    up = sum(1 for w in workers if w["up"])
    lines = [f"workers: {up}/{len(workers)} up"]
    for w in workers:
        state = ("ready" if w["ready"] else "not ready") if w["up"] else "DOWN"
        rss = f"  rss {w['rss_mb']} MB" if w.get("rss_mb") is not None else ""
        lines.append(
            f"  worker {w['index']}  shard {w['shard']}  pid {w['pid'] or '-'}  {state}  restarts {w['restarts']}"
            + ("  leader" if w.get("leader") else "")
            + rss
        )
    return lines


def _render_shards(cluster: dict[str, Any] | None) -> list[str]:
    """The deployment's shards as the state store lists them, the rollout leader marked."""
    if not cluster:
        return []
    shards = cluster.get("shards", [])
    leader = cluster.get("leader")
    lines = [f"shards: {len(shards)} in the store, leader: " + (f"shard {leader['shard']}" if leader else "none")]
    for r in shards:
        lines.append(
            f"  shard {r['shard']}/{r['count']}  {r['host']} pid {r['pid']}  {r['url'] or '-'}  "
            f"{r['symbols']} symbols  heartbeat {r['heartbeat_age_s']:g}s ago" + ("  leader" if r["leader"] else "")
        )
    return lines


def plan(args: argparse.Namespace) -> int:
    """Like `terraform plan -detailed-exitcode`: 0 no change, 2 changes, 78 invalid, 69 no runner."""
    from feedrunner.plan import diff, secrets_in, spec_to_dict
    from feedrunner.spec import check_file

    spec, problems = check_file(args.file)
    if spec is None:
        for p in problems:
            print(p)
        print(f"{args.file}: invalid; a reload would be rejected and the running config kept", file=sys.stderr)
        return EX_CONFIG
    target = _target(args)
    if target is None:
        return EX_CONFIG
    base, token = target
    try:
        code, running = _call(f"{base}/config", token)
        answer = running
        if code == 200:  # the runner fingerprints under its own key (see feedrunner.plan): ask for the file's
            code, answer = _fingerprints(base, token, sorted(secrets_in(spec)))
    except (urllib.error.URLError, OSError) as exc:
        print(f"feedrunner: no runner answers at {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    if code != 200:
        print(f"feedrunner: {answer.get('error', code)}", file=sys.stderr)
        return EX_UNAVAILABLE
    changes = diff(running, spec_to_dict(spec, answer.__getitem__))
    if args.json:
        print(json.dumps([c.as_dict() for c in changes], indent=2))
    elif not changes:
        print("No changes: the running runner already matches " + args.file)
    else:
        print(f"A reload of {args.file} would:")
        for c in changes:
            print(f"  {c}")
        if any(not c.live for c in changes):
            print("Changes marked (needs a restart) are reported but not applied by a reload.")
    return 2 if changes else EX_OK
