"""What a reload would change: a pure diff of two specs, shared by `feedrunner plan` and the runner.

Specs are compared in their JSON form (`spec_to_dict`), which is also what the control server's
/config returns, so `plan` diffs a file against the running runner without either side guessing.
Secrets are replaced by a fingerprint: a rotated key shows as a change, never as a value.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from feedrunner.spec import Secret, Spec

# Venue fields that can change live (the adapter reconfigures in place) ...
LIVE_VENUE_FIELDS = frozenset(
    {
        "poll_interval",
        "stale_after",
        "backoff",
        "circuit_breaker",
        "channels",
        "book_depth",
        "trades_buffer",
        "quota",
        "min_subscription",
        "market_data_lines",
    }
)
# ... and those that need that venue's connection rebuilt (the venue restarts; the others keep running).
RECONNECT_VENUE_FIELDS = frozenset(
    {
        "adapter",
        "exchange",
        "endpoints",
        "credentials",
        "rate_limit",
        "host",
        "port",
        "client_id",
        "contracts",
        "market_data_type",
    }
)
# Global settings that only a process restart applies.
RESTART_FIELDS = (
    "environment",
    "queue",
    "server",
    "state_url",
    "log_level",
    "log_format",
    "sinks",
    "sim_seed",
    "sim_rate",
)


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return "secret:" + hashlib.sha256(value.reveal().encode()).hexdigest()[:12]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    out = _plain(spec)
    out["venues"] = {v["name"]: v for v in out["venues"]}
    return out


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # venue_added, venue_removed, venue_restart, symbols_added, symbols_removed, transport, setting,
    #            rollout, health, restart_required
    target: str  # venue name, "rollout", "health" or a global key
    detail: str
    live: bool = True  # False: only a process restart applies it

    def __str__(self) -> str:
        sign = {
            "venue_added": "+",
            "symbols_added": "+",
            "venue_removed": "-",
            "symbols_removed": "-",
            "restart_required": "!",
        }.get(self.kind, "~")
        return f"{sign} {self.target}: {self.detail}" + ("" if self.live else "  (needs a restart)")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "detail": self.detail, "live": self.live}


def _short(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f", ... (+{len(items) - 8})" if len(items) > 8 else "")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    changes: list[Change] = []
    ov, nv = old["venues"], new["venues"]
    for name in nv.keys() - ov.keys():
        v = nv[name]
        changes.append(Change("venue_added", name, f"new {v['adapter']} venue with {len(v['symbols'])} symbols"))
    for name in ov.keys() - nv.keys():
        changes.append(Change("venue_removed", name, "venue removed: its subscriptions stop"))
    for name in sorted(ov.keys() & nv.keys()):
        a, b = ov[name], nv[name]
        if a["enabled"] != b["enabled"]:
            changes.append(
                Change(
                    "venue_added" if b["enabled"] else "venue_removed", name, "enabled" if b["enabled"] else "disabled"
                )
            )
            continue
        added = [s for s in b["symbols"] if s not in a["symbols"]]
        removed = [s for s in a["symbols"] if s not in b["symbols"]]
        if added:
            changes.append(Change("symbols_added", name, f"subscribe {_short(added)}"))
        if removed:
            changes.append(Change("symbols_removed", name, f"unsubscribe {_short(removed)}"))
        if a["transport"] != b["transport"]:
            changes.append(Change("transport", name, f"transport {a['transport']} -> {b['transport']}"))
        reconnect = sorted(k for k in RECONNECT_VENUE_FIELDS if a.get(k) != b.get(k))
        if reconnect:
            changes.append(Change("venue_restart", name, f"{', '.join(reconnect)} changed: the venue reconnects"))
        for key in sorted(LIVE_VENUE_FIELDS):
            if a.get(key) != b.get(key):
                changes.append(Change("setting", name, f"{key}: {_fmt(a.get(key))} -> {_fmt(b.get(key))}"))
    changes += _rollout_changes(old.get("rollout"), new.get("rollout"))
    if old["health"] != new["health"]:
        changes.append(Change("health", "health", "health interval, checks or alerts changed"))
    for key in RESTART_FIELDS:
        if old.get(key) != new.get(key):
            changes.append(Change("restart_required", key, f"{key} changed", live=False))
    return changes


def _rollout_changes(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[Change]:
    if a == b:
        return []
    if a is None or b is None:
        return [Change("rollout", "rollout", "rollout added" if a is None else "rollout removed")]
    out = []
    an, bn = [p["name"] for p in a["phases"]], [p["name"] for p in b["phases"]]
    if an != bn:
        out.append(Change("rollout", "rollout", f"phases {' > '.join(an)} -> {' > '.join(bn)}"))
    elif a["phases"] != b["phases"]:
        out.append(Change("rollout", "rollout", "phase symbols, dwell or approval changed"))
    for key in ("gates", "rollback", "recovery", "baseline", "target", "enabled"):
        if a[key] != b[key]:
            out.append(Change("rollout", "rollout", f"{key} changed"))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)
