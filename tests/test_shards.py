"""Three `feedrunner run` processes as the shards of one deployment: one feeds.yaml, the shard index from
the environment (as a StatefulSet ordinal gives it), one throwaway PostgreSQL, one Binance simulator.

Every symbol is served by exactly one shard; one shard leads the rollout; kill -9 the leader mid-phase
and a standby leads within the lease, in the same phase with the same entered_at; a shard that is down
holds the promotion, and once it is back the promotions reach every shard."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import http_get, spawn
from helpers import wait_for as until
from runproc import Run

from feedrunner.sharding import owner
from feedrunner.statelock import PG_LOCK

SYMBOLS = [f"S{i:02d}/USDT" for i in range(12)]

FEEDS = """\
version: 1
environment: live
shard: {{index: "${{SHARD_INDEX}}", count: 3}}
coordination: {{lease: 3s, poll: 250ms}}
defaults: {{poll_interval: 1s, stale_after: {{default: 5s, trades: 3s}}}}
venues:
  binance:
    adapter: ccxt
    exchange: binance
    channels: [trades]
    symbols: [{symbols}]
    endpoints: {{rest: "{rest}", ws: "{ws}"}}
rollout:
  baseline: polling
  target: websocket
  phases:
    - {{name: one, symbols: [{phase_one}], dwell: {dwell}, approval: manual}}
    - {{name: all, symbols: all}}
  gates: [{{metric: error_rate, below: 50%, window: 1s}}]
