"""The rollout state machine on a fake clock and programmed health readings: pure logic, no sockets."""

from __future__ import annotations

import pytest
from helpers import Clock

from feedrunner.health import Reading
from feedrunner.rollout import ActionError, Controller, State, Store, engine_for
from feedrunner.spec import check_text

SPEC = """\
version: 1
venues:
  binance: {adapter: ccxt, exchange: binance, symbols: [A/USDT, B/USDT, C/USDT, D/USDT]}
rollout:
  phases:
    - {name: one, symbols: [binance:A/USDT], dwell: 10s}
    - {name: two, symbols: {venue: binance, first: 2}, dwell: 10s}
    - {name: three, symbols: {venue: binance, first: 3}, dwell: 10s, approval: manual}
    - {name: all, symbols: all}
  gates: [{metric: latency_p95, below: 500ms, window: 5s}]
  rollback: [{metric: error_rate, above: 5%, window: 5s}]
  recovery: {cooldown: 30s, restart_from: RESTART, max_attempts: 2}
"""


class FakeHealth:
    """Readings by metric; symbols listed in `silent` have no data (inconclusive)."""

    def __init__(self) -> None:
        self.values: dict[str, Reading] = {"latency_p95": Reading(0.1, 100), "error_rate": Reading(0.0, 100)}
        self.silent_keys: set[tuple[str, str]] = set()

    def evaluate(self, cond, venues, keys, transport):
        return self.values[cond.metric]

    def silent(self, keys, transport, window):
        return [k for k in keys if k in self.silent_keys]


def make(tmp_path, restart="first", changes=None):
    spec, problems = check_text(SPEC.replace("RESTART", restart), "t.yaml", {})
    assert spec is not None, problems
    clock, health = Clock(), FakeHealth()
    store = Store(engine_for(f"sqlite:///{tmp_path}/state.db"))
    c = Controller(
        spec, store, health, clock=clock, on_change=(lambda: changes.append(1)) if changes is not None else None
    )
    return c, clock, health, store, spec


def names(c):
    return sorted(s for _, s in c.target_symbols())


def test_promotes_phase_by_phase_only_after_dwell_and_gates(tmp_path):
    changes = []
    c, clock, _, _, _ = make(tmp_path, changes=changes)
    assert c.state is State.PENDING and c.target_symbols() == set()
    c.evaluate()
    assert (c.state, c.phase_name, names(c)) == (State.PROGRESSING, "one", ["A/USDT"])
    clock.now += 9
    c.evaluate()
    assert c.phase_name == "one" and "dwelling in 'one'" in c.reason
    clock.now += 1
    c.evaluate()
    assert (c.phase_name, names(c)) == ("two", ["A/USDT", "B/USDT"])
    c.evaluate()  # idempotent: the job running twice promotes nothing twice
    assert c.phase_name == "two"
    clock.now += 10
    c.evaluate()
    assert c.state is State.AWAITING_APPROVAL and c.phase_name == "two" and "needs approval" in c.reason
    clock.now += 100
    c.evaluate()
    assert c.state is State.AWAITING_APPROVAL  # no promotion without an operator
    c.promote()
    assert (c.state, c.phase_name) == (State.PROGRESSING, "three")
    clock.now += 10
    c.evaluate()
    assert c.state is State.COMPLETED and len(c.target_symbols()) == 4
    assert changes  # the runner was told to reconcile


def test_failing_gate_holds_and_says_why(tmp_path):
    c, clock, health, _, _ = make(tmp_path)
    c.evaluate()
    health.values["latency_p95"] = Reading(0.9, 100)
    clock.now += 20
    c.evaluate()
    assert c.phase_name == "one" and c.reason == "holding: latency_p95 below 500ms: fails at 0.9"
    health.values["latency_p95"] = Reading(0.2, 100)
    c.evaluate()
    assert c.phase_name == "two"


def test_no_data_is_inconclusive_never_a_pass(tmp_path):
    c, clock, health, _, _ = make(tmp_path)
    c.evaluate()
    health.values["latency_p95"] = Reading(None, 0)
    clock.now += 20
    c.evaluate()
    assert c.phase_name == "one" and "inconclusive (0 samples" in c.reason
    health.values["latency_p95"] = Reading(0.1, 50)
    health.silent_keys = {("binance", "A/USDT")}
    c.evaluate()
    assert c.phase_name == "one" and "no data on websocket within 5s from binance:A/USDT" in c.reason
    health.silent_keys = set()
    c.evaluate()
    assert c.phase_name == "two"


