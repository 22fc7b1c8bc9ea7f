"""The spool on its own: order, acknowledgement, restart, torn tails and its bound."""

from __future__ import annotations

from pathlib import Path

from feedrunner.spec import SpoolSpec
from feedrunner.spool import Spool


def _spool(tmp: Path, **kw) -> Spool:
    s = Spool(SpoolSpec(str(tmp / "spool"), **kw), "test")
    s.open()
    return s


def _drain(s: Spool, batch: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    while s:
        payloads, n, pos = s.read(batch)
        out += payloads
        s.ack(pos, n)
    return out


def test_records_come_back_in_order_across_segments_and_acked_segments_go(tmp_path: Path):
    s = _spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    records = [f"record {i:04d}".encode() * 20 for i in range(100)]
    for r in records:
        assert s.append(r, 2) == (True, 0)
    assert s.events == 200 and len(s.segments) > 3
    payloads, n, pos = s.read(10)
    assert payloads == records[:5] and n == 10
    assert s.events == 200  # nothing advances before the ack
    s.ack(pos, n)
    assert _drain(s) == records[5:]
    assert s.events == 0 and s.bytes == 0
    assert list((tmp_path / "spool").glob("*.seg")) == []


def test_a_restart_replays_what_was_not_acknowledged(tmp_path: Path):
    s = _spool(tmp_path, segment_bytes=4096)
    for i in range(50):
        s.append(b"x%03d" % i * 50, 1)
    _, n, pos = s.read(20)
    s.ack(pos, n)
    s.close()
    again = _spool(tmp_path, segment_bytes=4096)
    assert again.events == 30
    assert _drain(again) == [b"x%03d" % i * 50 for i in range(20, 50)]
    again.append(b"after", 1)  # positions go on from where they were
    assert _drain(again) == [b"after"]


def test_a_torn_tail_is_cut_off_and_counted(tmp_path: Path):
    s = _spool(tmp_path)
    s.append(b"whole", 3)
    s.append(b"torn-record-body", 7)
    s.close()
    seg = next((tmp_path / "spool").glob("*.seg"))
    seg.write_bytes(seg.read_bytes()[:-4])  # the crash cut the last write short
    again = _spool(tmp_path)
    assert again.torn == 7 and again.events == 3
    assert _drain(again) == [b"whole"]


def test_drop_oldest_keeps_the_newest_within_the_bound(tmp_path: Path):
    s = _spool(tmp_path, segment_bytes=4096, max_bytes=16384, overflow="drop_oldest")
    dropped = 0
    for i in range(200):
        stored, lost = s.append(b"%05d" % i + b"." * 200, 1)
        assert stored
        dropped += lost
    assert s.bytes <= 16384
    kept = _drain(s)
    assert dropped > 0 and len(kept) + dropped == 200
    assert kept[-1].startswith(b"00199") and kept == sorted(kept)


def test_drop_newest_refuses_new_batches_once_full(tmp_path: Path):
    s = _spool(tmp_path, segment_bytes=4096, max_bytes=8192, overflow="drop_newest")
    results = [s.append(b"%05d" % i + b"." * 200, 1) for i in range(100)]
    refused = [r for r in results if not r[0]]
    assert refused and all(lost == 1 for _, lost in refused)
    kept = _drain(s)
    assert kept[0].startswith(b"00000") and len(kept) == 100 - len(refused)