health: {{interval: 250ms}}
sinks: [{{type: jsonl, path: "{out}/{{shard}}/{{symbol}}.jsonl", flush_interval: 200ms}}]
server: {{listen: "127.0.0.1:0"}}
state: {{url: "{url}"}}
"""


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """A database of its own on the session's PostgreSQL: the shards' tables and locks start empty."""
    name = "shards_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[str, str]]:
    proc = spawn(
        tmp_path, "sim", "binance", "--port", "0", "--rate", "10", "--symbols", ",".join(SYMBOLS),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        found = re.search(r"rest: (\S+), ws: (\S+)\}", proc.stdout.readline())
        assert found, "simulator printed no endpoints"
        yield found.group(1), found.group(2)
    finally:
        proc.kill()
        proc.wait()


def status(run: Run) -> dict[str, Any]:
    return http_get(run.url + "/status")


def served(runs: dict[int, Run]) -> dict[str, int]:
    """symbol -> the shard serving it; a symbol served twice fails here."""
    out: dict[str, int] = {}
    for index, run in runs.items():
        for symbol in status(run)["venues"].get("binance", {}).get("symbols", {}):
            assert symbol not in out, f"{symbol} served by shards {out[symbol]} and {index}"
            out[symbol] = index
    return out


def leader(runs: dict[int, Run]) -> int | None:
    leading = [i for i, r in runs.items() if status(r)["leader"]]
    assert len(leading) <= 1, f"shards {leading} all lead"
    return leading[0] if leading else None


def test_three_shards_one_leader_failover_in_phase(tmp_path: Path, database: str, sim: tuple[str, str]):
    rest, ws = sim
    # Phase one holds one symbol of each shard: whichever shard leads, losing it silences part of the phase.
    one = [next(s for s in SYMBOLS if owner(f"binance/{s}", 3) == i) for i in range(3)]
    (tmp_path / "feeds.yaml").write_text(
        FEEDS.format(
            symbols=", ".join(SYMBOLS),
            phase_one=", ".join(f"binance:{s}" for s in one),
            rest=rest,
            ws=ws,
            dwell="6s",
            out=tmp_path / "out",
            url=database,
        )
    )
    runs: dict[int, Run] = {}
    spare: list[Run] = []
    try:
        for i in range(3):
            runs[i] = Run(tmp_path, env={"SHARD_INDEX": str(i)}, log=f"shard{i}.log")
        assert sorted(served(runs)) == SYMBOLS  # every symbol, each by exactly one shard
        first = until(lambda: leader(runs) is not None, 15, "a leader")
        first = leader(runs)
        assert first is not None

        # The same index twice is refused: it would deliver the same symbols twice.
        twin = subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", "run", "feeds.yaml"], cwd=tmp_path,
            env={**os.environ, "SHARD_INDEX": str(first)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert twin.returncode == 69 and f"running shard {first}" in twin.stderr, twin.stderr[-2000:]
        # Nor does a runner of another shard count, or an unsharded one, join: they would serve our symbols.
        text = (tmp_path / "feeds.yaml").read_text()
        for name, body in (
            ("count2.yaml", text.replace("count: 3", "count: 2")),
            ("single.yaml", text.replace('shard: {index: "${SHARD_INDEX}", count: 3}', "")),
        ):
            (tmp_path / name).write_text(body)
            other = subprocess.run(
                [sys.executable, "-m", "feedrunner.cli", "run", name], cwd=tmp_path,
                env={**os.environ, "SHARD_INDEX": "1"}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert other.returncode == 69, other.stderr[-2000:]
            assert ("same count" if name == "count2.yaml" else "held by another runner") in other.stderr

        # A standby cannot steer; it names the leader, and `feedrunner status` shows the shards.
        standby = next(i for i in runs if i != first)
        shown = subprocess.run(
            [sys.executable, "-m", "feedrunner.cli", "status", "--url", runs[standby].url],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        assert f"shards: 3 in the store, leader: shard {first}" in shown, shown
        code, body = runs[standby].cli("rollout", "pause")
        assert code != 0 and body["leader"]["shard"] == first

        assert status(runs[first])["rollout"]["state"] == "awaiting_approval"
        code, body = runs[first].cli("rollout", "promote")  # the leader acts
        assert code == 0 and body["phase"] == "one", body
        in_one = body

        def phase_one_everywhere() -> bool:  # the phase reached every shard: its phase-one symbol streams
            for i, run in runs.items():
                st = status(run)
                rows = st["venues"]["binance"]["symbols"]
                if st["rollout"]["phase"] != "one" or rows[one[i]]["transport"] != "websocket":
                    return False
                if any(row["transport"] != "polling" for s, row in rows.items() if s not in one):
                    return False
            return True

        until(phase_one_everywhere, 10, "phase one on every shard")

        runs[first].proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        runs[first].proc.wait()
        runs[first].log.close()
        dead = runs.pop(first)

        def new_leader() -> dict[str, Any] | None:
            for run in runs.values():
                st = status(run)
                if st["leader"] and (st["rollout"]["last_evaluated"] or 0) > killed_at:
                    return st
            return None

        st = until(new_leader, 3 + 2, "a standby to lead within the lease")
        took = st["rollout"]["last_evaluated"] - killed_at
        assert took < 3.0, took
        assert st["rollout"]["phase"] == "one" and st["rollout"]["entered_at"] == in_one["entered_at"]

        # The dead shard's symbols are silent: the promotion waits for them, past the dwell.
        time.sleep(max(0.0, in_one["entered_at"] + 6 + 1.5 - time.time()))
        assert status(next(iter(runs.values())))["rollout"]["phase"] == "one"
        back = Run(tmp_path, env={"SHARD_INDEX": str(first)}, log=f"shard{first}-again.log")
        spare.append(dead)
        runs[first] = back
        assert not status(back)["leader"]  # it comes back as a standby

        def completed() -> bool:
            return all(status(r)["rollout"]["state"] == "completed" for r in runs.values())

        until(completed, 30, "the rollout completed on every shard")
        for run in runs.values():
            for symbol, row in status(run)["venues"]["binance"]["symbols"].items():
                assert row["transport"] == "websocket", (symbol, row)
        assert sorted(served(runs)) == SYMBOLS
        history = status(runs[leader(runs)])["rollout"]["history"]
        entered = [h for h in history if h["phase"] == "one" and h["to_state"] == "progressing"]
        assert len(entered) == 1 and history[-1]["to_state"] == "completed"  # phase one entered once

        # The leader's database session ends under it (an admin, a failover of the database): it stands
        # by at once, and one shard leads again.
        was = leader(runs)
        assert was is not None
        engine = sa.create_engine(database)
        with engine.connect() as c:
            ended = c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid = :a AND objid = :b AND granted"
                ),
                {"a": PG_LOCK[0], "b": PG_LOCK[1]},
            ).all()
        engine.dispose()
        assert len(ended) == 1
        until(lambda: "rollout leader lock lost" in runs[was].text(), 10, "the leader to notice")
        until(lambda: leader(runs) is not None, 10, "a leader again")
        assert sorted(served(runs)) == SYMBOLS
    finally:
        for run in runs.values():
            assert run.stop() == 0, run.text()[-3000:]


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_shards_starting_at_once_on_an_empty_store_all_get_their_tables(store, tmp_path: Path, request):
    from concurrent.futures import ThreadPoolExecutor

    from feedrunner.checkpoints import CheckpointStore
    from feedrunner.coordination import Registry
    from feedrunner.rollout import Store, engine_for

    url = request.getfixturevalue("database") if store == "postgresql" else f"sqlite:///{tmp_path}/state.db"
    engines = [engine_for(url) for _ in range(6)]
    barrier = __import__("threading").Barrier(len(engines))

    def start(engine: sa.Engine) -> None:
        barrier.wait()
        Store(engine), CheckpointStore(engine), Registry(engine)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            for f in [pool.submit(start, e) for e in engines]:
                f.result()  # none raised
    finally:
        for e in engines:
            e.dispose()
