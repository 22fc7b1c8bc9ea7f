"""A bus sink's on-disk spool: what the bus has not acknowledged, kept in order across outages and restarts.

Append-only segment files of records; each record is one appended batch: a 12-byte header (payload
length, event count, CRC-32 of the payload) then the payload. Positions are global byte offsets: a
segment is named by the offset of its first byte, so a position stays meaningful after the segments
before it are deleted. `acked` (persisted in the `acked` file, replaced atomically) is the position up
to which the bus has taken everything; a segment wholly before it is deleted. A crash between a delivery
and the save of `acked` replays that batch again: delivery is at least once, and every message carries
its event id so consumers (and NATS) de-duplicate.

Bounded by `max_bytes` of live records: past it `drop_oldest` deletes the oldest segment (its events
counted as dropped), `drop_newest` refuses the new batch (counted too). A record torn by a crash at the
tail of the last segment is cut off at open and counted.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from feedrunner.spec import SpoolSpec

HEADER = struct.Struct("<III")  # payload bytes, events, crc32
SUFFIX = ".seg"


@dataclass(slots=True)
class Segment:
    start: int  # global offset of its first byte
    size: int  # bytes on disk
    events: int  # events in its records from `start` (all of them, acked or not)
    counts: list[tuple[int, int]]  # (record end offset, events) in order: to count what a drop loses

    @property
    def end(self) -> int:
        return self.start + self.size


class Spool:
    def __init__(self, spec: SpoolSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.dir = Path(spec.path)
        self.segments: list[Segment] = []
        self.acked = 0
        self.events = 0  # events spooled and not acknowledged
        self.torn = 0  # events lost to a torn tail at open
        self._fh = None  # the last segment, open for appending
        self._dirty = False  # appended since the last fsync
        self._synced_at = time.monotonic()
        self.unsynced = 0  # events appended since the last fsync (not yet safe with fsync on)

    # -- open -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Read what a previous run left: segments, the acknowledged position, a torn tail cut off."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.acked = int((self.dir / "acked").read_text().strip() or 0)
        except FileNotFoundError:
            self.acked = 0
        except ValueError:
            logger.warning("spool {}: unreadable acked position, replaying every segment", self.name)
            self.acked = 0
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            try:
                start = int(path.stem)
            except ValueError:
                continue
            seg = self._scan(path, start)
            if seg.end <= self.acked or seg.size == 0:
                path.unlink(missing_ok=True)
                continue
            self.segments.append(seg)
        if self.segments:
            self.acked = max(self.acked, self.segments[0].start)
        else:
            self.acked = max(self.acked, 0)
        self.events = sum(self._live_events(s) for s in self.segments)
        if self.events:
            logger.info(
                "spool {}: {} events ({} bytes) left by the last run, replayed before new ones",
                self.name,
                self.events,
                self.bytes,
            )

    def _scan(self, path: Path, start: int) -> Segment:
        data = path.read_bytes()
        pos, counts, events = 0, [], 0
        while pos + HEADER.size <= len(data):
            length, count, crc = HEADER.unpack_from(data, pos)
            body = data[pos + HEADER.size : pos + HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            pos += HEADER.size + length
            events += count
            counts.append((start + pos, count))
        if pos < len(data):
            lost = 0
            if pos + HEADER.size <= len(data):
                lost = HEADER.unpack_from(data, pos)[1]
            self.torn += lost
            logger.warning(
                "spool {}: cut a record torn by an unclean stop off {} ({} bytes, {} events)",
                self.name,
                path.name,
                len(data) - pos,
                lost,
            )
            with path.open("r+b") as fh:
                fh.truncate(pos)
        return Segment(start, pos, events, counts)

    def _live_events(self, seg: Segment) -> int:
        return sum(n for end, n in seg.counts if end > self.acked)

    # -- state ------------------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Live bytes: written and not acknowledged."""
        if not self.segments:
            return 0
        return self.segments[-1].end - max(self.acked, self.segments[0].start)

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else self.acked

    def __bool__(self) -> bool:
        return self.events > 0

    # -- append -----------------------------------------------------------------------------------------

    def append(self, payload: bytes, events: int) -> tuple[bool, int]:
        """Add one batch: (whether it was stored, events dropped), the dropped being older segments'
        (drop_oldest) or this batch's (drop_newest, or a batch larger than the whole bound)."""
        need = HEADER.size + len(payload)
        dropped = 0
        while self.bytes + need > self.spec.max_bytes and self.events:
            if self.spec.overflow == "drop_newest":
                return False, events
            dropped += self._drop_oldest()
        if need > self.spec.max_bytes:
            return False, dropped + events
        seg = self.segments[-1] if self.segments else None
        if seg is None or self._fh is None or (seg.size + need > self.spec.segment_bytes and seg.size):
            self._roll()
            seg = self.segments[-1]
        assert self._fh is not None
        self._fh.write(HEADER.pack(len(payload), events, zlib.crc32(payload)) + payload)
        seg.size += need
        seg.events += events
        seg.counts.append((seg.end, events))
        self.events += events
        self.unsynced += events
        self._dirty = True
        if self.spec.fsync == "always":
            self.sync()
        elif self.spec.fsync == "never":
            self.unsynced = 0
        return True, dropped

    def _roll(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
        start = self.end
        path = self.dir / f"{start:020d}{SUFFIX}"
        self._fh = path.open("ab", buffering=0)  # one write per batch: a killed process loses nothing appended
        self.segments.append(Segment(start, 0, 0, []))
        self._sync_dir()

    def _drop_oldest(self) -> int:
        """Delete the oldest segment (rolling first if it is the one being written): its unacknowledged
        events are lost, and counted by the caller."""
        if len(self.segments) == 1:
            self._roll()
        seg = self.segments.pop(0)
        lost = self._live_events(seg)
        self.acked = max(self.acked, seg.end)
        self.events -= lost
        (self.dir / f"{seg.start:020d}{SUFFIX}").unlink(missing_ok=True)
        self._save_acked()
        return lost

    def sync(self) -> None:
        """Everything appended reaches the disk (fsync policy always and interval)."""
        if self._fh is None or not self._dirty:
            return
        if self.spec.fsync != "never":
            os.fsync(self._fh.fileno())
        self._dirty = False
        self.unsynced = 0
        self._synced_at = time.monotonic()

    def tick(self) -> None:
        """Called on the pipeline's flush timer: the interval fsync policy."""
        if self.spec.fsync == "interval" and time.monotonic() - self._synced_at >= self.spec.fsync_interval:
            self.sync()

    # -- replay -----------------------------------------------------------------------------------------

    def read(self, max_events: int) -> tuple[list[bytes], int, int]:
        """Records from the acknowledged position on, up to about `max_events` (at least one record):
        (payloads, events, position after them). Nothing advances until ack(position)."""
        out: list[bytes] = []
        events, pos = 0, self.acked
        for seg in self.segments:
            if seg.end <= pos:
                continue
            with (self.dir / f"{seg.start:020d}{SUFFIX}").open("rb") as fh:
                offset = max(pos, seg.start) - seg.start
                fh.seek(offset)
                data = fh.read(seg.size - offset)
            at = 0
            while at + HEADER.size <= len(data):
                length, count, _ = HEADER.unpack_from(data, at)
                out.append(data[at + HEADER.size : at + HEADER.size + length])
                at += HEADER.size + length
                events += count
                if events >= max_events:
                    return out, events, seg.start + offset + at
            pos = seg.end
        return out, events, pos

    def ack(self, position: int, events: int) -> None:
        """The bus took everything before `position`: forget it (whole segments deleted)."""
        if position <= self.acked:
            return  # a drop got there first
        self.acked = position
        self.events = max(0, self.events - events)
        while self.segments and self.segments[0].end <= self.acked and len(self.segments) > 1:
            seg = self.segments.pop(0)
            (self.dir / f"{seg.start:020d}{SUFFIX}").unlink(missing_ok=True)
        if len(self.segments) == 1 and self.segments[0].end <= self.acked:
            # Everything acknowledged: start afresh rather than keep a fully-read segment growing.
            seg = self.segments.pop()
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            (self.dir / f"{seg.start:020d}{SUFFIX}").unlink(missing_ok=True)
            self.events = 0
        self._save_acked()

    def _save_acked(self) -> None:
        tmp = self.dir / "acked.tmp"
        with tmp.open("w") as fh:
            fh.write(str(self.acked))
            if self.spec.fsync == "always":
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "acked")

    def _sync_dir(self) -> None:
        if self.spec.fsync == "never":
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None
