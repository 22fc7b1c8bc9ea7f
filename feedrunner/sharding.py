"""Which shard serves what: rendezvous (highest random weight) hashing over the units of each venue.

A ccxt venue is spread symbol by symbol: each (venue, symbol) goes to the shard with the highest hash of
(unit, shard index), so adding a shard moves only the units that now hash highest there, about 1/N of
them, and adding or removing a symbol moves nothing else. A venue held by one session (an IB client id,
one FutuOpenD connection) is one unit and stays whole on one shard. Every process computes the same
answer from feeds.yaml alone: no assignment is stored or negotiated.
"""

from __future__ import annotations

import dataclasses
import hashlib

from feedrunner.spec import Shard, Sink, Spec, Venue

WHOLE_VENUES = frozenset({"ib", "futu"})  # one session per venue: never split


def _weight(unit: str, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{unit}\x00{index}".encode(), digest_size=8).digest(), "big")


def owner(unit: str, count: int) -> int:
    """The shard (0-based) serving `unit` among `count` shards."""
    if count <= 1:
        return 0
    return max(range(count), key=lambda i: _weight(unit, i))


def unit_of(venue: Venue, symbol: str) -> str:
    return venue.name if venue.adapter in WHOLE_VENUES else f"{venue.name}/{symbol}"


def owner_of(venue: Venue, symbol: str, count: int) -> int:
    return owner(unit_of(venue, symbol), count)


def assignment(spec: Spec, count: int) -> dict[tuple[str, str], int]:
    """(venue, symbol) -> the shard serving it, for every enabled venue."""
    return {(v.name, s): owner_of(v, s, count) for v in spec.venues if v.enabled for s in v.symbols}


def _sink_for(sink: Sink, shard: Shard) -> Sink:
    """{shard} in a file sink's path becomes this shard's index, so workers on one host write apart; a
    bus sink's spool gets a directory per shard ({shard} where its path names it, else shard-<i> in it),
    since two processes replaying one spool would send its events twice."""
    index = str(shard.index)
    path = sink.path.replace("{shard}", index) if sink.path else sink.path
    parquet, delivery = sink.parquet, sink.delivery
    if parquet is not None:
        parquet = dataclasses.replace(parquet, path=parquet.path.replace("{shard}", index))
    if delivery is not None and shard.count > 1:
        spool = delivery.spool.path
        spool = spool.replace("{shard}", index) if "{shard}" in spool else f"{spool.rstrip('/')}/shard-{index}"
        delivery = dataclasses.replace(delivery, spool=dataclasses.replace(delivery.spool, path=spool))
    return dataclasses.replace(sink, path=path, parquet=parquet, delivery=delivery)


def own_share(spec: Spec, shard: Shard | None = None) -> Spec:
    """The spec this shard runs: its symbols of each venue (venues left with none are dropped), its
    sink paths. The rollout keeps every phase whole: which symbols are on the target is one decision
    for the whole deployment."""
    shard = shard or spec.shard
    venues = []
    for v in spec.venues:
        mine = tuple(s for s in v.symbols if owner_of(v, s, shard.count) == shard.index)
        if mine or (not v.symbols and shard.index == owner(v.name, shard.count)):
            venues.append(v if mine == v.symbols else dataclasses.replace(v, symbols=mine))
    sinks = tuple(_sink_for(s, shard) for s in spec.sinks)
    return dataclasses.replace(spec, venues=tuple(venues), sinks=sinks, shard=shard)


def parse_shard(text: str) -> Shard:
    """`i/N` as given to --shard; ValueError with the reason otherwise."""
    index_text, sep, count_text = text.partition("/")
    if not sep or not index_text.isdigit() or not count_text.isdigit():
        raise ValueError(f"--shard takes INDEX/COUNT, e.g. 0/3 (got {text!r})")
    index, count = int(index_text), int(count_text)
    if count < 1 or index >= count:
        raise ValueError(f"--shard {text}: the index must be below the count (indexes start at 0)")
    return Shard(index, count)
