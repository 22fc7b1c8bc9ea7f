"""The rollout state machine: phases, gates, rollback triggers, recovery, operator actions, persistence.

It decides *which symbols use the target transport* and nothing else; the runner turns that into the
desired state and reconciles. Every transition is stored with its time, reason and the figures behind
it, so `feedrunner rollout status` can always say why.

States: pending -> progressing(i) -> ... -> completed, with paused, awaiting_approval (a phase marked
`approval: manual` is entered only on `promote`), rolled_back (a trigger fired: every symbol back to the
baseline), recovering (after the cooldown, re-entering at the first or the failed phase) and aborted.

Restart and edited phase lists: the stored phase is matched by *name* in the current feeds.yaml. Found:
the rollout continues there, dwell counted from the original entry. Gone: the rollout restarts at the
first phase, and the history says why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from loguru import logger

from feedrunner.health import SLACK, Health, Reading
from feedrunner.spec import Condition, Rollout, Spec
from feedrunner.statelock import create_tables, sqlite_path
from feedrunner.units import fmt_duration


class State(StrEnum):
    PENDING = "pending"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"
    ROLLED_BACK = "rolled_back"
    RECOVERING = "recovering"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE = (State.PROGRESSING, State.RECOVERING)
STATE_VALUE = {s: i for i, s in enumerate(State)}


class ActionError(Exception):
    """An operator action that does not apply in the current state (HTTP 409)."""


# -- persistence ----------------------------------------------------------------------------------------

META = sa.MetaData()
STATE_TABLE = sa.Table(
    "rollout_state",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("phase", sa.String(64)),
    sa.Column("phase_index", sa.Integer, nullable=False),
    sa.Column("entered_at", sa.Float, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("failed_phase", sa.String(64)),
    sa.Column("reason", sa.Text, nullable=False),
)
HISTORY_TABLE = sa.Table(
    "rollout_history",
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("from_state", sa.String(32), nullable=False),
    sa.Column("to_state", sa.String(32), nullable=False),
    sa.Column("phase", sa.String(64)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("figures", sa.Text, nullable=False),
)


def engine_for(url: str) -> sa.Engine:
    """The state store's engine. SQLite gets its directory made; PostgreSQL bounded connects and
    statements and TCP keepalives, so a partition fails a call in seconds instead of hanging it."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return sa.create_engine(url)
    if parsed.get_backend_name() == "postgresql":
        args = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "options": "-c statement_timeout=10000",
        }
        return sa.create_engine(url, connect_args=args, pool_pre_ping=True)
    return sa.create_engine(url)


class Store:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        create_tables(engine, META)

    def load(self) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(STATE_TABLE).where(STATE_TABLE.c.id == 1)).mappings().first()
            return dict(row) if row else None

    def save(self, row: dict[str, Any], history: dict[str, Any] | None) -> None:
        with self.engine.begin() as c:  # state and its history entry commit together, or neither does
            if c.execute(sa.select(STATE_TABLE.c.id).where(STATE_TABLE.c.id == 1)).first():
                c.execute(sa.update(STATE_TABLE).where(STATE_TABLE.c.id == 1).values(**row))
            else:
                c.execute(sa.insert(STATE_TABLE).values(id=1, **row))
            if history:
                c.execute(sa.insert(HISTORY_TABLE).values(**history))

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(HISTORY_TABLE).order_by(HISTORY_TABLE.c.id.desc()).limit(limit)).mappings()
            return [{**r, "figures": json.loads(r["figures"])} for r in rows][::-1]


# -- the controller ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    name: str
    outcome: str  # pass | fail | inconclusive
    value: float | None
    samples: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "value": self.value,
            "samples": self.samples,
            "detail": self.detail,
        }