@pytest.mark.parametrize(("restart", "expected"), [("first", "one"), ("failed", "two")])
def test_trigger_rolls_back_at_once_then_recovers_after_cooldown(tmp_path, restart, expected):
    c, clock, health, store, _ = make(tmp_path, restart=restart)
    c.evaluate()
    clock.now += 10
    c.evaluate()
    assert c.phase_name == "two"
    health.values["error_rate"] = Reading(0.2, 100)
    c.evaluate()
    assert c.state is State.ROLLED_BACK and c.target_symbols() == set()
    assert "rollback: error_rate above 5%: holds at 0.2" in c.reason
    health.values["error_rate"] = Reading(0.0, 100)
    clock.now += 29
    c.evaluate()
    assert c.state is State.ROLLED_BACK and "recovery in 1s" in c.reason
    clock.now += 1
    c.evaluate()
    assert (c.state, c.phase_name) == (State.RECOVERING, expected)
    assert c.attempts == 1
    last = store.history()[-2]
    assert last["to_state"] == "rolled_back" and last["figures"]["triggers"][0]["value"] == 0.2


def test_recovery_attempts_are_bounded(tmp_path):
    c, clock, health, _, _ = make(tmp_path)
    c.evaluate()
    for _ in range(2):
        health.values["error_rate"] = Reading(0.5, 10)
        c.evaluate()
        assert c.state is State.ROLLED_BACK
        health.values["error_rate"] = Reading(0.0, 10)
        clock.now += 30
        c.evaluate()
        assert c.state is State.RECOVERING
    health.values["error_rate"] = Reading(0.5, 10)
    c.evaluate()
    clock.now += 1000
    c.evaluate()
    assert c.state is State.ROLLED_BACK and "waiting for `feedrunner rollout retry`" in c.reason
    c.retry()
    assert (c.state, c.phase_name, c.attempts) == (State.PROGRESSING, "one", 0)


def test_operator_actions(tmp_path):
    c, clock, health, _, _ = make(tmp_path)
    c.evaluate()
    c.pause()
    clock.now += 100
    c.evaluate()
    assert c.state is State.PAUSED and c.phase_name == "one"  # paused: no promotion
    health.values["error_rate"] = Reading(0.5, 10)
    c.evaluate()
    assert c.state is State.ROLLED_BACK  # ...but triggers still protect
    with pytest.raises(ActionError):
        c.resume()
    c.retry()
    health.values["error_rate"] = Reading(0.0, 10)
    c.pause()
    c.resume()
    assert c.state is State.PROGRESSING
    c.abort()
    assert c.state is State.ABORTED and c.target_symbols() == set()
    with pytest.raises(ActionError):
        c.promote()
    c.retry()
    c.promote(full=True)
    assert c.state is State.COMPLETED and len(c.target_symbols()) == 4
    with pytest.raises(ActionError, match="cannot abort a rollout that is completed"):
        c.abort()


def test_restart_resumes_same_phase_with_original_dwell(tmp_path):
    c, clock, health, store, spec = make(tmp_path)
    c.evaluate()
    clock.now += 10
    c.evaluate()
    entered = c.entered_at
    clock.now += 6
    again = Controller(spec, store, health, clock=clock)  # a restart: same store, new process
    assert (again.state, again.phase_name, again.entered_at) == (State.PROGRESSING, "two", entered)
    clock.now += 4
    again.evaluate()
    assert again.phase_name == "two" and again.state is State.AWAITING_APPROVAL  # dwell counted from entry
    assert [h["to_state"] for h in store.history()].count("progressing") == 2  # nothing repeated


def test_edited_phase_list_is_matched_by_name(tmp_path):
    c, clock, health, store, _ = make(tmp_path)
    c.evaluate()
    clock.now += 10
    c.evaluate()
    assert c.phase_name == "two"
    moved, _ = check_text(
        SPEC.replace("RESTART", "first").replace(
            "    - {name: one, symbols: [binance:A/USDT], dwell: 10s}\n",
            "    - {name: zero, symbols: [binance:A/USDT], dwell: 10s}\n"
            "    - {name: one, symbols: [binance:A/USDT], dwell: 10s}\n",
        ),
        "t.yaml",
        {},
    )
    again = Controller(moved, store, health, clock=clock)
    assert (again.phase_name, again.index) == ("two", 2)
    gone, _ = check_text(SPEC.replace("RESTART", "first").replace("name: two", "name: deux"), "t.yaml", {})
    third = Controller(gone, store, health, clock=clock)
    assert (third.phase_name, third.state) == ("one", State.PROGRESSING)
    assert "phase 'two' is no longer in feeds.yaml; restarting from the first phase 'one'" in third.reason
