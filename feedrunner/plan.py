"""What a reload would change: a pure diff of two specs, shared by `feedrunner plan` and the runner.

Specs are compared in their JSON form (`spec_to_dict`), which is also what the control server's
/config returns, so `plan` diffs a file against the running runner without either side guessing.

Secrets never appear in that form. A Secret (credentials, tokens, webhooks, and every value that came
from `${VAR}`, URLs included) becomes a fingerprint, HMAC-SHA256 under a key drawn at random when the
process starts and never shown: a rotated key shows as a change, and /config output alone cannot be
guessed offline (an unkeyed hash of a weak password can). The password of any URL written literally is
shown as `user:***@host`, as are password-like query parameters.

`plan` runs in another process, so it cannot compute the runner's fingerprints itself: it sends the
file's secret values to the runner's `POST /config/fingerprints`, which answers them under the runner's
key, and diffs with those. That endpoint asks what every state-changing call asks (the bearer token
when one is set, a Host naming the server, no foreign Origin, `X-Feedrunner: 1`) and answers at most
FINGERPRINT_BUDGET values a minute, so guessing through it is online and slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
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
    "workers",
    "shard",
    "coordination",
    "queue",
    "server",
    "state_url",
    "log_level",
    "log_format",
    "sinks",
    "sim_seed",
    "sim_rate",
    "shutdown_deadline",
)


FINGERPRINT_BUDGET = 256  # secret values /config/fingerprints answers per minute
_KEY = secrets.token_bytes(32)  # per process; never leaves it
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^@]*@")  # SQLAlchemy's reading: a password may hold '/'
_QUERY_SECRET = re.compile(
    r"([?&;](?:password|sslpassword|passwd|pwd|pass|secret|token|api_?key|access_token|auth)=)[^&;#]*", re.I
)


def fingerprint(value: str) -> str:
    """This process's keyed fingerprint of a secret: equal values match, nothing about the value shows."""
    digest = hmac.new(_KEY, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return "secret:" + digest[:16]


def mask_url(text: str) -> str:
    """`scheme://user:password@host...` -> `scheme://user:***@host...`; password-like query values too."""
    if "://" not in text:
        return text
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1:***@", text, count=1))


def secrets_in(value: Any) -> set[str]:
    """Every Secret value in a spec (what `plan` asks the runner to fingerprint)."""
    if isinstance(value, Secret):
        return {value.reveal()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return set().union(*(secrets_in(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, dict):
        return set().union(*(secrets_in(k) | secrets_in(v) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return set().union(*(secrets_in(v) for v in value))
    return set()


def _plain(value: Any, fp: Callable[[str], str]) -> Any:
    if isinstance(value, Secret):
        return fp(value.reveal())
    if isinstance(value, str):
        return mask_url(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), fp) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {_plain(k, fp) if isinstance(k, str) else str(k): _plain(v, fp) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, fp) for v in value]
    return value


def spec_to_dict(spec: Spec, fp: Callable[[str], str] = fingerprint) -> dict[str, Any]:
    """The spec as JSON data, secrets as `fp` fingerprints (the running runner's, for `plan`)."""
    out = _plain(spec, fp)
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