class Controller:
    def __init__(
        self,
        spec: Spec,
        store: Store,
        health: Health,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
        writable: bool = True,
    ) -> None:
        assert spec.rollout is not None
        self.r: Rollout = spec.rollout
        self.venues = {v.name for v in spec.venues if v.enabled}
        self.store = store
        self.health = health
        self.clock = clock
        self.on_change = on_change
        self.state = State.PENDING
        self.index = -1  # phase index; -1 before the first phase
        self.entered_at = clock()
        self.attempts = 0
        self.failed_phase: str | None = None
        self.reason = "not started"
        self.verdicts: list[Verdict] = []
        self.last_evaluated: float | None = None
        self.changed_at: float | None = None  # of the stored state this controller last read
        self._paused_from = State.PROGRESSING
        self.writable = writable  # False on a shard that follows another shard's lead: it reads, never writes
        self._restore()

    def update(self, spec: Spec) -> None:
        """A reloaded feeds.yaml: the same restart rule as a new process (stored phase matched by name)."""
        assert spec.rollout is not None
        self.r = spec.rollout
        self.venues = {v.name for v in spec.venues if v.enabled}
        self._restore()
        if self.on_change:
            self.on_change()

    # -- persistence and the restart rule --------------------------------------------------------------

    def follow(self) -> bool:
        """A standby's read of the leader's stored state: True (and the runner told) when it changed."""
        row = self.store.load()
        if row is None or row["changed_at"] == self.changed_at:
            return False
        self._restore(row)
        if self.on_change:
            self.on_change()
        return True

    def _restore(self, row: dict[str, Any] | None = None) -> None:
        row = row or self.store.load()
        if row is None:
            return
        names = [p.name for p in self.r.phases]
        self.state, self.attempts, self.failed_phase = State(row["state"]), row["attempts"], row["failed_phase"]
        self.changed_at = row["changed_at"]
        self.entered_at, self.reason = row["entered_at"], row["reason"]
        if row["phase"] is None:
            self.index = -1
        elif row["phase"] in names:
            self.index = names.index(row["phase"])
            if self.index != row["phase_index"]:
                self._record(
                    self.state,
                    f"phase '{row['phase']}' moved to position {self.index + 1} in feeds.yaml; continuing there",
                    {},
                )
        else:
            self.index, self.entered_at = 0, self.clock()
            self._record(
                State.PROGRESSING,
                f"phase '{row['phase']}' is no longer in feeds.yaml; restarting from the first phase '{names[0]}'",
                {},
            )
        logger.info(
            "rollout restored: {} at phase {} (entered {:.0f}s ago)",
            self.state.value,
            self.phase_name,
            self.clock() - self.entered_at,
        )

    @property
    def phase_name(self) -> str | None:
        return self.r.phases[self.index].name if 0 <= self.index < len(self.r.phases) else None

    def _record(self, new: State, reason: str, figures: dict[str, Any]) -> None:
        old = self.state
        now = self.clock()
        self.state, self.reason = new, reason
        if not self.writable:
            if self.on_change:
                self.on_change()
            return
        self.changed_at = now
        self.store.save(
            {
                "state": new.value,
                "phase": self.phase_name,
                "phase_index": self.index,
                "entered_at": self.entered_at,
                "changed_at": now,
                "attempts": self.attempts,
                "failed_phase": self.failed_phase,
                "reason": reason,
            },
            {
                "at": now,
                "from_state": old.value,
                "to_state": new.value,
                "phase": self.phase_name,
                "reason": reason,
                "figures": json.dumps(figures, default=str),
            },
        )
        log = logger.warning if new in (State.ROLLED_BACK, State.ABORTED) else logger.info
        log("rollout {} -> {} (phase {}): {}", old.value, new.value, self.phase_name, reason)
        if self.on_change:
            self.on_change()

    def _enter(self, index: int, state: State, reason: str, figures: dict[str, Any] | None = None) -> None:
        self.index, self.entered_at = index, self.clock()
        self._record(state, reason, figures or {})

    # -- what the runner asks ----------------------------------------------------------------------------

    def target_symbols(self) -> set[tuple[str, str]]:
        """(venue, symbol) pairs on the target transport now; every other symbol uses the baseline."""
        if self.state in (State.PENDING, State.ROLLED_BACK, State.ABORTED) or self.index < 0:
            return set()
        if self.state is State.COMPLETED:
            return {s for p in self.r.phases for s in p.symbols}
        return {s for p in self.r.phases[: self.index + 1] for s in p.symbols}

    def transport_for(self, venue: str, symbol: str, targets: set[tuple[str, str]]) -> str:
        return self.r.target if (venue, symbol) in targets else self.r.baseline

    # -- the job: idempotent ---------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Has the dwell elapsed and do the gates hold? Has a trigger fired? Has the cooldown passed?"""
        now = self.clock()
        self.last_evaluated = now
        if self.state is State.PENDING:
            self._start_phase(0, "rollout started")
            return
        if self.state in (*ACTIVE, State.PAUSED, State.AWAITING_APPROVAL):
            fired = self._triggers()
            if fired:
                self.failed_phase = self.phase_name
                self._record(
                    State.ROLLED_BACK,
                    "rollback: " + "; ".join(v.detail for v in fired),
                    {"triggers": [v.as_dict() for v in fired]},
                )
                self.entered_at = now
                return
        if self.state is State.ROLLED_BACK:
            if self.attempts >= self.r.recovery.max_attempts:
                self.reason = (
                    f"rolled back; {self.attempts} automatic recoveries used: waiting for `feedrunner rollout retry`"
                )
                return
            left = self.r.recovery.cooldown - (now - self.entered_at)
            if left > 0:
                self.reason = f"rolled back; recovery in {fmt_duration(round(left))}"
                return
            self.attempts += 1
            restart = 0
            if self.r.recovery.restart_from == "failed" and self.failed_phase:
                restart = [p.name for p in self.r.phases].index(self.failed_phase)
            self._enter(
                restart,
                State.RECOVERING,
                f"cooldown {fmt_duration(self.r.recovery.cooldown)} over; "
                f"recovery attempt {self.attempts} from phase "
                f"'{self.r.phases[restart].name}'",
            )
            return
        if self.state in ACTIVE:
            self._maybe_promote(now)

    def _start_phase(self, index: int, reason: str, figures: dict[str, Any] | None = None) -> None:
        phase = self.r.phases[index]
        if phase.approval == "manual":
            self._record(
                State.AWAITING_APPROVAL,
                f"phase '{phase.name}' needs approval: `feedrunner rollout promote`",
                figures or {},
            )
            return
        state = State.RECOVERING if self.state is State.RECOVERING else State.PROGRESSING
        self._enter(index, state, reason, figures)
        if index == len(self.r.phases) - 1 and self.r.phases[index].dwell is None:
            self._record(State.COMPLETED, f"last phase '{phase.name}' reached", {})

    def _maybe_promote(self, now: float) -> None:
        phase = self.r.phases[self.index]
        elapsed = now - self.entered_at
        if phase.dwell is not None and elapsed < phase.dwell:
            self.reason = f"dwelling in '{phase.name}': {fmt_duration(round(phase.dwell - elapsed))} left"
            self.verdicts = self._gates()
            return
        self.verdicts = verdicts = self._gates()
        failing = [v for v in verdicts if v.outcome == "fail"]
        unknown = [v for v in verdicts if v.outcome == "inconclusive"]
        if failing or unknown:
            self.reason = "holding: " + "; ".join(v.detail for v in failing + unknown)
            return
        figures = {"gates": [v.as_dict() for v in verdicts]}
        if self.index == len(self.r.phases) - 1:
            self._record(State.COMPLETED, f"phase '{phase.name}' held every gate for its dwell", figures)
            return
        self.state = State.PROGRESSING  # a recovery that is promoted is a rollout again
        self._start_phase(
            self.index + 1, f"promoted: '{phase.name}' held every gate for {fmt_duration(round(elapsed))}", figures
        )

    def _scope(self) -> tuple[set[str], set[tuple[str, str]]]:
        keys = self.target_symbols()
        return {v for v, _ in keys} or set(self.venues), keys

    def _judge(self, cond: Condition, reading: Reading) -> Verdict:
        if reading.value is None or reading.samples < cond.min_samples:
            if reading.covered + SLACK < cond.window:
                why = f"{fmt_duration(round(reading.covered))} of data in a {fmt_duration(cond.window)} window"
            else:
                why = f"{reading.samples} samples in {fmt_duration(cond.window)}"
            return Verdict(
                cond.name, "inconclusive", reading.value, reading.samples, f"{cond.name}: inconclusive ({why})"
            )
        ok = cond.holds(reading.value)
        return Verdict(
            cond.name,
            "pass" if ok else "fail",
            reading.value,
            reading.samples,
            f"{cond.name}: {'holds' if ok else 'fails'} at {reading.value:.4g}",
        )

    def _gates(self) -> list[Verdict]:
        venues, keys = self._scope()
        out = [self._judge(g, self.health.evaluate(g, venues, keys, self.r.target)) for g in self.r.gates]
        window = max((g.window for g in self.r.gates), default=60.0)
        silent = self.health.silent(sorted(keys), self.r.target, window)
        if silent:
            sample = ", ".join(f"{v}:{s}" for v, s in silent[:3])
            out.append(
                Verdict(
                    "data",
                    "inconclusive",
                    None,
                    0,
                    f"no data on {self.r.target} within "
                    f"{fmt_duration(window)} from {sample}" + (f" (+{len(silent) - 3})" if len(silent) > 3 else ""),
                )
            )
        return out

    def _triggers(self) -> list[Verdict]:
        venues, keys = self._scope()
        if not keys:
            return []
        verdicts = [self._judge(t, self.health.evaluate(t, venues, keys, self.r.target)) for t in self.r.rollback]
        return [v for v in verdicts if v.outcome == "pass"]  # a trigger "passes" when its condition holds

    # -- operator actions --------------------------------------------------------------------------------

    def promote(self, full: bool = False) -> None:
        if self.state in (State.COMPLETED, State.ABORTED, State.ROLLED_BACK):
            raise ActionError(
                f"cannot promote a rollout that is {self.state.value}"
                + ("; use retry" if self.state is not State.COMPLETED else "")
            )
        if full:
            self.index = len(self.r.phases) - 1
            self._record(State.COMPLETED, "promoted to the end by an operator", {})
            return
        nxt = self.index + 1
        if nxt >= len(self.r.phases):
            self._record(State.COMPLETED, "promoted past the last phase by an operator", {})
            return
        self._enter(nxt, State.PROGRESSING, f"promoted to '{self.r.phases[nxt].name}' by an operator")
        if nxt == len(self.r.phases) - 1 and self.r.phases[nxt].dwell is None:
            self._record(State.COMPLETED, f"last phase '{self.r.phases[nxt].name}' reached", {})

    def pause(self) -> None:
        if self.state not in (*ACTIVE, State.AWAITING_APPROVAL, State.PENDING):
            raise ActionError(f"cannot pause a rollout that is {self.state.value}")
        self._paused_from = self.state
        self._record(State.PAUSED, "paused by an operator: no promotion until resume (triggers still act)", {})

    def resume(self) -> None:
        if self.state is not State.PAUSED:
            raise ActionError(f"cannot resume a rollout that is {self.state.value}")
        self._record(self._paused_from, "resumed by an operator", {})

    def abort(self) -> None:
        if self.state in (State.ABORTED, State.COMPLETED):
            raise ActionError(f"cannot abort a rollout that is {self.state.value}")
        self.failed_phase = self.phase_name
        self._record(State.ABORTED, "aborted by an operator: every symbol back to the baseline", {})

    def retry(self) -> None:
        if self.state not in (State.ABORTED, State.ROLLED_BACK):
            raise ActionError(f"retry applies to an aborted or rolled-back rollout, not {self.state.value}")
        self.attempts = 0
        restart = 0
        if self.r.recovery.restart_from == "failed" and self.failed_phase in [p.name for p in self.r.phases]:
            restart = [p.name for p in self.r.phases].index(self.failed_phase)
        self.state = State.PROGRESSING
        self._start_phase(restart, f"retried by an operator from phase '{self.r.phases[restart].name}'")

    def act(self, action: str, full: bool = False) -> None:
        if action == "promote":
            self.promote(full)
        elif action in ("pause", "resume", "abort", "retry"):
            getattr(self, action)()
        else:
            raise ActionError(f"unknown action '{action}'")

    def status(self) -> dict[str, Any]:
        phase = self.r.phases[self.index] if 0 <= self.index < len(self.r.phases) else None
        now = self.clock()
        return {
            "state": self.state.value,
            "phase": self.phase_name,
            "phase_index": self.index,
            "phases": [p.name for p in self.r.phases],
            "entered_at": self.entered_at,
            "in_phase_seconds": round(now - self.entered_at, 1),
            "dwell_seconds": phase.dwell if phase else None,
            "reason": self.reason,
            "attempts": self.attempts,
            "baseline": self.r.baseline,
            "target": self.r.target,
            "symbols_on_target": len(self.target_symbols()),
            "gates": [v.as_dict() for v in self.verdicts],
            "last_evaluated": self.last_evaluated,
            "history": self.store.history(20),
        }
