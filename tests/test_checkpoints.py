"""Trade checkpoints in the state store: what one process saves, the next one loads, whole or not at all."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from feedrunner.checkpoints import TABLE, CheckpointStore


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_an_empty_store_loads_nothing_and_an_empty_save_writes_nothing(url):
    store = CheckpointStore(sa.create_engine(url))
    store.save({})
    assert store.load() == {}


def test_saved_ids_survive_the_process_and_a_save_updates_them_in_place(url):
    CheckpointStore(sa.create_engine(url)).save({("binance", "BTC/USDT"): 1050, ("futu", "HK.00700"): 7})
    store = CheckpointStore(sa.create_engine(url))  # another engine, as after a restart
    assert store.load() == {("binance", "BTC/USDT"): 1050, ("futu", "HK.00700"): 7}
    before = time.time()
    store.save({("binance", "BTC/USDT"): 1200, ("binance", "ETH/USDT"): 3})  # futu untouched
    assert store.load() == {("binance", "BTC/USDT"): 1200, ("binance", "ETH/USDT"): 3, ("futu", "HK.00700"): 7}
    with store.engine.connect() as c:
        rows = {(r.venue, r.symbol): r for r in c.execute(sa.select(TABLE))}
    assert len(rows) == 3  # one row per (venue, symbol), upserted, never appended
    assert rows[("binance", "BTC/USDT")].at >= before > rows[("futu", "HK.00700")].at


def test_a_failing_save_leaves_the_previous_checkpoints_whole(url):
    store = CheckpointStore(sa.create_engine(url))
    store.save({("binance", "BTC/USDT"): 1, ("binance", "ETH/USDT"): 2})
    with pytest.raises(OverflowError):  # SQLite refuses the second row: the first one's update is rolled back
        store.save({("binance", "BTC/USDT"): 10, ("binance", "ETH/USDT"): 2**70})
    assert store.load() == {("binance", "BTC/USDT"): 1, ("binance", "ETH/USDT"): 2}


def test_a_save_of_every_symbol_is_one_cheap_statement(url):
    store = CheckpointStore(sa.create_engine(url))
    ids = {("binance", f"S{i}/USDT"): 10**12 + i for i in range(10_000)}
    store.save(ids)
    started = time.perf_counter()
    store.save({k: n + 1 for k, n in ids.items()})
    took = time.perf_counter() - started
    assert store.load() == {k: n + 1 for k, n in ids.items()}
    assert took < 2.0, f"saving 10,000 checkpoints took {took:.2f}s"
    print(f"\n10,000 checkpoints upserted in {took * 1000:.0f} ms")


def test_postgres_upserts_the_same_way(postgres_url):
    engine = sa.create_engine(postgres_url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS trade_checkpoints"))
    try:
        store = CheckpointStore(engine)
        store.save({("binance", "BTC/USDT"): 2**62, ("futu", "HK.00700"): 7})
        store.save({("binance", "BTC/USDT"): 2**62 + 1})
        assert CheckpointStore(sa.create_engine(postgres_url)).load() == {
            ("binance", "BTC/USDT"): 2**62 + 1,
            ("futu", "HK.00700"): 7,
        }
    finally:
        with engine.begin() as c:
            c.execute(sa.text("DROP TABLE trade_checkpoints"))
        engine.dispose()
